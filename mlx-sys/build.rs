//! Builds the mlx-c 0.7.0 C API against a prebuilt libmlx and generates its
//! Rust bindings.
//!
//! Upstream mlx-sys builds MLX itself with CMake (fetching it from GitHub) and
//! links Apple frameworks unconditionally. Here MLX comes prebuilt from a wheel
//! (`MLX_DIR`, see docs/mlx.md), so this script only has to:
//!
//! 1. find that MLX (`MLX_DIR`, else the cache `dev/mlx.sh` fills);
//! 2. find the genuine mlx-c 0.7.0 sources, shipped inside the crates.io
//!    `mlx-sys` 0.7.0 package, by asking cargo to resolve a throwaway manifest
//!    (`MLX_C_DIR` overrides);
//! 3. compile mlx-c's `mlx/c/*.cpp` with the `cc` crate and link `libmlx`;
//! 4. compile Tandem's own additions to that API (`shim/`, see
//!    `shim/tandem_mlx_shim.h`) into the same library;
//! 5. run bindgen over mlx-c's headers and the shim's.
//!
//! Everything it writes goes to `OUT_DIR`.

use std::env;
use std::ffi::OsStr;
use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The upstream package whose sources (`src/mlx-c`) we compile.
const UPSTREAM_VERSION: &str = "0.7.0";
/// The wheel `dev/mlx.sh` unpacks when `MLX_DIR` is not set.
const DEFAULT_WHEEL: &str = "mlx-cpu-0.32.2";

type BuildResult<T> = Result<T, String>;

fn main() {
    if let Err(message) = run() {
        eprintln!("\nerror: mlx-sys build failed: {message}\n");
        std::process::exit(1);
    }
}

fn run() -> BuildResult<()> {
    for var in ["MLX_DIR", "MLX_C_DIR", "TANDEM_CACHE_DIR", "HOME"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=compat");
    println!("cargo::rerun-if-changed=shim");

    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let target_os = env_var("CARGO_CFG_TARGET_OS")?;
    let compat_header = manifest_dir.join("compat").join("tandem_mlx_compat.h");
    let shim_dir = manifest_dir.join("shim");

    let mlx_dir = locate_mlx()?;
    let mlx_c = locate_mlx_c(&out_dir)?;

    compile_mlx_c(&mlx_c, &shim_dir, &mlx_dir, &compat_header)?;
    link_mlx(&mlx_dir, &target_os);
    generate_bindings(&mlx_c, &shim_dir, &compat_header, &out_dir)
}

fn env_var(name: &str) -> BuildResult<String> {
    env::var(name).map_err(|e| format!("environment variable {name}: {e}"))
}

fn describe(path: &Path, problem: impl Display) -> String {
    format!("{}: {problem}", path.display())
}

/// The `mlx` directory of an MLX wheel: `lib/libmlx.{so,dylib}` and `include/mlx/`.
fn locate_mlx() -> BuildResult<PathBuf> {
    let dir = match env::var_os("MLX_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = match env::var_os("TANDEM_CACHE_DIR").filter(|v| !v.is_empty()) {
                Some(cache) => PathBuf::from(cache),
                None => match env::var_os("HOME") {
                    Some(home) => Path::new(&home).join(".cache").join("tandem"),
                    None => return Err(no_mlx_message("HOME is not set")),
                },
            };
            let default = cache.join(DEFAULT_WHEEL).join("mlx");
            if !default.is_dir() {
                return Err(no_mlx_message(&format!(
                    "MLX_DIR is not set and {} does not exist",
                    default.display()
                )));
            }
            default
        }
    };
    // A wheel replaced in place (same MLX_DIR) must relink.
    println!("cargo::rerun-if-changed={}", dir.join("lib").display());
    if !dir.join("include").join("mlx").join("mlx.h").is_file() {
        return Err(describe(
            &dir,
            "no include/mlx/mlx.h here; MLX_DIR must be a wheel's `mlx` directory",
        ));
    }
    let has_lib = ["libmlx.so", "libmlx.dylib"]
        .iter()
        .any(|name| dir.join("lib").join(name).is_file());
    if !has_lib {
        return Err(describe(&dir, "no lib/libmlx.so or lib/libmlx.dylib here"));
    }
    Ok(dir)
}

fn no_mlx_message(why: &str) -> String {
    format!(
        "no MLX found ({why}).\n\
         Run `dev/mlx.sh` to fetch the mlx-cpu {} wheel into ~/.cache/tandem, or set \
         MLX_DIR to the `mlx` directory of an MLX wheel (it holds lib/ and include/), \
         e.g. `eval \"$(dev/mlx.sh env)\"`.",
        DEFAULT_WHEEL.trim_start_matches("mlx-cpu-")
    )
}

/// The mlx-c source tree (the directory holding `mlx/c/`).
fn locate_mlx_c(out_dir: &Path) -> BuildResult<PathBuf> {
    let dir = match env::var_os("MLX_C_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            println!("cargo::rerun-if-changed={}", dir.display());
            dir
        }
        None => upstream_package_dir(out_dir)?.join("src").join("mlx-c"),
    };
    if !dir.join("mlx").join("c").join("mlx.h").is_file() {
        return Err(describe(
            &dir,
            "no mlx/c/mlx.h here; not an mlx-c source tree",
        ));
    }
    Ok(dir)
}

/// Lets cargo download (or find in its cache) the crates.io `mlx-sys` package and
/// returns its directory. The throwaway manifest is a workspace of its own, so
/// this workspace's `[patch]` (which points back at us) does not apply to it.
fn upstream_package_dir(out_dir: &Path) -> BuildResult<PathBuf> {
    let probe = out_dir.join("upstream-mlx-sys-probe");
    fs::create_dir_all(&probe).map_err(|e| describe(&probe, e))?;
    let manifest = probe.join("Cargo.toml");
    let manifest_text = format!(
        "[package]\n\
         name = \"tandem-mlx-c-probe\"\n\
         version = \"0.0.0\"\n\
         edition = \"2021\"\n\
         publish = false\n\n\
         [lib]\n\
         path = \"lib.rs\"\n\n\
         [dependencies]\n\
         mlx-sys = {{ version = \"={UPSTREAM_VERSION}\", default-features = false }}\n\n\
         [workspace]\n"
    );
    fs::write(&manifest, manifest_text).map_err(|e| describe(&manifest, e))?;
    fs::write(probe.join("lib.rs"), "").map_err(|e| describe(&probe, e))?;

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Offline first: after the first build the package sits in cargo's cache, and
    // a build should not need the network for it again.
    let mut failures = Vec::new();
    for offline in [true, false] {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest);
        if offline {
            cmd.arg("--offline");
        }
        let output = cmd
            .output()
            .map_err(|e| format!("running `{} metadata`: {e}", cargo.to_string_lossy()))?;
        if output.status.success() {
            return package_dir_from_metadata(&output.stdout);
        }
        failures.push(format!(
            "cargo metadata{}: {}",
            if offline { " --offline" } else { "" },
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Err(format!(
        "could not fetch the crates.io mlx-sys {UPSTREAM_VERSION} package for its mlx-c \
         sources (set MLX_C_DIR to an mlx-c 0.7.0 tree to skip this):\n{}",
        failures.join("\n")
    ))
}

fn package_dir_from_metadata(json: &[u8]) -> BuildResult<PathBuf> {
    let metadata: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("parsing cargo metadata: {e}"))?;
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata has no `packages` list")?;
    let manifest_path = packages
        .iter()
        .find(|p| p["name"] == "mlx-sys" && p["version"] == UPSTREAM_VERSION)
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or_else(|| format!("cargo metadata does not list mlx-sys {UPSTREAM_VERSION}"))?;
    Path::new(manifest_path)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("odd manifest path {manifest_path}"))
}

/// Files in `dir` with extension `ext`, sorted so builds are reproducible.
fn files_with_extension(dir: &Path, ext: &str) -> BuildResult<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| describe(dir, e))? {
        let path = entry.map_err(|e| describe(dir, e))?.path();
        if path.extension() == Some(OsStr::new(ext)) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(describe(dir, format!("no .{ext} files")));
    }
    Ok(files)
}

fn compile_mlx_c(
    mlx_c: &Path,
    shim_dir: &Path,
    mlx_dir: &Path,
    compat_header: &Path,
) -> BuildResult<()> {
    let mut sources = files_with_extension(&mlx_c.join("mlx").join("c"), "cpp")?;
    sources.extend(files_with_extension(shim_dir, "cpp")?);
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include(mlx_c)
        .include(shim_dir)
        .include(mlx_dir.join("include"))
        .flag("-include")
        .flag(compat_header.as_os_str())
        // Third-party code: its warnings are not ours to fix, and cargo would
        // replay each one as a build warning.
        .warnings(false)
        .flag("-w")
        .files(&sources)
        .try_compile("mlxc")
        .map_err(|e| format!("compiling mlx-c: {e}"))
}

fn link_mlx(mlx_dir: &Path, target_os: &str) {
    let lib_dir = mlx_dir.join("lib");
    // After `try_compile`, which asked for the static mlxc and the C++ runtime:
    // mlxc must come before the library that resolves its symbols.
    println!("cargo::rustc-link-search=native={}", lib_dir.display());
    println!("cargo::rustc-link-lib=dylib=mlx");
    if target_os == "macos" {
        // The macOS `mlx` wheel's libmlx is built with Metal and Accelerate.
        for framework in ["Foundation", "Metal", "Accelerate"] {
            println!("cargo::rustc-link-lib=framework={framework}");
        }
    }
    // Dependents read this as DEP_MLX_LIBDIR to give their binaries an rpath;
    // link arguments do not travel from a -sys crate to the final link.
    println!("cargo::metadata=libdir={}", lib_dir.display());
    println!(
        "cargo::metadata=include={}",
        mlx_dir.join("include").display()
    );
    // This crate's own tests and examples.
    println!("cargo::rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}

fn generate_bindings(
    mlx_c: &Path,
    shim_dir: &Path,
    compat_header: &Path,
    out_dir: &Path,
) -> BuildResult<()> {
    let mut headers = files_with_extension(&mlx_c.join("mlx").join("c"), "h")?;
    headers.extend(files_with_extension(shim_dir, "h")?);
    let target = bindgen::RustTarget::stable(85, 0).map_err(|e| format!("bindgen target: {e}"))?;
    let mut builder = bindgen::Builder::default()
        .rust_target(target)
        .rust_edition(bindgen::RustEdition::Edition2024)
        .clang_arg(format!("-I{}", mlx_c.display()))
        .clang_arg("-include")
        .clang_arg(compat_header.display().to_string())
        // lib.rs defines these the way mlx-rs expects on every platform.
        .blocklist_type("float16_t")
        .blocklist_type("bfloat16_t")
        .blocklist_type("__BindgenFloat16")
        // Their `c_ulong` signatures trip rustc's
        // suspicious_runtime_symbol_definitions lint; nothing here needs them.
        .blocklist_function("malloc")
        .blocklist_function("realloc")
        .wrap_unsafe_ops(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for header in &headers {
        builder = builder.header(header.display().to_string());
    }
    let bindings = builder
        .generate()
        .map_err(|e| format!("bindgen over {}: {e}", mlx_c.display()))?;
    let out = out_dir.join("bindings.rs");
    bindings.write_to_file(&out).map_err(|e| describe(&out, e))
}
