//! The one error type of the compute crate.

use crate::collective::CollectiveError;

/// What went wrong in the compute: a bad configuration, a tensor of the wrong shape, a
/// checkpoint that does not fit, a collective that failed between backward and Adam, a GPU that
/// cannot be used, or a CUDA call that failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    Shape { what: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("checkpoint {file}: {reason}")]
    Checkpoint { file: String, reason: String },
    #[error("all-reduce failed: {0}")]
    Collective(#[source] CollectiveError),
    /// The device asked for cannot be used here; the message names what is missing and the way
    /// out (usually `--device cpu`).
    #[error("{0}")]
    DeviceUnavailable(String),
    /// A CUDA driver, NVRTC, cuBLAS or NCCL call failed on a device that was usable.
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
