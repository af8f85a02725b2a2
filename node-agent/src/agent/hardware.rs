//! What this machine has, as the LlamaNode reports it: chip, memory, the
//! macOS GPU wired-memory limit, cores, the MLX compute backend and MLX
//! version; and the well-known placement labels derived from them.
//!
//! Probing (sysctl, /proc) is kept apart from the pure parsing and label
//! functions, which are unit tested with captured outputs.

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::process::Command;

use serde::Deserialize;
use tandem_crds::{LABEL_BACKEND, LABEL_CHIP, LABEL_MEMORY_GIB, LABEL_OS, NodeCapacity};

/// Which MLX compute backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Whatever this build of MLX runs on this machine.
    Auto,
    /// MLX's CPU backend.
    Cpu,
    /// Apple GPUs through Metal.
    Metal,
    /// NVIDIA GPUs through CUDA.
    Cuda,
}

/// Version of libmlx this binary links, read from its headers at build time.
pub const MLX_VERSION: Option<&str> = option_env!("TANDEM_MLX_VERSION");
/// Whether the libmlx this binary links is a CUDA build (found at build time).
const MLX_IS_CUDA: Option<&str> = option_env!("TANDEM_MLX_CUDA");
/// This agent's version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The MLX compute backend a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeBackend {
    /// CPU.
    Cpu,
    /// Apple GPU.
    Metal,
    /// NVIDIA GPU.
    Cuda,
}

impl ComputeBackend {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ComputeBackend::Cpu => "cpu",
            ComputeBackend::Metal => "metal",
            ComputeBackend::Cuda => "cuda",
        }
    }
}

/// The machine as detected.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardware {
    /// The chip as the OS names it, such as `Apple M3 Ultra`.
    pub chip: String,
    /// `macos` or `linux` (or another OS name).
    pub os: String,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// macOS: most GPU-wired memory the kernel allows.
    pub wired_limit_bytes: Option<u64>,
    /// Logical CPU cores.
    pub cpu_cores: u32,
    /// GPU cores where known.
    pub gpu_cores: Option<u32>,
    /// Compute backend.
    pub backend: ComputeBackend,
    /// NVIDIA GPUs offered to `Nccl` ranks (0 unless the backend is CUDA).
    pub gpus: u32,
    /// libmlx version.
    pub mlx_version: Option<String>,
}

/// Why the machine cannot run as configured.
#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    /// The configured backend is not what this machine and build can run.
    #[error("backend `{asked}` was configured, but this machine and MLX build run `{actual}`")]
    BackendUnavailable {
        /// Asked for.
        asked: &'static str,
        /// What is available.
        actual: &'static str,
    },
    /// GPUs were offered for `Nccl` ranks, but the backend is not CUDA.
    #[error(
        "--gpus {gpus} needs MLX's CUDA backend, but this agent runs `{backend}`; run it with \
         --backend cuda on a CUDA build of MLX, or with --gpus 0"
    )]
    GpusWithoutCuda {
        /// GPUs asked for.
        gpus: u32,
        /// The backend that runs.
        backend: &'static str,
    },
}

impl Hardware {
    /// Probes this machine; `choice` is checked against what it can run,
    /// and `gpus` (`--gpus`) against the backend (see [`gpus_for`]).
    pub fn detect(choice: BackendChoice, gpus: Option<u32>) -> Result<Hardware, HardwareError> {
        let os = os_name(std::env::consts::OS);
        let backend = available_backend(&os, std::env::consts::ARCH, MLX_IS_CUDA.is_some());
        let backend = check_backend(choice, backend)?;
        let gpus = gpus_for(gpus, backend)?;
        let (chip, memory_bytes, wired_limit_bytes) = if os == "macos" {
            let memory = sysctl("hw.memsize")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let wired = sysctl("iogpu.wired_limit_mb")
                .and_then(|v| v.parse::<u64>().ok())
                .map(|mb| macos_wired_limit(mb, memory));
            (
                sysctl("machdep.cpu.brand_string").unwrap_or_else(|| "unknown".into()),
                memory,
                wired,
            )
        } else {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
            (
                linux_cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
                linux_mem_total(&meminfo).unwrap_or(0),
                None,
            )
        };
        let cpu_cores = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        Ok(Hardware {
            chip,
            os,
            memory_bytes,
            wired_limit_bytes,
            cpu_cores,
            gpu_cores: None,
            backend,
            gpus,
            mlx_version: MLX_VERSION.map(str::to_owned),
        })
    }

    /// The chip as a label value, such as `apple-m3-ultra`.
    pub fn chip_label(&self) -> String {
        label_value(&self.chip)
    }

    /// The well-known labels, with `extra` (from the configuration) on top
    /// where they do not name a well-known key.
    pub fn labels(&self, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut labels = extra.clone();
        labels.insert(LABEL_CHIP.into(), self.chip_label());
        labels.insert(LABEL_BACKEND.into(), self.backend.as_str().into());
        labels.insert(
            LABEL_MEMORY_GIB.into(),
            (self.memory_bytes >> 30).to_string(),
        );
        labels.insert(LABEL_OS.into(), label_value(&self.os));
        labels
    }

    /// The LlamaNode's capacity.
    pub fn capacity(&self) -> NodeCapacity {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        NodeCapacity {
            memory_bytes: i(self.memory_bytes),
            wired_limit_bytes: self.wired_limit_bytes.map(i),
            cpu_cores: i32::try_from(self.cpu_cores).unwrap_or(i32::MAX),
            gpu_cores: self.gpu_cores.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
            gpus: (self.backend == ComputeBackend::Cuda)
                .then(|| i32::try_from(self.gpus).unwrap_or(i32::MAX)),
        }
    }
}

fn os_name(os: &str) -> String {
    match os {
        "macos" => "macos".into(),
        "linux" => "linux".into(),
        other => other.into(),
    }
}

/// What the MLX build runs here: Metal on Apple Silicon Macs, CUDA with a
/// CUDA build of libmlx, the CPU otherwise.
fn available_backend(os: &str, arch: &str, mlx_cuda: bool) -> ComputeBackend {
    if os == "macos" && arch == "aarch64" {
        ComputeBackend::Metal
    } else if mlx_cuda {
        ComputeBackend::Cuda
    } else {
        ComputeBackend::Cpu
    }
}

/// Accepts `auto`, the available backend, or `cpu` (every MLX build has it).
fn check_backend(
    choice: BackendChoice,
    available: ComputeBackend,
) -> Result<ComputeBackend, HardwareError> {
    let asked = match choice {
        BackendChoice::Auto => return Ok(available),
        BackendChoice::Cpu => ComputeBackend::Cpu,
        BackendChoice::Metal => ComputeBackend::Metal,
        BackendChoice::Cuda => ComputeBackend::Cuda,
    };
    if asked == available || asked == ComputeBackend::Cpu {
        Ok(asked)
    } else {
        Err(HardwareError::BackendUnavailable {
            asked: asked.as_str(),
            actual: available.as_str(),
        })
    }
}

/// The GPUs a node offers to `Nccl` ranks: `asked` (`--gpus`), by default
/// 1 with the CUDA backend and 0 otherwise. More than 0 without CUDA is an
/// error, so a misconfigured node fails at start-up, not at its first rank.
pub fn gpus_for(asked: Option<u32>, backend: ComputeBackend) -> Result<u32, HardwareError> {
    let cuda = backend == ComputeBackend::Cuda;
    match asked {
        None => Ok(u32::from(cuda)),
        Some(n) if n > 0 && !cuda => Err(HardwareError::GpusWithoutCuda {
            gpus: n,
            backend: backend.as_str(),
        }),
        Some(n) => Ok(n),
    }
}

/// `iogpu.wired_limit_mb` is 0 unless an admin raised it; macOS then allows
/// about two thirds of memory up to 36 GiB and three quarters above.
fn macos_wired_limit(limit_mb: u64, memory_bytes: u64) -> u64 {
    if limit_mb > 0 {
        limit_mb << 20
    } else if memory_bytes <= 36 << 30 {
        memory_bytes / 3 * 2
    } else {
        memory_bytes / 4 * 3
    }
}

fn sysctl(name: &str) -> Option<String> {
    let out = Command::new("sysctl").arg("-n").arg(name).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// The first `model name` of /proc/cpuinfo (absent on some ARM boards,
/// where `Hardware`, then `CPU implementer`, stand in).
fn linux_cpu_model(cpuinfo: &str) -> Option<String> {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name && !value.trim().is_empty()).then(|| value.trim().to_owned())
        })
    };
    field("model name")
        .or_else(|| field("Hardware"))
        .or_else(|| field("CPU implementer"))
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn linux_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// A label value from free text: lower case, runs of other characters as
/// one `-`, at most 63 characters, starting and ending alphanumeric.
pub fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.truncate(63);
    let trimmed = out.trim_end_matches('-');
    if trimmed.is_empty() {
        "unknown".into()
    } else {
        trimmed.to_owned()
    }
}

/// The host name, as the OS reports it.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

/// The address of the interface that routes outwards. Connecting a UDP
/// socket sends nothing; it only asks the kernel for a route.
pub fn outward_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
    socket.connect(("192.0.2.1", 9)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chips_become_label_values() {
        assert_eq!(label_value("Apple M3 Ultra"), "apple-m3-ultra");
        assert_eq!(
            label_value("Intel(R) Xeon(R) CPU @ 2.20GHz"),
            "intel-r-xeon-r-cpu-2-20ghz"
        );
        assert_eq!(label_value("  --  "), "unknown");
        assert!(label_value(&"x".repeat(100)).len() <= 63);
    }

    #[test]
    fn proc_files_parse() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(
            linux_cpu_model(cpuinfo).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(
            linux_mem_total("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16384 * 1024)
        );
    }

    #[test]
    fn wired_limit_defaults_like_macos() {
        assert_eq!(macos_wired_limit(100_000, 0), 100_000 << 20);
        assert_eq!(macos_wired_limit(0, 36 << 30), (36u64 << 30) / 3 * 2);
        assert_eq!(macos_wired_limit(0, 192 << 30), (192u64 << 30) / 4 * 3);
    }

    #[test]
    fn backends_are_reported_honestly() {
        assert_eq!(
            available_backend("macos", "aarch64", false),
            ComputeBackend::Metal
        );
        assert_eq!(
            available_backend("linux", "x86_64", false),
            ComputeBackend::Cpu
        );
        assert_eq!(
            available_backend("linux", "x86_64", true),
            ComputeBackend::Cuda
        );
        assert!(check_backend(BackendChoice::Metal, ComputeBackend::Cpu).is_err());
        assert_eq!(
            check_backend(BackendChoice::Cpu, ComputeBackend::Metal).ok(),
            Some(ComputeBackend::Cpu)
        );
    }

    #[test]
    fn labels_hold_the_well_known_keys() {
        let hw = Hardware {
            chip: "Apple M2 Max".into(),
            os: "macos".into(),
            memory_bytes: 96 << 30,
            wired_limit_bytes: None,
            cpu_cores: 12,
            gpu_cores: None,
            backend: ComputeBackend::Metal,
            gpus: 0,
            mlx_version: None,
        };
        let extra: BTreeMap<String, String> = [
            ("rack".to_owned(), "a".to_owned()),
            (LABEL_CHIP.to_owned(), "fake".to_owned()),
        ]
        .into();
        let labels = hw.labels(&extra);
        assert_eq!(labels[LABEL_CHIP], "apple-m2-max");
        assert_eq!(labels[LABEL_MEMORY_GIB], "96");
        assert_eq!(labels[LABEL_BACKEND], "metal");
        assert_eq!(labels[LABEL_OS], "macos");
        assert_eq!(labels["rack"], "a");
        assert_eq!(hw.capacity().gpus, None, "no CUDA, no gpus field");
        let cuda = Hardware {
            backend: ComputeBackend::Cuda,
            gpus: 4,
            ..hw
        };
        assert_eq!(cuda.capacity().gpus, Some(4));
    }

    #[test]
    fn gpus_default_to_one_with_cuda_and_need_it() {
        assert_eq!(gpus_for(None, ComputeBackend::Cuda).ok(), Some(1));
        assert_eq!(gpus_for(None, ComputeBackend::Cpu).ok(), Some(0));
        assert_eq!(gpus_for(None, ComputeBackend::Metal).ok(), Some(0));
        assert_eq!(gpus_for(Some(8), ComputeBackend::Cuda).ok(), Some(8));
        assert_eq!(gpus_for(Some(0), ComputeBackend::Cuda).ok(), Some(0));
        assert_eq!(gpus_for(Some(0), ComputeBackend::Cpu).ok(), Some(0));
        let err = gpus_for(Some(2), ComputeBackend::Cpu).expect_err("no CUDA");
        assert_eq!(
            err.to_string(),
            "--gpus 2 needs MLX's CUDA backend, but this agent runs `cpu`; run it with \
             --backend cuda on a CUDA build of MLX, or with --gpus 0"
        );
    }
}
