//! One coordinator invocation from start to exit: check everything that can be checked before
//! anything starts, serve, launch, watch, and stop cleanly whichever way the run ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use data::DatasetSpec;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint_store::CheckpointStore;
use crate::cli::{Cli, Explicit};
use crate::config::{ConfigError, RunConfig, merge_for_resume};
use crate::evaluation::{self, EvalRecord, EvalRequest, EvalSettings};
use crate::health::HealthConfig;
use crate::initial::StartingWeights;
use crate::launcher::{LaunchSpec, Launcher, describe_exit, resolve_worker_bin};
use crate::live_page::LivePage;
use crate::metrics_log::MetricsLog;
use crate::progress::{Progress, StepLine};
use crate::run_dir::{RunDir, unix_ms, utc_stamp, write_atomic};
use crate::run_state::{Event, Phase, Run};
use crate::shards::ShardServer;
use crate::tensorboard::TensorBoardWriter;
use crate::{observability, samples, server};
use dcgan_process::signals::EXIT_STOPPED;
pub use dcgan_process::startup::Ended;
use dcgan_process::telemetry::MetricsListener;

/// How long workers get to exit by themselves after a completed run.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// TensorBoard files are flushed every this many seconds (and at each epoch's grid).
const TENSORBOARD_FLUSH_TICKS: u64 = 5;
/// How long open gRPC streams get to end after the run ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The same after a failed generation: no answer is owed then, and a partitioned worker's
/// connection would hold the next generation back for the whole grace.
const FAILED_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a new generation retries its busy gRPC port.
const REBIND_PATIENCE: Duration = Duration::from_secs(10);

/// Runs the coordinator; `Ok` when the run completed or stopped cleanly.
pub async fn run(mut cli: Cli, explicit: Explicit, progress: Progress) -> anyhow::Result<Ended> {
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

    RunConfig::check_cli(&cli, 3).map_err(ConfigError::into_anyhow)?;
    if cli.precision == kernels::Precision::Bf16.to_string() && !cli.external_workers {
        if let Some(warning) = kernels::ops::isa_rate::bf16_slowdown_warning() {
            tracing::warn!("{warning}");
        }
    }
    let gpus = !cli.external_workers && launch_on_gpus(&cli.device, cli.workers)?;
    if gpus {
        let precision = cli.precision.parse().context("--precision")?;
        if let Some(why) = kernels::Device::Cuda(0).refusal(&RunConfig::demands(&cli, precision)) {
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

    // Everything that needs no data is checked before the data set loads (minutes for a large
    // one): the run directory, the token, the TLS files, the ports. The ports are taken now, so
    // a busy one leaves no half-made run.
    dir.check_can_create()?;
    let token = proto::auth::token_from(cli.token.as_deref(), cli.token_file.as_deref())?;
    let auth = proto::auth::RequireToken { token: token.clone(), open_reads: cli.open_status };
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf, flag: &str| {
                std::fs::read(p).with_context(|| format!("{flag} {}: cannot read it", p.display()))
            };
            let (cert_pem, key_pem) = (read(cert, "--tls-cert")?, read(key, "--tls-key")?);
            check_pem(&cert_pem, "CERTIFICATE", "--tls-cert", cert)?;
            check_pem(&key_pem, "PRIVATE KEY", "--tls-key", key)?;
            Some(tonic::transport::Identity::from_pem(cert_pem, key_pem))
        }
        _ => None,
    };
    let listener =
        TcpListener::bind(cli.listen).await.with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    let metrics_listener = match cli.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr).await?),
        None => None,
    };
    // TLS covers the live page's port too, with the same certificate (rustls reads the files
    // itself: the identity above is opaque), under the gRPC port's access policy.
    let http_access = dcgan_process::telemetry::HttpAccess {
        auth: auth.clone(),
        https: match (&cli.tls_cert, &cli.tls_key, &metrics_listener) {
            (Some(cert), Some(key), Some(_)) => Some(dcgan_process::telemetry::Https::from_pem_files(cert, key)?),
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

    let config = match &previous {
        None => {
            let run_id = format!("{}-{:04x}", utc_stamp(), (unix_ms() ^ u64::from(std::process::id())) & 0xffff);
            RunConfig::from_cli(&cli, &facts, run_id, utc_stamp()).map_err(ConfigError::into_anyhow)?
        }
        Some(prev) => {
            let mut c = RunConfig::from_cli(&cli, &facts, prev.run_id.clone(), prev.created.clone())
                .map_err(ConfigError::into_anyhow)?;
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
            c
        }
    };

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

    // From here on SIGTERM and Ctrl-C stop the run cleanly instead of killing the process.
    let mut signals = dcgan_process::signals::StopSignals::new().context("cannot listen for SIGTERM")?;

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
        Some(l) => {
            let a = l.addr;
            let scheme = if http_access.https.is_some() { "https" } else { "http" };
            l.serve_with(&[], Some(live_page.routes()), http_access)?;
            observability::describe(
                &config.run_id,
                &config.dataset,
                config.generation,
                config.workers,
                config.total_steps,
            );
            // HOST:PORT as before over plain HTTP; the URL's scheme says when it is HTTPS.
            let shown = if scheme == "https" { format!("https://{a}") } else { a.to_string() };
            write_atomic(&root.join("metrics.addr"), format!("{shown}\n").as_bytes())?;
            println!("live page at {scheme}://{a}/ (metrics at {scheme}://{a}/metrics)");
            Some(a)
        }
        None => None,
    };
    write_atomic(&dir.address_file(), format!("{addr}\n").as_bytes())?;
    println!("coordinator listening on {addr}, run directory {}", root.display());

    // One generation per pass: a worker's failure ends one, and up to --max-restarts times the
    // next starts from the latest checkpoint with every worker launched (or joined) anew.
    let mut config = config;
    let mut listener = Some(listener);
    let mut restarts = 0u32;
    // --metrics-linger counts from when the last generation ended, for the workers and the
    // coordinator together; a signal while lingering ends it.
    let mut ended_at;
    // The last generation's launched workers, lingering while the coordinator reports.
    let mut lingering_workers = None;
    // Ranks of the next generation: all of --workers, unless a regroup went on with fewer.
    let mut world = config.workers;
    let resumed = previous.is_some();
    let (run, outcome) = loop {
        let listener = match listener.take() {
            Some(l) => l,
            // The same address again, so external workers find the new generation where they left.
            None => bind_again(addr).await?,
        };
        store.remove_partial()?;
        write_atomic(&dir.run_json(), config.to_json().as_bytes())?;
        let (metrics_log, past_steps) = match resume_from {
            Some(step) => MetricsLog::resume(&dir.metrics(), step)?,
            None => (MetricsLog::create(&dir.metrics())?, Vec::new()),
        };
        let (eval_log, past_evaluations) = match resume_from {
            Some(step) => MetricsLog::<EvalRecord>::resume(&dir.evals(), step)?,
            None => (MetricsLog::create(&dir.evals())?, Vec::new()),
        };

        let checkpoints = store
            .list()?
            .iter()
            .map(|c| proto::v1::CheckpointInfo {
                step: c.step,
                epoch: c.step.saturating_sub(1) / config.steps_per_epoch.max(1),
                path: format!("checkpoints/{}", CheckpointStore::dir_name(c.step)),
                total_size: c.total_size,
            })
            .collect();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let shards = ShardServer::new(
            Arc::clone(&dataset),
            config.seed,
            config.batch_size as usize,
            world as usize,
            config.total_steps,
        );
        let run = Run::new(
            config.clone(),
            resume_from,
            shards,
            store.clone(),
            metrics_log,
            checkpoints,
            root.display().to_string(),
            events_tx.clone(),
            HealthConfig { d_won_steps: cli.d_won_steps, collapse_fraction: cli.collapse_fraction },
            world,
        );
        run.set_restart_allowed(restarts < cli.max_restarts);
        // The run's span lives until this function returns (and is exported then); its context goes
        // to the workers with `Join`.
        let run_span = tracing::info_span!("run", run_id = %config.run_id, generation = config.generation);
        {
            let mut cx = tonic::metadata::MetadataMap::new();
            dcgan_process::telemetry::inject_context(&run_span, &mut cx);
            let _ = run.trace_context.set(cx);
        }
        {
            let (d, seed) = (Arc::clone(&dataset), config.seed);
            let distance = tokio::task::spawn_blocking(move || samples::real_diversity(&d, seed))
                .await
                .context("sample diversity panicked")??;
            run.set_real_sample_distance(distance);
        }
        tracing::info!(
            run_id = %config.run_id,
            generation = config.generation,
            workers = world,
            steps = config.total_steps,
            from = run.start_step,
            "run configured"
        );

        let (stop_server, server_stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(Arc::clone(&run), listener, auth.clone(), tls.clone(), async {
            let _ = server_stopped.await;
        }));
        live_page.attach(Arc::clone(&run));
        if let Some(tb_dir) = &cli.tensorboard {
            let tb_from = if resumed || restarts > 0 { Some(resume_from.unwrap_or(0)) } else { None };
            let writer = TensorBoardWriter::create(tb_dir, tb_from)
                .with_context(|| format!("--tensorboard {}", tb_dir.display()))?;
            tracing::info!(file = %writer.path().display(), "writing TensorBoard events");
            run.set_tensorboard(writer);
        }
        run.restore_history(&past_steps);
        run.restore_evaluations(&past_evaluations);
        let (eval_tx, eval_rx) = mpsc::unbounded_channel();
        let evaluator = (eval_settings.every_epochs > 0).then(|| {
            tokio::spawn(evaluation::evaluate(
                Arc::clone(&run),
                eval_settings.clone(),
                Arc::clone(&dataset),
                eval_log,
                eval_rx,
            ))
        });
        let renderer = tokio::spawn(render_samples(
            Arc::clone(&run),
            events_rx,
            dir.samples(),
            config.seed,
            evaluator.is_some().then_some((eval_tx, eval_settings.clone())),
            cli.tensorboard.is_some(),
        ));
        // A checkpoint that ended an epoch can be stored while its generation is being torn
        // down, too late for its grid (and FID) to be drawn: the next generation draws it first.
        // (Step 0, the weights given with --netG/--netD, ended no epoch.)
        if let Some(step) = resume_from.filter(|&s| s > 0 && s % config.steps_per_epoch.max(1) == 0) {
            let epoch = (step - 1) / config.steps_per_epoch.max(1);
            if !dir.samples().join(format!("fake_epoch_{epoch:03}.png")).exists() {
                let files = store.read(step)?;
                let names = samples::GridNames { epoch: Some(epoch), step: None };
                run.request_samples(step, epoch, false, names, files);
            }
        }
        // The epochs this run trains (--max-steps can end it before --epochs).
        let epochs = config.total_steps.div_ceil(config.steps_per_epoch.max(1)).max(1) as u32;
        let line = if Progress::wanted(cli.quiet) {
            progress.start(run.start_step, config.total_steps, epochs);
            None
        } else {
            Some(StepLine::new(config.total_steps, u64::from(epochs), cli.log_every))
        };
        let progress_task = tokio::spawn(follow_progress(Arc::clone(&run), progress.clone(), epochs, line));

        let (exit_tx, mut exits) = mpsc::unbounded_channel();
        let launcher = if config.external_workers {
            tracing::info!("waiting for {world} external workers to join at {addr}");
            None
        } else {
            let spec = LaunchSpec {
                worker: worker_bin.clone().context("no worker command")?,
                generation: config.generation,
                coordinator_url: format!("{}://{}", if tls.is_some() { "https" } else { "http" }, connectable(addr)),
                tls_ca: cli.tls_cert.clone().filter(|_| tls.is_some()),
                tls_domain: cli.tls_domain.clone(),
                world: world as usize,
                threads: config.worker_threads,
                gpus,
                data: config.worker_data,
                logs: dir.logs(),
                // Workers serve theirs on the coordinator's metrics host, each on a free port.
                metrics_listen: metrics_addr.map(|a| SocketAddr::new(a.ip(), 0)),
                metrics_linger: cli.metrics_linger,
                log_format: cli.log_format,
                otlp_endpoint: cli.otlp_endpoint.clone(),
                token: token.as_ref().map(|t| t.expose_secret().to_string()),
            };
            match Launcher::launch(&spec, exit_tx) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = stop_server.send(());
                    return Err(e.into());
                }
            }
        };

        // Watch the run until it ends, whatever ends it.
        let mut phase = run.watch_phase();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let heartbeat_timeout = Duration::from_secs(config.heartbeat_timeout_secs);
        let stop_timeout = Duration::from_secs(cli.stop_timeout);
        let mut exits_open = launcher.is_some();
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let mut ticks: u64 = 0;
        let opened = tokio::time::Instant::now();
        let rejoin_wait = Duration::from_secs(cli.rejoin_wait);
        loop {
            if phase.borrow_and_update().is_over() {
                break;
            }
            if run.is_stopping() && stop_deadline.is_none() {
                stop_deadline = Some(tokio::time::Instant::now() + stop_timeout);
            }
            tokio::select! {
                changed = phase.changed() => if changed.is_err() { break },
                exit = exits.recv(), if exits_open => match exit {
                    Some(exit) => {
                        let ok = exit.status.as_ref().is_ok_and(|s| s.success());
                        let stopped = run.is_stopping() && exit_code(&exit) == Some(i32::from(EXIT_STOPPED));
                        if !ok && !exit.killed && !stopped {
                            run.worker_failed(describe_exit(&exit));
                        }
                    }
                    None => exits_open = false,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks % TENSORBOARD_FLUSH_TICKS == 0 {
                        run.flush_tensorboard();
                    }
                    run.check_heartbeats(heartbeat_timeout);
                    run.record_liveness(heartbeat_timeout);
                    if (restarts > 0 || resumed) && world > min_workers && opened.elapsed() >= rejoin_wait {
                        regroup_if_short(&run, min_workers, rejoin_wait);
                    }
                    if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        run.fail(format!("the workers did not stop within {} s (--stop-timeout)", stop_timeout.as_secs()));
                    }
                }
                name = signals.next() => {
                    if run.is_stopping() {
                        run.fail(format!("{name} received again: stopping at once"));
                    } else {
                        println!("{name}: the workers finish their step and rank 0 checkpoints it ({name} again to stop at once)");
                        run.request_stop(format!("{name} received by the coordinator"));
                    }
                }
            }
        }

        let outcome = run.phase();
        ended_at = tokio::time::Instant::now();
        if let Some(l) = launcher {
            if matches!(outcome, Phase::Failed(_)) {
                l.kill_all();
                l.wait_all(EXIT_GRACE, std::future::pending()).await;
            } else {
                // They serve their metrics for --metrics-linger more seconds: waited for at the
                // very end, so the summary comes as soon as the run ends.
                lingering_workers = Some(l);
            }
        }
        if matches!(outcome, Phase::Failed(_)) {
            run.mark_unfinished_failed();
        }
        run.record_liveness(heartbeat_timeout);
        // No more uploads can come: let the renderer finish what is queued, then stop serving.
        let _ = events_tx.send(Event::Stop);
        match renderer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if matches!(outcome, Phase::Completed) => {
                return Err(e.context("cannot draw sample grids"));
            }
            Ok(Err(e)) => tracing::warn!("cannot draw sample grids: {e:#}"),
            Err(e) => tracing::warn!("sample renderer panicked: {e}"),
        }
        // The renderer dropped its sender: a completed run's last evaluations finish before the
        // exit (they are part of its results); a stopped or failed run does not wait for them.
        if let Some(evaluator) = evaluator {
            if matches!(outcome, Phase::Completed) {
                match evaluator.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("FID evaluation failed: {e:#}"),
                    Err(e) => tracing::warn!("the FID evaluator panicked: {e}"),
                }
            } else {
                evaluator.abort();
            }
        }
        // Graceful shutdown waits for open streams; a client that stopped reading must not keep
        // the coordinator alive, so the wait is bounded.
        let _ = stop_server.send(());
        let mut server = server;
        let grace = if matches!(outcome, Phase::Failed(_)) { FAILED_SHUTDOWN_GRACE } else { SHUTDOWN_GRACE };
        match tokio::time::timeout(grace, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("{e}"),
            Ok(Err(e)) => tracing::warn!("server task panicked: {e}"),
            Err(_) => {
                tracing::warn!("clients still connected {} s after the run ended: closing", grace.as_secs());
                // Awaited after the abort: the listening socket is closed only once the task is
                // dropped, and the next generation binds the same port.
                server.abort();
                let _ = server.await;
            }
        }
        run.sync_tensorboard();
        progress_task.abort();
        progress.finish();

        if let Phase::Failed(reason) = &outcome {
            if let Some(fewer) = run.regrouped_world() {
                println!("{reason}; generation {} with {fewer} workers", config.generation + 1);
                config.generation += 1;
                world = fewer;
                resume_from = resume_point(&store, &config, true)?;
                observability::record_restart(config.generation);
                continue;
            }
            if run.failure_is_restartable() && restarts < cli.max_restarts {
                restarts += 1;
                let from = resume_point(&store, &config, true)?;
                println!(
                    "{reason}; restart {restarts} of {} (--max-restarts): generation {} from {}",
                    cli.max_restarts,
                    config.generation + 1,
                    from.map_or("the start".to_string(), |s| format!("the checkpoint of step {s}"))
                );
                tracing::warn!(
                    restarts,
                    generation = config.generation + 1,
                    from = from.unwrap_or(0),
                    "restarting: {reason}"
                );
                config.generation += 1;
                resume_from = from;
                world = config.workers;
                observability::record_restart(config.generation);
                continue;
            }
        }
        break (run, outcome);
    };

    // The summary comes when the run ends, before any lingering.
    let ended = report_outcome(outcome, &run, &store, &config, &root);
    let linger_until = ended_at + Duration::from_secs(cli.metrics_linger);
    let mut cut_short = false;
    if metrics_addr.is_some() && tokio::time::Instant::now() < linger_until {
        let left = linger_until - tokio::time::Instant::now();
        println!(
            "serving the live page and metrics for {} s more (--metrics-linger; Ctrl-C to exit now)",
            left.as_secs()
        );
        tokio::select! {
            _ = tokio::time::sleep_until(linger_until) => {}
            name = signals.next() => {
                println!("{name}: not lingering any longer");
                cut_short = true;
            }
        }
    }
    if let Some(workers) = lingering_workers {
        if cut_short {
            workers.kill_all();
        }
        workers
            .wait_all(EXIT_GRACE, async {
                signals.next().await;
            })
            .await;
    }
    ended
}

/// Says how the run ended (the summary line, or how to resume it) and turns the outcome into
/// the run's result.
fn report_outcome(
    outcome: Phase,
    run: &Run,
    store: &CheckpointStore,
    config: &RunConfig,
    root: &std::path::Path,
) -> anyhow::Result<Ended> {
    match outcome {
        Phase::Completed => {
            let latest = run.latest();
            write_atomic(&root.join("COMPLETE"), format!("{}\n", config.total_steps).as_bytes())?;
            match latest {
                Some(r) => println!(
                    "run completed: {} steps, loss_D {:.4} loss_G {:.4} D(x) {:.3} D(G(z)) {:.3}/{:.3}; results in {}",
                    r.step,
                    r.loss_d,
                    r.loss_g,
                    r.d_x,
                    r.d_g_z1,
                    r.d_g_z2,
                    root.display()
                ),
                None => println!("run completed; results in {}", root.display()),
            }
            Ok(Ended::Completed)
        }
        Phase::Stopped { step, reason } => {
            let from = match store.latest()? {
                Some(c) => format!("its checkpoint of step {} is in {}", c.step, c.dir.display()),
                None => "it has no checkpoint yet".to_string(),
            };
            println!(
                "run stopped after step {step} of {} ({reason}); {from}; continue it with: coordinator --resume --run-dir {}",
                config.total_steps,
                root.display()
            );
            Ok(Ended::Stopped)
        }
        Phase::Failed(reason) => bail!("run failed: {reason}"),
        other => bail!("run stopped in state {other:?}"),
    }
}

/// Whether launched workers get one GPU each (`--device`): checked here, before anything starts,
/// so that too few GPUs or a missing CUDA library is one clear error rather than N failing
/// workers.
fn launch_on_gpus(device: &str, workers: u32) -> anyhow::Result<bool> {
    let count = kernels::cuda::gpu_count();
    match (device, count) {
        ("cpu", _) => Ok(false),
        ("auto", Ok(n)) if n >= workers as usize => {
            kernels::cuda::probe(0)?;
            println!("training on {workers} of the {n} GPUs (--device cpu to use the CPU instead)");
            Ok(true)
        }
        ("auto", _) => Ok(false),
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

/// Ends a restarted generation that waits for workers who are not coming back, when enough did
/// (`--min-workers`): every joined worker is ready and none is missing but the absent ones.
fn regroup_if_short(run: &Run, min_workers: u32, waited: Duration) {
    if run.phase() != Phase::WaitingForWorkers {
        return;
    }
    let (joined, ready) = run.joined_and_ready();
    if joined == ready && ready >= min_workers && ready < run.world() {
        run.regroup(
            ready,
            format!(
                "only {ready} of {} workers rejoined within {} s (--rejoin-wait): going on with {ready} (--min-workers {min_workers})",
                run.world(),
                waited.as_secs()
            ),
        );
    }
}

/// Refuses, before anything starts, a file that is not the PEM it should be (rustls would only
/// say so at the first connection).
fn check_pem(pem: &[u8], kind: &str, flag: &str, path: &Path) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(pem);
    if !text.lines().any(|l| l.starts_with("-----BEGIN ") && l.contains(kind)) {
        bail!("{flag} {}: no PEM \"{kind}\" block in it", path.display());
    }
    Ok(())
}

/// A launched worker's exit code, when it exited (rather than being killed by a signal).
fn exit_code(exit: &crate::launcher::WorkerExit) -> Option<i32> {
    exit.status.as_ref().ok().and_then(|s| s.code())
}

/// The checkpoint a resumed run starts from: the newest one that passes its digests and loads,
/// and is not already at the end. A damaged one (truncated, bytes flipped) is set aside as
/// `checkpoints/damaged-step_NNNNNNNN` with a warning and the one before is tried. `Ok(None)`
/// when `allow_none` and no checkpoint is usable (a restart before the first checkpoint starts
/// over from step 0).
/// Binds the gRPC port again for the next generation. The last generation's listener has
/// been dropped, but its socket may take a moment to leave the kernel's table under load: a
/// busy port is retried for a few seconds before the run gives up.
async fn bind_again(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot listen on {addr} again"))),
        }
    }
}

fn resume_point(store: &CheckpointStore, config: &RunConfig, allow_none: bool) -> anyhow::Result<Option<u64>> {
    let mut candidates = store.list()?;
    candidates.sort_by_key(|c| std::cmp::Reverse(c.step));
    for latest in candidates {
        match check_checkpoint(store, config, latest.step) {
            Ok(()) => {
                if latest.step >= config.total_steps {
                    dcgan_process::bail_usage!(
                        "--resume: the run is already at step {} of {}; raise --max-steps or --epochs to train further",
                        latest.step,
                        config.total_steps
                    );
                }
                tracing::info!(step = latest.step, dir = %latest.dir.display(), "resuming from checkpoint");
                return Ok(Some(latest.step));
            }
            Err(e) => {
                let aside = store.dir().join(format!("damaged-{}", CheckpointStore::dir_name(latest.step)));
                tracing::warn!(
                    "checkpoint {} is unusable ({e:#}): set aside as {}",
                    latest.dir.display(),
                    aside.display()
                );
                eprintln!(
                    "warning: checkpoint {} is unusable ({e:#}); falling back to an earlier one",
                    latest.dir.display()
                );
                std::fs::rename(&latest.dir, &aside)
                    .with_context(|| format!("cannot set {} aside", latest.dir.display()))?;
            }
        }
    }
    if allow_none {
        return Ok(None);
    }
    bail!("--resume: no usable checkpoint in {} to resume from", store.dir().display())
}

/// Checks a stored checkpoint fully (digests, names, shapes, the state document) before any
/// worker is started on it.
fn check_checkpoint(store: &CheckpointStore, config: &RunConfig, step: u64) -> anyhow::Result<()> {
    let files = store.read(step)?;
    let (gan, state) = kernels::Gan::load(&kernels::CheckpointFiles { files })?;
    if *gan.model_config() != config.model() {
        bail!("it holds networks {:?}, the run's are {:?}", gan.model_config(), config.model());
    }
    if state.step != step {
        bail!("state.json says step {}, the directory name says {step}", state.step);
    }
    Ok(())
}

/// An address a local worker can connect to (a wildcard listen address is not one).
fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    a
}

/// Draws the fake grids asked for by [`Event::RenderSamples`] until [`Event::Stop`], and hands
/// the checkpoints due for evaluation to the evaluator.
async fn render_samples(
    run: Arc<Run>,
    mut events: mpsc::UnboundedReceiver<Event>,
    dir: PathBuf,
    seed: u64,
    evaluations: Option<(mpsc::UnboundedSender<EvalRequest>, EvalSettings)>,
    tensorboard: bool,
) -> anyhow::Result<()> {
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Stop => break,
            Event::RenderSamples { files, epoch, step, is_final, names } => {
                let epoch_grid = names.epoch.is_some();
                if let Some((tx, settings)) = &evaluations {
                    if epoch_grid && settings.due(epoch, is_final) {
                        let _ = tx.send(EvalRequest { epoch, step, files: files.clone() });
                    }
                }
                let d = dir.clone();
                let drawn = tokio::task::spawn_blocking(move || samples::write_fake(&d, files, seed, names)).await;
                run.samples_drawn();
                let grids = drawn.context("sample renderer panicked")??;
                let Some(grid) = grids.first() else { continue };
                for g in &grids {
                    tracing::info!(step, epoch, path = %g.path.display(), diversity = g.diversity, "samples drawn");
                }
                // Mode collapse is judged at epoch ends, as its grace period counts epochs.
                if epoch_grid {
                    run.observe_samples(epoch, grid.diversity);
                }
                if tensorboard {
                    let png = tokio::fs::read(&grid.path)
                        .await
                        .with_context(|| format!("reading {}", grid.path.display()))?;
                    // Grids are RGB (gray images are drawn as gray RGB).
                    run.tensorboard_grid(step, &png, grid.size, 3);
                }
            }
        }
    }
    Ok(())
}

/// Moves the progress bar as steps are aggregated, or, without a bar, logs a line every
/// `--log-every` steps.
async fn follow_progress(run: Arc<Run>, progress: Progress, epochs: u32, mut line: Option<StepLine>) {
    let mut rx = run.subscribe_metrics();
    loop {
        match rx.recv().await {
            Ok(r) => {
                progress.update(&r, epochs);
                if let Some(text) = line.as_mut().and_then(|l| l.observe(&r, std::time::Instant::now())) {
                    tracing::info!("{text}");
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
