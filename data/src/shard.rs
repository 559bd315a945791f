//! Which samples each rank trains on, step by step.
//!
//! Every rank (and the coordinator) computes the same seeded permutation of the epoch from the
//! run's seed and the epoch number alone, so nothing but two integers has to be agreed on.
//! Each step takes the next `global_batch` entries of the permutation and splits them into
//! `world` contiguous parts, one per rank; the last step of the epoch also takes the remainder,
//! so across the world every sample is used exactly once per epoch.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Why an epoch cannot be split into steps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The global batch is zero.
    #[error("the global batch size must be at least 1")]
    ZeroBatch,
    /// The dataset cannot fill a single global batch.
    #[error(
        "the dataset has {n} samples, fewer than one global batch of {global_batch}: use a smaller batch or more data"
    )]
    TooFewSamples { n: usize, global_batch: usize },
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of the `n` samples in epoch `epoch` of a run seeded with `seed`: a permutation of
/// `0..n`, the same wherever it is computed (for a given `rand` version).
///
/// # Panics
/// If `n` does not fit in a `u32`.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let n = u32::try_from(n).expect("dataset larger than u32::MAX samples");
    let mut order: Vec<u32> = (0..n).collect();
    let mixed = splitmix64(seed) ^ splitmix64(epoch.wrapping_add(0x632B_E59B_D9B4_E019));
    order.shuffle(&mut StdRng::seed_from_u64(mixed));
    order
}

/// Number of optimizer steps in an epoch of `n` samples: `n / global_batch` (the remainder
/// joins the last step).
pub fn steps_per_epoch(n: usize, global_batch: usize) -> Result<usize, ShardError> {
    if global_batch == 0 {
        return Err(ShardError::ZeroBatch);
    }
    if n < global_batch {
        return Err(ShardError::TooFewSamples { n, global_batch });
    }
    Ok(n / global_batch)
}

/// Start and length of part `rank` when `len` items are split into `world` contiguous parts
/// whose sizes differ by at most one (the first `len % world` parts get the extra item).
fn split(len: usize, world: usize, rank: usize) -> (usize, usize) {
    let (base, extra) = (len / world, len % world);
    (rank * base + rank.min(extra), base + usize::from(rank < extra))
}

/// The sample indices rank `rank` of `world` trains on at step `step_in_epoch`.
///
/// Step `s` covers `order[s * B..(s + 1) * B]`, the last step `order[s * B..]`; rank `r` gets
/// part `r` of that slice. When `B >= world` every rank gets at least one sample.
///
/// # Panics
/// If `global_batch` or `world` is 0, `rank >= world`, or `step_in_epoch` is not below
/// [`steps_per_epoch`]: these are checked once when the run is configured.
pub fn rank_batch(order: &[u32], step_in_epoch: usize, global_batch: usize, world: usize, rank: usize) -> &[u32] {
    assert!(world > 0 && rank < world, "rank {rank} out of range for world {world}");
    let steps = match steps_per_epoch(order.len(), global_batch) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert!(step_in_epoch < steps, "step {step_in_epoch} out of range: the epoch has {steps} steps");
    let start = step_in_epoch * global_batch;
    let end = if step_in_epoch + 1 == steps { order.len() } else { start + global_batch };
    let (offset, len) = split(end - start, world, rank);
    &order[start + offset..start + offset + len]
}

/// The largest batch any rank gets at any step of an epoch of `n` samples: its part of the
/// last step, which also takes the remainder. A GPU rank sizes its buffers by it (each rank
/// holds its share of the global batch, not the whole). 0 for an epoch without steps.
pub fn max_rank_batch(n: usize, global_batch: usize, world: usize) -> usize {
    match steps_per_epoch(n, global_batch) {
        Ok(_) if world > 0 => (global_batch + n % global_batch).div_ceil(world),
        _ => 0,
    }
}

/// Everything rank `rank` trains on in the epoch: its batches of every step, concatenated.
/// Empty if the epoch has no step (fewer samples than one global batch).
///
/// # Panics
/// As [`rank_batch`], except that an epoch without steps is not an error here.
pub fn rank_shard(order: &[u32], global_batch: usize, world: usize, rank: usize) -> Vec<u32> {
    let steps = steps_per_epoch(order.len(), global_batch).unwrap_or(0);
    (0..steps).flat_map(|s| rank_batch(order, s, global_batch, world, rank).iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(42, 0, 1000);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(42, 0, 1000));
        assert_ne!(a, epoch_order(42, 1, 1000));
        assert_ne!(a, epoch_order(43, 0, 1000));
        assert_ne!(a, sorted);
        assert!(epoch_order(1, 2, 0).is_empty());
    }

    #[test]
    fn max_rank_batch_is_the_largest_part_of_any_step() {
        for n in [7, 64, 100, 1000, 1003] {
            for global in [1, 3, 7, 64] {
                for world in 1..=9 {
                    let order: Vec<u32> = (0..n as u32).collect();
                    let steps = steps_per_epoch(n, global).unwrap_or(0);
                    let largest = (0..steps)
                        .flat_map(|s| (0..world).map(move |r| (s, r)))
                        .map(|(s, r)| rank_batch(&order, s, global, world, r).len())
                        .max()
                        .unwrap_or(0);
                    assert_eq!(max_rank_batch(n, global, world), largest, "n {n} global {global} world {world}");
                }
            }
        }
        // The gpu overlay's batch 1024 over 8 GPUs on CIFAR-10: 128 + a share of the remainder.
        assert_eq!(max_rank_batch(50_000, 1024, 8), (1024usize + 50_000 % 1024).div_ceil(8));
    }

    #[test]
    fn steps_per_epoch_rejects_tiny_data() {
        assert_eq!(steps_per_epoch(100, 32), Ok(3));
        assert_eq!(steps_per_epoch(64, 64), Ok(1));
        assert_eq!(steps_per_epoch(10, 64), Err(ShardError::TooFewSamples { n: 10, global_batch: 64 }));
        assert!(steps_per_epoch(10, 64).unwrap_err().to_string().contains("10 samples"));
        assert_eq!(steps_per_epoch(10, 0), Err(ShardError::ZeroBatch));
    }

    #[test]
    fn shards_are_disjoint_and_cover_every_sample_once() {
        for n in [1usize, 2, 7, 64, 100, 101, 257, 1000] {
            for b in [1usize, 3, 4, 7, 16, 64] {
                if n < b {
                    continue;
                }
                for world in [1usize, 2, 3] {
                    let order = epoch_order(7, 3, n);
                    let steps = steps_per_epoch(n, b).unwrap();
                    let mut all: Vec<u32> = Vec::new();
                    for rank in 0..world {
                        let shard = rank_shard(&order, b, world, rank);
                        let by_steps: Vec<u32> =
                            (0..steps).flat_map(|s| rank_batch(&order, s, b, world, rank).to_vec()).collect();
                        assert_eq!(shard, by_steps);
                        all.extend(shard);
                    }
                    all.sort_unstable();
                    assert_eq!(all, (0..n as u32).collect::<Vec<_>>(), "n={n} b={b} world={world}");
                    for s in 0..steps {
                        let sizes: Vec<usize> = (0..world).map(|r| rank_batch(&order, s, b, world, r).len()).collect();
                        let step_len = if s + 1 == steps { n - s * b } else { b };
                        assert_eq!(sizes.iter().sum::<usize>(), step_len);
                        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                        assert!(hi - lo <= 1, "n={n} b={b} world={world} step={s}: {sizes:?}");
                        if b >= world {
                            assert!(*lo >= 1, "n={n} b={b} world={world} step={s}: {sizes:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_take_contiguous_parts_of_the_step() {
        let order: Vec<u32> = (0..10).collect();
        // B = 4, world 3: step 0 = [0,1,2,3] -> [0,1] [2] [3]; last step = [4..10] -> 2/2/2.
        assert_eq!(rank_batch(&order, 0, 4, 3, 0), &[0, 1]);
        assert_eq!(rank_batch(&order, 0, 4, 3, 1), &[2]);
        assert_eq!(rank_batch(&order, 0, 4, 3, 2), &[3]);
        assert_eq!(rank_batch(&order, 1, 4, 3, 0), &[4, 5]);
        assert_eq!(rank_batch(&order, 1, 4, 3, 2), &[8, 9]);
        assert!(rank_shard(&order, 11, 2, 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn step_past_the_epoch_panics() {
        let order: Vec<u32> = (0..10).collect();
        let _ = rank_batch(&order, 2, 4, 1, 0);
    }
}
