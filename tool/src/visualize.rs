//! `dcgan visualize`: what the discriminator's features respond to.
//!
//! Two pictures, as in the paper: the first layer's filters drawn directly (they are small
//! image patches), and, for chosen features of a deeper layer, the images that excite each one
//! most, each beside its guided-backpropagation map (which pixels raise that feature).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;
use data::DatasetSpec;

use crate::checkpoint_ref;
use crate::features;
use dcgan_fid::latent;
use dcgan_fid::render::{self, BnStats};

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  \
dcgan visualize --checkpoint runs/mnist --dataset mnist:/data/mnist --limit 2000 --layer 2 --features 0,1,2,3 --out out/vis\n\
Writes filters.png (D's first-layer filters) and features_layer<L>.png: for each feature two\n\
rows, the --top images that activate it most and their guided-backpropagation maps.")]
pub struct VisualizeArgs {
    /// A checkpoint or run directory (it must hold a discriminator).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images to search for the top activations; default: samples generated from --seed.
    #[arg(long)]
    pub dataset: Option<DatasetSpec>,
    /// Images read from --dataset (or generated).
    #[arg(long, default_value_t = 2000)]
    pub limit: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Discriminator block whose features are shown; default: the deepest feature block.
    #[arg(long)]
    pub layer: Option<usize>,
    /// Features (channels) of that block, comma-separated.
    #[arg(long, default_value = "0,1,2,3,4,5")]
    pub features: String,
    /// Images shown per feature.
    #[arg(long, default_value_t = 8)]
    pub top: usize,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &VisualizeArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.checkpoint)?;
    model.require_discriminator("visualize")?;
    let cfg = model.config().clone();
    let (nc, s) = (cfg.nc, cfg.image_size);
    ensure!(args.top >= 1 && args.top <= 64, "--top must be in 1..=64");
    ensure!(args.limit >= 1, "--limit must be at least 1");
    render::ensure_out_dir(&args.out)?;

    // First-layer filters, [ndf, nc, k, k]: each drawn as a k x k patch, scaled to its own
    // largest weight so that weak filters are visible too.
    let net = model.gan.discriminator_net();
    let first = &net.blocks[0];
    let (ndf, k) = (first.shape.out_channels, first.shape.kernel);
    let mut filters = net.params[first.weight.clone()].to_vec();
    filters.chunks_mut(nc * k * k).for_each(render::normalise_symmetric);
    let factor = (32 / k).max(1);
    let big = render::upscale(&filters, ndf, nc, k, factor);
    let nrow = (ndf as f64).sqrt().ceil() as usize;
    render::save_grid(&args.out.join("filters.png"), &big, ndf, nc, k * factor, nrow)?;

    let blocks = net.blocks.len();
    let layer = args.layer.unwrap_or(blocks.saturating_sub(2));
    ensure!(layer + 1 < blocks, "--layer {layer}: the discriminator has feature layers 0..={}", blocks - 2);
    let channels = net.blocks[layer].shape.out_channels;
    let chosen = latent::parse_indices(&args.features)?;
    if let Some(&bad) = chosen.iter().find(|&&c| c >= channels) {
        anyhow::bail!(
            "--features: feature {bad} does not exist; discriminator layer {layer} has features 0..{channels}"
        );
    }

    let images = match &args.dataset {
        Some(spec) => {
            let d = spec.load(s, Some(args.limit)).with_context(|| format!("loading dataset {spec}"))?;
            ensure!(d.nc == nc, "dataset {spec} has {} channel(s) but the checkpoint's images have {nc}", d.nc);
            d.pixels
        }
        None => {
            let z = latent::Latents::from_seed(args.seed, args.limit, cfg.nz);
            render::generate(&mut model.gan, &z.z, BnStats::Running)?
        }
    };
    let per = nc * s * s;
    let n = images.len() / per;

    // Each image's strongest response of each chosen feature, anywhere in the map.
    let mut scores = vec![vec![f32::NEG_INFINITY; n]; chosen.len()];
    features::forward_chunks(&mut model.gan, &images, |start, batch, net| {
        let b = &net.blocks[layer];
        let plane = b.out_side * b.out_side;
        for (fi, &f) in chosen.iter().enumerate() {
            for i in 0..batch {
                let m = b.output()[(f * batch + i) * plane..][..plane].iter().fold(f32::NEG_INFINITY, |a, v| a.max(*v));
                scores[fi][start + i] = m;
            }
        }
        Ok(())
    })?;

    let top = args.top.min(n);
    let mut tiles = Vec::new();
    for (fi, &f) in chosen.iter().enumerate() {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| scores[fi][*b].total_cmp(&scores[fi][*a]));
        order.truncate(top);
        let picked: Vec<f32> = order.iter().flat_map(|&i| images[i * per..(i + 1) * per].iter().copied()).collect();
        let maps = guided_maps(&mut model.gan, &picked, top, layer, f)?;
        tiles.extend_from_slice(&picked);
        tiles.extend_from_slice(&maps);
    }
    let path = args.out.join(format!("features_layer{layer}.png"));
    render::save_grid(&path, &tiles, 2 * top * chosen.len(), nc, s, top)?;
    eprintln!(
        "wrote filters.png and {} to {}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or_default(),
        args.out.display()
    );
    Ok(())
}

/// Guided-backpropagation maps (NCHW, each scaled to [-1, 1]) of feature `f` of D block
/// `layer` at its strongest position, for each of the `n` images.
fn guided_maps(gan: &mut kernels::Gan, images: &[f32], n: usize, layer: usize, f: usize) -> Result<Vec<f32>> {
    let cfg = gan.model_config().clone();
    let (nc, s) = (cfg.nc, cfg.image_size);
    let mut maps = Vec::new();
    features::forward_chunks(gan, images, |_, batch, net| {
        let b = &net.blocks[layer];
        let plane = b.out_side * b.out_side;
        let mut d_out = vec![0.0; b.output().len()];
        for i in 0..batch {
            let at = (f * batch + i) * plane;
            let row = &b.output()[at..at + plane];
            let arg = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (j, v)| if *v > bv { (j, *v) } else { (bi, bv) })
                .0;
            d_out[at + arg] = 1.0;
        }
        // Samples do not interact in eval mode, so one backward gives every image its own map.
        let g = features::guided_backprop_eval(net, layer, batch, &d_out);
        let mut nchw = vec![0.0; g.len()];
        kernels::tensor::swap_leading_axes(&g, nc, batch, s * s, &mut nchw);
        maps.extend_from_slice(&nchw);
        Ok(())
    })?;
    debug_assert_eq!(maps.len(), n * nc * s * s);
    maps.chunks_mut(nc * s * s).for_each(render::normalise_range);
    Ok(maps)
}
