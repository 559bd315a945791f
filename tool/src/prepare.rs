//! `dcgan prepare`: a source (or a public data set fetched first) to a prepared data set of
//! packed `u8` shards that training streams from disk (`coordinator --dataset prepared:DIR`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use data::DatasetSpec;
use data::prepared::{ChannelMode, OnBadImage, PrepareOptions, Progress, SKIPPED_FILE};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::download::{DownloadOptions, Downloadable, download};

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// What to prepare: `mnist:PATH`, `fashion-mnist:PATH` (IDX, also torchvision's `MNIST/raw`),
    /// `cifar10:PATH` (binary batches or torchvision's `cifar-10-batches-py`), `folder:DIR`
    /// (PNG/JPEG/WebP, recursively, sorted by path), `tar:FILE` (a WebDataset tar, `.cls`
    /// labels), `lsun:DIR` (an LSUN `<category>_train_lmdb`).
    #[arg(long, required_unless_present = "download", conflicts_with = "download")]
    pub source: Option<String>,

    /// Fetch a public data set into --download-dir (sha256-checked) and prepare it.
    #[arg(long, value_enum)]
    pub download: Option<Downloadable>,

    /// Where --download puts the files it fetches.
    #[arg(long, default_value = "data/downloads")]
    pub download_dir: PathBuf,

    /// A mirror for --download: each file's name is appended to this URL instead of its usual one.
    #[arg(long)]
    pub base_url: Option<String>,

    /// The prepared directory to write (created). Running the same command again after an
    /// interruption continues where it stopped.
    #[arg(long)]
    pub out: PathBuf,

    /// Height and width of every sample: Resize(N) then CenterCrop(N), as the PyTorch example.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub image_size: u32,

    /// Channels of encoded images: `rgb` (as PyTorch's ImageFolder), `gray`, or `auto` (the first
    /// image's; a set that mixes gray and colour images is then refused). IDX is always gray and
    /// CIFAR-10 RGB [default: rgb].
    #[arg(long)]
    pub channels: Option<ChannelMode>,

    /// Prepare only the first N source images.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,

    /// Source images per shard [default: as many as fill about 128 MiB].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_images: Option<u64>,

    /// Stop at the first image that cannot be decoded, instead of leaving it out and naming it
    /// in DIR/skipped.txt.
    #[arg(long)]
    pub strict: bool,

    /// Decoding threads [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t as usize).build_global().context("--threads")?;
    }
    let interactive = !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let spec_text = match (args.download, &args.source) {
        (Some(set), _) => {
            let opts =
                DownloadOptions { base_url: args.base_url.as_deref(), dest: &args.download_dir, progress: interactive };
            download(set, &opts).with_context(|| format!("--download {}", set_name(set)))?
        }
        (None, Some(s)) => s.clone(),
        (None, None) => bail!("give --source SPEC or --download NAME"),
    };
    let spec: DatasetSpec = spec_text.parse().context("--source")?;
    if !spec.is_preparable() {
        bail!(
            "--source {spec}: only a data source can be prepared (mnist:, fashion-mnist:, cifar10:, folder:, tar:, lsun:)"
        );
    }
    let opts = PrepareOptions {
        image_size: args.image_size as usize,
        channels: args.channels,
        limit: args.limit.map(|l| l as usize),
        shard_images: args.shard_images.map(|s| s as usize),
        on_bad_image: if args.strict { OnBadImage::Fail } else { OnBadImage::Skip },
    };
    let started = Instant::now();
    let progress = ShownProgress::new(interactive, args.quiet);
    let result = data::prepared::prepare(&spec, &args.out, &opts, &progress);
    progress.finish();
    let prepared = result.with_context(|| format!("cannot prepare {spec} into {}", args.out.display()))?;
    let m = &prepared.manifest;
    let bytes: u64 = m.count * m.sample_bytes();
    if prepared.already_complete {
        println!(
            "{} already holds {spec} prepared at {}x{}: nothing to do",
            args.out.display(),
            m.image_size,
            m.image_size
        );
    } else {
        let secs = started.elapsed().as_secs_f64();
        println!(
            "prepared {} images of {}x{}x{} ({:.1} MiB in {} shards{}) into {} in {secs:.1} s ({:.0} images/s)",
            m.count,
            m.channels,
            m.image_size,
            m.image_size,
            bytes as f64 / (1 << 20) as f64,
            m.shards.len(),
            if m.labels { ", with labels" } else { "" },
            args.out.display(),
            (m.source.items.saturating_sub(resumed_items(&prepared))) as f64 / secs.max(1e-9),
        );
    }
    if !prepared.skipped.is_empty() {
        let first = &prepared.skipped[0];
        println!(
            "left out {} image(s) that could not be decoded, listed in {} (first: {}: {})",
            prepared.skipped.len(),
            args.out.join(SKIPPED_FILE).display(),
            first.name,
            first.reason
        );
    }
    println!("train on it: coordinator --dataset prepared:{} --image-size {}", args.out.display(), m.image_size);
    Ok(())
}

/// Source images an interrupted run had already done (not counted in this run's rate).
fn resumed_items(p: &data::prepared::Prepared) -> u64 {
    if p.resumed_shards == 0 {
        return 0;
    }
    let per_shard = p.manifest.source.items / p.manifest.shards.len().max(1) as u64;
    per_shard * p.resumed_shards as u64
}

fn set_name(set: Downloadable) -> String {
    clap::ValueEnum::to_possible_value(&set).map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// A progress bar with images/s and ETA on a terminal; a line every 10 s otherwise (a
/// Kubernetes Job's log).
struct ShownProgress {
    bar: Option<ProgressBar>,
    quiet: bool,
    done: AtomicU64,
    total: AtomicU64,
    started: Instant,
    last_line: std::sync::Mutex<Instant>,
}

impl ShownProgress {
    fn new(interactive: bool, quiet: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
            let style =
                ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let now = Instant::now();
        ShownProgress {
            bar,
            quiet,
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: now,
            last_line: std::sync::Mutex::new(now),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for ShownProgress {
    fn begin(&self, total: Option<u64>, done: u64) {
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_position(done);
            b.reset_eta();
        }
    }

    fn advance(&self, images: u64) {
        let done = self.done.fetch_add(images, Ordering::Relaxed) + images;
        if let Some(b) = &self.bar {
            b.inc(images);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if self.quiet || last.elapsed() < Duration::from_secs(10) {
            return;
        }
        *last = Instant::now();
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let total = self.total.load(Ordering::Relaxed);
        let of = if total > 0 { format!(" of {total}") } else { String::new() };
        eprintln!("prepared {done}{of} images ({rate:.0} images/s)");
    }

    fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None if !self.quiet => eprintln!("{msg}"),
            None => {}
        }
    }
}
