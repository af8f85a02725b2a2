//! The node's GPUs for `Nccl` ranks: which one an attempt takes, and
//! whether this node can run a rank of a backend at all.

use super::*;

/// The node's GPUs for `Nccl` ranks, by CUDA device index `0..count`; a
/// running worker holds one through a [`GpuSlot`].
#[derive(Debug, Clone, Default)]
pub struct GpuSlots {
    /// Whether each GPU is held.
    held: Arc<Mutex<Vec<bool>>>,
}

impl GpuSlots {
    /// `count` free GPUs.
    pub fn new(count: u32) -> GpuSlots {
        GpuSlots {
            held: Arc::new(Mutex::new(vec![false; count as usize])),
        }
    }

    /// How many GPUs the node offers.
    pub fn count(&self) -> u32 {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        u32::try_from(held.len()).unwrap_or(u32::MAX)
    }

    /// The lowest free GPU, held until the slot drops; `None` when every
    /// GPU is held.
    pub fn acquire(&self) -> Option<GpuSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let index = held.iter().position(|h| !h)?;
        held[index] = true;
        Some(GpuSlot {
            held: self.held.clone(),
            index: u32::try_from(index).unwrap_or(u32::MAX),
        })
    }
}

/// One GPU held by a worker; dropping it gives the GPU back.
#[derive(Debug)]
pub struct GpuSlot {
    held: Arc<Mutex<Vec<bool>>>,
    index: u32,
}

impl GpuSlot {
    /// The CUDA device index (`CUDA_VISIBLE_DEVICES`).
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for GpuSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.get_mut(self.index as usize) {
            *h = false;
        }
    }
}

/// Whether this node can run a rank with `backend`: `Nccl` needs MLX's
/// CUDA backend and at least one GPU. The message says what would work.
pub(super) fn check_backend(
    backend: Backend,
    compute: ComputeBackend,
    gpus: u32,
) -> Result<(), String> {
    if backend != Backend::Nccl {
        return Ok(());
    }
    if compute != ComputeBackend::Cuda {
        return Err(format!(
            "spec.backend is Nccl but this node runs MLX's {} backend; use Ring, or run the \
             agent with MLX's CUDA build (--backend cuda)",
            compute.as_str()
        ));
    }
    if gpus == 0 {
        return Err(
            "spec.backend is Nccl but this node offers no GPUs (--gpus 0); use Ring, or run \
             the agent with --gpus N (one Nccl rank per GPU)"
                .into(),
        );
    }
    Ok(())
}

/// A GPU for an `Nccl` rank, or why there is none.
pub(super) fn take_gpu(gpus: &GpuSlots) -> Result<GpuSlot, String> {
    gpus.acquire().ok_or_else(|| {
        let n = gpus.count();
        let (offers, all) = if n == 1 {
            ("1 GPU".to_owned(), "it is".to_owned())
        } else {
            (format!("{n} GPUs"), format!("all {n} are"))
        };
        format!(
            "spec.backend is Nccl and this node offers {offers} (one Nccl rank each), but \
             {all} taken by other ranks; place the rank on another node, run the agent with \
             more --gpus, or use Ring"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_go_lowest_first_and_come_back_when_the_slot_drops() {
        let gpus = GpuSlots::new(2);
        assert_eq!(gpus.count(), 2);
        let a = gpus.acquire().expect("gpu 0");
        let b = gpus.acquire().expect("gpu 1");
        assert_eq!((a.index(), b.index()), (0, 1));
        assert!(gpus.acquire().is_none(), "both held");
        drop(a);
        let c = gpus.clone().acquire().expect("gpu 0 again");
        assert_eq!(c.index(), 0, "clones share the slots");
        drop(b);
        drop(c);
        assert_eq!(gpus.acquire().map(|g| g.index()), Some(0));
        assert!(GpuSlots::new(0).acquire().is_none());
        assert!(GpuSlots::default().acquire().is_none());
    }

    #[test]
    fn taken_gpus_are_explained() {
        let one = GpuSlots::new(1);
        let _held = take_gpu(&one).expect("free");
        let err = take_gpu(&one).expect_err("taken");
        assert!(
            err.contains("offers 1 GPU (one Nccl rank each), but it is taken"),
            "{err}"
        );
        let four = GpuSlots::new(4);
        let _held: Vec<GpuSlot> = (0..4).map(|_| take_gpu(&four).expect("free")).collect();
        let err = take_gpu(&four).expect_err("taken");
        assert!(err.contains("offers 4 GPUs"), "{err}");
        assert!(err.contains("all 4 are taken"), "{err}");
    }

    #[test]
    fn nccl_needs_cuda_and_gpus_and_says_what_would_work() {
        for backend in [Backend::Ring, Backend::Jaccl] {
            assert!(check_backend(backend, ComputeBackend::Cpu, 0).is_ok());
        }
        assert!(check_backend(Backend::Nccl, ComputeBackend::Cuda, 1).is_ok());
        assert_eq!(
            check_backend(Backend::Nccl, ComputeBackend::Cpu, 0),
            Err(
                "spec.backend is Nccl but this node runs MLX's cpu backend; use Ring, or run \
                 the agent with MLX's CUDA build (--backend cuda)"
                    .into()
            )
        );
        let err = check_backend(Backend::Nccl, ComputeBackend::Metal, 0).expect_err("metal");
        assert!(err.contains("MLX's metal backend"), "{err}");
        let err = check_backend(Backend::Nccl, ComputeBackend::Cuda, 0).expect_err("no gpus");
        assert!(err.contains("offers no GPUs (--gpus 0)"), "{err}");
        assert!(err.contains("--gpus N"), "{err}");
    }
}
