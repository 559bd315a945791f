//! `dcgan generate`: samples from a checkpoint, and the z behind them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::checkpoint_ref;
use dcgan_fid::latent::{self, Latents};
use dcgan_fid::render::{self, BnStats};

/// Arguments every command that starts from a set of generated samples shares.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A checkpoint directory, a run directory (its latest checkpoint), or a generator file:
    /// .safetensors, or a PyTorch .pth state dict (`torch.save(netG.state_dict(), path)`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Seed of the latent vectors (the run's seed reproduces its sample grids' z).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of samples drawn from the seed.
    #[arg(long, default_value_t = 64)]
    pub count: usize,
    /// Read the z vectors from this JSON file (as written by `generate`) instead of the seed.
    #[arg(long)]
    pub z_file: Option<PathBuf>,
    /// BatchNorm statistics in the generator: running (eval, per-sample deterministic) or
    /// batch (as the PyTorch example's sample grids).
    #[arg(long, value_enum, default_value_t = BnStats::Running)]
    pub bn: BnStats,
}

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  dcgan generate --checkpoint runs/mnist --count 64 --out out/samples\n  \
dcgan generate --checkpoint runs/mnist --z-file out/samples/z.json --each --out out/again")]
pub struct GenerateArgs {
    #[command(flatten)]
    pub samples: SampleArgs,
    /// Output directory: samples.png (or sample_NNNN.png with --each) and z.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Write one PNG per sample, at the image size with no border, instead of a grid.
    #[arg(long)]
    pub each: bool,
    /// Images per grid row.
    #[arg(long, default_value_t = 8)]
    pub nrow: usize,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.samples.checkpoint)?;
    let cfg = model.config().clone();
    let z = latent::source(args.samples.z_file.as_deref(), args.samples.seed, args.samples.count, cfg.nz)?;
    let images = render::generate(&mut model.gan, &z.z, args.samples.bn)?;
    render::ensure_out_dir(&args.out)?;
    let (nc, s) = (cfg.nc, cfg.image_size);
    if args.each {
        for (i, img) in images.chunks(nc * s * s).enumerate() {
            let path = args.out.join(format!("sample_{i:04}.png"));
            data::save_image(&path, img, nc, s).with_context(|| format!("writing {}", path.display()))?;
        }
    } else {
        render::save_grid(&args.out.join("samples.png"), &images, z.len(), nc, s, args.nrow.max(1))?;
    }
    Latents { nz: cfg.nz, z: z.z.clone() }.save(&args.out.join("z.json"))?;
    eprintln!("wrote {} samples ({}x{}, {} channel(s)) to {}", z.len(), s, s, nc, args.out.display());
    Ok(())
}
