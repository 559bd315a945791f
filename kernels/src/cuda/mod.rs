//! The CUDA backend: the same DCGAN step as the CPU code, on one NVIDIA GPU.
//!
//! Always compiled: cudarc loads the driver, NVRTC, cuBLAS and NCCL at run time, so a machine
//! without CUDA builds and runs everything else. cudarc panics when a library is missing, so
//! every entry point here ([`probe`], [`Gpu::open`], [`nccl`]) checks first ([`libs`]) and
//! answers with a [`KernelError`] that names what is missing and the way out (`--device cpu`).
//!
//! - [`libs`]: finding the libraries, and what to say when one is missing;
//! - [`device`]: probing and opening a GPU (context, the one stream, cuBLAS, the kernels);
//! - [`module`]: the project's `.cu` sources (`kernels/cuda/`), compiled by NVRTC once per
//!   process;
//! - [`ops`]: each CPU operation's twin (im2col/col2im + cuBLAS convolutions, BatchNorm,
//!   activations, the loss, Adam), on device buffers;
//! - [`net`] and [`gan`]: the networks and the whole training step on the device;
//! - [`nccl`]: averaging gradients between GPUs ([`DeviceCollective`]).
//!
//! Every kernel has a CPU reference in [`crate::ops`]; `kernels/tests/cuda_conformance.rs` runs
//! both on the same inputs (on a GPU machine: `scripts/gpu-check.sh`).

pub mod device;
pub mod gan;
pub mod libs;
pub mod module;
pub mod nccl;
pub mod net;
pub mod ops;

pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
pub use device::{Gpu, GpuInfo, gpu_count, probe};
pub use gan::CudaGan;
pub use libs::find_nccl;
pub use nccl::{DeviceCollective, NCCL_ID_BYTES, NcclCollective, SingleGpu, nccl_unique_id};

use crate::KernelError;

/// Turns a CUDA library's error into a [`KernelError::Cuda`] that says which call failed.
pub(crate) trait OrCuda<T> {
    fn or_cuda(self, what: &str) -> Result<T, KernelError>;
}

impl<T, E: std::fmt::Debug> OrCuda<T> for Result<T, E> {
    fn or_cuda(self, what: &str) -> Result<T, KernelError> {
        self.map_err(|e| KernelError::Cuda(format!("{what}: {e:?}")))
    }
}
