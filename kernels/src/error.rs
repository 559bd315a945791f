//! The one error type of the compute crate.

use crate::collective::CollectiveError;

/// What went wrong in the compute: a bad configuration, a tensor of the wrong shape, a
/// checkpoint that does not fit, or a collective that failed between backward and Adam.
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
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
