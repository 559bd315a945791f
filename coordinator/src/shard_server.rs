//! Which samples each rank trains on, and, for a worker that cannot read the prepared data
//! set itself, how they travel to it.
//!
//! The order of an epoch and the split into steps and ranks are `data::shard`'s (the same
//! functions a worker reading the shards itself uses, so both ways give the same batches).
//! This module turns one rank's step into [`ShardChunk`]s of whole samples, each at most
//! [`proto::CHUNK_BYTES`] of pixels, so that any image size fits the message limit. Samples
//! are read from disk for each request: the coordinator never holds the data set.

use std::sync::{Arc, Mutex};

use data::SampleStore;
use proto::framing::encode_f32_le;
use proto::v1::ShardChunk;

/// Why a shard request cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardRequestError {
    #[error("epoch {epoch} is past the run's last epoch {last}")]
    EpochOutOfRange { epoch: u64, last: u64 },
    #[error("step {step} is past the epoch's {steps} steps")]
    StepOutOfRange { step: u64, steps: u64 },
}

/// Serves the ranks' shards of one run from the run's samples.
pub struct ShardServer {
    dataset: Arc<SampleStore>,
    seed: u64,
    global_batch: usize,
    world: usize,
    steps_per_epoch: u64,
    /// Epochs a run of `total_steps` steps touches.
    epochs: u64,
    /// The last two epochs' orders: ranks are at most one epoch apart, and a permutation of a
    /// large dataset is worth computing once rather than once per rank.
    cache: Mutex<Vec<(u64, Arc<Vec<u32>>)>>,
}

impl ShardServer {
    pub fn new(dataset: Arc<SampleStore>, seed: u64, global_batch: usize, world: usize, total_steps: u64) -> Self {
        let steps_per_epoch = data::steps_per_epoch(dataset.len(), global_batch).unwrap_or(0) as u64;
        let epochs = if steps_per_epoch == 0 { 0 } else { total_steps.div_ceil(steps_per_epoch) };
        Self { dataset, seed, global_batch, world, steps_per_epoch, epochs, cache: Mutex::new(Vec::new()) }
    }

    pub fn dataset(&self) -> &SampleStore {
        &self.dataset
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The seeded order of `epoch`.
    pub fn order(&self, epoch: u64) -> Arc<Vec<u32>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, o)) = cache.iter().find(|(e, _)| *e == epoch) {
            return Arc::clone(o);
        }
        let order = Arc::new(data::epoch_order(self.seed, epoch, self.dataset.len()));
        cache.push((epoch, Arc::clone(&order)));
        if cache.len() > 2 {
            cache.remove(0);
        }
        order
    }

    /// Checks a request before a stream is opened for it.
    pub fn check(&self, epoch: u64, from_step: u64) -> Result<(), ShardRequestError> {
        if epoch >= self.epochs {
            return Err(ShardRequestError::EpochOutOfRange { epoch, last: self.epochs.saturating_sub(1) });
        }
        if from_step >= self.steps_per_epoch {
            return Err(ShardRequestError::StepOutOfRange { step: from_step, steps: self.steps_per_epoch });
        }
        Ok(())
    }

    /// Dataset indices of `rank`'s batch at `step` of the epoch whose order is `order`.
    /// `rank < world` and `step < steps_per_epoch` (checked by [`ShardServer::check`] and the
    /// caller's loop).
    pub fn indices<'a>(&self, order: &'a [u32], step: u64, rank: usize) -> &'a [u32] {
        data::rank_batch(order, step as usize, self.global_batch, self.world, rank)
    }

    /// The chunks carrying `rank`'s batch at `step`: whole samples, at most
    /// [`proto::CHUNK_BYTES`] of pixels each (at least one sample), the last one flagged.
    pub fn step_chunks(
        &self,
        order: &[u32],
        epoch: u64,
        step: u64,
        rank: usize,
    ) -> Result<Vec<ShardChunk>, data::DataError> {
        let indices = self.indices(order, step, rank);
        let sample_bytes = self.dataset.sample_len() * 4;
        let per_chunk = (proto::CHUNK_BYTES / sample_bytes.max(1)).max(1);
        let n_chunks = indices.len().div_ceil(per_chunk).max(1);
        let mut pixels = Vec::new();
        let mut out = Vec::with_capacity(n_chunks);
        for (i, part) in indices.chunks(per_chunk).enumerate() {
            let mut bytes = Vec::with_capacity(part.len() * sample_bytes);
            self.dataset.gather(part, &mut pixels)?;
            encode_f32_le(&pixels, &mut bytes);
            out.push(ShardChunk {
                epoch,
                step_in_epoch: step,
                indices: part.to_vec(),
                pixels: bytes,
                last_in_step: i + 1 == n_chunks,
                step_batch: indices.len() as u32,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(len: usize, size: usize) -> Arc<SampleStore> {
        let sample = 3 * size * size;
        Arc::new(SampleStore::Memory(data::Dataset {
            name: "t".into(),
            nc: 3,
            image_size: size,
            len,
            pixels: (0..len * sample).map(|i| (i / sample) as f32).collect(),
            labels: None,
        }))
    }

    #[test]
    fn every_sample_once_per_epoch_across_ranks() {
        let world = 3;
        let s = ShardServer::new(dataset(100, 4), 5, 16, world, 12);
        let mut seen = Vec::new();
        for rank in 0..world {
            let order = s.order(1);
            for step in 0..s.steps_per_epoch() {
                for c in s.step_chunks(&order, 1, step, rank).unwrap() {
                    assert!(c.last_in_step);
                    let mut px = Vec::new();
                    proto::framing::decode_f32_le(&c.pixels, &mut px).unwrap();
                    // Each sample's pixels are its own index.
                    for (k, i) in c.indices.iter().enumerate() {
                        assert_eq!(px[k * 48], *i as f32);
                    }
                    seen.extend(c.indices);
                }
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<u32>>());
    }

    #[test]
    fn big_batches_are_split_into_bounded_chunks() {
        // 3 x 128 x 128 x 4 bytes = 192 KiB per sample: 21 samples per 4 MiB chunk.
        let s = ShardServer::new(dataset(64, 128), 5, 64, 1, 1);
        let order = s.order(0);
        let chunks = s.step_chunks(&order, 0, 0, 0).unwrap();
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c.pixels.len() <= proto::CHUNK_BYTES && c.step_batch == 64));
        assert_eq!(chunks.iter().filter(|c| c.last_in_step).count(), 1);
        assert!(chunks[3].last_in_step);
    }

    #[test]
    fn refuses_requests_outside_the_run() {
        let s = ShardServer::new(dataset(100, 4), 5, 16, 2, 12);
        assert_eq!(s.check(2, 0), Err(ShardRequestError::EpochOutOfRange { epoch: 2, last: 1 }));
        assert_eq!(s.check(0, 6), Err(ShardRequestError::StepOutOfRange { step: 6, steps: 6 }));
        assert!(s.check(1, 5).is_ok());
    }
}
