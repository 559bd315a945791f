//! `dcgan evaluate`: numbers that say how good a checkpoint is.
//!
//! `fid`: the Fréchet distance between generated samples and real images on the features of a
//! classifier trained on the real dataset's labels (cached between runs). `d-features`: the
//! paper's test of D as a feature extractor, a linear classifier on D's max-pooled features of
//! every layer, trained on one labelled set and scored on another.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use data::{Dataset, DatasetSpec};
use serde::Serialize;

use crate::checkpoint_ref;
use crate::features;
use dcgan_fid::fid_score::{ClassifierOptions, FidReference};
use dcgan_fid::latent::Latents;
use dcgan_fid::linear::{FitOptions, SoftmaxRegression, Standardiser};
use dcgan_fid::render::{self, BnStats};

#[derive(Subcommand, Debug)]
pub enum EvaluateCommand {
    /// FID between generated samples (or another dataset, or noise) and a real dataset.
    #[command(after_help = "Examples:\n  \
dcgan evaluate fid --checkpoint runs/mnist --dataset mnist:/data/mnist --count 5000\n  \
dcgan evaluate fid --dataset shapes --against-noise --count 1000\n\
The classifier is trained once per (dataset, size, settings) and cached (see --classifier).")]
    Fid(FidArgs),
    /// Test accuracy of a linear classifier on D's features (the paper's CIFAR-10 experiment).
    #[command(after_help = "Example:\n  \
dcgan evaluate d-features --checkpoint runs/cifar --dataset cifar10:/data/cifar-10 \\\n    \
--test-dataset cifar10:/data/cifar-10/test_batch.bin.xz --train-limit 10000")]
    DFeatures(DFeaturesArgs),
}

#[derive(Args, Debug)]
pub struct FidArgs {
    /// The real, labelled dataset: the reference set and the classifier's training data.
    #[arg(long)]
    pub dataset: DatasetSpec,
    /// Checkpoint whose samples are scored.
    #[arg(long, conflicts_with_all = ["against", "against_noise"])]
    pub checkpoint: Option<PathBuf>,
    /// Score this dataset's images instead of a checkpoint's samples.
    #[arg(long, conflicts_with = "against_noise")]
    pub against: Option<DatasetSpec>,
    /// Score uniform noise images (a sanity check: the FID should be large).
    #[arg(long)]
    pub against_noise: bool,
    /// Images in each of the two sets.
    #[arg(long, default_value_t = 2000)]
    pub count: usize,
    /// Image side when no checkpoint fixes it.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Seed of the generated samples and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = BnStats::Running)]
    pub bn: BnStats,
    /// The cached classifier file; default: a file named after its settings in
    /// $XDG_CACHE_HOME/dcgan (or ~/.cache/dcgan).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Training epochs of the classifier.
    #[arg(long, default_value_t = 2)]
    pub classifier_epochs: usize,
    /// Feature maps of the classifier's first layer.
    #[arg(long, default_value_t = 32)]
    pub classifier_width: usize,
    /// Train the classifier on the first N images only (default: all).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DFeaturesArgs {
    /// A checkpoint or run directory (it must hold a discriminator).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Labelled training set of the linear classifier.
    #[arg(long)]
    pub dataset: DatasetSpec,
    /// Labelled test set (for CIFAR-10: cifar10:DIR/test_batch.bin.xz).
    #[arg(long)]
    pub test_dataset: DatasetSpec,
    #[arg(long, default_value_t = 10000)]
    pub train_limit: usize,
    #[arg(long, default_value_t = 10000)]
    pub test_limit: usize,
    /// Passes of Adam over the training features.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// L2 penalty on the weights.
    #[arg(long, default_value_t = 1e-3)]
    pub weight_decay: f32,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(cmd: &EvaluateCommand) -> Result<()> {
    match cmd {
        EvaluateCommand::Fid(a) => fid(a),
        EvaluateCommand::DFeatures(a) => d_features(a),
    }
}

fn load_labelled(spec: &DatasetSpec, size: usize, limit: Option<usize>) -> Result<(Dataset, Vec<u8>)> {
    let d = spec.load(size, limit).with_context(|| format!("loading dataset {spec}"))?;
    let Some(labels) = d.labels.clone() else {
        bail!(
            "dataset {spec} has no labels; this evaluation needs a labelled dataset (mnist, fashion-mnist, cifar10, shapes)"
        )
    };
    ensure!(d.len >= 2, "dataset {spec} holds {} image(s); at least 2 are needed", d.len);
    Ok((d, labels))
}

#[derive(Serialize)]
struct FidReport {
    fid: f64,
    dataset: String,
    against: String,
    count: usize,
    feature_dim: usize,
    classifier: String,
    classifier_train_accuracy: f64,
    /// Share of the scored images the classifier assigns to each class.
    class_histogram: Vec<f64>,
}

fn fid(args: &FidArgs) -> Result<()> {
    ensure!(args.count >= 2, "--count must be at least 2");
    ensure!(args.classifier_epochs >= 1, "--classifier-epochs must be at least 1");
    let mut model = args.checkpoint.as_deref().map(checkpoint_ref::load).transpose()?;
    let size = model.as_ref().map_or(args.image_size, |m| m.config().image_size);
    let limit = args.train_limit.map(|l| l.max(args.count));
    let (real, labels) = load_labelled(&args.dataset, size, limit)?;
    ensure!(
        real.len >= args.count,
        "dataset {} has {} images, fewer than --count {}",
        args.dataset,
        real.len,
        args.count
    );
    let per = real.sample_len();
    let options = ClassifierOptions {
        width: args.classifier_width,
        epochs: args.classifier_epochs,
        train_limit: args.train_limit,
    };
    let mut reference = FidReference::prepare(
        &args.dataset.to_string(),
        &real,
        &labels,
        args.count,
        &options,
        args.classifier.as_deref(),
    )?;

    let (against, other): (String, Vec<f32>) = if let Some(m) = model.as_mut() {
        let cfg = m.config().clone();
        ensure!(
            cfg.nc == real.nc,
            "the checkpoint makes {}-channel images but dataset {} has {} channel(s)",
            cfg.nc,
            args.dataset,
            real.nc
        );
        let z = Latents::from_seed(args.seed, args.count, cfg.nz);
        let name = args.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        (name, render::generate(&mut m.gan, &z.z, args.bn)?)
    } else if let Some(spec) = &args.against {
        let d = spec.load(size, Some(args.count)).with_context(|| format!("loading dataset {spec}"))?;
        ensure!(d.nc == real.nc, "dataset {spec} has {} channel(s) but {} has {}", d.nc, args.dataset, real.nc);
        ensure!(d.len >= 2, "dataset {spec} holds fewer than 2 images");
        (spec.to_string(), d.pixels)
    } else if args.against_noise {
        let mut rng = kernels::rng::stream(&[0x0015E, args.seed]);
        let mut v = vec![0.0; args.count * per];
        kernels::rng::fill_normal(&mut rng, 0.0, 0.5, &mut v);
        v.iter_mut().for_each(|x| *x = x.clamp(-1.0, 1.0));
        ("noise".into(), v)
    } else {
        bail!("give what to score: --checkpoint, --against SPEC or --against-noise");
    };

    let d = reference.classifier.feature_len();
    let (value, preds) = reference.score_images(&other)?;
    let mut hist = vec![0.0; reference.classifier.key.classes];
    preds.iter().for_each(|p| hist[*p] += 1.0 / preds.len() as f64);
    let report = FidReport {
        fid: value,
        dataset: args.dataset.to_string(),
        against,
        count: args.count,
        feature_dim: d,
        classifier: reference.classifier_path.display().to_string(),
        classifier_train_accuracy: reference.classifier.train_accuracy,
        class_histogram: hist,
    };
    println!(
        "FID {:.4} ({} vs {}, {} images each, {d}-d classifier features)",
        value, report.against, report.dataset, args.count
    );
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[derive(Serialize)]
struct DFeaturesReport {
    test_accuracy: f64,
    train_accuracy: f64,
    feature_dim: usize,
    train_images: usize,
    test_images: usize,
    checkpoint: String,
}

fn d_features(args: &DFeaturesArgs) -> Result<()> {
    let mut model = checkpoint_ref::load(&args.checkpoint)?;
    model.require_discriminator("evaluate d-features")?;
    let cfg = model.config().clone();
    let (train, train_labels) = load_labelled(&args.dataset, cfg.image_size, Some(args.train_limit))?;
    let (test, test_labels) = load_labelled(&args.test_dataset, cfg.image_size, Some(args.test_limit))?;
    for (spec, d) in [(&args.dataset, &train), (&args.test_dataset, &test)] {
        ensure!(d.nc == cfg.nc, "dataset {spec} has {} channel(s) but the checkpoint's D reads {}", d.nc, cfg.nc);
    }
    let dim = features::d_feature_len(model.gan.discriminator_net());
    eprintln!("extracting {dim}-d D features of {} + {} images", train.len, test.len);
    let mut xtr = features::d_features(&mut model.gan, &train.pixels)?;
    let mut xte = features::d_features(&mut model.gan, &test.pixels)?;
    let std = Standardiser::fit(&xtr, dim);
    std.apply(&mut xtr);
    std.apply(&mut xte);
    let classes = train_labels.iter().chain(&test_labels).copied().max().unwrap_or(0) as usize + 1;
    let mut reg = SoftmaxRegression::new(dim, classes.max(2));
    let opts = FitOptions { epochs: args.epochs, batch: 128, lr: args.lr, weight_decay: args.weight_decay, seed: 0 };
    let loss = reg.fit(&xtr, &train_labels, &opts);
    let report = DFeaturesReport {
        test_accuracy: reg.accuracy(&xte, &test_labels),
        train_accuracy: reg.accuracy(&xtr, &train_labels),
        feature_dim: dim,
        train_images: train.len,
        test_images: test.len,
        checkpoint: args.checkpoint.display().to_string(),
    };
    println!(
        "D-feature linear classifier: test accuracy {:.4}, train accuracy {:.4} (final loss {loss:.4}, {dim}-d features, {} train / {} test images)",
        report.test_accuracy, report.train_accuracy, train.len, test.len
    );
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
