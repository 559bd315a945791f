//! The sets drawn on demand instead of read from files: the built-in `shapes`, and `fake`
//! (random images, as the PyTorch example's `--dataset fake`, torchvision's `FakeData`).
//!
//! Both need no file and draw sample `i` from its own RNG, so every machine, thread count and
//! worker sees the same set, and a worker draws its share itself instead of receiving it.

use rayon::prelude::*;

use crate::{Dataset, shapes};

/// Samples in `fake` when no limit is given (torchvision's `FakeData` default).
pub const FAKE_LEN: usize = 1000;

/// Fixed seed of `fake`: changing it changes the set.
const FAKE_SEED: u64 = 0x4641_4b45_0000_0001;

/// Which drawn set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drawn {
    /// One coloured disc, square or triangle per image ([`crate::shapes`]); labelled by its kind.
    Shapes,
    /// Uniform noise in every pixel: no structure to learn, for timing and plumbing checks.
    Fake,
}

impl Drawn {
    pub fn name(self) -> &'static str {
        match self {
            Drawn::Shapes => "shapes",
            Drawn::Fake => "fake",
        }
    }

    /// Samples in the whole set.
    pub fn full_len(self) -> usize {
        match self {
            Drawn::Shapes => shapes::DEFAULT_LEN,
            Drawn::Fake => FAKE_LEN,
        }
    }

    /// Samples used under `limit`: the whole set, or its first `limit` samples.
    pub fn len_for(self, limit: Option<usize>) -> usize {
        limit.map_or(self.full_len(), |l| l.min(self.full_len()))
    }

    /// Channels of every sample (both are RGB).
    pub fn nc(self) -> usize {
        3
    }

    /// Whether samples have class labels (an FID classifier needs them).
    pub fn has_labels(self) -> bool {
        matches!(self, Drawn::Shapes)
    }

    /// Draws sample `i` into `out` (CHW, `3 * size * size` values in [-1, 1]); its label.
    pub fn render(self, i: usize, size: usize, out: &mut [f32]) -> u8 {
        match self {
            Drawn::Shapes => shapes::render(i, size, out),
            Drawn::Fake => {
                let mut state = FAKE_SEED ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                for v in out.iter_mut() {
                    state = shapes::splitmix64(state);
                    // 24 random bits to [-1, 1].
                    *v = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                }
                0
            }
        }
    }

    /// The first `len` samples in memory.
    pub fn generate(self, len: usize, size: usize) -> Dataset {
        if self == Drawn::Shapes {
            return shapes::generate(len, size);
        }
        let sample = 3 * size * size;
        let mut pixels = vec![0.0f32; len * sample];
        if sample > 0 {
            pixels.par_chunks_mut(sample).enumerate().for_each(|(i, out)| {
                self.render(i, size, out);
            });
        }
        Dataset { name: self.name().into(), nc: 3, image_size: size, len, pixels, labels: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_is_noise_in_range_the_same_everywhere_and_differs_by_index() {
        let a = Drawn::Fake.generate(4, 8);
        let b = Drawn::Fake.generate(4, 8);
        assert_eq!(a.pixels, b.pixels, "deterministic");
        assert!(a.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        let mean = a.pixels.iter().sum::<f32>() / a.pixels.len() as f32;
        assert!(mean.abs() < 0.1, "centred noise, mean {mean}");
        let n = 3 * 64;
        assert_ne!(a.pixels[..n], a.pixels[n..2 * n], "samples differ");
        let mut one = vec![0.0; n];
        Drawn::Fake.render(2, 8, &mut one);
        assert_eq!(one, a.pixels[2 * n..3 * n], "a sample drawn alone is the same");
        assert!(a.labels.is_none());
    }
}
