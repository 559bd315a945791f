//! `dcgan arithmetic`: vector arithmetic on z, as the paper's "smiling woman - neutral woman +
//! neutral man = smiling man".
//!
//! Single samples are too noisy for arithmetic to work, so (as the paper does) each concept is
//! the mean z of a few samples the user picked from a generated grid. The result is decoded
//! together with a few points of small noise around it, which shows whether the concept is a
//! stable region of Z or one lucky point.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;
use noise::Gaussian;

use crate::checkpoint_ref;
use crate::generate::SampleArgs;
use dcgan_fid::latent::{self, Latents};
use dcgan_fid::render;

#[derive(Args, Debug)]
#[command(after_help = "Example (pick indices from `dcgan generate --seed 3` first):\n  \
dcgan arithmetic --checkpoint runs/mnist --seed 3 --a 1,7,12 --b 4,9,20 --c 2,5,30 --out out/arith\n\
Writes arithmetic.png: rows A, B, C (mean-z image first, then the chosen samples), then the\n\
result A - B + C followed by --variations images with --noise around it.")]
pub struct ArithmeticArgs {
    #[command(flatten)]
    pub samples: SampleArgs,
    /// Indices of the samples whose mean z is concept A.
    #[arg(long)]
    pub a: String,
    /// Indices for concept B (subtracted).
    #[arg(long)]
    pub b: String,
    /// Indices for concept C (added).
    #[arg(long)]
    pub c: String,
    /// Standard deviation of the noise added around the result.
    #[arg(long, default_value_t = 0.25)]
    pub noise: f32,
    /// Noisy variations of the result to show.
    #[arg(long, default_value_t = 7)]
    pub variations: usize,
    #[arg(long)]
    pub out: PathBuf,
}

fn mean(vs: &[Vec<f32>]) -> Vec<f32> {
    let mut m = vec![0.0; vs[0].len()];
    for v in vs {
        m.iter_mut().zip(v).for_each(|(a, b)| *a += b / vs.len() as f32);
    }
    m
}

pub fn run(args: &ArithmeticArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.samples.checkpoint)?;
    let cfg = model.config().clone();
    let all = latent::source(args.samples.z_file.as_deref(), args.samples.seed, args.samples.count, cfg.nz)?;
    ensure!(args.noise.is_finite() && args.noise >= 0.0, "--noise must be a non-negative number");
    ensure!(args.variations <= 64, "--variations {} is more than 64", args.variations);
    let groups = [("--a", &args.a), ("--b", &args.b), ("--c", &args.c)]
        .iter()
        .map(|(flag, s)| all.pick(&latent::parse_indices(s)?, flag))
        .collect::<Result<Vec<_>>>()?;
    let means: Vec<Vec<f32>> = groups.iter().map(|g| mean(g)).collect();
    let result: Vec<f32> = (0..cfg.nz).map(|i| means[0][i] - means[1][i] + means[2][i]).collect();
    let mut gauss = Gaussian::new(args.samples.seed ^ 0xA717_4E71);
    let mut results = vec![result.clone()];
    for _ in 0..args.variations {
        results.push(result.iter().map(|v| v + args.noise * gauss.sample()).collect());
    }

    // Rows of equal width; missing cells are left blank (value -1, black).
    let width = groups.iter().map(|g| g.len() + 1).max().unwrap_or(1).max(results.len());
    let mut rows: Vec<Vec<Option<Vec<f32>>>> = Vec::new();
    for (g, m) in groups.iter().zip(&means) {
        rows.push(std::iter::once(m).chain(g.iter()).cloned().map(Some).collect());
    }
    rows.push(results.iter().cloned().map(Some).collect());
    let cells: Vec<Option<Vec<f32>>> = rows
        .into_iter()
        .flat_map(|mut r| {
            r.resize(width, None);
            r
        })
        .collect();
    let z: Vec<Vec<f32>> = cells.iter().flatten().cloned().collect();
    let images = render::generate(&mut model.gan, &z, args.samples.bn)?;
    let per = cfg.nc * cfg.image_size * cfg.image_size;
    let mut grid = Vec::with_capacity(cells.len() * per);
    let mut next = images.chunks(per);
    for c in &cells {
        match c {
            Some(_) => grid.extend_from_slice(next.next().unwrap_or_default()),
            None => grid.extend(std::iter::repeat_n(-1.0, per)),
        }
    }
    render::ensure_out_dir(&args.out)?;
    render::save_grid(&args.out.join("arithmetic.png"), &grid, cells.len(), cfg.nc, cfg.image_size, width)?;
    Latents { nz: cfg.nz, z: results }.save(&args.out.join("result_z.json"))?;
    eprintln!("wrote arithmetic.png (4 rows of {width}) and result_z.json to {}", args.out.display());
    Ok(())
}

/// A tiny seeded Gaussian source, so the noise around a result is reproducible from the seed
/// without another dependency.
mod noise {
    pub struct Gaussian(rand::rngs::StdRng);

    impl Gaussian {
        pub fn new(seed: u64) -> Self {
            Self(kernels::rng::stream(&[0xA417, seed]))
        }
        pub fn sample(&mut self) -> f32 {
            let mut v = [0.0];
            kernels::rng::fill_normal(&mut self.0, 0.0, 1.0, &mut v);
            v[0]
        }
    }
}
