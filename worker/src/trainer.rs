//! The compute loop of one rank, on its own thread with its own rayon pool: take the step's
//! batch, draw its noise, train, report, and (rank 0) hand checkpoints to the uploader.
//!
//! It never touches the network itself except through the collective: reports and uploads go
//! to async tasks through channels, so a slow coordinator delays no step.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kernels::{
    CheckpointFiles, Collective, Gan, ModelConfig, OptimConfig, SingleProcess, StepShare, Tensor, TrainingState,
    Watchdog,
};
use proto::v1;
use tokio::sync::mpsc;

use crate::batches::Batch;
use crate::client::Upload;
use crate::engine::{Engine, GpuRanks};
use crate::stop::{Askers, Stop, StopRequest, stop_vote};

/// Everything the compute thread needs; built by the async side.
pub struct Trainer {
    pub rank: usize,
    pub world: usize,
    pub config: v1::RunConfig,
    pub config_json: serde_json::Value,
    pub start_step: u64,
    pub checkpoint: Option<CheckpointFiles>,
    pub peers: Vec<SocketAddr>,
    pub listener: TcpListener,
    pub session: u64,
    /// Where to train (`cpu` or `cuda:N`, resolved).
    pub device: kernels::Device,
    /// Rank 0's NCCL unique id, for a GPU run of several ranks.
    pub nccl_id: Vec<u8>,
    pub ring_timeout: Duration,
    pub threads: usize,
    pub batches: mpsc::Receiver<Batch>,
    pub reports: mpsc::Sender<v1::ReportStepRequest>,
    pub uploads: mpsc::Sender<Upload>,
    pub stop: Arc<Stop>,
    /// A clean stop asked for (SIGTERM, or the coordinator stopping the run).
    pub stop_request: Arc<StopRequest>,
    /// Global steps completed, for the heartbeats.
    pub progress: Arc<AtomicU64>,
}

/// How the loop ended when it ended well.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub final_step: u64,
    pub checksum: u64,
    /// Why the run stopped before its last step, when a clean stop was asked for.
    pub stopped: Option<String>,
}

impl Trainer {
    pub fn model(&self) -> ModelConfig {
        let c = &self.config;
        ModelConfig {
            image_size: c.image_size as usize,
            nc: c.nc as usize,
            nz: c.nz as usize,
            ngf: c.ngf as usize,
            ndf: c.ndf as usize,
        }
    }

    /// Runs every remaining step. Blocking: call from a dedicated thread.
    pub fn run(mut self) -> anyhow::Result<Outcome> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("compute-{i}"))
            .build()
            .context("cannot build the compute thread pool")?;
        let mut gan = self.build_gan()?;
        gan.set_sync_batch_norm(self.config.sync_bn);
        let c = self.config.clone();
        let precision = run_precision(&c, &self.config_json)?;
        let demands = kernels::RunDemands { precision, sync_batch_norm: c.sync_bn, world: self.world };
        if let Some(why) = self.device.refusal(&demands) {
            bail!("{why}");
        }
        let mut engine = match self.device {
            kernels::Device::Cuda(ordinal) => {
                // This rank's largest share of a step (the last step of an epoch also takes the
                // remainder), not the whole global batch.
                let max_batch = data::max_rank_batch(c.dataset_len as usize, c.batch_size as usize, self.world);
                let watchdog = Watchdog::new(self.ring_timeout, self.stop.clone());
                let ranks = GpuRanks { rank: self.rank, world: self.world, nccl_id: &self.nccl_id, watchdog };
                Engine::on_gpu(&gan, ordinal, max_batch, ranks)?
            }
            _ => {
                gan.set_precision(precision).context("the run's --precision")?;
                tracing::info!(%precision, "convolution products");
                if precision == kernels::Precision::Bf16 {
                    if let Some(warning) = kernels::ops::isa_rate::bf16_slowdown_warning() {
                        tracing::warn!("{warning}");
                    }
                }
                Engine::Cpu { gan: Box::new(gan), collective: self.cpu_collective()? }
            }
        };
        self.train(&pool, &mut engine, c)
    }

    /// The TCP ring with the other ranks (nothing to talk to in a world of one).
    fn cpu_collective(&self) -> anyhow::Result<Box<dyn Collective + Send>> {
        Ok(if self.world == 1 {
            Box::new(SingleProcess)
        } else {
            let listener = self.listener.try_clone().context("ring listener")?;
            let ring = allreduce::TcpRing::connect(self.rank, &self.peers, listener, self.session, self.ring_timeout)
                .context("cannot build the all-reduce ring")?;
            tracing::info!(rank = self.rank, world = self.world, "all-reduce ring connected");
            if let Some(abort) = ring.abort_handle().context("all-reduce ring")? {
                self.stop.arm(abort);
            }
            Box::new(ring)
        })
    }

    fn train(&mut self, pool: &rayon::ThreadPool, engine: &mut Engine, c: v1::RunConfig) -> anyhow::Result<Outcome> {
        let (spe, total, global) = (c.steps_per_epoch, c.total_steps, c.batch_size as u64);
        let s = c.image_size as usize;
        let mut step = self.start_step;
        while step < total {
            if let Some(reason) = self.stop.reason() {
                bail!("stopped at step {step}: {reason}");
            }
            // One span per step, with one child per phase the kernels API lets us time apart:
            // waiting for data, the compute (forward, backward, Adam; train_step is one call, so
            // the all-reduce time inside it is a field), and rank 0's checkpoint serialisation.
            let step_span = tracing::info_span!("step", rank = self.rank, step = step + 1, epoch = step / spe);
            let _step_guard = step_span.enter();
            let t0 = Instant::now();
            let data_span = tracing::info_span!("data", local_batch = tracing::field::Empty).entered();
            let batch = match self.batches.blocking_recv() {
                Some(b) => b,
                None => match self.stop.reason() {
                    Some(reason) => bail!("stopped at step {step}: {reason}"),
                    None => bail!("the data source ended before step {step}"),
                },
            };
            if batch.step != step {
                bail!("data for step {} arrived at step {step}", batch.step);
            }
            let n = batch.indices.len();
            let real = Tensor::new(vec![n, c.nc as usize, s, s], batch.pixels).context("real batch")?;
            let z = kernels::rng::noise(c.seed, self.rank as u64, step, n, c.nz as usize);
            let data_seconds = t0.elapsed().as_secs_f64();
            data_span.record("local_batch", n);
            drop(data_span);

            // The last step of an epoch also takes the remainder, so its global batch is larger.
            let step_in_epoch = step % spe;
            let global_n = if step_in_epoch + 1 == spe { c.dataset_len - step_in_epoch * global } else { global };
            let grad_weight = (n as f64 * self.world as f64 / global_n as f64) as f32;
            // A clean stop must happen after the same step on every rank, or the others would
            // wait in the next all-reduce for a peer that left: the ranks vote on it in the
            // step's own gradient average (see `stop_vote`), so agreeing costs nothing extra.
            let asked = self.stop_request.reason();
            let share = StepShare { grad_weight, vote: stop_vote(self.rank, asked.is_some()) };
            let compute_span = tracing::info_span!(
                "compute",
                phases = "d_forward,g_forward,backward,all_reduce,optimizer",
                all_reduce_seconds = tracing::field::Empty,
                loss_d = tracing::field::Empty,
                loss_g = tracing::field::Empty,
            )
            .entered();
            let stats = engine.train_step(pool, &real, &z, share).with_context(|| format!("training step {step}"))?;
            compute_span.record("all_reduce_seconds", stats.all_reduce_seconds);
            compute_span.record("loss_d", stats.loss_d);
            compute_span.record("loss_g", stats.loss_g);
            drop(compute_span);
            let epoch = step / spe;
            step += 1;
            self.progress.store(step, Ordering::Relaxed);

            let checksum = (step == total || (c.checksum_every > 0 && step % c.checksum_every == 0))
                .then(|| engine.consistency_checksum(c.sync_bn))
                .transpose()?;
            let report = v1::ReportStepRequest {
                id: None,
                step,
                epoch,
                local_batch: n as u32,
                loss_d: stats.loss_d,
                loss_g: stats.loss_g,
                d_x: stats.d_x,
                d_g_z1: stats.d_g_z1,
                d_g_z2: stats.d_g_z2,
                data_seconds,
                compute_seconds: stats.compute_seconds,
                all_reduce_seconds: stats.all_reduce_seconds,
                step_seconds: t0.elapsed().as_secs_f64(),
                has_checksum: checksum.is_some(),
                parameter_checksum: checksum.unwrap_or(0),
            };
            crate::metrics::record_step(&crate::metrics::StepTimes {
                step,
                local_batch: n,
                data_seconds,
                compute_seconds: stats.compute_seconds,
                all_reduce_seconds: stats.all_reduce_seconds,
                total_seconds: report.step_seconds,
            });
            if self.reports.blocking_send(report).is_err() {
                bail!(
                    "stopped at step {step}: {}",
                    self.stop.reason().unwrap_or_else(|| "the reporter stopped".into())
                );
            }
            if step % spe == 0 {
                tracing::info!(epoch, step, loss_d = stats.loss_d, loss_g = stats.loss_g, "epoch done");
            }

            let end_of_epoch = step % spe == 0;
            let is_final = step == total;
            let every = |n: u64| n > 0 && step % n == 0;
            // A grid of --sample-every is drawn from a checkpoint of its step.
            let scheduled = end_of_epoch || is_final || every(c.checkpoint_every) || every(c.sample_every);
            if self.rank == 0 && scheduled {
                self.checkpoint(engine, step, end_of_epoch, is_final)?;
            }
            let askers = Askers::from_mean(stats.vote, self.world);
            if !is_final && askers.any() {
                if self.rank == 0 && !scheduled {
                    self.checkpoint(engine, step, end_of_epoch, is_final)?;
                }
                let reason = match asked {
                    Some(r) => format!("rank {}: {r}", self.rank),
                    None => askers.describe(),
                };
                tracing::info!(step, reason, "stopped cleanly");
                let checksum = engine.consistency_checksum(c.sync_bn)?;
                return Ok(Outcome { final_step: step, checksum, stopped: Some(reason) });
            }
        }
        Ok(Outcome { final_step: step, checksum: engine.consistency_checksum(c.sync_bn)?, stopped: None })
    }

    /// Rank 0: serialises the model after `step` and hands it to the uploader.
    fn checkpoint(&self, engine: &Engine, step: u64, end_of_epoch: bool, is_final: bool) -> anyhow::Result<()> {
        let c = &self.config;
        let spe = c.steps_per_epoch;
        let epoch = (step - 1) / spe;
        let state = TrainingState {
            step,
            epoch: step / spe,
            step_in_epoch: step % spe,
            seed: c.seed,
            config: self.config_json.clone(),
        };
        let files = tracing::info_span!("checkpoint_save")
            .in_scope(|| engine.save(&state))
            .with_context(|| format!("checkpoint of step {step}"))?;
        let upload = Upload { step, epoch, end_of_epoch, is_final, files: files.files };
        if self.uploads.blocking_send(upload).is_err() {
            bail!("stopped at step {step}: {}", self.stop.reason().unwrap_or_else(|| "the uploader stopped".into()));
        }
        Ok(())
    }

    /// A fresh GAN from the run's seed (the same on every rank), or the checkpoint's.
    fn build_gan(&mut self) -> anyhow::Result<Gan> {
        let model = self.model();
        match self.checkpoint.take() {
            None => {
                let optim = OptimConfig { lr: self.config.lr, beta1: self.config.beta1, ..Default::default() };
                Gan::new(model, optim, self.config.seed).context("cannot build the networks")
            }
            Some(files) => {
                let (gan, state) = Gan::load(&files).context("cannot load the checkpoint")?;
                if state.step != self.start_step {
                    bail!("the checkpoint is of step {}, the coordinator said {}", state.step, self.start_step);
                }
                if *gan.model_config() != model {
                    bail!("the checkpoint's networks {:?} are not the run's {:?}", gan.model_config(), model);
                }
                tracing::info!(step = state.step, "resumed from checkpoint");
                Ok(gan)
            }
        }
    }
}

/// The run's precision. A coordinator that sends none in the enum is older: it sent the precision
/// as a string this worker no longer reads, but its `run.json` copy (`config_json`) still says it;
/// one from before the setting says nothing there either: fp32.
fn run_precision(config: &v1::RunConfig, config_json: &serde_json::Value) -> anyhow::Result<kernels::Precision> {
    match v1::Precision::try_from(config.precision) {
        Ok(v1::Precision::F32) => Ok(kernels::Precision::F32),
        Ok(v1::Precision::Bf16) => Ok(kernels::Precision::Bf16),
        Ok(v1::Precision::Unspecified) => match config_json.get("precision") {
            None => Ok(kernels::Precision::F32),
            Some(named) => serde_json::from_value(named.clone())
                .with_context(|| format!("the run's precision {named} is not one this worker knows")),
        },
        Err(_) => bail!("the run's precision {} is not one this worker knows", config.precision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_coordinators_precision_is_read_from_its_run_json() {
        let mut config = v1::RunConfig { precision: v1::Precision::Bf16 as i32, ..Default::default() };
        let json = serde_json::json!({ "precision": "f32" });
        assert_eq!(run_precision(&config, &json).unwrap(), kernels::Precision::Bf16, "the enum decides");
        config.precision = v1::Precision::Unspecified as i32;
        let bf16 = serde_json::json!({ "precision": "bf16" });
        assert_eq!(run_precision(&config, &bf16).unwrap(), kernels::Precision::Bf16);
        assert_eq!(run_precision(&config, &serde_json::json!({})).unwrap(), kernels::Precision::F32);
        assert_eq!(run_precision(&config, &serde_json::Value::Null).unwrap(), kernels::Precision::F32);
        let e = run_precision(&config, &serde_json::json!({ "precision": "fp8" })).unwrap_err();
        assert!(format!("{e:#}").contains("\"fp8\" is not one this worker knows"), "{e:#}");
        config.precision = 9;
        assert!(run_precision(&config, &json).is_err());
    }
}
