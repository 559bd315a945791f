//! The sample grids of a run: `samples/real.png` and `samples/fake_epoch_NNN.png`.
//!
//! The coordinator draws the fake grids itself, from the checkpoint rank 0 uploaded at the end
//! of each epoch, rather than asking rank 0 to render them: drawing then happens off the
//! training's critical path (no rank waits at the next all-reduce while rank 0 renders), the
//! workers stay pure training loops, and each grid is known to show exactly a stored
//! checkpoint. The cost is one generator forward pass of 64 images on the coordinator's CPU per
//! epoch, small next to an epoch of training.

use std::path::{Path, PathBuf};

use data::SampleStore;
use kernels::{CheckpointFiles, Gan};

/// Images per grid and per row, as the PyTorch example's `save_image` calls use.
pub const GRID_IMAGES: usize = 64;
pub const GRID_ROW: usize = 8;

/// Why a grid could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cannot load checkpoint for samples: {0}")]
    Load(#[source] kernels::KernelError),
    #[error("cannot generate samples: {0}")]
    Generate(#[source] kernels::KernelError),
    #[error(transparent)]
    Write(#[from] data::DataError),
}

/// `samples/real.png`: the first samples of the first epoch's order (what the first steps train on).
pub fn write_real(dir: &Path, samples: &SampleStore, seed: u64) -> Result<PathBuf, SampleError> {
    let (pixels, n) = first_of_epoch(samples, seed)?;
    let path = dir.join("real.png");
    data::save_grid(&path, &pixels, n, samples.nc(), samples.image_size(), GRID_ROW)?;
    Ok(path)
}

/// The first grid's worth of samples of the first epoch's order, and how many there are.
fn first_of_epoch(samples: &SampleStore, seed: u64) -> Result<(Vec<f32>, usize), data::DataError> {
    let order = data::epoch_order(seed, 0, samples.len());
    let n = GRID_IMAGES.min(order.len());
    let mut pixels = Vec::new();
    samples.gather(&order[..n], &mut pixels)?;
    Ok((pixels, n))
}

/// The mean pairwise distance of the real grid's samples: the yardstick of mode collapse.
pub fn real_diversity(samples: &SampleStore, seed: u64) -> Result<f64, data::DataError> {
    let (pixels, n) = first_of_epoch(samples, seed)?;
    Ok(crate::health::mean_pairwise_distance(&pixels, n))
}

/// A fake grid as drawn: where, its size, and its mean pairwise distance (see [`crate::health`]).
pub struct FakeGrid {
    pub path: PathBuf,
    /// Width and height in pixels (an RGB PNG).
    pub size: (u32, u32),
    pub diversity: f64,
}

/// Which files one checkpoint's fixed-noise grid is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridNames {
    /// `fake_epoch_NNN.png`: the checkpoint ends this epoch (or the run).
    pub epoch: Option<u64>,
    /// `fake_step_NNNNNNNN.png`: the checkpoint's step is one of `--sample-every`'s.
    pub step: Option<u64>,
}

impl GridNames {
    pub fn paths(&self, dir: &Path) -> Vec<PathBuf> {
        let epoch = self.epoch.map(|e| dir.join(format!("fake_epoch_{e:03}.png")));
        let step = self.step.map(|s| dir.join(format!("fake_step_{s:08}.png")));
        epoch.into_iter().chain(step).collect()
    }
}

/// The fixed-noise grid of a checkpoint, written to every file `names` gives (the generator
/// runs once).
pub fn write_fake(
    dir: &Path,
    files: Vec<(String, Vec<u8>)>,
    seed: u64,
    names: GridNames,
) -> Result<Vec<FakeGrid>, SampleError> {
    let (mut gan, _) = Gan::load(&CheckpointFiles { files }).map_err(SampleError::Load)?;
    let model = gan.model_config().clone();
    let z = kernels::rng::fixed_noise(seed, GRID_IMAGES, model.nz);
    let images = gan.generate(&z).map_err(SampleError::Generate)?;
    let diversity = crate::health::mean_pairwise_distance(images.data(), GRID_IMAGES);
    let size = data::grid_size(GRID_IMAGES, model.image_size, GRID_ROW);
    let mut grids = Vec::new();
    for path in names.paths(dir) {
        data::save_grid(&path, images.data(), GRID_IMAGES, model.nc, model.image_size, GRID_ROW)?;
        grids.push(FakeGrid { path, size, diversity });
    }
    Ok(grids)
}
