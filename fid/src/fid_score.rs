//! FID against one real reference, prepared once and scored as often as wanted: `dcgan
//! evaluate fid` scores one set of images, the coordinator's `--eval-every` a checkpoint's
//! samples every few epochs, with the same classifier, reference set and maths.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail, ensure};
use data::Dataset;
use kernels::Gan;

use crate::classifier::{Classifier, ClassifierKey};
use crate::fid::{GaussianStats, frechet_distance};
use crate::latent::Latents;
use crate::render::{self, BnStats};

/// How the feature classifier is trained (part of its cache key).
#[derive(Clone, Debug)]
pub struct ClassifierOptions {
    pub width: usize,
    pub epochs: usize,
    /// Train on the first N images only.
    pub train_limit: Option<usize>,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        Self { width: 32, epochs: 2, train_limit: None }
    }
}

/// The classifier and the real reference set's feature statistics.
pub struct FidReference {
    pub classifier: Classifier,
    pub classifier_path: PathBuf,
    real: GaussianStats,
    /// Images in the reference set, and in each scored set.
    pub count: usize,
}

impl FidReference {
    /// Loads the classifier cached at `cache` (or trains and caches it) for the labelled dataset
    /// `real` named `spec`, and takes the statistics of its first `count` images.
    pub fn prepare(
        spec: &str,
        real: &Dataset,
        labels: &[u8],
        count: usize,
        options: &ClassifierOptions,
        cache: Option<&Path>,
    ) -> Result<Self> {
        ensure!(count >= 2, "FID needs at least 2 images per set, not {count}");
        ensure!(options.epochs >= 1, "the FID classifier needs at least 1 training epoch");
        ensure!(real.len >= count, "dataset {spec} has {} images, fewer than the {count} FID compares", real.len);
        let classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
        let key = ClassifierKey {
            dataset: canonical_spec(spec),
            image_size: real.image_size,
            nc: real.nc,
            classes: classes.max(2),
            width: options.width,
            epochs: options.epochs,
            train_limit: options.train_limit,
            seed: 0,
        };
        let path = cache.map(Path::to_path_buf).unwrap_or_else(|| default_cache_dir().join(key.file_name()));
        let mut classifier = load_or_train(key, &path, real, labels)?;
        let (features, _) = classifier.features(&real.pixels[..count * real.sample_len()])?;
        let real_stats = GaussianStats::of(&features, classifier.feature_len());
        Ok(Self { classifier, classifier_path: path, real: real_stats, count })
    }

    /// FID of NCHW `images` in [-1, 1] against the reference, and the class the classifier
    /// gives each image.
    pub fn score_images(&mut self, images: &[f32]) -> Result<(f64, Vec<usize>)> {
        let (features, predictions) = self.classifier.features(images)?;
        let stats = GaussianStats::of(&features, self.classifier.feature_len());
        Ok((frechet_distance(&self.real, &stats), predictions))
    }

    /// FID of `count` samples of `gan` from noise seeded by `seed` (eval-mode BatchNorm).
    pub fn score_generator(&mut self, gan: &mut Gan, seed: u64) -> Result<f64> {
        let cfg = gan.model_config().clone();
        ensure!(
            cfg.nc == self.classifier.key.nc && cfg.image_size == self.classifier.key.image_size,
            "the generator makes {}-channel {}px images, the FID reference holds {}-channel {}px ones",
            cfg.nc,
            cfg.image_size,
            self.classifier.key.nc,
            self.classifier.key.image_size
        );
        let z = Latents::from_seed(seed, self.count, cfg.nz);
        let images = render::generate(gan, &z.z, BnStats::Running)?;
        Ok(self.score_images(&images)?.0)
    }
}

/// The dataset spec as the classifier's cache key: `kind:ABSOLUTE_PATH`, so that
/// `mnist:data/mnist` given to the coordinator and `mnist:/work/data/mnist` given to `dcgan
/// evaluate` name the same classifier.
pub fn canonical_spec(spec: &str) -> String {
    let Ok(parsed) = spec.parse::<data::DatasetSpec>() else { return spec.to_string() };
    match parsed.path().and_then(|p| std::fs::canonicalize(p).ok()) {
        Some(abs) => format!("{}:{}", parsed.kind(), abs.display()),
        None => spec.to_string(),
    }
}

/// Where the classifier cache lives by default: $XDG_CACHE_HOME/dcgan or ~/.cache/dcgan.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("dcgan");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("dcgan"),
        None => PathBuf::from(".dcgan-cache"),
    }
}

/// Loads the cached classifier for `key`, or trains and caches one.
fn load_or_train(key: ClassifierKey, path: &Path, data: &Dataset, labels: &[u8]) -> Result<Classifier> {
    if path.is_file() {
        match Classifier::load(path, &key)? {
            Some(c) => {
                eprintln!("reusing FID classifier {}", path.display());
                return Ok(c);
            }
            None => bail!(
                "{} holds a classifier trained with other settings; pass another classifier path or delete it",
                path.display()
            ),
        }
    }
    let n = key.train_limit.map_or(data.len, |l| l.min(data.len));
    eprintln!("training the FID classifier on {n} images of {} (cached as {})", key.dataset, path.display());
    let c = Classifier::train(key, &data.pixels[..n * data.sample_len()], &labels[..n])?;
    c.save(path)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_spelled_two_ways_is_one_cache_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("mnist")).unwrap();
        let absolute = format!("mnist:{}", dir.path().join("mnist").display());
        let roundabout = format!("mnist:{}", dir.path().join("mnist/../mnist").display());
        assert_eq!(canonical_spec(&absolute), canonical_spec(&roundabout));
        assert_eq!(canonical_spec("shapes"), "shapes");
        // A path that does not exist stays as given (loading it will say what is wrong).
        assert_eq!(canonical_spec("mnist:/no/such/dir"), "mnist:/no/such/dir");
    }
}
