//! The project's CUDA kernels: the `.cu` sources in `kernels/cuda/`, compiled by NVRTC at run
//! time (no CUDA toolkit at build time) once per process and architecture, then loaded into
//! each context that needs them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::sys::cudaError_enum;
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};

use super::OrCuda;
use crate::KernelError;

/// The sources, in the order they are concatenated: `common.cu` (helpers) comes first.
const SOURCES: [(&str, &str); 4] = [
    ("common.cu", include_str!("../../cuda/common.cu")),
    ("im2col.cu", include_str!("../../cuda/im2col.cu")),
    ("batchnorm.cu", include_str!("../../cuda/batchnorm.cu")),
    ("elementwise.cu", include_str!("../../cuda/elementwise.cu")),
];

/// PTX per virtual architecture (`compute_90`, ...): compiling takes a noticeable fraction of
/// a second, and a process opens its GPU more than once in tests and benchmarks.
static PTX: OnceLock<Mutex<HashMap<String, Ptx>>> = OnceLock::new();

/// The PTX of all kernels for `arch`, compiled on the first call.
pub fn ptx_for(arch: &str) -> Result<Ptx, KernelError> {
    let cache = PTX.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(ptx) = cache.get(arch) {
        return Ok(ptx.clone());
    }
    let source: String = SOURCES.iter().map(|(name, text)| format!("// ---- {name}\n{text}\n")).collect();
    let opts = CompileOptions {
        name: Some("dcgan_kernels.cu".into()),
        options: vec![format!("--gpu-architecture={arch}")],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            KernelError::Cuda(format!("NVRTC could not compile the kernels for {arch}:\n{}", log.to_string_lossy()))
        }
        other => KernelError::Cuda(format!("NVRTC failed for {arch}: {other:?}")),
    })?;
    cache.insert(arch.to_string(), ptx.clone());
    Ok(ptx)
}

/// NVRTC's CUDA version as (major, minor), (0, 0) if it cannot say.
fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (the caller compiled with it); the pointers outlive the call.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS { (major, minor) } else { (0, 0) }
}

/// Every kernel of the module, looked up once.
pub(crate) struct Kernels {
    pub im2col: CudaFunction,
    pub col2im: CudaFunction,
    pub bn_forward_train: CudaFunction,
    pub bn_forward_eval: CudaFunction,
    pub bn_backward: CudaFunction,
    pub activation_forward: CudaFunction,
    pub activation_backward: CudaFunction,
    pub bce_with_logits: CudaFunction,
    pub adam_step: CudaFunction,
    pub swap_leading_axes: CudaFunction,
    pub scale: CudaFunction,
}

impl Kernels {
    /// Compiles (once) for the GPU's compute capability and loads the module into `ctx`.
    pub(crate) fn load(ctx: &Arc<CudaContext>, (major, minor): (i32, i32)) -> Result<Self, KernelError> {
        let arch = format!("compute_{major}{minor}");
        let ptx = ptx_for(&arch)?;
        let module = ctx.load_module(ptx).map_err(|e| {
            if e.0 == cudaError_enum::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                let (maj, min) = nvrtc_version();
                let drv = super::device::driver_cuda_version();
                KernelError::DeviceUnavailable(format!(
                    "the driver supports CUDA {}.{} but cannot load PTX from NVRTC {maj}.{min}, which is newer: use \
                     an NVRTC no newer than CUDA {}.{} (put its directory first in LD_LIBRARY_PATH) or update the \
                     driver, or run on the CPU with `--device cpu`",
                    drv / 1000,
                    (drv % 1000) / 10,
                    drv / 1000,
                    (drv % 1000) / 10,
                ))
            } else {
                KernelError::Cuda(format!("loading the kernels' PTX for {arch}: {e:?}"))
            }
        })?;
        let f = |name: &str| module.load_function(name).or_cuda(&format!("finding kernel {name}"));
        Ok(Self {
            im2col: f("im2col")?,
            col2im: f("col2im")?,
            bn_forward_train: f("bn_forward_train")?,
            bn_forward_eval: f("bn_forward_eval")?,
            bn_backward: f("bn_backward")?,
            activation_forward: f("activation_forward")?,
            activation_backward: f("activation_backward")?,
            bce_with_logits: f("bce_with_logits")?,
            adam_step: f("adam_step")?,
            swap_leading_axes: f("swap_leading_axes")?,
            scale: f("scale")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: where it is installed (`LD_LIBRARY_PATH` pointing at it), the sources
    /// must compile, for the oldest and the newest architectures the backend is used on.
    #[test]
    fn the_kernels_compile_with_nvrtc_where_it_is_installed() {
        if !super::super::libs::NVRTC.loadable() {
            eprintln!("NVRTC is not installed here: skipped");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let ptx = ptx_for(arch).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for kernel in ["im2col", "col2im", "bn_forward_train", "bn_backward", "adam_step", "bce_with_logits"] {
                assert!(text.contains(&format!(".entry {kernel}(")), "{arch}: no kernel {kernel}");
            }
        }
    }
}
