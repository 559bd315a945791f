//! The in-memory dataset every loader produces.
//!
//! Training reads random batches every step, so samples are kept decoded, resized and
//! normalised in one flat `f32` buffer: drawing a batch is then a handful of `memcpy`s, with
//! no decoding on the hot path.

/// Decoded samples, all of one shape `nc x image_size x image_size`, values in `[-1, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Short name of the source ("mnist", "cifar10", "folder", "shapes", ...), for logs.
    pub name: String,
    /// Channels per sample: 1 for MNIST-like data, 3 for colour.
    pub nc: usize,
    /// Height and width of every sample.
    pub image_size: usize,
    /// Number of samples.
    pub len: usize,
    /// `len` samples one after another, each `nc * image_size * image_size` values in CHW
    /// order (so a run of samples is already an NCHW batch).
    pub pixels: Vec<f32>,
    /// One class label per sample where the source has them.
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    /// Number of `f32` values in one sample (`nc * image_size * image_size`).
    pub fn sample_len(&self) -> usize {
        self.nc * self.image_size * self.image_size
    }

    /// Sample `i` as a CHW slice.
    ///
    /// # Panics
    /// If `i >= self.len`.
    pub fn sample(&self, i: usize) -> &[f32] {
        assert!(i < self.len, "sample index {i} out of range for dataset '{}' of {} samples", self.name, self.len);
        let n = self.sample_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Label of sample `i`, if the dataset has labels.
    pub fn label(&self, i: usize) -> Option<u8> {
        self.labels.as_ref().and_then(|l| l.get(i).copied())
    }

    /// Copies the samples `indices` (in that order) into `out`, replacing its contents, so that
    /// `out` is an NCHW batch of `indices.len()` samples. Reusing `out` across steps avoids an
    /// allocation per batch.
    ///
    /// # Panics
    /// If an index is out of range (indices come from [`crate::shard`], never from a user).
    pub fn gather(&self, indices: &[u32], out: &mut Vec<f32>) {
        out.clear();
        out.reserve(indices.len() * self.sample_len());
        for &i in indices {
            out.extend_from_slice(self.sample(i as usize));
        }
    }
}

/// Samples as a loader decodes them: bytes (what a prepared set stores, see
/// [`crate::prepared`]) or their normalised `f32` values (a [`Dataset`]). One loader serves both,
/// so the two are the same pixels.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decoded<T> {
    pub name: String,
    pub nc: usize,
    pub image_size: usize,
    pub len: usize,
    pub pixels: Vec<T>,
    pub labels: Option<Vec<u8>>,
}

impl From<Decoded<f32>> for Dataset {
    fn from(d: Decoded<f32>) -> Dataset {
        Dataset { name: d.name, nc: d.nc, image_size: d.image_size, len: d.len, pixels: d.pixels, labels: d.labels }
    }
}

/// A byte's value `v / 255 * 2 - 1`: the PyTorch example's `ToTensor()` followed by
/// `Normalize(0.5, 0.5)`. Takes the byte as `f32` so that loops over many pixels vectorise.
#[inline]
pub(crate) fn byte_to_unit(v: f32) -> f32 {
    v / 255.0 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            name: "t".into(),
            nc: 1,
            image_size: 2,
            len: 3,
            pixels: (0..12).map(|v| v as f32).collect(),
            labels: Some(vec![7, 8, 9]),
        }
    }

    #[test]
    fn sample_and_gather() {
        let d = tiny();
        assert_eq!(d.sample_len(), 4);
        assert_eq!(d.sample(1), &[4.0, 5.0, 6.0, 7.0]);
        assert_eq!(d.label(2), Some(9));
        let mut out = vec![99.0];
        d.gather(&[2, 0], &mut out);
        assert_eq!(out, vec![8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn bytes_map_like_normalize() {
        assert_eq!(byte_to_unit(0.0), -1.0);
        assert_eq!(byte_to_unit(255.0), 1.0);
        assert!((byte_to_unit(128.0) - 0.003_921_6).abs() < 1e-6);
    }
}
