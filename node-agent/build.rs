//! Gives this package's binaries and tests an rpath to libmlx, so they run
//! without LD_LIBRARY_PATH.
//!
//! mlx-sys links `libmlx` from `$MLX_DIR/lib` and publishes that directory as
//! `DEP_MLX_LIBDIR`; link arguments of a -sys crate do not reach the final link,
//! so each package that produces executables adds the rpath itself. Packaged
//! builds should ship an `$ORIGIN`-relative rpath instead (docs/mlx.md).
//!
//! It also generates the gRPC code of `proto/control.proto` (rank 0's control
//! service) into `OUT_DIR`, with the protoc that `protoc-bin-vendored` ships,
//! so a build needs no protoc installed.
//!
//! Finally it tells the agent which MLX it links (for its LlamaNode):
//! `TANDEM_MLX_VERSION` from `include/mlx/version.h`, and `TANDEM_MLX_CUDA`
//! when the MLX comes from a CUDA wheel.

fn main() {
    compile_control_proto();
    println!("cargo::rerun-if-env-changed=DEP_MLX_LIBDIR");
    match std::env::var("DEP_MLX_LIBDIR") {
        Ok(dir) => {
            println!("cargo::rustc-link-arg=-Wl,-rpath,{dir}");
            describe_mlx(std::path::Path::new(&dir));
        }
        Err(_) => {
            eprintln!("error: DEP_MLX_LIBDIR is not set; mlx-sys should have published it");
            std::process::exit(1);
        }
    }
}

/// Generates `tandem.control.v1` (messages, client and server) into OUT_DIR.
fn compile_control_proto() {
    let protoc = match protoc_bin_vendored::protoc_bin_path() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("error: no vendored protoc for this platform: {e}");
            std::process::exit(1);
        }
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    if let Err(e) = tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/control.proto"],
        &["proto"],
    ) {
        eprintln!("error: compiling proto/control.proto: {e}");
        std::process::exit(1);
    }
}

/// Sets `TANDEM_MLX_VERSION` and `TANDEM_MLX_CUDA` for the MLX in `libdir`
/// (`<wheel>/mlx/lib`); says nothing when they cannot be found.
fn describe_mlx(libdir: &std::path::Path) {
    let Some(mlx_dir) = libdir.parent() else {
        return;
    };
    let header = mlx_dir.join("include/mlx/version.h");
    println!("cargo::rerun-if-changed={}", header.display());
    if let Ok(text) = std::fs::read_to_string(&header) {
        let part = |name: &str| {
            text.lines().find_map(|line| {
                let rest = line.trim().strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse::<u32>().ok()
            })
        };
        if let (Some(major), Some(minor), Some(patch)) = (
            part("MLX_VERSION_MAJOR"),
            part("MLX_VERSION_MINOR"),
            part("MLX_VERSION_PATCH"),
        ) {
            println!("cargo::rustc-env=TANDEM_MLX_VERSION={major}.{minor}.{patch}");
        }
    }
    let cuda = mlx_dir
        .parent()
        .and_then(|wheel| std::fs::read_dir(wheel).ok())
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().starts_with("mlx_cuda"));
    if cuda {
        println!("cargo::rustc-env=TANDEM_MLX_CUDA=1");
    }
}
