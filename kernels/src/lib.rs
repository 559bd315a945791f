//! DCGAN compute: tensors, layers with forward and backward, the generator and the
//! discriminator, the loss, Adam, the DCGAN initialisation and checkpoints in the PyTorch
//! example's `state_dict` layout; on the CPU, and on NVIDIA GPUs ([`cuda`]).

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod cuda;
pub mod device;
pub mod error;
pub mod gan;
pub mod models;
pub mod net;
pub mod ops;
pub mod precision;
pub mod rng;
pub mod tensor;
pub mod watchdog;

pub use checkpoint::{CheckpointFiles, TrainingState};
pub use collective::{Collective, CollectiveError, SingleProcess};
pub use config::{ModelConfig, OptimConfig};
pub use device::{Device, ParseDeviceError, RunDemands};
pub use error::KernelError;
pub use gan::{Gan, StepShare, StepStats};
pub use precision::Precision;
pub use tensor::Tensor;
pub use watchdog::{StopSignal, Watchdog};
