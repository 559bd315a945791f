//! Running the generator and writing images: the pieces every command that shows samples
//! shares.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use clap::ValueEnum;
use image::RgbImage;
use kernels::Gan;
use kernels::ops::batchnorm::BnMode;
use kernels::tensor::swap_leading_axes;

/// Which statistics the generator's BatchNorm layers use.
///
/// `running` (eval mode) is the default because it makes each image a function of its own z
/// alone: sample 3 of a grid is then the same picture in `generate`, at the end of an
/// interpolation and in an ablation, whatever else shares its batch. `batch` is what the
/// PyTorch example's sample grids use (batch statistics), and may look better on checkpoints
/// whose running statistics lag behind the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BnStats {
    #[default]
    Running,
    Batch,
}

impl BnStats {
    pub fn mode(self) -> BnMode {
        match self {
            BnStats::Running => BnMode::Eval,
            BnStats::Batch => BnMode::Train { update_running: false },
        }
    }
}

/// Images generated per forward pass with running statistics; batch statistics use one pass
/// for everything so that the statistics are those of the whole set.
const CHUNK: usize = 256;

/// Images (NCHW, values in [-1, 1]) for the latent rows `z` (each `nz` long), calling `hook` on
/// every generator block's output (C, N*H*W) as it is produced, so callers can inspect or edit
/// feature maps.
pub fn generate_with_hook(
    gan: &mut Gan,
    z: &[Vec<f32>],
    stats: BnStats,
    hook: &mut dyn FnMut(usize, &mut [f32]),
) -> Result<Vec<f32>> {
    let cfg = gan.model_config().clone();
    let (nz, nc, s) = (cfg.nz, cfg.nc, cfg.image_size);
    let chunk = if stats == BnStats::Batch { z.len().max(1) } else { CHUNK };
    let mut images = Vec::with_capacity(z.len() * nc * s * s);
    for part in z.chunks(chunk) {
        let n = part.len();
        ensure!(part.iter().all(|v| v.len() == nz), "every z must have {nz} values");
        let flat: Vec<f32> = part.iter().flatten().copied().collect();
        let mut zc = vec![0.0; flat.len()];
        swap_leading_axes(&flat, n, nz, 1, &mut zc);
        let out = gan
            .generator_net()
            .forward_with_hook(&zc, n, stats.mode(), None, hook)
            .map_err(|e| anyhow::anyhow!("generator forward failed: {e}"))?;
        let mut nchw = vec![0.0; out.len()];
        swap_leading_axes(out, nc, n, s * s, &mut nchw);
        images.extend_from_slice(&nchw);
    }
    Ok(images)
}

/// [`generate_with_hook`] with no hook.
pub fn generate(gan: &mut Gan, z: &[Vec<f32>], stats: BnStats) -> Result<Vec<f32>> {
    generate_with_hook(gan, z, stats, &mut |_, _| {})
}

/// Writes `n` images as a grid PNG with `nrow` images per row (torchvision's layout).
pub fn save_grid(path: &Path, images: &[f32], n: usize, nc: usize, size: usize, nrow: usize) -> Result<()> {
    data::save_grid(path, images, n, nc, size, nrow).with_context(|| format!("writing {}", path.display()))
}

/// The grid as an image, for composing several grids into one picture.
pub fn grid(images: &[f32], n: usize, nc: usize, size: usize, nrow: usize) -> RgbImage {
    data::grid_image(images, n, nc, size, nrow.max(1))
}

/// Places images left to right with `gap` white pixels between them, top-aligned.
pub fn hconcat(parts: &[RgbImage], gap: u32) -> RgbImage {
    let width = parts.iter().map(|p| p.width()).sum::<u32>() + gap * parts.len().saturating_sub(1) as u32;
    let height = parts.iter().map(|p| p.height()).max().unwrap_or(0);
    let mut out = RgbImage::from_pixel(width.max(1), height.max(1), image::Rgb([255, 255, 255]));
    let mut x = 0;
    for p in parts {
        image::imageops::replace(&mut out, p, x as i64, 0);
        x += p.width() + gap;
    }
    out
}

pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

/// Creates the output directory, naming it in the error.
pub fn ensure_out_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating output directory {}", dir.display()))
}

/// Rescales `v` linearly so that its largest magnitude maps to 1: for showing filters and
/// gradient maps, whose scale is arbitrary, in the [-1, 1] range the grid writer expects.
pub fn normalise_symmetric(v: &mut [f32]) {
    let m = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if m > 0.0 {
        v.iter_mut().for_each(|x| *x /= m);
    }
}

/// Rescales `v` so that its range maps to [-1, 1].
pub fn normalise_range(v: &mut [f32]) {
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), x| (l.min(*x), h.max(*x)));
    if hi > lo {
        v.iter_mut().for_each(|x| *x = (*x - lo) / (hi - lo) * 2.0 - 1.0);
    } else {
        v.fill(0.0);
    }
}

/// Nearest-neighbour upscaling of `n` images (NCHW) by `factor`, so that 4x4 filters or small
/// feature maps are visible in a PNG.
pub fn upscale(images: &[f32], n: usize, nc: usize, size: usize, factor: usize) -> Vec<f32> {
    let big = size * factor;
    let mut out = vec![0.0; n * nc * big * big];
    for p in 0..n * nc {
        let src = &images[p * size * size..][..size * size];
        let dst = &mut out[p * big * big..][..big * big];
        for y in 0..big {
            for x in 0..big {
                dst[y * big + x] = src[(y / factor) * size + x / factor];
            }
        }
    }
    out
}
