//! `dcgan nearest`: the training images closest to generated samples.
//!
//! A generator that memorised its data would reproduce training images; their nearest
//! neighbours would then be near-copies. Pixel distance finds copies; distance in D's feature
//! space also finds images that are the same up to small shifts, which pixels miss.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;
use data::DatasetSpec;
use kernels::ops::matmul::{Gemm, Operand, Output, matmul};

use crate::checkpoint_ref::{self, Source};
use crate::features;
use crate::generate::SampleArgs;
use dcgan_fid::latent;
use dcgan_fid::render;

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  \
dcgan nearest --checkpoint runs/mnist --count 8 --dataset mnist:/data/mnist --limit 10000 --out out/nearest\n\
Writes nearest_pixels.png and nearest_features.png: one row per sample, the sample first, then\n\
its --k nearest training images.")]
pub struct NearestArgs {
    #[command(flatten)]
    pub samples: SampleArgs,
    /// The training data to search.
    #[arg(long)]
    pub dataset: DatasetSpec,
    /// Training images searched (the first N).
    #[arg(long, default_value_t = 10000)]
    pub limit: usize,
    /// Neighbours shown per sample.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    #[arg(long)]
    pub out: PathBuf,
}

/// For each row of `a` (n x d), the indices of the `k` nearest rows of `b` (m x d) by
/// Euclidean distance, nearest first; |a|^2 + |b|^2 - 2 a.b with the cross term as one GEMM.
pub fn nearest_rows(a: &[f32], b: &[f32], d: usize, k: usize) -> Vec<Vec<usize>> {
    let (n, m) = (a.len() / d, b.len() / d);
    let mut cross = vec![0.0; n * m];
    matmul(Gemm { m: n, n: m, k: d }, Operand::normal(a), Operand::transposed(b), Output::overwrite(&mut cross));
    let nb: Vec<f32> = b.chunks(d).map(|r| r.iter().map(|v| v * v).sum()).collect();
    (0..n)
        .map(|i| {
            // |a_i|^2 is the same for every candidate and does not change the order.
            let row = &cross[i * m..(i + 1) * m];
            let mut idx: Vec<usize> = (0..m).collect();
            let dist = |j: usize| nb[j] - 2.0 * row[j];
            idx.sort_by(|x, y| dist(*x).total_cmp(&dist(*y)));
            idx.truncate(k);
            idx
        })
        .collect()
}

fn l2_normalise_rows(x: &mut [f32], d: usize) {
    for r in x.chunks_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|v| *v /= n);
        }
    }
}

pub fn run(args: &NearestArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.samples.checkpoint)?;
    let cfg = model.config().clone();
    let (nc, s) = (cfg.nc, cfg.image_size);
    ensure!(args.k >= 1 && args.k <= 32, "--k must be in 1..=32");
    let z = latent::source(args.samples.z_file.as_deref(), args.samples.seed, args.samples.count, cfg.nz)?;
    let fake = render::generate(&mut model.gan, &z.z, args.samples.bn)?;
    let real = args.dataset.load(s, Some(args.limit)).with_context(|| format!("loading dataset {}", args.dataset))?;
    ensure!(real.nc == nc, "dataset {} has {} channel(s) but the checkpoint's images have {nc}", args.dataset, real.nc);
    ensure!(real.len > 0, "dataset {} holds no images", args.dataset);
    let per = nc * s * s;
    let k = args.k.min(real.len);
    render::ensure_out_dir(&args.out)?;

    let write = |name: &str, nn: &[Vec<usize>]| -> Result<()> {
        let mut tiles = Vec::new();
        for (i, row) in nn.iter().enumerate() {
            tiles.extend_from_slice(&fake[i * per..(i + 1) * per]);
            for &j in row {
                tiles.extend_from_slice(real.sample(j));
            }
        }
        render::save_grid(&args.out.join(name), &tiles, nn.len() * (k + 1), nc, s, k + 1)
    };
    write("nearest_pixels.png", &nearest_rows(&fake, &real.pixels, per, k))?;

    if matches!(model.source, Source::GeneratorFile(_)) {
        eprintln!("note: {} has no discriminator; skipped nearest_features.png", args.samples.checkpoint.display());
    } else {
        // Unit-length features: the layers' scales differ widely, and direction is what
        // distinguishes images in a LeakyReLU network's features.
        let d = features::d_feature_len(model.gan.discriminator_net());
        let mut ff = features::d_features(&mut model.gan, &fake)?;
        let mut fr = features::d_features(&mut model.gan, &real.pixels)?;
        l2_normalise_rows(&mut ff, d);
        l2_normalise_rows(&mut fr, d);
        write("nearest_features.png", &nearest_rows(&ff, &fr, d, k))?;
    }
    eprintln!("wrote nearest neighbours of {} samples among {} images to {}", z.len(), real.len, args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exact_and_close_rows() {
        let b = [0.0, 0.0, 1.0, 1.0, 5.0, 5.0, 1.1, 0.9];
        let a = [1.0, 1.0, 4.0, 4.5];
        assert_eq!(nearest_rows(&a, &b, 2, 2), vec![vec![1, 3], vec![2, 1]]);
    }
}
