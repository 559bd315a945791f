//! Everything a run checks and opens before its first generation starts, in the order that
//! costs a user least: flags and files first, then the ports, then the data set (minutes for a
//! large one), and only then anything written to the run directory. A mistake found here
//! leaves no half-made run behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use data::DatasetSpec;
use dcgan_process::signals::StopSignals;
use dcgan_process::telemetry::{HttpAccess, Https, MetricsListener};
use tokio::net::TcpListener;

use crate::checkpoint_store::CheckpointStore;
use crate::config::{ConfigError, DatasetFacts, DeviceChoice, RunConfig, merge_for_resume};
use crate::evaluation::EvalSettings;
use crate::flags::{Cli, Explicit};
use crate::generation::RunContext;
use crate::initial::StartingWeights;
use crate::launcher::resolve_worker_bin;
use crate::live_page::LivePage;
use crate::progress::Progress;
use crate::resume::resume_point;
use crate::run_dir::{RunDir, unix_ms, utc_stamp, write_atomic};
use crate::{observability, samples};

/// A run ready for its first generation.
pub struct Prepared {
    pub ctx: RunContext,
    pub config: RunConfig,
    /// The checkpoint the first generation starts from.
    pub resume_from: Option<u64>,
    /// The gRPC port, taken before anything was written.
    pub listener: TcpListener,
    /// From here on SIGTERM and Ctrl-C stop the run cleanly instead of killing the process.
    pub signals: StopSignals,
}

/// Checks the flags, the files they name, the ports and the data set; then creates the run
/// directory, stores the starting checkpoint (`--netG`/`--netD`), writes the real samples and
/// serves the live page.
pub async fn prepare(mut cli: Cli, explicit: Explicit, progress: Progress) -> anyhow::Result<Prepared> {
    let root = cli.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(utc_stamp()));
    let dir = RunDir::new(&root);

    // A resumed run takes its settings from run.json; a fresh one must not overwrite a run.
    let previous = if cli.resume {
        let prev = RunConfig::read(&dir.run_json())
            .with_context(|| format!("--resume: {} does not hold a run", root.display()))?;
        merge_for_resume(&mut cli, &explicit, &prev).map_err(ConfigError::into_anyhow)?;
        Some(prev)
    } else {
        if dir.run_json().exists() {
            dcgan_process::bail_usage!(
                "{} already holds a run (run.json): pass --resume to continue it, or choose another --run-dir",
                root.display()
            );
        }
        None
    };

    // The worker binary is found before anything is written, so a wrong path costs nothing.
    let worker_bin = match cli.external_workers {
        true => None,
        // Only a --worker-bin that names no binary fails here: a usage error.
        false => {
            Some(resolve_worker_bin(cli.worker_bin.as_deref()).map_err(|e| dcgan_process::exit::usage(e.to_string()))?)
        }
    };
    let gpus = check_flags(&cli)?;

    // Everything that needs no data is checked before the data set loads: the run directory,
    // the token, the TLS files, the ports. The ports are taken now, so a busy one leaves no
    // half-made run.
    dir.check_can_create()?;
    let token = proto::auth::token_from(cli.token.as_deref(), cli.token_file.as_deref())?;
    let auth = proto::auth::RequireToken { token: token.clone(), open_reads: cli.open_status };
    let tls = tls_identity(&cli)?;
    let listener =
        TcpListener::bind(cli.listen).await.with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    let metrics_listener = match cli.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr).await?),
        None => None,
    };
    // TLS covers the live page's port too, with the same certificate (rustls reads the files
    // itself: the identity above is opaque), under the gRPC port's access policy.
    let http_access = HttpAccess {
        auth: auth.clone(),
        https: match (&cli.tls_cert, &cli.tls_key, &metrics_listener) {
            (Some(cert), Some(key), Some(_)) => Some(Https::from_pem_files(cert, key)?),
            _ => None,
        },
    };

    // --netG / --netD are read (a .pth converted) before the data set loads; their shapes are
    // checked once the run's networks are known, still before any worker starts.
    let starting_weights = StartingWeights::read(cli.net_g.as_deref(), cli.net_d.as_deref())?;

    // The dataset is opened (prepared first if it is a raw source) and checked before anything
    // else starts. Only its shape and its shard files are held, never its pixels.
    let spec: DatasetSpec =
        cli.dataset.parse().map_err(|e| dcgan_process::exit::usage(format!("--dataset {}: {e}", cli.dataset)))?;
    let cache_root = cli.data_cache.clone().unwrap_or_else(data::prepared::cache::default_cache_root);
    let dataset = crate::dataset::open(&spec, cli.image_size as usize, cli.data_limit, &cache_root).await?;
    let facts = crate::dataset::facts(&dataset)?;
    let config = run_config(&cli, &facts, previous.as_ref(), &spec)?;
    let initial_checkpoint = match &starting_weights {
        Some(weights) => Some(weights.initial_checkpoint(&config)?),
        None => None,
    };
    let eval_settings = EvalSettings {
        every_epochs: config.eval_every,
        count: config.eval_count as usize,
        dataset: config.dataset.clone(),
        classifier: cli.eval_classifier.clone().unwrap_or_else(|| dir.eval().join("fid-classifier.safetensors")),
        seed: config.seed ^ 0xF1D,
    };
    if eval_settings.every_epochs > 0 {
        eval_settings.check(&dataset)?;
    }

    let signals = StopSignals::new().context("cannot listen for SIGTERM")?;

    dir.create()?;
    let store = CheckpointStore::new(dir.checkpoints(), config.keep_checkpoints as usize);
    store.remove_partial()?;
    let mut resume_from = if previous.is_some() { resume_point(&store, &config, false)? } else { None };
    if let Some(files) = &initial_checkpoint {
        // The workers start from the given weights as from a checkpoint of step 0.
        store.store(0, &files.files)?;
        resume_from = Some(0);
    }
    if !dir.samples().join("real.png").exists() {
        let (d, samples_dir, seed) = (Arc::clone(&dataset), dir.samples(), config.seed);
        tokio::task::spawn_blocking(move || samples::write_real(&samples_dir, &d, seed))
            .await
            .context("sample writer panicked")??;
    }

    let addr = listener.local_addr().context("listener address")?;
    // Metrics first: a test or a scraper that finds coordinator.addr finds metrics.addr too.
    let live_page = LivePage::new(&root);
    let metrics_addr = match metrics_listener {
        Some(l) => Some(serve_live_page(l, &live_page, http_access, &config, &root)?),
        None => None,
    };
    write_atomic(&dir.address_file(), format!("{addr}\n").as_bytes())?;
    println!("coordinator listening on {addr}, run directory {}", root.display());

    let ctx = RunContext {
        cli,
        dir,
        store,
        dataset,
        auth,
        tls,
        token,
        worker_bin,
        gpus,
        addr,
        metrics_addr,
        live_page,
        eval_settings,
        progress,
        resumed: previous.is_some(),
    };
    Ok(Prepared { ctx, config, resume_from, listener, signals })
}

/// The checks of the flags alone; whether launched workers get one GPU each.
fn check_flags(cli: &Cli) -> anyhow::Result<bool> {
    RunConfig::check_cli(cli, 3).map_err(ConfigError::into_anyhow)?;
    if cli.precision == kernels::Precision::Bf16 && !cli.external_workers {
        if let Some(warning) = kernels::ops::isa_rate::bf16_slowdown_warning() {
            tracing::warn!("{warning}");
        }
    }
    let gpus = !cli.external_workers && launch_on_gpus(cli.device, cli.workers)?;
    if gpus {
        if let Some(why) = kernels::Device::Cuda(0).refusal(&RunConfig::demands(cli)) {
            dcgan_process::bail_usage!("{why}");
        }
    }
    let min_workers = cli.min_workers.unwrap_or(cli.workers);
    if min_workers > cli.workers {
        dcgan_process::bail_usage!("--min-workers {min_workers} is more than --workers {}", cli.workers);
    }
    if !(cli.collapse_fraction >= 0.0 && cli.collapse_fraction <= 1.0) {
        dcgan_process::bail_usage!("--collapse-fraction {} must be between 0 and 1", cli.collapse_fraction);
    }
    Ok(gpus)
}

/// `--tls-cert` and `--tls-key`, read and checked now (rustls would only complain at the first
/// connection).
fn tls_identity(cli: &Cli) -> anyhow::Result<Option<tonic::transport::Identity>> {
    let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else { return Ok(None) };
    let read =
        |p: &PathBuf, flag: &str| std::fs::read(p).with_context(|| format!("{flag} {}: cannot read it", p.display()));
    let (cert_pem, key_pem) = (read(cert, "--tls-cert")?, read(key, "--tls-key")?);
    check_pem(&cert_pem, "CERTIFICATE", "--tls-cert", cert)?;
    check_pem(&key_pem, "PRIVATE KEY", "--tls-key", key)?;
    Ok(Some(tonic::transport::Identity::from_pem(cert_pem, key_pem)))
}

/// The run's configuration: a new run's, or a resumed one's, which must train on the same data.
fn run_config(
    cli: &Cli,
    facts: &DatasetFacts,
    previous: Option<&RunConfig>,
    spec: &DatasetSpec,
) -> anyhow::Result<RunConfig> {
    let Some(prev) = previous else {
        let run_id = format!("{}-{:04x}", utc_stamp(), (unix_ms() ^ u64::from(std::process::id())) & 0xffff);
        return RunConfig::from_cli(cli, facts, run_id, utc_stamp()).map_err(ConfigError::into_anyhow);
    };
    let mut c =
        RunConfig::from_cli(cli, facts, prev.run_id.clone(), prev.created.clone()).map_err(ConfigError::into_anyhow)?;
    c.generation = prev.generation + 1;
    let changed_samples = !prev.data_id.is_empty() && !c.data_id.is_empty() && c.data_id != prev.data_id;
    if changed_samples {
        dcgan_process::bail_usage!(
            "dataset {spec} is not the data set run.json recorded (its prepared samples' id is {}, run.json has \
             {}): it cannot be resumed exactly",
            c.data_id,
            prev.data_id
        );
    }
    if (c.dataset_len, c.nc) != (prev.dataset_len, prev.nc) {
        dcgan_process::bail_usage!(
            "dataset {spec} now has {} samples of {} channels, run.json recorded {} of {}: it cannot be resumed exactly",
            c.dataset_len,
            c.nc,
            prev.dataset_len,
            prev.nc
        );
    }
    Ok(c)
}

/// Serves the live page and the metrics on `listener`; writes `metrics.addr`.
fn serve_live_page(
    listener: MetricsListener,
    live_page: &Arc<LivePage>,
    access: HttpAccess,
    config: &RunConfig,
    root: &Path,
) -> anyhow::Result<SocketAddr> {
    let a = listener.addr;
    let scheme = if access.https.is_some() { "https" } else { "http" };
    listener.serve_with(&[], Some(live_page.routes()), access)?;
    observability::describe(&config.run_id, &config.dataset, config.generation, config.workers, config.total_steps);
    // HOST:PORT as before over plain HTTP; the URL's scheme says when it is HTTPS.
    let shown = if scheme == "https" { format!("https://{a}") } else { a.to_string() };
    write_atomic(&root.join("metrics.addr"), format!("{shown}\n").as_bytes())?;
    println!("live page at {scheme}://{a}/ (metrics at {scheme}://{a}/metrics)");
    Ok(a)
}

/// Whether launched workers get one GPU each (`--device`): checked here, before anything starts,
/// so that too few GPUs or a missing CUDA library is one clear error rather than N failing
/// workers.
fn launch_on_gpus(device: DeviceChoice, workers: u32) -> anyhow::Result<bool> {
    let count = kernels::cuda::gpu_count();
    match (device, count) {
        (DeviceChoice::Cpu, _) => Ok(false),
        (DeviceChoice::Auto, Ok(n)) if n >= workers as usize => {
            kernels::cuda::probe(0)?;
            println!("training on {workers} of the {n} GPUs (--device cpu to use the CPU instead)");
            Ok(true)
        }
        (DeviceChoice::Auto, _) => Ok(false),
        (_, Ok(n)) if n >= workers as usize => {
            kernels::cuda::probe(0)?;
            Ok(true)
        }
        (_, Ok(n)) => bail!(
            "--device cuda: {workers} workers need {workers} GPUs, this machine has {n}; lower --workers, or use --device cpu"
        ),
        (_, Err(e)) => Err(anyhow::Error::new(e).context("--device cuda")),
    }
}

/// Refuses, before anything starts, a file that is not the PEM it should be.
fn check_pem(pem: &[u8], kind: &str, flag: &str, path: &Path) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(pem);
    if !text.lines().any(|l| l.starts_with("-----BEGIN ") && l.contains(kind)) {
        bail!("{flag} {}: no PEM \"{kind}\" block in it", path.display());
    }
    Ok(())
}
