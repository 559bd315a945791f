//! The coordinator's command line. Flags take the PyTorch DCGAN example's names in Rust style;
//! every flag can also come from a `DCGAN_*` environment variable (the Kubernetes way).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

/// Train a DCGAN with N worker processes, synchronous data parallel.
///
/// The coordinator loads and checks the dataset, serves the gRPC API (with server reflection and
/// health), launches the workers (or waits for external ones), hands out ranks, ring addresses
/// and data shards, aggregates metrics into RUN_DIR/metrics.jsonl, stores checkpoints under
/// RUN_DIR/checkpoints and draws sample grids into RUN_DIR/samples.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "coordinator",
    version,
    about,
    long_about,
    after_help = "`coordinator --help` lists every flag; each also reads from its DCGAN_* variable.",
    after_long_help = dcgan_process::exit::EXIT_CODES_HELP
)]
pub struct Cli {
    /// Passes over the dataset.
    #[arg(help_heading = "Training", long, env = "DCGAN_EPOCHS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: u32,

    /// Global batch size, split across the workers.
    ///
    /// The last step of an epoch also takes the remainder. Must be at least the number of
    /// workers.
    #[arg(help_heading = "Training", long, env = "DCGAN_BATCH_SIZE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    /// Side of the square images the networks make and judge: 32, 64 or 128.
    #[arg(help_heading = "Training", long, env = "DCGAN_IMAGE_SIZE", default_value_t = 32)]
    pub image_size: u32,

    /// Length of the latent vector z.
    #[arg(help_heading = "Training", long, env = "DCGAN_NZ", default_value_t = 100)]
    pub nz: u32,

    /// Generator feature maps.
    #[arg(help_heading = "Training", long, env = "DCGAN_NGF", default_value_t = 64)]
    pub ngf: u32,

    /// Discriminator feature maps.
    #[arg(help_heading = "Training", long, env = "DCGAN_NDF", default_value_t = 64)]
    pub ndf: u32,

    /// Adam learning rate.
    #[arg(help_heading = "Training", long, env = "DCGAN_LR", default_value_t = 2e-4)]
    pub lr: f32,

    /// Adam beta1.
    #[arg(help_heading = "Training", hide_short_help = true, long, env = "DCGAN_BETA1", default_value_t = 0.5)]
    pub beta1: f32,

    /// Seed of the weights, the noise and the epochs' sample order.
    #[arg(help_heading = "Training", long, env = "DCGAN_SEED", default_value_t = 999)]
    pub seed: u64,

    /// All-reduce BatchNorm statistics across workers, so N workers with batch B/N compute what
    /// one worker with batch B computes (default: per-worker statistics, as DDP does).
    #[arg(help_heading = "Training", hide_short_help = true, long, env = "DCGAN_SYNC_BN")]
    pub sync_bn: bool,

    /// The convolutions' products: `f32`, or `bf16` (operands rounded to bf16, fp32
    /// accumulation; parameters, Adam and BatchNorm stay fp32). bf16 needs a CPU with
    /// AVX512-BF16 and is a CPU mode: GPU workers compute in fp32.
    #[arg(help_heading = "Training", hide_short_help = true, long, env = "DCGAN_PRECISION", value_enum, default_value_t = kernels::Precision::F32)]
    pub precision: kernels::Precision,

    /// Stop after this many global steps in all.
    ///
    /// Counted from the run's start, across resumes.
    #[arg(help_heading = "Training", long, env = "DCGAN_MAX_STEPS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_steps: Option<u64>,

    /// Start a fresh run's generator from this file (as the PyTorch example's --netG): a
    /// safetensors file or a PyTorch .pth state dict. The discriminator is initialised as usual
    /// unless --netD is given; Adam starts fresh. Checked against the run's networks first.
    #[arg(
        help_heading = "Training",
        hide_short_help = true,
        long = "netG",
        env = "DCGAN_NET_G",
        value_name = "PATH",
        conflicts_with = "resume"
    )]
    pub net_g: Option<PathBuf>,

    /// Start a fresh run's discriminator from this file (safetensors or .pth), as --netG does
    /// for the generator.
    #[arg(
        help_heading = "Training",
        hide_short_help = true,
        long = "netD",
        env = "DCGAN_NET_D",
        value_name = "PATH",
        conflicts_with = "resume"
    )]
    pub net_d: Option<PathBuf>,

    /// Training data: `shapes` (built in), `mnist:PATH`, `cifar10:PATH`, `folder:PATH`, ...
    ///
    /// `shapes` (built in, needs no file), `fake` (random images, as the PyTorch example's),
    /// `prepared:DIR` (made by `dcgan prepare`),
    /// or a source that is prepared into --data-cache the first time: `mnist:PATH`,
    /// `fashion-mnist:PATH`, `cifar10:PATH` (binary or torchvision's python batches),
    /// `folder:PATH` (PNG/JPEG/WebP images), `tar:FILE` (WebDataset) or `lsun:DIR` (LMDB).
    #[arg(help_heading = "Data", long, env = "DCGAN_DATASET", default_value = "shapes")]
    pub dataset: String,

    /// Use only the first N samples of the dataset.
    #[arg(help_heading = "Data", long, env = "DCGAN_DATA_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
    pub data_limit: Option<u64>,

    /// How launched workers get their samples (their --data): `auto` and `disk` read the
    /// prepared shards where the coordinator has them (`auto` falls back to gRPC), `stream`
    /// receives them over gRPC, `memory` has each worker decode the source into memory itself.
    #[arg(help_heading = "Data", hide_short_help = true, long, env = "DCGAN_WORKER_DATA", value_enum, default_value_t = crate::config::WorkerData::Auto)]
    pub worker_data: crate::config::WorkerData,

    /// Where sources other than `prepared:DIR` are prepared (decoded once into u8 shards at the
    /// run's image size, reused by later runs while the source is unchanged)
    /// [default: $XDG_CACHE_HOME/dcgan/prepared or ~/.cache/dcgan/prepared].
    #[arg(help_heading = "Data", hide_short_help = true, long, env = "DCGAN_DATA_CACHE")]
    pub data_cache: Option<PathBuf>,

    /// Number of workers (ranks), each its own process.
    #[arg(help_heading = "Workers and devices", long, env = "DCGAN_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,

    /// Address of the gRPC server. Port 0 picks a free port; the bound address is printed and
    /// written to RUN_DIR/coordinator.addr.
    #[arg(
        help_heading = "Workers and devices",
        hide_short_help = true,
        long,
        env = "DCGAN_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Wait for --workers external workers to join instead of launching them.
    ///
    /// For workers started elsewhere, e.g. by a Kubernetes Job.
    #[arg(help_heading = "Workers and devices", long, env = "DCGAN_EXTERNAL_WORKERS")]
    pub external_workers: bool,

    /// Compute threads per launched worker [default: CPU cores / workers, at least 1].
    #[arg(help_heading = "Workers and devices", hide_short_help = true, long, env = "DCGAN_WORKER_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub worker_threads: Option<u32>,

    /// Where launched workers train: `auto`, `cpu` or `cuda`.
    ///
    /// `auto`: one GPU each when a CUDA driver sees at least `--workers` GPUs, else the CPU.
    /// `cuda`: worker i on GPU i; an error when there are fewer GPUs than workers. External
    /// workers choose with their own `--device`.
    #[arg(help_heading = "Workers and devices", long, env = "DCGAN_DEVICE", value_enum, default_value_t = crate::config::DeviceChoice::Auto)]
    pub device: crate::config::DeviceChoice,

    /// Path of the worker binary [default: `worker` next to this executable].
    #[arg(help_heading = "Workers and devices", hide_short_help = true, long, env = "DCGAN_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,

    /// Run directory [default: runs/<UTC date-time>].
    #[arg(help_heading = "Run directory", long, env = "DCGAN_RUN_DIR")]
    pub run_dir: Option<PathBuf>,

    /// Store a checkpoint every K steps (besides the end of each epoch and of the run); 0: only
    /// at those ends.
    #[arg(
        help_heading = "Run directory",
        hide_short_help = true,
        long,
        env = "DCGAN_CHECKPOINT_EVERY",
        default_value_t = 500
    )]
    pub checkpoint_every: u64,

    /// Draw the generator's fixed-noise grid every N steps (samples/fake_step_NNNNNNNN.png,
    /// from a checkpoint of that step), as the PyTorch example writes one every 100
    /// iterations; the grid of each epoch's end is drawn as well. 0: only at epoch ends.
    #[arg(help_heading = "Run directory", long, env = "DCGAN_SAMPLE_EVERY", default_value_t = 100)]
    pub sample_every: u64,

    /// Checkpoints to keep; older ones are deleted.
    #[arg(help_heading = "Run directory", hide_short_help = true, long, env = "DCGAN_KEEP_CHECKPOINTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_checkpoints: u32,

    /// Continue the run in --run-dir from its latest checkpoint.
    ///
    /// Settings not given take run.json's values; given ones that would change the training are
    /// refused.
    #[arg(help_heading = "Run directory", long, env = "DCGAN_RESUME", requires = "run_dir")]
    pub resume: bool,

    /// Write TensorBoard event files into DIR (`tensorboard --logdir DIR`): every step's losses,
    /// D outputs, images/s and all-reduce time, each epoch's fixed-noise grid, and the FIDs.
    /// A resumed run drops the events after its checkpoint, so no step appears twice.
    #[arg(help_heading = "Run directory", hide_short_help = true, long, env = "DCGAN_TENSORBOARD")]
    pub tensorboard: Option<PathBuf>,

    /// Every K steps (and at the last step) each rank reports a checksum of its parameters; a
    /// mismatch stops the run. 0: only at the last step.
    #[arg(help_heading = "Faults", hide_short_help = true, long, env = "DCGAN_CHECKSUM_EVERY", default_value_t = 50)]
    pub checksum_every: u64,

    /// A worker silent for this many seconds fails the run.
    #[arg(help_heading = "Faults", hide_short_help = true, long, env = "DCGAN_HEARTBEAT_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_timeout: u64,

    /// A worker that dies, goes silent or fails ends the run's generation; this many times the
    /// coordinator starts the next from the latest checkpoint (launching the workers again, or
    /// waiting for external ones to rejoin). 0: the first failure fails the run.
    #[arg(help_heading = "Faults", hide_short_help = true, long, env = "DCGAN_MAX_RESTARTS", default_value_t = 3)]
    pub max_restarts: u32,

    /// After a restart, go on with as few as this many workers when not all of `--workers` come
    /// back within `--rejoin-wait` (external workers whose node is gone): the shards are
    /// recomputed for the smaller world, the global batch stays. [default: --workers]
    #[arg(help_heading = "Faults", hide_short_help = true, long, env = "DCGAN_MIN_WORKERS", value_parser = clap::value_parser!(u32).range(1..))]
    pub min_workers: Option<u32>,

    /// With `--min-workers`: seconds a restarted generation waits for all of `--workers` before
    /// going on with fewer.
    #[arg(help_heading = "Faults", hide_short_help = true, long, env = "DCGAN_REJOIN_WAIT", default_value_t = 60)]
    pub rejoin_wait: u64,

    /// On SIGTERM or Ctrl-C the workers finish their step and rank 0 checkpoints it; if that
    /// takes longer than this many seconds the run fails instead (keep it below Kubernetes'
    /// terminationGracePeriodSeconds). The process then exits with code 143; `--resume` continues.
    #[arg(help_heading = "Faults", hide_short_help = true, long, env = "DCGAN_STOP_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub stop_timeout: u64,

    /// A shared token that every worker must present (`authorization: Bearer ...`); calls
    /// without it are refused with UNAUTHENTICATED. Health and reflection stay open. The live
    /// page and checkpoint downloads of --metrics-listen need it too (Bearer, or a browser's
    /// Basic prompt with the token as the password); /metrics stays open. Launched
    /// workers get it through their environment. Prefer DCGAN_TOKEN (a Kubernetes Secret) to the
    /// flag, which `ps` shows.
    #[arg(help_heading = "Security", hide_short_help = true, long, env = "DCGAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the shared token from this file (a mounted Kubernetes Secret): it then appears in no
    /// environment and no command line. Instead of --token.
    #[arg(help_heading = "Security", hide_short_help = true, long, env = "DCGAN_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// Serve gRPC over TLS with this certificate chain (PEM), and --metrics-listen as HTTPS with
    /// it; needs --tls-key. Launched workers trust it (as a CA or the self-signed certificate
    /// itself) and check it for --tls-domain.
    #[arg(help_heading = "Security", hide_short_help = true, long, env = "DCGAN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(help_heading = "Security", hide_short_help = true, long, env = "DCGAN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// With TLS: the name launched workers check the certificate for (they connect to the
    /// loopback address).
    #[arg(
        help_heading = "Security",
        hide_short_help = true,
        long,
        env = "DCGAN_TLS_DOMAIN",
        default_value = "localhost"
    )]
    pub tls_domain: String,

    /// With a token: let GetStatus, WatchMetrics and the live page (its JSON and grids) through
    /// without it (operators' reads); every call that changes the run, and checkpoint downloads,
    /// still need it.
    #[arg(help_heading = "Security", hide_short_help = true, long, env = "DCGAN_OPEN_STATUS")]
    pub open_status: bool,

    /// Without a terminal (output redirected), log a training line every N steps: losses, D's
    /// outputs, images/s and the ETA. 0: never.
    #[arg(help_heading = "Observability", hide_short_help = true, long, env = "DCGAN_LOG_EVERY", default_value_t = 50)]
    pub log_every: u64,

    /// No progress bar and only warnings and errors on the terminal.
    #[arg(help_heading = "Observability", long, short, env = "DCGAN_QUIET")]
    pub quiet: bool,

    /// Serve the live page at http://ADDR/ and Prometheus metrics at http://ADDR/metrics.
    ///
    /// HTTPS with --tls-cert. Port 0 picks a free port; the bound address is printed and written
    /// to RUN_DIR/metrics.addr. Off when not given; when given, launched workers serve theirs
    /// on the same host with a free port (see their logs).
    #[arg(help_heading = "Observability", long, env = "DCGAN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// With --metrics-listen: keep serving /metrics this many seconds after the run ends (launched workers do too), so a
    /// scrape sees the final values.
    #[arg(
        help_heading = "Observability",
        hide_short_help = true,
        long,
        env = "DCGAN_METRICS_LINGER",
        default_value_t = 0
    )]
    pub metrics_linger: u64,

    /// Log lines as `pretty` text or `json` objects (`RUST_LOG` filters them); launched workers
    /// use the same.
    #[arg(help_heading = "Observability", hide_short_help = true, long, env = "DCGAN_LOG_FORMAT", value_enum, default_value_t = dcgan_process::telemetry::LogFormat::Pretty)]
    pub log_format: dcgan_process::telemetry::LogFormat,

    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317). Off when
    /// neither this nor OTEL_EXPORTER_OTLP_ENDPOINT is set; launched workers
    /// inherit the environment variable or get the flag.
    #[arg(help_heading = "Observability", hide_short_help = true, long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// GAN health: warn that the discriminator has won when, over this many steps, D(x)
    /// averaged above 0.9 and D(G(z)) (after D's update) below 0.01.
    #[arg(help_heading = "Observability", hide_short_help = true, long, env = "DCGAN_D_WON_STEPS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub d_won_steps: u64,

    /// GAN health: warn of mode collapse when the fixed-noise samples' mean pairwise distance
    /// falls below this fraction of the real samples'.
    #[arg(
        help_heading = "Observability",
        hide_short_help = true,
        long,
        env = "DCGAN_COLLAPSE_FRACTION",
        default_value_t = 0.2
    )]
    pub collapse_fraction: f64,

    /// Compute the FID of the generator after every N epochs (and after the last): its samples
    /// against the dataset on the features of a classifier trained on the dataset's labels, as
    /// `dcgan evaluate fid` does. Written to RUN_DIR/evals.jsonl, the `dcgan_fid` gauge and
    /// GetStatus. 0: never. Needs a labelled dataset.
    #[arg(
        help_heading = "Evaluation (FID)",
        hide_short_help = true,
        long,
        env = "DCGAN_EVAL_EVERY",
        default_value_t = 0
    )]
    pub eval_every: u32,

    /// Images in each set the FID compares (generated, and the dataset's first N).
    #[arg(help_heading = "Evaluation (FID)", hide_short_help = true, long, env = "DCGAN_EVAL_COUNT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(2..))]
    pub eval_count: u32,

    /// The FID classifier's file: reused when it exists and fits the dataset, else trained on the
    /// dataset and saved there [default: RUN_DIR/eval/fid-classifier.safetensors]. Share one
    /// with `dcgan evaluate fid --classifier` to compare the figures.
    #[arg(help_heading = "Evaluation (FID)", hide_short_help = true, long, env = "DCGAN_EVAL_CLASSIFIER")]
    pub eval_classifier: Option<PathBuf>,
}

/// Argument ids given on the command line or in the environment (not defaulted).
pub type Explicit = BTreeSet<String>;

impl Cli {
    /// Parses `std::env::args`, also recording which flags were given explicitly (a resumed run
    /// takes every other one from `run.json`).
    pub fn parse_with_sources() -> (Self, Explicit) {
        let matches = Self::command().get_matches();
        let explicit = explicit_ids(&matches);
        match Self::from_arg_matches(&matches) {
            Ok(cli) => (cli, explicit),
            Err(e) => e.exit(),
        }
    }

    /// As [`Cli::parse_with_sources`] from given arguments (tests).
    pub fn try_parse_with_sources<I, T>(args: I) -> Result<(Self, Explicit), clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let explicit = explicit_ids(&matches);
        Ok((Self::from_arg_matches(&matches)?, explicit))
    }
}

fn explicit_ids(matches: &ArgMatches) -> Explicit {
    matches
        .ids()
        .filter(|id| {
            matches!(matches.value_source(id.as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
        })
        .map(|id| id.as_str().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_explicit_flags() {
        let (cli, explicit) = Cli::try_parse_with_sources(["coordinator", "--ngf", "16"]).unwrap();
        assert_eq!(cli.workers, 2);
        assert_eq!(cli.dataset, "shapes");
        assert_eq!(cli.batch_size, 64);
        assert_eq!(cli.ngf, 16);
        assert!(explicit.contains("ngf"));
        assert!(!explicit.contains("ndf"));
    }

    #[test]
    fn resume_needs_a_run_dir_and_zero_workers_is_refused() {
        assert!(Cli::try_parse_with_sources(["coordinator", "--resume"]).is_err());
        assert!(Cli::try_parse_with_sources(["coordinator", "--workers", "0"]).is_err());
    }

    /// `-h` fits one screen with the common flags; `--help` has every flag under its heading
    /// and the exit codes.
    #[test]
    fn short_help_fits_a_screen_and_long_help_has_every_heading() {
        let short = Cli::command().render_help().to_string();
        assert!(short.lines().count() <= 40, "{} lines:\n{short}", short.lines().count());
        assert!(short.contains("--workers") && short.contains("--dataset") && !short.contains("--tls-key"), "{short}");
        let long = Cli::command().render_long_help().to_string();
        for heading in
            ["Training:", "Data:", "Workers and devices:", "Run directory:", "Faults:", "Security:", "Observability:"]
        {
            assert!(long.contains(heading), "--help lacks {heading}");
        }
        assert!(long.contains("--tls-key") && long.contains("Exit status:") && long.contains("143"), "{long}");
    }

    #[test]
    fn help_names_defaults() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("[default: 64]") && help.contains("[env: DCGAN_WORKERS="), "{help}");
    }
}
