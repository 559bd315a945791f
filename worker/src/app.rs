//! One worker from join to exit.
//!
//! The async side (tokio) talks to the coordinator: join, rendezvous, checkpoint download,
//! heartbeats, the data stream, reports and uploads. The training runs on a blocking thread of
//! its own ([`Trainer::run`]) with a rayon pool sized by `--threads`, so compute never stalls the
//! network tasks and vice versa.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dcgan_process::signals::StopSignals;
use dcgan_process::startup::Ended;
use dcgan_process::telemetry::MetricsListener;
use kernels::CheckpointFiles;
use proto::v1;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::batches::{self, PREFETCH_STEPS, Plan};
use crate::client::{self, Client, Ending, Upload};
use crate::flags::Cli;
use crate::rejoin::{self, Backoff};
use crate::stop::{Stop, StopRequest};
use crate::trainer::{Outcome, Trainer};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Heartbeats that may fail in a row before the worker gives the coordinator up.
const HEARTBEAT_MISSES: u32 = 15;

/// Runs the worker; `Ok` when its part of the run completed or stopped cleanly.
pub async fn run(cli: Cli) -> anyhow::Result<Ended> {
    // SIGTERM (how Kubernetes stops a pod) and Ctrl-C ask for a clean stop from the start; a
    // second one ends the process at once.
    let stop_request = Arc::new(StopRequest::default());
    let signals = StopSignals::new().context("cannot listen for SIGTERM")?;
    tokio::spawn(crate::stop::watch_signals(signals, Arc::clone(&stop_request)));
    // The metrics port is taken first, so a busy one fails the start before anything joins.
    let metrics_listener = match cli.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr).await?),
        None => None,
    };
    // A GPU that is missing, or a CUDA library that is, is refused before joining.
    let device = cli.device.check().with_context(|| format!("--device {}", cli.device))?;
    tracing::info!(%device, "compute device");
    let token = proto::auth::token_from(cli.token.as_deref(), cli.token_file.as_deref())?;
    let tls = client::Tls {
        ca_pem: match &cli.tls_ca {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("--tls-ca {}: cannot read it", p.display()))?),
            None => None,
        },
        domain: cli.tls_domain.clone(),
    };
    let raw = client::connect(&cli.coordinator, Duration::from_secs(cli.connect_timeout), token, &tls).await?;
    let threads = cli
        .threads
        .map(|t| t as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let hostname =
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    let worker = WorkerSetup { cli: &cli, device, threads, stop_request: &stop_request };
    let join = v1::JoinRequest {
        hostname,
        pid: std::process::id(),
        device: Some(device_message(device)),
        threads: threads as u32,
        requested_rank: cli.rank.map_or(-1, |r| r as i32),
    };

    // One pass per generation this worker trains in. When a generation ends without this worker
    // finishing (a peer died, the coordinator restarted, a partition), or a join finds the run
    // formed without it, it asks again with backoff until the coordinator takes it or says the
    // run is over (see `rejoin`).
    let mut metrics_listener = metrics_listener;
    let mut metrics_on = false;
    let mut backoff = Backoff::default();
    let mut waiting_since: Option<Instant> = None;
    let rejoin_timeout = Duration::from_secs(cli.rejoin_timeout);
    let outcome = loop {
        let answer = match raw.clone().join(join.clone()).await {
            Ok(a) => a,
            Err(status) if rejoin::worth_retrying(&status) && !rejoin_timeout.is_zero() => {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if let Some(reason) = stop_request.reason() {
                    tracing::info!("{reason}: no longer waiting to join");
                    break Ok(Ended::Stopped);
                }
                if since.elapsed() >= rejoin_timeout {
                    bail!(
                        "{} s without being taken into a generation (--rejoin-timeout): {}",
                        rejoin_timeout.as_secs(),
                        status.message()
                    );
                }
                let wait = backoff.next_wait();
                tracing::info!("join refused ({:?}: {}); trying again in {wait:.1?}", status.code(), status.message());
                tokio::time::sleep(wait).await;
                continue;
            }
            Err(status) => return Err(anyhow::Error::new(status).context("join")),
        };
        backoff = Backoff::default();
        // The coordinator's run span, the parent of this worker's spans.
        let parent = answer.metadata().clone().into_headers();
        let joined = answer.into_inner();
        let id = joined.id.clone().context("the coordinator's join answer has no id")?;
        let config = joined.config.clone().context("the coordinator's join answer has no config")?;
        let (rank, world) = (id.rank as usize, joined.world_size as usize);
        check_config(&config, world)?;
        tracing::info!(rank, world, run = %id.run_id, generation = id.generation, "joined");
        if let Some(l) = metrics_listener.take() {
            // Labelled with the rank of the first generation; a later one may give another.
            let addr = l.addr;
            l.serve(&[("rank", rank.to_string())])?;
            crate::metrics::describe();
            tracing::info!(rank, "metrics listening on http://{addr}/metrics");
            metrics_on = true;
        }
        let client = Client::new(raw.clone(), id);
        let stop = Arc::new(Stop::default());

        // From here on, whatever goes wrong is told to the coordinator before exiting.
        let span = tracing::info_span!("worker", run_id = %client.id.run_id, generation = client.id.generation, rank);
        dcgan_process::telemetry::adopt_context(&span, &parent);
        let result = train(&worker, &client, &joined, Arc::clone(&stop)).instrument(span).await;
        match result {
            Ok(Outcome { final_step, checksum, stopped: None }) => {
                client.finish(Ending::Completed { final_step, checksum }).await?;
                tracing::info!(rank, final_step, checksum = format!("{checksum:#018x}"), "finished");
                break Ok(Ended::Completed);
            }
            Ok(Outcome { final_step, checksum, stopped: Some(reason) }) => {
                tracing::info!(
                    rank,
                    final_step,
                    reason,
                    "stopped cleanly; the run can be resumed from step {final_step}"
                );
                client.finish(Ending::Stopped { final_step, checksum, reason }).await?;
                break Ok(Ended::Stopped);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if let Err(f) = client.finish(Ending::Failed(msg.clone())).await {
                    tracing::debug!("could not tell the coordinator: {f:#}");
                }
                // A stop asked for here (SIGTERM) ends the worker; anything else may be a
                // generation ending under it, which the next join tells.
                if stop_request.reason().is_some() || rejoin_timeout.is_zero() {
                    break Err(e);
                }
                let wait = backoff.next_wait();
                tracing::warn!(
                    generation = client.id.generation,
                    "generation ended for this worker ({msg}); rejoining in {wait:.1?}"
                );
                waiting_since = Some(Instant::now());
                tokio::time::sleep(wait).await;
            }
        }
    };
    if metrics_on && cli.metrics_linger > 0 {
        linger(Duration::from_secs(cli.metrics_linger), &stop_request).await;
    }
    outcome
}

/// Keeps serving metrics for `how_long`, unless a stop is asked for (a signal, now or during
/// the wait: the signal watcher records it in `request`), which ends the wait at once.
async fn linger(how_long: Duration, request: &StopRequest) {
    if request.reason().is_some() {
        return;
    }
    tracing::info!("serving metrics for {} s more (--metrics-linger)", how_long.as_secs());
    let until = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < until {
        if let Some(reason) = request.reason() {
            tracing::info!("{reason}: not lingering any longer");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100).min(until - tokio::time::Instant::now())).await;
    }
}

fn check_config(c: &v1::RunConfig, world: usize) -> anyhow::Result<()> {
    if world == 0 || c.steps_per_epoch == 0 || c.batch_size == 0 || c.dataset_len == 0 {
        bail!("the coordinator sent an unusable configuration: {c:?}");
    }
    if (c.batch_size as usize) < world {
        bail!("global batch {} is smaller than the world of {world}", c.batch_size);
    }
    Ok(())
}

/// What this worker brings to every generation it trains in.
struct WorkerSetup<'a> {
    cli: &'a Cli,
    /// Resolved: `cpu` or `cuda:N`.
    device: kernels::Device,
    /// Compute threads (`--worker-threads`, else every core).
    threads: usize,
    /// SIGTERM's or the coordinator's request to stop cleanly; it outlives a generation.
    stop_request: &'a Arc<StopRequest>,
}

/// Trains one generation: rendezvous, the checkpoint to start from, the batches, the step loop.
async fn train(
    worker: &WorkerSetup<'_>,
    client: &Client,
    joined: &v1::JoinResponse,
    stop: Arc<Stop>,
) -> anyhow::Result<Outcome> {
    let WorkerSetup { cli, device, threads, stop_request } = *worker;
    let stop_request = Arc::clone(stop_request);
    let config = joined.config.clone().context("the coordinator's join answer has no config")?;
    let rank = client.id.rank as usize;
    let world = joined.world_size as usize;
    let start_step = if joined.load_checkpoint { joined.checkpoint_step } else { 0 };

    // Heartbeats start at once: loading a dataset or a checkpoint can take a while.
    let progress = Arc::new(AtomicU64::new(start_step));
    let heartbeat = tokio::spawn(
        heartbeats(client.clone(), Arc::clone(&stop), Arc::clone(&stop_request), Arc::clone(&progress))
            .in_current_span(),
    );
    let _heartbeat_guard = AbortOnDrop(heartbeat);

    let listener = TcpListener::bind((cli.listen_host.as_str(), 0))
        .with_context(|| format!("cannot bind the ring listener on {} (--listen-host)", cli.listen_host))?;
    let port = listener.local_addr().context("ring listener address")?.port();
    let advertise = cli.advertise_host.clone().unwrap_or_else(|| cli.listen_host.clone());
    let ring_address =
        if advertise.contains(':') { format!("[{advertise}]:{port}") } else { format!("{advertise}:{port}") };
    // Rank 0 of a GPU run makes the NCCL id the others build their communicators from.
    let nccl_id = match device {
        kernels::Device::Cuda(_) if rank == 0 && world > 1 => kernels::cuda::nccl_unique_id()?.to_vec(),
        _ => Vec::new(),
    };
    let ring = client.rendezvous(ring_address, nccl_id).await?;
    let peers = resolve(&ring.ring_addresses).await?;
    if peers.len() != world {
        bail!("the coordinator sent {} ring addresses for a world of {world}", peers.len());
    }

    let checkpoint = if joined.load_checkpoint {
        let files = client.download_checkpoint(start_step).await?;
        tracing::info!(step = start_step, "checkpoint downloaded");
        Some(CheckpointFiles { files })
    } else {
        None
    };

    let sample_len = (config.nc * config.image_size * config.image_size) as usize;
    let plan = Plan {
        rank,
        world,
        seed: config.seed,
        global_batch: config.batch_size as usize,
        steps_per_epoch: config.steps_per_epoch,
        start_step,
        total_steps: config.total_steps,
        sample_len,
    };
    let (batch_tx, batch_rx) = mpsc::channel(PREFETCH_STEPS);
    let (choice, cfg) = (cli.data.clone(), config.clone());
    let source = tokio::task::spawn_blocking(move || batches::choose(&choice, &cfg))
        .await
        .context("opening the data panicked")??;
    let data_task = match source {
        batches::Source::Stream => {
            let (c, p, s) = (client.clone(), plan, Arc::clone(&stop));
            tokio::spawn(
                async move {
                    if let Err(e) = batches::from_coordinator(c, p, batch_tx).await {
                        s.set(format!("data stream: {e:#}"));
                    }
                }
                .in_current_span(),
            )
        }
        batches::Source::Store(store) => {
            let s = Arc::clone(&stop);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = batches::from_store(store, plan, batch_tx) {
                    s.set(format!("local data: {e:#}"));
                }
            })
        }
    };
    let _data_guard = AbortOnDrop(data_task);

    let (report_tx, report_rx) = mpsc::channel(64);
    // The background tasks' requests carry the worker's span (its trace) to the coordinator.
    let reporter = tokio::spawn(
        report_steps(client.clone(), report_rx, Arc::clone(&stop), Arc::clone(&stop_request)).in_current_span(),
    );
    // One checkpoint in flight: if uploads are slower than checkpoints, rank 0 waits rather
    // than piling copies of the model up in memory.
    let (upload_tx, upload_rx) = mpsc::channel(1);
    let uploader = tokio::spawn(upload_checkpoints(client.clone(), upload_rx, Arc::clone(&stop)).in_current_span());

    let config_json = serde_json::from_str(&joined.config_json).unwrap_or(serde_json::Value::Null);
    let trainer = Trainer {
        rank,
        world,
        config,
        config_json,
        start_step,
        checkpoint,
        peers,
        listener,
        session: ring.session,
        device,
        nccl_id: ring.nccl_id,
        ring_timeout: Duration::from_secs(cli.ring_timeout),
        threads,
        batches: batch_rx,
        reports: report_tx,
        uploads: upload_tx,
        stop: Arc::clone(&stop),
        stop_request,
        progress,
    };
    // The compute thread's spans are children of this worker's span (run id, generation, rank).
    let span = tracing::Span::current();
    let outcome = tokio::task::spawn_blocking(move || span.in_scope(|| trainer.run()))
        .await
        .context("the compute thread panicked")?;
    // The trainer dropped its senders: wait until every report and upload has gone out.
    let reported = reporter.await.context("the reporter panicked")?;
    let uploaded = uploader.await.context("the uploader panicked")?;
    let outcome = outcome?;
    reported?;
    uploaded?;
    Ok(outcome)
}

/// Aborts a background task when the worker leaves the scope that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn resolve(addresses: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::with_capacity(addresses.len());
    for (rank, a) in addresses.iter().enumerate() {
        let addr = tokio::net::lookup_host(a.as_str())
            .await
            .with_context(|| format!("rank {rank}'s ring address {a:?}"))?
            .next()
            .with_context(|| format!("rank {rank}'s ring address {a:?} resolves to nothing"))?;
        out.push(addr);
    }
    Ok(out)
}

async fn heartbeats(client: Client, stop: Arc<Stop>, stop_request: Arc<StopRequest>, progress: Arc<AtomicU64>) {
    let mut misses = 0;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tick.tick().await;
        match client.heartbeat(progress.load(Ordering::Relaxed)).await {
            Ok(v1::RunState::Failed) => {
                stop.set("the coordinator reports that the run failed");
                return;
            }
            Ok(v1::RunState::Stopping) => {
                stop_request.set("the coordinator is stopping the run");
                misses = 0;
            }
            Ok(_) => misses = 0,
            // The coordinator moved on to another generation (this worker was partitioned away
            // or too slow) or ended the run: no use waiting in the ring for peers who left.
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::Aborted | tonic::Code::NotFound
                ) =>
            {
                stop.set(format!("the coordinator ended this generation: {}", e.message()));
                return;
            }
            Err(e) => {
                misses += 1;
                tracing::warn!("heartbeat failed ({misses}/{HEARTBEAT_MISSES}): {}", e.message());
                if misses >= HEARTBEAT_MISSES {
                    stop.set(format!("the coordinator stopped answering: {}", e.message()));
                    return;
                }
            }
        }
    }
}

async fn report_steps(
    client: Client,
    mut rx: mpsc::Receiver<v1::ReportStepRequest>,
    stop: Arc<Stop>,
    stop_request: Arc<StopRequest>,
) -> anyhow::Result<()> {
    while let Some(report) = rx.recv().await {
        match client.report(report).await {
            Ok(r) if r.continue_training => {
                if r.stop_requested {
                    stop_request.set("the coordinator is stopping the run");
                }
            }
            Ok(r) => {
                stop.set(format!("the coordinator stopped the run: {}", r.reason));
                return Ok(());
            }
            Err(e) => {
                stop.set(format!("{e:#}"));
                return Err(e);
            }
        }
    }
    Ok(())
}

async fn upload_checkpoints(client: Client, mut rx: mpsc::Receiver<Upload>, stop: Arc<Stop>) -> anyhow::Result<()> {
    while let Some(upload) = rx.recv().await {
        let step = upload.step;
        let started = std::time::Instant::now();
        let span = tracing::info_span!("checkpoint_upload", step);
        match client.upload_checkpoint(upload).instrument(span).await {
            Ok(path) => {
                crate::metrics::record_upload(started.elapsed().as_secs_f64());
                tracing::info!(step, path, "checkpoint uploaded")
            }
            Err(e) => {
                stop.set(format!("{e:#}"));
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The device as the coordinator is told it at join. `device` is resolved ([`kernels::Device::check`]
/// turned `auto` into `cpu` or `cuda:0`).
fn device_message(device: kernels::Device) -> v1::ComputeDevice {
    match device {
        kernels::Device::Cuda(index) => v1::ComputeDevice::cuda(index as u32),
        kernels::Device::Cpu | kernels::Device::Auto => v1::ComputeDevice::cpu(),
    }
}
