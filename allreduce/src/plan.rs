//! The ring's schedule as pure arithmetic: which chunk each rank sends and receives at each step,
//! and how chunks are cut into frames. Kept apart from the sockets so that it can be tested alone.

use std::ops::Range;

/// Elements of chunk `c` when `len` elements are split into `world` chunks whose sizes differ by
/// at most one (the first `len % world` chunks get the extra element). With `len < world` some
/// chunks are empty; they still travel as empty frames so that every rank runs the same steps.
pub fn chunk_range(len: usize, world: usize, c: usize) -> Range<usize> {
    let q = len / world;
    let r = len % world;
    let start = c * q + c.min(r);
    start..start + q + usize::from(c < r)
}

/// The chunk rank `rank` sends at global step `step` (`0..2*(world-1)`).
///
/// Reduce-scatter step `s` sends chunk `rank - s`; all-gather step `t` sends chunk `rank + 1 - t`,
/// which is `rank - s` again with `s = t + world - 1`, so one formula covers both phases.
pub fn send_chunk(rank: usize, world: usize, step: usize) -> usize {
    (rank + 2 * world - step % world) % world
}

/// The chunk rank `rank` receives at `step`: the one its left neighbour sends, which is also the
/// one it forwards at `step + 1`.
pub fn recv_chunk(rank: usize, world: usize, step: usize) -> usize {
    send_chunk(rank + world - 1, world, step)
}

/// The frames a chunk travels in: `seg`-element pieces, and one empty frame for an empty chunk.
pub fn segments(chunk: Range<usize>, seg: usize) -> impl Iterator<Item = Range<usize>> {
    let seg = seg.max(1);
    let n = chunk.len().div_ceil(seg).max(1);
    (0..n).map(move |k| {
        let start = (chunk.start + k * seg).min(chunk.end);
        start..(start + seg).min(chunk.end)
    })
}

/// Payload bytes one rank sends (and receives) in one all-reduce of `len` floats: every chunk but
/// one in each phase, i.e. about `2 * (world - 1) / world * 4 * len`, the ring's optimum. Frame
/// headers ([`crate::FRAME_HEADER_BYTES`] per frame) come on top.
///
/// `rank` matters only when `len % world != 0` (chunks differ by one element).
pub fn bytes_sent_per_all_reduce(len: usize, world: usize, rank: usize) -> u64 {
    if world < 2 {
        return 0;
    }
    let size = |c: usize| chunk_range(len, world, c % world).len();
    // Reduce-scatter skips chunk rank+1 (it ends there), all-gather skips chunk rank+2 (it started
    // from there). With world 2 these are the two different chunks, still correct.
    let elems = 2 * len - size(rank + 1) - size(rank + 2);
    4 * elems as u64
}

/// The nccl-tests "bus bandwidth" factor for all-reduce: `busbw = algbw * 2 * (world - 1) / world`,
/// so that a ring saturating its links reads as the link speed whatever the world size.
pub fn bus_bandwidth_factor(world: usize) -> f64 {
    if world < 2 {
        return 0.0;
    }
    2.0 * (world as f64 - 1.0) / world as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer() {
        for len in [0, 1, 3, 7, 1000, 1_000_003] {
            for world in 1..=9 {
                let mut next = 0;
                for c in 0..world {
                    let r = chunk_range(len, world, c);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn each_step_forwards_what_was_received() {
        for world in 2..=7 {
            for rank in 0..world {
                for step in 0..2 * (world - 1) - 1 {
                    assert_eq!(send_chunk(rank, world, step + 1), recv_chunk(rank, world, step));
                }
                // After reduce-scatter, rank holds the finished chunk rank+1 and sends it first.
                assert_eq!(send_chunk(rank, world, world - 1), (rank + 1) % world);
            }
        }
    }

    #[test]
    fn segments_cover_chunk() {
        assert_eq!(segments(5..5, 4).collect::<Vec<_>>(), vec![5..5]);
        assert_eq!(segments(0..8, 4).collect::<Vec<_>>(), vec![0..4, 4..8]);
        assert_eq!(segments(2..11, 4).collect::<Vec<_>>(), vec![2..6, 6..10, 10..11]);
    }

    #[test]
    fn bytes_sent_matches_schedule() {
        for len in [0, 1, 3, 10, 1001] {
            for world in 2..=5 {
                for rank in 0..world {
                    let by_schedule: usize =
                        (0..2 * (world - 1)).map(|s| chunk_range(len, world, send_chunk(rank, world, s)).len()).sum();
                    assert_eq!(bytes_sent_per_all_reduce(len, world, rank), 4 * by_schedule as u64);
                }
            }
        }
        assert_eq!(bytes_sent_per_all_reduce(1000, 1, 0), 0);
    }
}
