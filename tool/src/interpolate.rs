//! `dcgan interpolate`: walks in latent space between chosen samples.
//!
//! The paper's check that G has not memorised its training set: if it had, the images between
//! two samples would jump from one memorised image to another; a generator that learned the
//! data's structure changes smoothly (a window appears, a wall turns into a window).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;

use crate::checkpoint_ref;
use crate::generate::SampleArgs;
use dcgan_fid::latent::{self, Latents};
use dcgan_fid::render;

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  dcgan interpolate --checkpoint runs/mnist --seed 0 --indices 0,5,9 --out out/walk\n\
Writes linear.png and spherical.png: one row per consecutive pair, its two ends and the\n\
--steps images between them."
)]
pub struct InterpolateArgs {
    #[command(flatten)]
    pub samples: SampleArgs,
    /// Indices (in the seed's sample grid, or the z file) of the points to walk through, in order.
    #[arg(long, default_value = "0,1")]
    pub indices: String,
    /// Images between each pair (the paper shows 9).
    #[arg(long, default_value_t = 9)]
    pub steps: usize,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &InterpolateArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.samples.checkpoint)?;
    let cfg = model.config().clone();
    let all = latent::source(args.samples.z_file.as_deref(), args.samples.seed, args.samples.count, cfg.nz)?;
    let indices = latent::parse_indices(&args.indices)?;
    ensure!(indices.len() >= 2, "--indices needs at least two points to walk between");
    ensure!(args.steps <= 64, "--steps {} is more than 64", args.steps);
    let points = all.pick(&indices, "--indices")?;
    render::ensure_out_dir(&args.out)?;
    let per_row = args.steps + 2;
    for (name, f) in [("linear", latent::lerp as fn(&[f32], &[f32], f32) -> Vec<f32>), ("spherical", latent::slerp)] {
        let mut z = Vec::new();
        for pair in points.windows(2) {
            for k in 0..per_row {
                let t = k as f32 / (per_row - 1) as f32;
                // The ends are the given vectors exactly, not a rounding of them.
                z.push(match k {
                    0 => pair[0].clone(),
                    k if k == per_row - 1 => pair[1].clone(),
                    _ => f(&pair[0], &pair[1], t),
                });
            }
        }
        let images = render::generate(&mut model.gan, &z, args.samples.bn)?;
        render::save_grid(&args.out.join(format!("{name}.png")), &images, z.len(), cfg.nc, cfg.image_size, per_row)?;
        Latents { nz: cfg.nz, z }.save(&args.out.join(format!("{name}_z.json")))?;
    }
    eprintln!("wrote linear.png and spherical.png ({} rows of {per_row}) to {}", points.len() - 1, args.out.display());
    Ok(())
}
