//! The run's state machine: who has joined, where the ring is, which steps are done, what is
//! stored, and whether the run is still going.
//!
//! Every gRPC handler goes through [`Run`], which holds the state behind one mutex taken only
//! for short, non-blocking sections (never across an `.await` or a disk write of a checkpoint).
//! Phase changes are published on a `watch` channel so that waiters (rendezvous, streams, the
//! generation's watch loop) wake up without polling. The first failure wins and is final: later errors are
//! usually its echoes (a peer's socket closing after the first worker died).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::v1::{self, WorkerId};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use crate::checkpoint_store::{CheckpointStore, StoredCheckpoint};
use crate::config::RunConfig;
use crate::metrics_log::{RankReport, StepAggregator, StepRecord};
use crate::observability::{Liveness, RankLiveness};
use crate::run_dir::unix_ms;
use crate::samples::GridNames;
use crate::shard_server::ShardServer;
use crate::step_feed::StepFeed;

/// Where the run stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    WaitingForWorkers,
    Running,
    /// Asked to stop (SIGTERM): the workers finish their step and rank 0 checkpoints it.
    Stopping(String),
    /// Stopped cleanly after `step`, whose checkpoint is stored: `--resume` continues.
    Stopped {
        step: u64,
        reason: String,
    },
    Completed,
    Failed(String),
}

impl Phase {
    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed(_) | Phase::Stopped { .. })
    }

    fn to_proto(&self) -> v1::RunState {
        match self {
            Phase::WaitingForWorkers => v1::RunState::WaitingForWorkers,
            Phase::Running => v1::RunState::Running,
            Phase::Stopping(_) => v1::RunState::Stopping,
            Phase::Stopped { .. } => v1::RunState::Stopped,
            Phase::Completed => v1::RunState::Completed,
            Phase::Failed(_) => v1::RunState::Failed,
        }
    }
}

/// Bytes of an NCCL unique id (`ncclUniqueId`).
const NCCL_ID_BYTES: usize = 128;

/// A request the run refuses; the server turns each into the matching gRPC status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    #[error("request carries no worker id")]
    MissingId,
    #[error("unknown run {got:?}: this coordinator runs {expected:?}")]
    UnknownRun { got: String, expected: String },
    #[error("stale generation {got}: the run is at generation {current}; rejoin")]
    StaleGeneration { got: u64, current: u64 },
    #[error("rank {rank} is outside a world of {world}")]
    BadRank { rank: u32, world: u32 },
    #[error("rank {0} has not joined this generation")]
    NotJoined(u32),
    #[error("rank {0} is already taken")]
    RankTaken(u32),
    #[error("all {0} ranks are taken")]
    WorldFull(u32),
    #[error("the run has formed; joining is closed until the next generation")]
    Formed,
    #[error("the run is over: {0}")]
    Over(String),
    #[error("this generation is over ({0}); join again for the next one")]
    GenerationOver(String),
    #[error("{0}")]
    Invalid(String),
}

/// A worker as the coordinator knows it.
#[derive(Clone, Debug)]
struct WorkerSlot {
    hostname: String,
    pid: u32,
    /// As the worker said it at join (checked by [`joined_device`]).
    device: v1::ComputeDevice,
    ring_address: Option<String>,
    state: v1::WorkerState,
    last_seen: Instant,
    last_seen_unix_ms: u64,
    last_step: u64,
    final_checksum: Option<u64>,
    /// It finished by stopping cleanly on request, not at the run's last step.
    stopped: bool,
}

struct Inner {
    workers: Vec<Option<WorkerSlot>>,
    /// Rank 0's NCCL unique id, handed to every rank of a GPU run at rendezvous.
    nccl_id: Vec<u8>,
    aggregator: StepAggregator,
    latest: Option<StepRecord>,
    checkpoints: Vec<v1::CheckpointInfo>,
    last_stored_step: Option<u64>,
    last_checkpoint_at: Option<Instant>,
}

/// One generation of the run, shared by the gRPC handlers and the generation's watch loop.
pub struct Run {
    pub config: RunConfig,
    proto_config: v1::RunConfig,
    config_json: String,
    /// The checkpoint the workers start from, when resuming.
    pub resume_from: Option<u64>,
    /// Global steps already done when this generation started.
    pub start_step: u64,
    session: u64,
    pub shards: ShardServer,
    pub store: CheckpointStore,
    run_dir: String,
    inner: Mutex<Inner>,
    phase: watch::Sender<Phase>,
    /// Each aggregated step, for watchers (`WatchMetrics`, the progress bar) who may skip some.
    metrics: broadcast::Sender<StepRecord>,
    /// Each aggregated step, in order and none skipped, for the outputs ([`crate::step_feed`]).
    feed: StepFeed,
    /// The trace context (`traceparent`) of the generation's span, which the `Generation` holds open: it
    /// goes out in `Join`'s answer and becomes the parent of the workers' spans.
    pub trace_context: std::sync::OnceLock<tonic::metadata::MetadataMap>,
    /// Set when a worker's failure ended the run (see [`Run::worker_failed`]).
    restartable: std::sync::atomic::AtomicBool,
    /// Whether a restartable failure will be followed by another generation (restarts left).
    restart_allowed: std::sync::atomic::AtomicBool,
    /// Ranks in this generation: `--workers`, or fewer after a regroup (`--min-workers`).
    world: u32,
    /// Set by [`Run::regroup`]: the world of the next generation.
    regroup_to: std::sync::atomic::AtomicU32,
}

/// What a generation's [`Run`] starts from.
pub struct RunSetup {
    pub config: RunConfig,
    /// The checkpoint the workers start from, when resuming or restarting.
    pub resume_from: Option<u64>,
    pub shards: ShardServer,
    pub store: CheckpointStore,
    /// The stored checkpoints, as `GetStatus` lists them.
    pub checkpoints: Vec<v1::CheckpointInfo>,
    /// The run directory as `GetStatus` shows it.
    pub run_dir: String,
    /// Ranks in this generation: `--workers`, or fewer after a regroup.
    pub world: u32,
    /// Where aggregated steps go (see [`crate::step_feed`]).
    pub feed: StepFeed,
}

impl Run {
    pub fn new(setup: RunSetup) -> Arc<Self> {
        let RunSetup { config, resume_from, shards, store, checkpoints, run_dir, world, feed } = setup;
        let start_step = resume_from.unwrap_or(0);
        let world_size = world;
        let world = world as usize;
        // The ring's per-generation token: its links accept only peers that present it, which
        // the coordinator hands to this generation's workers alone. Random, so that knowing the
        // run id and generation is not enough to get into a ring.
        let session = {
            let nonce: u64 = rand::random();
            let d = Sha256::digest(format!("{}/{}/{nonce:016x}", config.run_id, config.generation).as_bytes());
            u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
        };
        let (phase, _) = watch::channel(Phase::WaitingForWorkers);
        let (metrics, _) = broadcast::channel(1024);
        Arc::new(Self {
            proto_config: config.to_proto(),
            config_json: config.to_json(),
            inner: Mutex::new(Inner {
                workers: vec![None; world],
                nccl_id: Vec::new(),
                aggregator: StepAggregator::new(world, start_step + 1, config.total_steps),
                latest: None,
                checkpoints,
                last_stored_step: resume_from,
                last_checkpoint_at: None,
            }),
            config,
            resume_from,
            start_step,
            session,
            shards,
            store,
            run_dir,
            phase,
            metrics,
            feed,
            trace_context: std::sync::OnceLock::new(),
            restartable: std::sync::atomic::AtomicBool::new(false),
            restart_allowed: std::sync::atomic::AtomicBool::new(false),
            world: world_size,
            regroup_to: std::sync::atomic::AtomicU32::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A handler that panicked mid-update must not take the whole server down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ranks in this generation (see [`Run::regroup`]).
    pub fn world(&self) -> u32 {
        self.world
    }

    /// Says whether a worker's failure will be followed by another generation, so that workers
    /// asking in between are told to come back (UNAVAILABLE) rather than that the run is over.
    pub fn set_restart_allowed(&self, allowed: bool) {
        self.restart_allowed.store(allowed, std::sync::atomic::Ordering::Release);
    }

    /// Ranks joined, and of those the ones ready to train (with a ring address).
    pub fn joined_and_ready(&self) -> (u32, u32) {
        let inner = self.lock();
        let joined = inner.workers.iter().flatten().count() as u32;
        let ready = inner.workers.iter().flatten().filter(|w| w.ring_address.is_some()).count() as u32;
        (joined, ready)
    }

    /// Ends a generation that cannot form (workers missing after a restart) so that the next
    /// one forms with the `world` that did come back: `--min-workers`. Not counted as a restart.
    pub fn regroup(&self, world: u32, reason: impl Into<String>) -> bool {
        self.regroup_to.store(world, std::sync::atomic::Ordering::Release);
        self.set_restart_allowed(true);
        let ended = self.worker_failed(reason);
        if !ended {
            self.regroup_to.store(0, std::sync::atomic::Ordering::Release);
        }
        ended
    }

    /// The world the next generation forms with, when this one ended by [`Run::regroup`].
    pub fn regrouped_world(&self) -> Option<u32> {
        Some(self.regroup_to.load(std::sync::atomic::Ordering::Acquire)).filter(|w| *w > 0)
    }

    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn subscribe_metrics(&self) -> broadcast::Receiver<StepRecord> {
        self.metrics.subscribe()
    }

    /// Ends the run with `reason` unless it is already over. Returns whether this call ended it.
    pub fn fail(&self, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let changed = self.phase.send_if_modified(|p| {
            if p.is_over() {
                false
            } else {
                *p = Phase::Failed(reason.clone());
                true
            }
        });
        if changed {
            tracing::error!("run failed: {reason}");
        }
        changed
    }

    /// Ends the run because a worker died, went silent or failed: a failure a new generation
    /// from the latest checkpoint can get past (`--max-restarts`), unlike a checksum mismatch.
    pub fn worker_failed(&self, reason: impl Into<String>) -> bool {
        let ended = self.fail(reason);
        if ended {
            self.restartable.store(true, std::sync::atomic::Ordering::Release);
        }
        ended
    }

    /// Whether the failure that ended the run was a worker's (see [`Run::worker_failed`]).
    pub fn failure_is_restartable(&self) -> bool {
        self.restartable.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks the workers to stop cleanly: they agree on a step, rank 0 checkpoints it, and the
    /// run ends [`Phase::Stopped`] there. A run no worker has started training ends at once.
    /// Returns whether this call asked.
    pub fn request_stop(&self, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let start = self.start_step;
        let changed = self.phase.send_if_modified(|p| match p {
            Phase::Running => {
                *p = Phase::Stopping(reason.clone());
                true
            }
            Phase::WaitingForWorkers => {
                *p = Phase::Stopped { step: start, reason: reason.clone() };
                true
            }
            _ => false,
        });
        if changed {
            tracing::warn!("stopping the run ({reason}): the workers finish their step and rank 0 checkpoints it");
        }
        changed
    }

    /// Whether the workers are being asked to stop.
    pub fn is_stopping(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Stopping(_))
    }

    fn refuse_if_over(&self) -> Result<(), RunError> {
        match &*self.phase.borrow() {
            Phase::Failed(r)
                if self.failure_is_restartable() && self.restart_allowed.load(std::sync::atomic::Ordering::Acquire) =>
            {
                Err(RunError::GenerationOver(r.clone()))
            }
            Phase::Failed(r) => Err(RunError::Over(format!("failed: {r}"))),
            Phase::Completed => Err(RunError::Over("completed".into())),
            Phase::Stopped { step, reason } => Err(RunError::Over(format!("stopped after step {step} ({reason})"))),
            _ => Ok(()),
        }
    }

    /// Checks who is speaking: the run, the generation, a joined rank. Refreshes its heartbeat.
    pub fn check(&self, id: Option<&WorkerId>) -> Result<usize, RunError> {
        let id = id.ok_or(RunError::MissingId)?;
        if id.run_id != self.config.run_id {
            return Err(RunError::UnknownRun { got: id.run_id.clone(), expected: self.config.run_id.clone() });
        }
        if id.generation != self.config.generation {
            return Err(RunError::StaleGeneration { got: id.generation, current: self.config.generation });
        }
        if id.rank >= self.world() {
            return Err(RunError::BadRank { rank: id.rank, world: self.world() });
        }
        let mut inner = self.lock();
        let slot = inner.workers[id.rank as usize].as_mut().ok_or(RunError::NotJoined(id.rank))?;
        slot.last_seen = Instant::now();
        slot.last_seen_unix_ms = unix_ms();
        Ok(id.rank as usize)
    }

    /// Why a worker on `device` (as it reported it at join) cannot train this run: the same
    /// rule the coordinator applies before launching GPU workers, for workers it did not launch.
    fn device_refusal(&self, device: kernels::Device) -> Option<String> {
        let demands = kernels::RunDemands {
            precision: self.config.precision,
            sync_batch_norm: self.config.sync_bn,
            world: self.world() as usize,
        };
        device.refusal(&demands)
    }

    /// Gives a worker a rank: the one it asks for, or the lowest free one.
    pub fn join(&self, req: &v1::JoinRequest) -> Result<v1::JoinResponse, RunError> {
        self.refuse_if_over()?;
        let device = joined_device(req.device.as_ref())?;
        if *self.phase.borrow() != Phase::WaitingForWorkers {
            return Err(RunError::Formed);
        }
        let world = self.world();
        let mut inner = self.lock();
        let rank = if req.requested_rank >= 0 {
            let r = req.requested_rank as u32;
            if r >= world {
                return Err(RunError::BadRank { rank: r, world });
            }
            if inner.workers[r as usize].is_some() {
                return Err(RunError::RankTaken(r));
            }
            r
        } else {
            inner.workers.iter().position(Option::is_none).ok_or(RunError::WorldFull(world))? as u32
        };
        if let Some(why) = self.device_refusal(device) {
            drop(inner);
            // Not a restartable failure: every new generation would be refused the same way.
            let reason = format!("rank {rank} (host {}) cannot train this run: {why}", req.hostname);
            self.fail(reason.clone());
            return Err(RunError::Over(format!("failed: {reason}")));
        }
        inner.workers[rank as usize] = Some(WorkerSlot {
            hostname: req.hostname.clone(),
            pid: req.pid,
            device: req.device.unwrap_or_default(),
            ring_address: None,
            state: v1::WorkerState::Joined,
            last_seen: Instant::now(),
            last_seen_unix_ms: unix_ms(),
            last_step: self.start_step,
            final_checksum: None,
            stopped: false,
        });
        tracing::info!(rank, host = %req.hostname, pid = req.pid, %device, "worker joined");
        Ok(v1::JoinResponse {
            id: Some(WorkerId { run_id: self.config.run_id.clone(), generation: self.config.generation, rank }),
            world_size: world,
            config: Some(self.proto_config.clone()),
            config_json: self.config_json.clone(),
            load_checkpoint: self.resume_from.is_some(),
            checkpoint_step: self.resume_from.unwrap_or(0),
        })
    }

    /// Records a rank's ring address (and rank 0's NCCL id); when every rank has one, the run
    /// starts.
    pub fn set_ring_address(&self, rank: usize, address: &str, nccl_id: &[u8]) -> Result<(), RunError> {
        self.refuse_if_over()?;
        if address.is_empty() || address.len() > 256 {
            return Err(RunError::Invalid(format!("ring address {address:?} is not host:port")));
        }
        match (rank, nccl_id.len()) {
            (_, 0) => {}
            (0, NCCL_ID_BYTES) => {}
            (0, n) => return Err(RunError::Invalid(format!("an NCCL id has {NCCL_ID_BYTES} bytes, not {n}"))),
            (r, _) => return Err(RunError::Invalid(format!("rank {r} sent an NCCL id: only rank 0 makes it"))),
        }
        let all_ready = {
            let mut inner = self.lock();
            if rank == 0 {
                inner.nccl_id = nccl_id.to_vec();
            }
            if let Some(slot) = inner.workers[rank].as_mut() {
                slot.ring_address = Some(address.to_string());
                slot.state = v1::WorkerState::Ready;
            }
            inner.workers.iter().all(|w| w.as_ref().is_some_and(|w| w.ring_address.is_some()))
        };
        if all_ready {
            let started = self.phase.send_if_modified(|p| {
                if *p == Phase::WaitingForWorkers {
                    *p = Phase::Running;
                    true
                } else {
                    false
                }
            });
            if started {
                tracing::info!(world = self.world(), "every rank is ready: training starts");
            }
        }
        Ok(())
    }

    /// Waits until every rank has a ring address; returns them in rank order and the session.
    pub async fn ring(&self) -> Result<(Vec<String>, u64, Vec<u8>), RunError> {
        let mut rx = self.phase.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Phase::WaitingForWorkers => {}
                Phase::Failed(r) => return Err(RunError::Over(format!("failed: {r}"))),
                Phase::Completed => return Err(RunError::Over("completed".into())),
                Phase::Stopped { step, reason } => {
                    return Err(RunError::Over(format!("stopped after step {step} ({reason})")));
                }
                Phase::Running | Phase::Stopping(_) => {
                    let inner = self.lock();
                    let addrs = inner
                        .workers
                        .iter()
                        .map(|w| w.as_ref().and_then(|w| w.ring_address.clone()).unwrap_or_default())
                        .collect();
                    return Ok((addrs, self.session, inner.nccl_id.clone()));
                }
            }
            if rx.changed().await.is_err() {
                return Err(RunError::Over("the coordinator is shutting down".into()));
            }
        }
    }

    /// Takes one rank's step report. Returns `Ok(false)` when the run is over and the worker
    /// should stop.
    pub fn report(&self, report: RankReport) -> Result<bool, RunError> {
        if self.phase().is_over() {
            return Ok(false);
        }
        let (rank, step) = (report.rank, report.step);
        // Aggregated and queued under the lock, so the outputs get the steps in order; they
        // are written by the feed's task, outside it.
        let result = {
            let mut inner = self.lock();
            if let Some(w) = inner.workers[rank].as_mut() {
                w.last_step = step;
                w.state = v1::WorkerState::Training;
            }
            let result = inner.aggregator.add(report);
            if let Ok(records) = &result {
                if let Some(last) = records.last() {
                    inner.latest = Some(last.clone());
                }
                for record in records {
                    self.feed.send(record.clone());
                }
            }
            result
        };
        let records = match result {
            Ok(r) => r,
            Err(e @ crate::metrics_log::AggregateError::ChecksumMismatch { .. }) => {
                self.fail(e.to_string());
                return Ok(false);
            }
            Err(e) => return Err(RunError::Invalid(e.to_string())),
        };
        for record in records {
            let _ = self.metrics.send(record);
        }
        Ok(!self.phase().is_over())
    }

    /// Notes a worker's heartbeat; returns the run's state for the answer.
    pub fn heartbeat(&self, rank: usize, step: u64) -> v1::RunState {
        if let Some(w) = self.lock().workers[rank].as_mut() {
            w.last_step = w.last_step.max(step);
        }
        self.phase().to_proto()
    }

    /// Checks an upload's header before its bytes are accepted.
    pub fn check_upload(&self, rank: usize, step: u64) -> Result<(), RunError> {
        self.refuse_if_over()?;
        if rank != 0 {
            return Err(RunError::Invalid(format!("rank {rank} uploaded a checkpoint; only rank 0 does")));
        }
        if step == 0 || step > self.config.total_steps {
            return Err(RunError::Invalid(format!(
                "checkpoint step {step} is outside 1..={}",
                self.config.total_steps
            )));
        }
        Ok(())
    }

    /// Records a stored checkpoint; returns the sample grids it is due for (it ends an epoch
    /// or the run, or its step is one of `--sample-every`'s).
    pub fn checkpoint_stored(
        &self,
        header: &v1::CheckpointHeader,
        stored: &StoredCheckpoint,
        all: Vec<v1::CheckpointInfo>,
    ) -> Option<GridNames> {
        {
            let mut inner = self.lock();
            inner.checkpoints = all;
            inner.last_stored_step = Some(inner.last_stored_step.unwrap_or(0).max(stored.step));
            inner.last_checkpoint_at = Some(Instant::now());
        }
        tracing::info!(step = stored.step, dir = %stored.dir.display(), bytes = stored.total_size, "checkpoint stored");
        let every = self.config.sample_every;
        let names = GridNames {
            epoch: (header.end_of_epoch || header.r#final).then_some(header.epoch),
            step: (every > 0 && stored.step % every == 0).then_some(stored.step),
        };
        (names.epoch.is_some() || names.step.is_some()).then_some(names)
    }

    /// Closes the step feed: the generation is over, its outputs get what was aggregated.
    pub fn close_feed(&self) {
        self.feed.close();
    }

    /// A worker is done. When every rank is done, the run completes — if every step was
    /// aggregated, the final checkpoint is stored and the ranks' final parameters agree — or,
    /// when the workers stopped on request, it stops at their step on the same conditions.
    pub fn finish(&self, rank: usize, req: &v1::FinishRequest) {
        if !req.ok {
            let host = self.lock().workers[rank].as_ref().map(|w| w.hostname.clone()).unwrap_or_default();
            self.worker_failed(format!("rank {rank} (host {host}) failed: {}", req.error));
            return;
        }
        if req.stopped {
            // A worker's own SIGTERM stops the whole run: its peers stopped with it.
            self.request_stop(req.stop_reason.clone());
        }
        let verdict = {
            let mut inner = self.lock();
            if let Some(w) = inner.workers[rank].as_mut() {
                w.state = v1::WorkerState::Finished;
                w.last_step = req.final_step;
                w.final_checksum = Some(req.parameter_checksum);
                w.stopped = req.stopped;
            }
            let all_done =
                inner.workers.iter().all(|w| w.as_ref().is_some_and(|w| w.state == v1::WorkerState::Finished));
            if !all_done { None } else { Some(self.completion_verdict(&inner)) }
        };
        match verdict {
            None => tracing::info!(rank, step = req.final_step, stopped = req.stopped, "worker finished"),
            Some(Ok(end)) => {
                let done = self.phase.send_if_modified(|p| {
                    let reason = match p {
                        Phase::Stopping(r) => r.clone(),
                        _ => String::new(),
                    };
                    match (&p, end) {
                        (p, _) if p.is_over() => false,
                        (_, None) => {
                            *p = Phase::Completed;
                            true
                        }
                        (_, Some(step)) => {
                            *p = Phase::Stopped { step, reason };
                            true
                        }
                    }
                });
                match end {
                    _ if !done => {}
                    None => tracing::info!(steps = self.config.total_steps, "run completed"),
                    Some(step) => tracing::warn!(step, "run stopped cleanly; resume it with --resume"),
                }
            }
            Some(Err(reason)) => {
                self.fail(reason);
            }
        }
    }

    /// Whether every rank's ending adds up: `Ok(None)` for a completed run, `Ok(Some(step))` for
    /// one stopped cleanly after `step`.
    fn completion_verdict(&self, inner: &Inner) -> Result<Option<u64>, String> {
        let workers: Vec<&WorkerSlot> = inner.workers.iter().flatten().collect();
        let stopped = workers.iter().any(|w| w.stopped);
        let end = if stopped { workers[0].last_step } else { self.config.total_steps };
        if stopped && workers.iter().any(|w| !w.stopped || w.last_step != end) {
            let list: Vec<String> = workers
                .iter()
                .enumerate()
                .map(|(r, w)| {
                    format!("rank {r} {} after step {}", if w.stopped { "stopped" } else { "finished" }, w.last_step)
                })
                .collect();
            return Err(format!("the ranks did not stop together: {}", list.join(", ")));
        }
        if inner.aggregator.completed() != end {
            return Err(format!(
                "every rank finished but only steps up to {} of {end} were reported",
                inner.aggregator.completed()
            ));
        }
        if inner.last_stored_step != Some(end) {
            return Err(format!("every rank finished but the checkpoint of step {end} was not stored"));
        }
        let sums: Vec<(usize, Option<u64>)> =
            inner.workers.iter().enumerate().map(|(r, w)| (r, w.as_ref().and_then(|w| w.final_checksum))).collect();
        if sums.iter().any(|(_, c)| *c != sums[0].1) {
            let list: Vec<String> = sums.iter().map(|(r, c)| format!("rank {r} = {:#018x}", c.unwrap_or(0))).collect();
            return Err(format!("final parameter checksums differ: {}", list.join(", ")));
        }
        Ok(stopped.then_some(end))
    }

    /// Fails the run if a joined, unfinished worker has been silent for longer than `timeout`.
    pub fn check_heartbeats(&self, timeout: Duration) {
        if self.phase().is_over() {
            return;
        }
        let silent = {
            let inner = self.lock();
            inner.workers.iter().enumerate().find_map(|(r, w)| {
                w.as_ref()
                    .filter(|w| w.state != v1::WorkerState::Finished && w.last_seen.elapsed() > timeout)
                    .map(|w| (r, w.hostname.clone(), w.pid, w.last_seen.elapsed()))
            })
        };
        if let Some((rank, host, pid, quiet)) = silent {
            self.worker_failed(format!(
                "rank {rank} (host {host}, pid {pid}) has been silent for {:.0} s (limit {} s)",
                quiet.as_secs_f64(),
                timeout.as_secs()
            ));
        }
    }

    /// The steps a resumed run had already made: the latest is the status's until a new one.
    pub fn restore_latest(&self, latest: Option<StepRecord>) {
        self.lock().latest = latest;
    }

    /// Who is alive now (joined, not finished or failed, heard from within `timeout`), each
    /// rank's step and heartbeat age, the checkpoint's age: what the periodic gauges show.
    pub fn liveness(&self, timeout: Duration) -> Liveness {
        let inner = self.lock();
        let over = self.phase().is_over();
        let mut alive = 0;
        let mut ranks = Vec::new();
        for (rank, w) in inner.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            let age = w.last_seen.elapsed();
            if !over && !matches!(w.state, v1::WorkerState::Finished | v1::WorkerState::Failed) && age <= timeout {
                alive += 1;
            }
            ranks.push(RankLiveness { rank, step: w.last_step, heartbeat_age_seconds: age.as_secs_f64() });
        }
        Liveness { alive, ranks, checkpoint_age_seconds: inner.last_checkpoint_at.map(|t| t.elapsed().as_secs_f64()) }
    }

    /// Marks every worker that had not finished as failed (after the run failed).
    pub fn mark_unfinished_failed(&self) {
        for w in self.lock().workers.iter_mut().flatten() {
            if w.state != v1::WorkerState::Finished {
                w.state = v1::WorkerState::Failed;
            }
        }
    }

    /// The latest aggregated step, if any.
    pub fn latest(&self) -> Option<StepRecord> {
        self.lock().latest.clone()
    }

    /// The run as `GetStatus` shows it.
    pub fn status(&self) -> v1::RunStatus {
        let phase = self.phase();
        let inner = self.lock();
        let step = inner.aggregator.completed();
        let spe = self.config.steps_per_epoch.max(1);
        // The epochs this run trains, which --max-steps can make fewer than --epochs.
        let epochs = self.config.total_steps.div_ceil(spe).max(1);
        let workers = inner
            .workers
            .iter()
            .enumerate()
            .filter_map(|(rank, w)| {
                w.as_ref().map(|w| v1::WorkerStatus {
                    rank: Some(rank as u32),
                    state: w.state as i32,
                    hostname: w.hostname.clone(),
                    pid: w.pid,
                    device: Some(w.device),
                    ring_address: w.ring_address.clone().unwrap_or_default(),
                    last_heartbeat_unix_ms: w.last_seen_unix_ms,
                    seconds_since_heartbeat: w.last_seen.elapsed().as_secs_f64(),
                    last_step: w.last_step,
                })
            })
            .collect();
        v1::RunStatus {
            run_id: self.config.run_id.clone(),
            generation: self.config.generation,
            state: phase.to_proto() as i32,
            error: match &phase {
                Phase::Failed(r) => r.clone(),
                _ => String::new(),
            },
            epoch: (step.saturating_sub(1) / spe).min(epochs.saturating_sub(1)),
            epochs: epochs as u32,
            step,
            total_steps: self.config.total_steps,
            world_size: self.world(),
            dataset: self.config.dataset.clone(),
            run_dir: self.run_dir.clone(),
            workers,
            latest_metrics: inner.latest.as_ref().map(to_proto_metrics),
            checkpoints: inner.checkpoints.clone(),
            // The outputs' views fill these ([`crate::run_view::RunView::status`]).
            health: None,
            evaluations: Vec::new(),
        }
    }
}

/// An aggregated step as the protocol carries it.
pub fn to_proto_metrics(r: &StepRecord) -> v1::StepMetrics {
    v1::StepMetrics {
        step: r.step,
        epoch: r.epoch,
        loss_d: r.loss_d,
        loss_g: r.loss_g,
        d_x: r.d_x,
        d_g_z1: r.d_g_z1,
        d_g_z2: r.d_g_z2,
        images_per_sec: r.images_per_sec,
        data_seconds: r.data_seconds,
        compute_seconds: r.compute_seconds,
        all_reduce_seconds: r.all_reduce_seconds,
        global_batch: r.global_batch,
    }
}

/// The device a joining worker says it computes on; a join without one (or with a kind this
/// coordinator does not know) is refused rather than guessed.
fn joined_device(device: Option<&v1::ComputeDevice>) -> Result<kernels::Device, RunError> {
    let Some(device) = device else {
        return Err(RunError::Invalid("the join request names no compute device (its `device` field)".into()));
    };
    match v1::DeviceKind::try_from(device.kind) {
        Ok(v1::DeviceKind::Cpu) => Ok(kernels::Device::Cpu),
        Ok(v1::DeviceKind::Cuda) => Ok(kernels::Device::Cuda(device.index as usize)),
        _ => Err(RunError::Invalid(format!(
            "the join request's compute device has kind {}, which is neither CPU nor CUDA",
            device.kind
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser;

    use super::*;
    use crate::flags::Cli;
    use crate::step_feed::StepQueue;

    /// A generation of `world` ranks over 8 built-in samples at batch 4 (2 steps per epoch),
    /// `steps` steps long, with its step queue and its checkpoint directory.
    pub(crate) fn generation(world: u32, steps: u64) -> (Arc<Run>, StepQueue, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dataset = Arc::new(data::SampleStore::Drawn { set: data::Drawn::Shapes, len: 8, image_size: 32 });
        let facts = crate::dataset::facts(&dataset).unwrap();
        let max_steps = steps.to_string();
        let args = ["coordinator", "--batch-size", "4", "--max-steps", max_steps.as_str(), "--workers"];
        let cli = Cli::try_parse_from(args.iter().copied().chain([world.to_string().as_str()])).unwrap();
        let config = RunConfig::from_cli(&cli, &facts, "run-1".into(), "now".into()).unwrap();
        let (feed, queue) = StepFeed::channel();
        let run = Run::new(RunSetup {
            shards: ShardServer::new(Arc::clone(&dataset), config.seed, 4, world as usize, config.total_steps),
            config,
            resume_from: None,
            store: CheckpointStore::new(tmp.path(), 3),
            checkpoints: Vec::new(),
            run_dir: tmp.path().display().to_string(),
            world,
            feed,
        });
        (run, queue, tmp)
    }

    fn join(run: &Run, requested_rank: i32) -> Result<u32, RunError> {
        let req = v1::JoinRequest {
            hostname: "h".into(),
            pid: 1,
            device: Some(v1::ComputeDevice::cpu()),
            threads: 1,
            requested_rank,
        };
        run.join(&req).map(|r| r.id.unwrap().rank)
    }

    fn report(run: &Run, rank: usize, step: u64) -> Result<bool, RunError> {
        run.report(RankReport { rank, step, epoch: (step - 1) / 2, local_batch: 2, ..Default::default() })
    }

    fn finish(final_step: u64, checksum: u64) -> v1::FinishRequest {
        v1::FinishRequest { ok: true, final_step, parameter_checksum: checksum, ..Default::default() }
    }

    /// Joins every rank and gives each a ring address: the run is training.
    fn running(world: u32, steps: u64) -> (Arc<Run>, StepQueue, tempfile::TempDir) {
        let (run, queue, tmp) = generation(world, steps);
        for rank in 0..world {
            join(&run, rank as i32).unwrap();
            run.set_ring_address(rank as usize, &format!("127.0.0.1:{}", 9000 + rank), &[]).unwrap();
        }
        assert_eq!(run.phase(), Phase::Running);
        (run, queue, tmp)
    }

    fn store_checkpoint(run: &Run, step: u64, tmp: &tempfile::TempDir) -> Option<GridNames> {
        let header = v1::CheckpointHeader {
            step,
            epoch: (step - 1) / 2,
            r#final: step == run.config.total_steps,
            ..Default::default()
        };
        let stored = StoredCheckpoint { step, dir: tmp.path().join(format!("step_{step:08}")), total_size: 1 };
        run.checkpoint_stored(&header, &stored, Vec::new())
    }

    #[test]
    fn ranks_are_handed_out_until_the_world_is_full() {
        let (run, _queue, _tmp) = generation(2, 4);
        assert_eq!(join(&run, 1), Ok(1));
        assert_eq!(join(&run, 1), Err(RunError::RankTaken(1)));
        assert_eq!(join(&run, 5), Err(RunError::BadRank { rank: 5, world: 2 }));
        assert_eq!(join(&run, -1), Ok(0));
        assert_eq!(join(&run, -1), Err(RunError::WorldFull(2)));
        assert_eq!(run.joined_and_ready(), (2, 0));
        assert_eq!(run.phase(), Phase::WaitingForWorkers);
    }

    #[test]
    fn a_join_must_name_a_device_the_coordinator_knows_and_its_gpu_is_shown_as_given() {
        let (run, _queue, _tmp) = generation(2, 4);
        let mut req = v1::JoinRequest { hostname: "h".into(), pid: 1, device: None, threads: 1, requested_rank: -1 };
        assert!(matches!(run.join(&req), Err(RunError::Invalid(m)) if m.contains("names no compute device")));
        req.device = Some(v1::ComputeDevice { kind: 7, index: 0 });
        assert!(matches!(run.join(&req), Err(RunError::Invalid(m)) if m.contains("kind 7")));
        assert_eq!(run.joined_and_ready(), (0, 0), "a refused join takes no rank");
        assert_eq!(run.phase(), Phase::WaitingForWorkers, "and does not fail the run");
        req.device = Some(v1::ComputeDevice::cuda(3));
        assert_eq!(run.join(&req).unwrap().id.unwrap().rank, 0);
        let shown = run.status().workers[0].device;
        assert_eq!(shown.map(|d| d.to_string()).as_deref(), Some("cuda:3"));
    }

    #[test]
    fn training_starts_when_every_rank_has_a_ring_address() {
        let (run, _queue, _tmp) = generation(2, 4);
        join(&run, 0).unwrap();
        join(&run, 1).unwrap();
        run.set_ring_address(0, "127.0.0.1:9000", &[]).unwrap();
        assert_eq!(run.phase(), Phase::WaitingForWorkers);
        assert!(matches!(run.set_ring_address(1, "", &[]), Err(RunError::Invalid(_))));
        assert!(matches!(run.set_ring_address(1, "h:1", &[7; 4]), Err(RunError::Invalid(_))));
        run.set_ring_address(1, "127.0.0.1:9001", &[]).unwrap();
        assert_eq!(run.phase(), Phase::Running);
        assert_eq!(join(&run, -1), Err(RunError::Formed));
    }

    #[test]
    fn who_speaks_is_checked() {
        let (run, _queue, _tmp) = running(1, 4);
        let id = |run_id: &str, generation, rank| Some(WorkerId { run_id: run_id.into(), generation, rank });
        assert_eq!(run.check(id("run-1", 1, 0).as_ref()), Ok(0));
        assert_eq!(run.check(None), Err(RunError::MissingId));
        assert!(matches!(run.check(id("other", 1, 0).as_ref()), Err(RunError::UnknownRun { .. })));
        assert!(matches!(run.check(id("run-1", 2, 0).as_ref()), Err(RunError::StaleGeneration { .. })));
        assert!(matches!(run.check(id("run-1", 1, 3).as_ref()), Err(RunError::BadRank { .. })));
    }

    #[test]
    fn aggregated_steps_reach_the_feed_in_order_and_the_status() {
        let (run, mut queue, _tmp) = running(2, 4);
        assert_eq!(report(&run, 0, 1), Ok(true));
        assert_eq!(report(&run, 0, 2), Ok(true));
        assert!(run.latest().is_none(), "no step is aggregated before every rank reported it");
        assert_eq!(report(&run, 1, 1), Ok(true));
        assert_eq!(report(&run, 1, 2), Ok(true));
        let fed: Vec<u64> = std::iter::from_fn(|| queue.try_recv()).map(|r| r.step).collect();
        assert_eq!(fed, [1, 2]);
        assert_eq!(run.latest().map(|r| r.step), Some(2));
        assert_eq!(run.status().step, 2);
    }

    #[test]
    fn a_run_completes_when_every_rank_finished_every_step_stored_and_agreeing() {
        let (run, _queue, tmp) = running(2, 2);
        for step in 1..=2 {
            report(&run, 0, step).unwrap();
            report(&run, 1, step).unwrap();
        }
        // The last checkpoint ends the run and its epoch: both grids are due.
        let names = store_checkpoint(&run, 2, &tmp).unwrap();
        assert_eq!(names.epoch, Some(0));
        run.finish(0, &finish(2, 42));
        assert_eq!(run.phase(), Phase::Running, "one rank finished, the other has not");
        run.finish(1, &finish(2, 42));
        assert_eq!(run.phase(), Phase::Completed);
        assert!(!run.fail("late echo"), "the end is final");
        assert_eq!(run.phase(), Phase::Completed);
    }

    #[test]
    fn liveness_counts_the_ranks_still_training_and_none_once_the_run_is_over() {
        let (run, _queue, tmp) = running(2, 2);
        let minute = Duration::from_secs(60);
        let now = run.liveness(minute);
        assert_eq!((now.alive, now.ranks.len(), now.checkpoint_age_seconds), (2, 2, None));
        for step in 1..=2 {
            report(&run, 0, step).unwrap();
            report(&run, 1, step).unwrap();
        }
        store_checkpoint(&run, 2, &tmp).unwrap();
        run.finish(0, &finish(2, 42));
        let now = run.liveness(minute);
        assert_eq!(now.alive, 1, "rank 0 finished");
        assert_eq!(now.ranks.iter().map(|r| r.step).collect::<Vec<_>>(), [2, 2]);
        assert!(now.checkpoint_age_seconds.is_some_and(|age| age < 60.0));
        run.finish(1, &finish(2, 42));
        assert_eq!(run.liveness(minute).alive, 0);
    }

    #[test]
    fn ranks_that_disagree_fail_the_run_for_good() {
        let (run, _queue, tmp) = running(2, 1);
        report(&run, 0, 1).unwrap();
        report(&run, 1, 1).unwrap();
        store_checkpoint(&run, 1, &tmp);
        run.finish(0, &finish(1, 1));
        run.finish(1, &finish(1, 2));
        assert!(matches!(run.phase(), Phase::Failed(r) if r.contains("final parameter checksums differ")));
        assert!(!run.failure_is_restartable());
    }

    #[test]
    fn a_run_missing_its_last_checkpoint_does_not_complete() {
        let (run, _queue, _tmp) = running(1, 1);
        report(&run, 0, 1).unwrap();
        run.finish(0, &finish(1, 1));
        assert!(matches!(run.phase(), Phase::Failed(r) if r.contains("checkpoint of step 1 was not stored")));
    }

    #[test]
    fn a_worker_failure_ends_the_generation_and_late_workers_are_told_to_come_back() {
        let (run, _queue, _tmp) = running(2, 4);
        run.set_restart_allowed(true);
        run.finish(1, &v1::FinishRequest { ok: false, error: "boom".into(), ..Default::default() });
        assert!(matches!(run.phase(), Phase::Failed(r) if r.contains("rank 1") && r.contains("boom")));
        assert!(run.failure_is_restartable());
        assert!(matches!(join(&run, -1), Err(RunError::GenerationOver(_))));
        assert_eq!(report(&run, 0, 1), Ok(false), "a report after the end tells the worker to stop");
        // Without restarts left, the same failure is the run's end.
        let (run, _queue, _tmp) = running(1, 4);
        run.worker_failed("gone");
        assert!(matches!(join(&run, -1), Err(RunError::Over(_))));
    }

    #[test]
    fn a_stop_before_training_ends_at_once_and_during_training_at_the_agreed_step() {
        let (run, _queue, _tmp) = generation(1, 4);
        assert!(run.request_stop("SIGTERM"));
        assert_eq!(run.phase(), Phase::Stopped { step: 0, reason: "SIGTERM".into() });

        let (run, _queue, tmp) = running(1, 4);
        assert!(run.request_stop("SIGTERM"));
        assert!(run.is_stopping());
        assert!(!run.request_stop("again"), "one stop at a time");
        report(&run, 0, 1).unwrap();
        store_checkpoint(&run, 1, &tmp);
        run.finish(0, &v1::FinishRequest { stopped: true, stop_reason: "SIGTERM".into(), ..finish(1, 9) });
        assert_eq!(run.phase(), Phase::Stopped { step: 1, reason: "SIGTERM".into() });
    }

    #[test]
    fn a_regroup_ends_the_generation_with_the_world_of_the_next() {
        let (run, _queue, _tmp) = generation(3, 4);
        join(&run, 0).unwrap();
        run.set_ring_address(0, "127.0.0.1:9000", &[]).unwrap();
        assert_eq!(run.regrouped_world(), None);
        assert!(run.regroup(1, "only 1 of 3 came back"));
        assert_eq!(run.regrouped_world(), Some(1));
        assert!(run.failure_is_restartable());
        // A run already over cannot be regrouped.
        let (run, _queue, _tmp) = generation(3, 4);
        run.fail("done");
        assert!(!run.regroup(1, "late"));
        assert_eq!(run.regrouped_world(), None);
    }

    #[test]
    fn a_silent_worker_fails_the_generation() {
        let (run, _queue, _tmp) = running(1, 4);
        run.check_heartbeats(Duration::from_secs(60));
        assert_eq!(run.phase(), Phase::Running);
        run.check_heartbeats(Duration::ZERO);
        assert!(matches!(run.phase(), Phase::Failed(r) if r.contains("silent")));
        assert!(run.failure_is_restartable());
    }
}
