//! Samples by index for training, from wherever they live, without holding the data set in
//! memory: a prepared set's shards on disk, or a set drawn on demand (the built-in shapes,
//! `fake`).

use std::path::Path;

use crate::prepared::{PreparedSet, Progress, cache};
use crate::{DataError, Dataset, DatasetSpec};

/// A trainer's view of its data set.
#[derive(Debug)]
pub enum SampleStore {
    /// Shards written by `dcgan prepare` (or prepared on the fly into the cache).
    Prepared(PreparedSet),
    /// A set drawn on demand: sample `i` is rendered when asked for.
    Drawn { set: crate::Drawn, len: usize, image_size: usize },
    /// A data set decoded into memory (a worker's `--data local:SPEC`, and tests).
    Memory(Dataset),
}

impl SampleStore {
    /// Opens `spec` for training at `image_size`: a `prepared:` directory as it is, the
    /// built-in set as it is, any other source prepared first into its directory under
    /// `cache_root` (once; later runs reuse it). Shards are not hashed here: call
    /// [`SampleStore::verify`].
    pub fn open(
        spec: &DatasetSpec,
        image_size: usize,
        limit: Option<usize>,
        cache_root: &Path,
        progress: &dyn Progress,
    ) -> Result<SampleStore, DataError> {
        if image_size == 0 {
            return Err(DataError::InvalidArgument {
                path: spec.path().unwrap_or(Path::new(spec.kind())).to_path_buf(),
                msg: "image size must be at least 1".into(),
            });
        }
        match spec {
            DatasetSpec::Shapes | DatasetSpec::Fake => {
                let set = spec.drawn().expect("a drawn set");
                Ok(SampleStore::Drawn { set, len: set.len_for(limit), image_size })
            }
            DatasetSpec::Prepared(dir) => {
                let set = PreparedSet::open(dir)?.with_limit(limit);
                check_prepared_size(&set, image_size)?;
                Ok(SampleStore::Prepared(set))
            }
            _ => {
                let prepared = cache::prepare_cached(cache_root, spec, image_size, limit, progress)?;
                Ok(SampleStore::Prepared(PreparedSet::open(&prepared.dir)?))
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            SampleStore::Prepared(p) => p.len(),
            SampleStore::Drawn { len, .. } => *len,
            SampleStore::Memory(d) => d.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn nc(&self) -> usize {
        match self {
            SampleStore::Prepared(p) => p.nc(),
            SampleStore::Drawn { set, .. } => set.nc(),
            SampleStore::Memory(d) => d.nc,
        }
    }

    pub fn image_size(&self) -> usize {
        match self {
            SampleStore::Prepared(p) => p.image_size(),
            SampleStore::Drawn { image_size, .. } => *image_size,
            SampleStore::Memory(d) => d.image_size,
        }
    }

    /// Values in one sample.
    pub fn sample_len(&self) -> usize {
        self.nc() * self.image_size() * self.image_size()
    }

    /// The set's short name for logs (`mnist`, `shapes`, ...).
    pub fn name(&self) -> &str {
        match self {
            SampleStore::Prepared(p) => &p.manifest().source.kind,
            SampleStore::Drawn { set, .. } => set.name(),
            SampleStore::Memory(d) => &d.name,
        }
    }

    /// The prepared directory and its content id, where the samples come from one.
    pub fn prepared(&self) -> Option<&PreparedSet> {
        match self {
            SampleStore::Prepared(p) => Some(p),
            _ => None,
        }
    }

    /// Checks a prepared set's files against their sha256 (nothing to check otherwise).
    pub fn verify(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<(), DataError> {
        match self {
            SampleStore::Prepared(p) => p.verify(progress),
            _ => Ok(()),
        }
    }

    /// Asks for the samples `indices` to be read ahead from disk (see [`PreparedSet::will_need`]).
    pub fn will_need(&self, indices: &[u32]) {
        if let SampleStore::Prepared(p) = self {
            p.will_need(indices);
        }
    }

    /// Copies the samples `indices` (in that order) into `out` as an NCHW batch in [-1, 1].
    /// The same images give the same values from every variant.
    pub fn gather(&self, indices: &[u32], out: &mut Vec<f32>) -> Result<(), DataError> {
        match self {
            SampleStore::Prepared(p) => p.gather(indices, out),
            SampleStore::Drawn { set, len, image_size } => {
                let n = set.nc() * image_size * image_size;
                out.clear();
                out.resize(indices.len() * n, 0.0);
                for (&i, o) in indices.iter().zip(out.chunks_exact_mut(n.max(1))) {
                    if i as usize >= *len {
                        return Err(DataError::InvalidArgument {
                            path: set.name().into(),
                            msg: format!("sample {i} is past the {len} samples of this set"),
                        });
                    }
                    set.render(i as usize, *image_size, o);
                }
                Ok(())
            }
            SampleStore::Memory(d) => {
                if let Some(&bad) = indices.iter().find(|&&i| i as usize >= d.len) {
                    return Err(DataError::InvalidArgument {
                        path: d.name.clone().into(),
                        msg: format!("sample {bad} is past the {} samples of this set", d.len),
                    });
                }
                d.gather(indices, out);
                Ok(())
            }
        }
    }

    /// The first `n` samples (all, if `None`) in memory, with labels where the set has them:
    /// for an FID classifier and its reference statistics, never for training.
    pub fn head(&self, n: Option<usize>) -> Result<Dataset, DataError> {
        let n = n.unwrap_or(self.len()).min(self.len());
        match self {
            SampleStore::Prepared(p) => p.head(Some(n)),
            SampleStore::Drawn { set, image_size, .. } => Ok(set.generate(n, *image_size)),
            SampleStore::Memory(d) => {
                let mut pixels = Vec::new();
                d.gather(&(0..n as u32).collect::<Vec<_>>(), &mut pixels);
                let labels = d.labels.as_ref().map(|l| l[..n].to_vec());
                Ok(Dataset { name: d.name.clone(), nc: d.nc, image_size: d.image_size, len: n, pixels, labels })
            }
        }
    }

    /// Whether the samples have class labels (without reading them).
    pub fn has_labels(&self) -> bool {
        match self {
            SampleStore::Prepared(p) => p.manifest().labels,
            SampleStore::Drawn { set, .. } => set.has_labels(),
            SampleStore::Memory(d) => d.labels.is_some(),
        }
    }
}

/// A prepared set trains only at the size it was prepared at.
pub(crate) fn check_prepared_size(set: &PreparedSet, image_size: usize) -> Result<(), DataError> {
    if set.image_size() != image_size {
        return Err(DataError::InvalidArgument {
            path: set.dir().to_path_buf(),
            msg: format!(
                "was prepared at {0}x{0}, not {image_size}x{image_size}: train with --image-size {0}, or prepare the \
                 source again at {image_size}",
                set.image_size()
            ),
        });
    }
    Ok(())
}
