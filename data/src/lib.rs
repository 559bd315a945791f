//! Datasets for the DCGAN trainer: reading them, sharding them across ranks, and writing
//! sample grids.
//!
//! Every loader produces the same [`Dataset`] (decoded, resized, normalised to [-1, 1] in
//! memory), so the trainer never knows which format it came from. A [`DatasetSpec`] string
//! names the source; [`shard`] decides which rank sees which sample at each step; [`grid`]
//! writes images the way the PyTorch example's `save_image` does.

mod cifar;
mod dataset;
mod error;
mod folder;
pub mod grid;
mod idx;
mod read;
mod resize;
pub mod shapes;
pub mod shard;
mod spec;

pub use dataset::Dataset;
pub use error::DataError;
pub use grid::{grid_image, grid_size, save_grid};
pub use shard::{ShardError, epoch_order, rank_batch, rank_shard, steps_per_epoch};
pub use spec::DatasetSpec;
