//! `dcgan ablate`: generation with chosen feature maps of a generator layer removed.
//!
//! The paper's "forgetting to draw windows": it fit a logistic regression predicting, from the
//! second-highest layer's activations, whether a position lies inside a window the authors had
//! boxed by hand, dropped every feature map with a positive weight, and the bedrooms it then
//! drew had no windows. This command does both steps: `--mark` gives the boxes (rectangles on
//! some samples), `--maps` lists maps directly; the output shows each sample with and without.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;

use crate::checkpoint_ref;
use crate::generate::SampleArgs;
use dcgan_fid::latent;
use dcgan_fid::linear::{FitOptions, SoftmaxRegression, Standardiser};
use dcgan_fid::render;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
dcgan ablate --checkpoint runs/mnist --count 16 --layer 2 --maps 3,17,40 --out out/ablate\n  \
dcgan ablate --checkpoint runs/mnist --count 16 --mark 0:8,4,24,14 --mark 5:6,2,26,12 --out out/ablate\n\
A mark is SAMPLE:X0,Y0,X1,Y1, a rectangle in image pixels (X1, Y1 exclusive) on sample SAMPLE\n\
of the grid. Writes original.png, ablated.png, side_by_side.png and removed_maps.json.")]
pub struct AblateArgs {
    #[command(flatten)]
    pub samples: SampleArgs,
    /// Generator block whose output maps are removed (0 = the first, after z); default: the
    /// second-highest, the layer the paper used.
    #[arg(long)]
    pub layer: Option<usize>,
    /// Maps to remove, comma-separated, or "none".
    #[arg(long)]
    pub maps: Option<String>,
    /// A region to predict, SAMPLE:X0,Y0,X1,Y1; repeat for several samples. The maps whose
    /// logistic-regression weight for "inside the region" is positive are removed.
    #[arg(long)]
    pub mark: Vec<String>,
    /// With --mark, remove only the K maps with the largest positive weights.
    #[arg(long)]
    pub top: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
}

/// A user-marked rectangle on one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub sample: usize,
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
}

impl Mark {
    pub fn parse(s: &str, count: usize, size: usize) -> Result<Self> {
        let bad = || format!("--mark '{s}': expected SAMPLE:X0,Y0,X1,Y1 (for example 3:4,4,20,20)");
        let (sample, rect) = s.split_once(':').with_context(bad)?;
        let sample: usize = sample.trim().parse().with_context(bad)?;
        let v: Vec<usize> =
            rect.split(',').map(|p| p.trim().parse::<usize>()).collect::<Result<_, _>>().with_context(bad)?;
        let [x0, y0, x1, y1] = v[..] else { bail!(bad()) };
        ensure!(sample < count, "--mark '{s}': sample {sample} is outside the grid of {count} samples");
        ensure!(x0 < x1 && y0 < y1, "--mark '{s}': the rectangle is empty (need X0 < X1 and Y0 < Y1)");
        ensure!(x1 <= size && y1 <= size, "--mark '{s}': the rectangle leaves the {size}x{size} image");
        Ok(Self { sample, x0, y0, x1, y1 })
    }

    /// Whether the centre of cell (x, y) of a `side` x `side` feature map falls inside, in image
    /// pixels of a `size` x `size` image.
    fn covers(&self, x: usize, y: usize, side: usize, size: usize) -> bool {
        let scale = size as f32 / side as f32;
        let (cx, cy) = ((x as f32 + 0.5) * scale, (y as f32 + 0.5) * scale);
        cx >= self.x0 as f32 && cx < self.x1 as f32 && cy >= self.y0 as f32 && cy < self.y1 as f32
    }
}

#[derive(Serialize)]
struct Report {
    layer: usize,
    channels: usize,
    removed: Vec<usize>,
    /// Logistic-regression weight of each removed map (with --mark).
    weights: Vec<f32>,
    /// Accuracy of the regression on the marked samples' positions (with --mark).
    fit_accuracy: Option<f64>,
}

pub fn run(args: &AblateArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.samples.checkpoint)?;
    let cfg = model.config().clone();
    let z = latent::source(args.samples.z_file.as_deref(), args.samples.seed, args.samples.count, cfg.nz)?;
    let blocks = model.gan.generator_net().blocks.len();
    let layer = args.layer.unwrap_or(blocks.saturating_sub(2));
    ensure!(
        layer + 1 < blocks,
        "--layer {layer}: the generator has feature layers 0..={} (block {} is the output image)",
        blocks - 2,
        blocks - 1
    );
    let (channels, side) = {
        let b = &model.gan.generator_net().blocks[layer];
        (b.shape.out_channels, b.out_side)
    };

    let mut report = Report { layer, channels, removed: Vec::new(), weights: Vec::new(), fit_accuracy: None };
    match (&args.maps, args.mark.is_empty()) {
        (Some(_), false) => bail!("give either --maps or --mark, not both"),
        (None, true) => bail!("give the maps to remove with --maps, or regions to predict with --mark"),
        (Some(m), true) => {
            if m.trim() != "none" && !m.trim().is_empty() {
                report.removed = latent::parse_indices(m)?;
            }
            if let Some(&bad) = report.removed.iter().find(|&&c| c >= channels) {
                bail!("--maps: map {bad} does not exist; generator layer {layer} has maps 0..{channels}");
            }
        }
        (None, false) => {
            let marks =
                args.mark.iter().map(|s| Mark::parse(s, z.len(), cfg.image_size)).collect::<Result<Vec<_>>>()?;
            let site = FeatureLayer { index: layer, side, image_size: cfg.image_size };
            select_by_regression(&mut model.gan, &z.z, &marks, site, args, &mut report)?;
        }
    }

    let original = render::generate(&mut model.gan, &z.z, args.samples.bn)?;
    let removed = report.removed.clone();
    let ablated = render::generate_with_hook(&mut model.gan, &z.z, args.samples.bn, &mut |b, out| {
        if b == layer {
            let m = out.len() / channels;
            for &c in &removed {
                out[c * m..(c + 1) * m].fill(0.0);
            }
        }
    })?;
    render::ensure_out_dir(&args.out)?;
    let nrow = (z.len() as f64).sqrt().ceil() as usize;
    let (nc, s) = (cfg.nc, cfg.image_size);
    render::save_grid(&args.out.join("original.png"), &original, z.len(), nc, s, nrow)?;
    render::save_grid(&args.out.join("ablated.png"), &ablated, z.len(), nc, s, nrow)?;
    let both = render::hconcat(
        &[render::grid(&original, z.len(), nc, s, nrow), render::grid(&ablated, z.len(), nc, s, nrow)],
        8,
    );
    render::save_png(&args.out.join("side_by_side.png"), &both)?;
    std::fs::write(args.out.join("removed_maps.json"), serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.join("removed_maps.json").display()))?;
    eprintln!("removed {} of {channels} maps of generator layer {layer}; wrote {}", removed.len(), args.out.display());
    Ok(())
}

/// The generator layer whose maps are fitted: its block index, the side of its square maps, and
/// the side of the images the marks were drawn on.
#[derive(Clone, Copy)]
struct FeatureLayer {
    index: usize,
    side: usize,
    image_size: usize,
}

/// Fits "is this position inside a marked region" from the layer's activations at every
/// position of the marked samples, and removes the maps whose weight is positive.
fn select_by_regression(
    gan: &mut kernels::Gan,
    z: &[Vec<f32>],
    marks: &[Mark],
    site: FeatureLayer,
    args: &AblateArgs,
    report: &mut Report,
) -> Result<()> {
    let FeatureLayer { index: layer, side, image_size: size } = site;
    let mut samples: Vec<usize> = marks.iter().map(|m| m.sample).collect();
    samples.sort_unstable();
    samples.dedup();
    let zs: Vec<Vec<f32>> = samples.iter().map(|&i| z[i].clone()).collect();
    let mut acts = Vec::new();
    render::generate_with_hook(gan, &zs, args.samples.bn, &mut |b, out| {
        if b == layer {
            acts.extend_from_slice(out);
        }
    })?;
    let c = report.channels;
    let n = zs.len();
    let plane = side * side;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (k, &sample) in samples.iter().enumerate() {
        for py in 0..side {
            for px in 0..side {
                for ch in 0..c {
                    x.push(acts[(ch * n + k) * plane + py * side + px]);
                }
                let inside = marks.iter().any(|m| m.sample == sample && m.covers(px, py, side, size));
                y.push(inside as u8);
            }
        }
    }
    let positives = y.iter().filter(|v| **v == 1).count();
    ensure!(
        positives > 0,
        "the marked rectangles cover no cell of layer {layer}'s {side}x{side} maps; mark larger regions"
    );
    ensure!(positives < y.len(), "the marked rectangles cover every position; nothing is left to contrast them with");
    let std = Standardiser::fit(&x, c);
    std.apply(&mut x);
    let mut reg = SoftmaxRegression::new(c, 2);
    reg.fit(&x, &y, &FitOptions { epochs: 200, batch: 64, lr: 0.01, weight_decay: 1e-3, seed: 0 });
    report.fit_accuracy = Some(reg.accuracy(&x, &y));
    let mut scored: Vec<(usize, f32)> =
        (0..c).map(|j| (j, reg.weight(j, 1) - reg.weight(j, 0))).filter(|(_, w)| *w > 0.0).collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = args.top {
        scored.truncate(k);
    }
    report.removed = scored.iter().map(|(j, _)| *j).collect();
    report.weights = scored.iter().map(|(_, w)| *w).collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_and_refuse() {
        assert_eq!(Mark::parse("2:1,2,10,12", 4, 32).unwrap(), Mark { sample: 2, x0: 1, y0: 2, x1: 10, y1: 12 });
        for bad in ["9:1,2,3,4", "1:5,5,5,9", "1:0,0,40,4", "1:1,2,3", "x:1,2,3,4", "1,2,3,4"] {
            assert!(Mark::parse(bad, 4, 32).is_err(), "{bad}");
        }
        let m = Mark::parse("0:0,0,16,16", 1, 32).unwrap();
        assert!(m.covers(0, 0, 4, 32) && m.covers(1, 1, 4, 32) && !m.covers(2, 0, 4, 32));
    }
}
