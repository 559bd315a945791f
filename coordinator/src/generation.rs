//! One generation of a run: the workers that train together from one starting point until the
//! run completes, stops, or fails. A generation owns everything that lives that long (the gRPC
//! server, the launched workers, the step feed, the sample renderer, the FID evaluator and the
//! progress display) and goes through [`Generation::start`], [`Generation::watch`] and
//! [`Generation::teardown`]. What comes after it (restart, regroup with fewer workers, or the
//! end) is [`next_after`], a pure function of how it ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use data::SampleStore;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::checkpoint_store::CheckpointStore;
use crate::config::RunConfig;
use crate::evaluation::{self, EvalRecord, EvalSettings, Evaluations};
use crate::flags::Cli;
use crate::health::{HealthConfig, HealthMonitor};
use crate::launcher::{LaunchSpec, Launcher, WorkerCommand, WorkerExit, describe_exit};
use crate::live_page::LivePage;
use crate::metrics_log::MetricsLog;
use crate::progress::{Progress, StepLine};
use crate::renderer::{GridRequest, Renderer, SampleQueue};
use crate::run::{Phase, Run, RunSetup};
use crate::run_dir::{RunDir, write_atomic};
use crate::run_view::RunView;
use crate::samples;
use crate::shard_server::ShardServer;
use crate::step_feed::{self, PrometheusSteps, StepFeed, StepSink};
use crate::step_history::StepHistory;
use crate::tensorboard::{TensorBoard, TensorBoardWriter};
use dcgan_process::signals::StopSignals;

/// How long workers get to exit by themselves after a completed run.
pub const EXIT_GRACE: Duration = Duration::from_secs(30);
/// TensorBoard files are flushed every this many seconds (and at each epoch's grid).
const TENSORBOARD_FLUSH_TICKS: u64 = 5;
/// How long open gRPC streams get to end after the run ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The same after a failed generation: no answer is owed then, and a partitioned worker's
/// connection would hold the next generation back for the whole grace.
const FAILED_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What every generation of one coordinator invocation shares: checked and opened once, before
/// the first generation starts.
pub struct RunContext {
    pub cli: Cli,
    pub dir: RunDir,
    pub store: CheckpointStore,
    pub dataset: Arc<SampleStore>,
    pub auth: proto::auth::RequireToken,
    pub tls: Option<tonic::transport::Identity>,
    pub token: Option<proto::auth::Token>,
    /// The worker command for launched workers; `None` with `--external-workers`.
    pub worker_bin: Option<WorkerCommand>,
    /// Launched workers get one GPU each.
    pub gpus: bool,
    /// The gRPC address every generation serves on.
    pub addr: SocketAddr,
    /// The live page's and metrics' address, when served.
    pub metrics_addr: Option<SocketAddr>,
    pub live_page: Arc<LivePage>,
    pub eval_settings: EvalSettings,
    pub progress: Progress,
    /// The run continues one that ran before (`--resume`).
    pub resumed: bool,
}

/// What one generation starts from.
#[derive(Clone, Debug)]
pub struct GenerationPlan {
    pub config: RunConfig,
    /// The checkpoint it starts from (none: step 0 with fresh weights).
    pub resume_from: Option<u64>,
    /// Ranks: `--workers`, or fewer after a regroup.
    pub world: u32,
    /// Restarts spent so far (`--max-restarts`).
    pub restarts: u32,
}

/// How a generation ended, as far as the next decision goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    pub failed: bool,
    /// A worker's failure (restartable), not the run's own (a checksum mismatch, a refusal).
    pub restartable: bool,
    /// The generation was ended to regroup with this many workers (`--min-workers`).
    pub regroup_to: Option<u32>,
}

/// What happens after a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A new generation with the workers who came back, from the latest checkpoint; not a restart.
    Regroup { world: u32 },
    /// A new generation with every worker anew, from the latest checkpoint; spends a restart.
    Restart,
    /// The run is over (completed, stopped, or failed for good).
    Finish,
}

/// The one rule for what follows a generation.
pub fn next_after(ending: &Ending, restarts: u32, max_restarts: u32) -> Next {
    match ending {
        Ending { failed: false, .. } => Next::Finish,
        Ending { regroup_to: Some(world), .. } => Next::Regroup { world: *world },
        Ending { restartable: true, .. } if restarts < max_restarts => Next::Restart,
        _ => Next::Finish,
    }
}

/// A running generation.
pub struct Generation {
    pub run: Arc<Run>,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<Result<(), crate::server::ServeError>>,
    feed: JoinHandle<anyhow::Result<()>>,
    samples: SampleQueue,
    renderer: JoinHandle<anyhow::Result<()>>,
    evaluator: Option<JoinHandle<anyhow::Result<()>>>,
    progress: JoinHandle<()>,
    tensorboard: TensorBoard,
    launcher: Option<Launcher>,
    exits: mpsc::UnboundedReceiver<WorkerExit>,
    /// The generation's trace span, the parent of the workers' spans (its context goes to them
    /// with `Join`); it ends, and is exported, when the generation is torn down.
    span: tracing::Span,
}

/// A generation after its teardown.
pub struct GenerationEnd {
    pub run: Arc<Run>,
    pub outcome: Phase,
    /// When it ended: `--metrics-linger` counts from here.
    pub at: tokio::time::Instant,
    /// Launched workers of a run that did not fail, serving their metrics for
    /// `--metrics-linger` while the coordinator reports.
    pub lingering_workers: Option<Launcher>,
}

impl Generation {
    /// Opens the generation's outputs, serves it on `listener` and launches its workers.
    pub async fn start(ctx: &RunContext, plan: &GenerationPlan, listener: TcpListener) -> anyhow::Result<Generation> {
        let (cli, config, dir) = (&ctx.cli, &plan.config, &ctx.dir);
        ctx.store.remove_partial()?;
        write_atomic(&dir.run_json(), config.to_json().as_bytes())?;
        let (metrics_log, past_steps) = match plan.resume_from {
            Some(step) => MetricsLog::resume(&dir.metrics(), step)?,
            None => (MetricsLog::create(&dir.metrics())?, Vec::new()),
        };
        let (eval_log, past_evaluations) = match plan.resume_from {
            Some(step) => MetricsLog::<EvalRecord>::resume(&dir.evals(), step)?,
            None => (MetricsLog::create(&dir.evals())?, Vec::new()),
        };

        let tensorboard = match &cli.tensorboard {
            None => TensorBoard::default(),
            Some(tb_dir) => {
                let continued = ctx.resumed || plan.restarts > 0 || config.generation > 1;
                let tb_from = continued.then(|| plan.resume_from.unwrap_or(0));
                let writer = TensorBoardWriter::create(tb_dir, tb_from)
                    .with_context(|| format!("--tensorboard {}", tb_dir.display()))?;
                tracing::info!(file = %writer.path().display(), "writing TensorBoard events");
                TensorBoard::new(Some(writer))
            }
        };
        let health =
            HealthMonitor::new(HealthConfig { d_won_steps: cli.d_won_steps, collapse_fraction: cli.collapse_fraction });
        let history = StepHistory::restored(&past_steps);
        let evaluations = Evaluations::restored(&past_evaluations);

        let (feed, queue) = StepFeed::channel();
        let run = Run::new(RunSetup {
            config: config.clone(),
            resume_from: plan.resume_from,
            shards: ShardServer::new(
                Arc::clone(&ctx.dataset),
                config.seed,
                config.batch_size as usize,
                plan.world as usize,
                config.total_steps,
            ),
            store: ctx.store.clone(),
            checkpoints: ctx.store.list()?.iter().map(|c| c.info(config.steps_per_epoch)).collect(),
            run_dir: dir.root().display().to_string(),
            world: plan.world,
            feed,
        });
        run.restore_latest(past_steps.last().cloned());
        run.set_restart_allowed(plan.restarts < cli.max_restarts);
        // The outputs of every aggregated step, in this order. A new output is one line here.
        let sinks: Vec<Box<dyn StepSink>> = vec![
            Box::new(metrics_log),
            Box::new(PrometheusSteps),
            Box::new(history.clone()),
            Box::new(tensorboard.clone()),
            Box::new(health.clone()),
        ];
        let feed = step_feed::spawn(queue, sinks, {
            let run = Arc::clone(&run);
            move |reason| {
                run.fail(reason);
            }
        });

        // The generation's span; its context goes to the workers with `Join`.
        let run_span = tracing::info_span!("run", run_id = %config.run_id, generation = config.generation);
        let mut cx = tonic::metadata::MetadataMap::new();
        dcgan_process::telemetry::inject_context(&run_span, &mut cx);
        let _ = run.trace_context.set(cx);
        let (d, seed) = (Arc::clone(&ctx.dataset), config.seed);
        let distance = tokio::task::spawn_blocking(move || samples::real_diversity(&d, seed))
            .await
            .context("sample diversity panicked")??;
        health.set_real_distance(distance);
        tracing::info!(
            run_id = %config.run_id,
            generation = config.generation,
            workers = plan.world,
            steps = config.total_steps,
            from = run.start_step,
            "run configured"
        );

        let (samples, grid_requests) = SampleQueue::channel();
        let view = RunView {
            run: Arc::clone(&run),
            health: health.clone(),
            evaluations: evaluations.clone(),
            history,
            samples: samples.clone(),
        };
        let (stop_server, server_stopped) = oneshot::channel::<()>();
        let server =
            tokio::spawn(crate::server::serve(view.clone(), listener, ctx.auth.clone(), ctx.tls.clone(), async {
                let _ = server_stopped.await;
            }));
        ctx.live_page.attach(view);

        let settings = &ctx.eval_settings;
        let (eval_tx, eval_rx) = mpsc::unbounded_channel();
        let evaluator = (settings.every_epochs > 0).then(|| {
            let (dataset, tb) = (Arc::clone(&ctx.dataset), tensorboard.clone());
            tokio::spawn(evaluation::evaluate(settings.clone(), dataset, eval_log, eval_rx, evaluations, tb))
        });
        let renderer = Renderer {
            dir: dir.samples(),
            seed: config.seed,
            health,
            tensorboard: tensorboard.clone(),
            evaluations: evaluator.is_some().then(|| (eval_tx, settings.clone())),
        }
        .spawn(grid_requests);
        // A checkpoint that ended an epoch can be stored while its generation is being torn
        // down, too late for its grid (and FID) to be drawn: the next generation draws it first.
        // (Step 0, the weights given with --netG/--netD, ended no epoch.)
        let spe = config.steps_per_epoch.max(1);
        if let Some(step) = plan.resume_from.filter(|&s| s > 0 && s % spe == 0) {
            let epoch = (step - 1) / spe;
            if !dir.samples().join(format!("fake_epoch_{epoch:03}.png")).exists() {
                let files = ctx.store.read(step)?;
                let names = samples::GridNames { epoch: Some(epoch), step: None };
                samples.request(GridRequest { step, epoch, is_final: false, names, files });
            }
        }

        // The epochs this run trains (--max-steps can end it before --epochs).
        let epochs = config.total_steps.div_ceil(spe).max(1) as u32;
        let line = if Progress::wanted(cli.quiet) {
            ctx.progress.start(run.start_step, config.total_steps, epochs);
            None
        } else {
            Some(StepLine::new(config.total_steps, u64::from(epochs), cli.log_every))
        };
        let progress = tokio::spawn(follow_progress(Arc::clone(&run), ctx.progress.clone(), epochs, line));

        let (exit_tx, exits) = mpsc::unbounded_channel();
        let launcher = match &ctx.worker_bin {
            None => {
                tracing::info!("waiting for {} external workers to join at {}", plan.world, ctx.addr);
                None
            }
            Some(worker) => match Launcher::launch(&launch_spec(ctx, plan, worker.clone()), exit_tx) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = stop_server.send(());
                    return Err(e.into());
                }
            },
        };
        Ok(Generation {
            run,
            stop_server,
            server,
            feed,
            samples,
            renderer,
            evaluator,
            progress,
            tensorboard,
            launcher,
            exits,
            span: run_span,
        })
    }

    /// Watches the generation until it is over, whatever ends it: the workers finish, one
    /// fails or goes silent, a signal stops it, or the stop takes too long.
    pub async fn watch(&mut self, ctx: &RunContext, signals: &mut StopSignals) -> Phase {
        let (cli, run) = (&ctx.cli, Arc::clone(&self.run));
        let mut phase = run.watch_phase();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let heartbeat_timeout = Duration::from_secs(run.config.heartbeat_timeout_secs);
        let stop_timeout = Duration::from_secs(cli.stop_timeout);
        let rejoin_wait = Duration::from_secs(cli.rejoin_wait);
        let min_workers = cli.min_workers.unwrap_or(cli.workers);
        // Only a generation that continues from a checkpoint waits for workers coming back.
        let rejoining = run.config.generation > 1 || ctx.resumed;
        let mut exits_open = self.launcher.is_some();
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let mut ticks: u64 = 0;
        let opened = tokio::time::Instant::now();
        loop {
            if phase.borrow_and_update().is_over() {
                break;
            }
            if run.is_stopping() && stop_deadline.is_none() {
                stop_deadline = Some(tokio::time::Instant::now() + stop_timeout);
            }
            tokio::select! {
                changed = phase.changed() => if changed.is_err() { break },
                exit = self.exits.recv(), if exits_open => match exit {
                    Some(exit) => {
                        let ok = exit.status.as_ref().is_ok_and(|s| s.success());
                        let stopped = run.is_stopping() && exit_code(&exit) == Some(i32::from(dcgan_process::exit::STOPPED));
                        if !ok && !exit.killed && !stopped {
                            run.worker_failed(describe_exit(&exit));
                        }
                    }
                    None => exits_open = false,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks % TENSORBOARD_FLUSH_TICKS == 0 {
                        self.tensorboard.flush();
                    }
                    run.check_heartbeats(heartbeat_timeout);
                    crate::observability::record_liveness(&run.liveness(heartbeat_timeout));
                    if rejoining && run.world() > min_workers && opened.elapsed() >= rejoin_wait {
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
        run.phase()
    }

    /// Ends the generation: its workers (killed after a failure, else left to linger), its
    /// outputs (every aggregated step written, every queued grid drawn, a completed run's
    /// evaluations finished) and its server. An output a completed run cannot do without
    /// (its grids, its `metrics.jsonl`) fails it.
    pub async fn teardown(self, ctx: &RunContext, outcome: Phase) -> anyhow::Result<GenerationEnd> {
        let at = tokio::time::Instant::now();
        let failed = matches!(outcome, Phase::Failed(_));
        let completed = matches!(outcome, Phase::Completed);
        let mut lingering_workers = None;
        if let Some(l) = self.launcher {
            if failed {
                l.kill_all();
                l.wait_all(EXIT_GRACE, std::future::pending()).await;
            } else {
                lingering_workers = Some(l);
            }
        }
        let run = self.run;
        if failed {
            run.mark_unfinished_failed();
        }
        crate::observability::record_liveness(&run.liveness(Duration::from_secs(run.config.heartbeat_timeout_secs)));
        // Every step aggregated so far reaches its outputs.
        run.close_feed();
        // A step output that failed while the run was going failed it then; one that fails
        // after it completed or stopped (its last steps) fails it here, once the rest is torn
        // down.
        let late_output_error = match self.feed.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) if !failed => Some(e),
            Ok(Err(e)) => {
                tracing::warn!("{e:#}");
                None
            }
            Err(e) => {
                tracing::warn!("the step feed panicked: {e}");
                None
            }
        };
        // No more uploads can come: the renderer finishes what is queued, then stops.
        self.samples.close();
        match self.renderer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if completed => return Err(e.context("cannot draw sample grids")),
            Ok(Err(e)) => tracing::warn!("cannot draw sample grids: {e:#}"),
            Err(e) => tracing::warn!("sample renderer panicked: {e}"),
        }
        // The renderer dropped its sender: a completed run's last evaluations finish before the
        // exit (they are part of its results); a stopped or failed run does not wait for them.
        if let Some(evaluator) = self.evaluator {
            if completed {
                match evaluator.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("FID evaluation failed: {e:#}"),
                    Err(e) => tracing::warn!("the FID evaluator panicked: {e}"),
                }
            } else {
                evaluator.abort();
            }
        }
        stop_serving(self.stop_server, self.server, if failed { FAILED_SHUTDOWN_GRACE } else { SHUTDOWN_GRACE }).await;
        self.tensorboard.sync();
        self.progress.abort();
        ctx.progress.finish();
        drop(self.span);
        if let Some(e) = late_output_error {
            return Err(e);
        }
        Ok(GenerationEnd { run, outcome, at, lingering_workers })
    }
}

impl Ending {
    pub fn of(outcome: &Phase, run: &Run) -> Ending {
        Ending {
            failed: matches!(outcome, Phase::Failed(_)),
            restartable: run.failure_is_restartable(),
            regroup_to: run.regrouped_world(),
        }
    }
}

/// Graceful shutdown waits for open streams; a client that stopped reading must not keep the
/// coordinator alive, so the wait is bounded by `grace`.
async fn stop_serving(
    stop: oneshot::Sender<()>,
    mut server: JoinHandle<Result<(), crate::server::ServeError>>,
    grace: Duration,
) {
    let _ = stop.send(());
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
}

/// How this generation's workers are launched.
fn launch_spec(ctx: &RunContext, plan: &GenerationPlan, worker: WorkerCommand) -> LaunchSpec {
    let cli = &ctx.cli;
    LaunchSpec {
        worker,
        generation: plan.config.generation,
        coordinator_url: format!("{}://{}", if ctx.tls.is_some() { "https" } else { "http" }, connectable(ctx.addr)),
        tls_ca: cli.tls_cert.clone().filter(|_| ctx.tls.is_some()),
        tls_domain: cli.tls_domain.clone(),
        world: plan.world as usize,
        threads: plan.config.worker_threads,
        gpus: ctx.gpus,
        data: plan.config.worker_data,
        logs: ctx.dir.logs(),
        // Workers serve theirs on the coordinator's metrics host, each on a free port.
        metrics_listen: ctx.metrics_addr.map(|a| SocketAddr::new(a.ip(), 0)),
        metrics_linger: cli.metrics_linger,
        log_format: cli.log_format,
        otlp_endpoint: cli.otlp_endpoint.clone(),
        token: ctx.token.as_ref().map(|t| t.expose_secret().to_string()),
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

/// A launched worker's exit code, when it exited (rather than being killed by a signal).
fn exit_code(exit: &WorkerExit) -> Option<i32> {
    exit.status.as_ref().ok().and_then(|s| s.code())
}

/// An address a local worker can connect to (a wildcard listen address is not one).
fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    a
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(failed: bool, restartable: bool, regroup_to: Option<u32>) -> Ending {
        Ending { failed, restartable, regroup_to }
    }

    #[test]
    fn a_run_that_did_not_fail_is_over() {
        assert_eq!(next_after(&ending(false, false, None), 0, 3), Next::Finish);
        // Even with restarts left and a stale restartable flag.
        assert_eq!(next_after(&ending(false, true, None), 0, 3), Next::Finish);
    }

    #[test]
    fn a_worker_failure_restarts_while_restarts_are_left() {
        assert_eq!(next_after(&ending(true, true, None), 0, 3), Next::Restart);
        assert_eq!(next_after(&ending(true, true, None), 2, 3), Next::Restart);
        assert_eq!(next_after(&ending(true, true, None), 3, 3), Next::Finish);
        assert_eq!(next_after(&ending(true, true, None), 0, 0), Next::Finish);
    }

    #[test]
    fn the_runs_own_failure_is_final() {
        // A checksum mismatch or a refused device: every new generation would fail the same way.
        assert_eq!(next_after(&ending(true, false, None), 0, 3), Next::Finish);
    }

    #[test]
    fn a_regroup_goes_on_with_fewer_and_spends_no_restart() {
        assert_eq!(next_after(&ending(true, true, Some(2)), 3, 3), Next::Regroup { world: 2 });
        assert_eq!(next_after(&ending(true, true, Some(1)), 0, 0), Next::Regroup { world: 1 });
    }
}
