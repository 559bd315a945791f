//! Datasets for the DCGAN trainer: reading them, preparing them for training at scale,
//! sharding them across ranks, and writing sample grids.
//!
//! A [`DatasetSpec`] string names the source. [`prepared`] decodes a source once into packed
//! `u8` shards that a [`SampleStore`] reads by index without holding the set in memory; the
//! in-memory [`Dataset`] comes from the same decoders, so both give the same values.
//! [`shard`] decides which rank sees which sample at each step; [`grid`] writes images the way
//! the PyTorch example's `save_image` does.

mod cifar;
mod cifar_py;
mod dataset;
pub mod drawn;
mod encoded;
mod error;
mod folder;
pub mod grid;
mod idx;
mod lmdb_source;
pub mod prepared;
mod read;
mod resize;
pub mod shapes;
pub mod shard;
mod spec;
mod store;
mod tar_source;

pub use dataset::Dataset;
pub use drawn::Drawn;
pub use encoded::Channels;
pub use error::DataError;
pub use grid::{grid_image, grid_size, save_grid, save_image};
pub use prepared::PreparedSet;
pub use shard::{ShardError, epoch_order, max_rank_batch, rank_batch, rank_shard, steps_per_epoch};
pub use spec::DatasetSpec;
pub use store::SampleStore;
