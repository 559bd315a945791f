//! Probing and opening a GPU. [`Gpu`] owns what every operation needs: the context, the one
//! stream all work of a worker is queued on (so no operation needs an event or a host
//! synchronisation to be ordered after another), the cuBLAS handle bound to that stream, and
//! the project's kernels loaded into the context.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::cublas::CudaBlas;
use cudarc::driver::result as drv;
use cudarc::driver::sys::{CUdevice_attribute, cudaError_enum};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView};

use super::OrCuda;
use super::libs::{CUBLAS, DRIVER, NVRTC};
use super::module::Kernels;
use crate::KernelError;

/// What [`probe`] learnt about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100/H200.
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    /// GPUs visible to this process.
    pub visible_gpus: usize,
    /// The CUDA version the driver supports, as 1000 * major + 10 * minor (12040 = 12.4).
    pub driver_cuda_version: i32,
}

/// Number of GPUs the CUDA driver shows this process; 0 when the driver is installed but finds
/// no GPU. An error (not a panic) when the driver library itself is missing.
pub fn gpu_count() -> Result<usize, KernelError> {
    DRIVER.require()?;
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        Err(e) if e.0 == cudaError_enum::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(KernelError::DeviceUnavailable(format!(
            "the CUDA driver is installed but failed to start ({e:?}): check `nvidia-smi`, or run on the CPU \
             with `--device cpu`"
        ))),
    }
}

/// Checks that GPU `ordinal` exists and that the libraries the backend needs (driver, NVRTC,
/// cuBLAS) load, without creating a context. Every failure is a
/// [`KernelError::DeviceUnavailable`] naming what is missing and the way out.
pub fn probe(ordinal: usize) -> Result<GpuInfo, KernelError> {
    let count = gpu_count()?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"));
    if count == 0 {
        return Err(KernelError::DeviceUnavailable(format!(
            "cuda:{ordinal} was asked for, but the CUDA driver sees no GPU{}: check `nvidia-smi`, or run on the \
             CPU with `--device cpu`",
            visible.unwrap_or_default()
        )));
    }
    if ordinal >= count {
        return Err(KernelError::DeviceUnavailable(format!(
            "cuda:{ordinal} was asked for, but only {count} GPU{} visible{} (cuda:0{}): pick one of those, or run \
             on the CPU with `--device cpu`",
            if count == 1 { " is" } else { "s are" },
            visible.unwrap_or_default(),
            if count > 1 { format!(" to cuda:{}", count - 1) } else { String::new() },
        )));
    }
    NVRTC.require()?;
    CUBLAS.require()?;
    let dev = drv::device::get(ordinal as i32).or_cuda("cuDeviceGet")?;
    let name = drv::device::get_name(dev).or_cuda("cuDeviceGetName")?;
    // SAFETY: `dev` came from cuDeviceGet above.
    let (major, minor, total) = unsafe {
        (
            drv::device::get_attribute(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .or_cuda("cuDeviceGetAttribute")?,
            drv::device::get_attribute(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .or_cuda("cuDeviceGetAttribute")?,
            drv::device::total_mem(dev).or_cuda("cuDeviceTotalMem")?,
        )
    };
    Ok(GpuInfo {
        ordinal,
        name,
        compute_capability: (major, minor),
        total_memory_bytes: total,
        visible_gpus: count,
        driver_cuda_version: driver_cuda_version(),
    })
}

/// The CUDA version the driver supports (e.g. 12040), 0 if it cannot say.
pub(crate) fn driver_cuda_version() -> i32 {
    let mut v = 0;
    // SAFETY: the driver library is loaded (callers checked), and `v` outlives the call.
    let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if ok == cudaError_enum::CUDA_SUCCESS { v } else { 0 }
}

/// One opened GPU: context, stream, cuBLAS and kernels. Shared (`Arc`) by the networks, the
/// step and the NCCL communicator of one worker, which all queue on [`Gpu::stream`].
pub struct Gpu {
    info: GpuInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    tf32: AtomicBool,
    pub(crate) kernels: Kernels,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).field("tf32", &self.tf32).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Probes GPU `ordinal` ([`probe`]), then creates its context and stream, the cuBLAS
    /// handle, and loads the kernels (compiled by NVRTC on the first open in this process).
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, KernelError> {
        let info = probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).or_cuda("creating the CUDA context")?;
        // All of a worker's work goes to one stream, in order, so cudarc's per-buffer events
        // (which order work across streams) would only add two driver calls per kernel argument.
        // SAFETY: no buffer of this context is ever used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().or_cuda("creating a CUDA stream")?;
        let blas = CudaBlas::new(stream.clone()).or_cuda("creating the cuBLAS handle")?;
        let kernels = Kernels::load(&ctx, info.compute_capability)?;
        let gpu = Gpu { info, ctx, stream, blas, tf32: AtomicBool::new(false), kernels };
        gpu.set_tf32(false)?;
        Ok(Arc::new(gpu))
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation of this GPU is queued on; an NCCL communicator for this GPU
    /// must use it too ([`super::NcclCollective::new`] does), so that an all-reduce is ordered
    /// after the backward that produced the gradients without a host synchronisation.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// TF32 tensor-core GEMMs (about 10 significant bits in the products): several times faster
    /// on Ampere and later, but no longer within 1e-4 of the CPU reference. Off by default.
    pub fn set_tf32(&self, on: bool) -> Result<(), KernelError> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode};
        let mode = if on { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cublasMath_t::CUBLAS_DEFAULT_MATH };
        // SAFETY: the handle is alive for as long as `self`.
        unsafe { cublasSetMathMode(*self.blas.handle(), mode) }.result().or_cuda("cublasSetMathMode")?;
        self.tf32.store(on, Ordering::Relaxed);
        Ok(())
    }

    pub fn tf32(&self) -> bool {
        self.tf32.load(Ordering::Relaxed)
    }

    /// Makes this GPU's context current on the calling thread (cuBLAS and NCCL calls need it).
    pub fn bind_to_thread(&self) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().or_cuda("binding the CUDA context to this thread")
    }

    /// Waits for all queued work; reports an error a kernel left behind.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().or_cuda("waiting for the GPU")
    }

    /// A new device buffer holding `host`.
    pub fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>, KernelError> {
        self.stream.clone_htod(host).or_cuda("copying to the GPU")
    }

    /// A new zeroed device buffer of `len` values.
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, KernelError> {
        self.stream.alloc_zeros(len).or_cuda("allocating GPU memory")
    }

    /// The values of `src`, after everything queued before has run.
    pub fn download(&self, src: &CudaView<'_, f32>) -> Result<Vec<f32>, KernelError> {
        let mut host = vec![0.0f32; src.len()];
        self.stream.memcpy_dtoh(src, &mut host).or_cuda("copying from the GPU")?;
        self.synchronize()?;
        Ok(host)
    }
}
