//! The coordinator's Prometheus series: the run aggregated over its ranks (the same numbers as
//! `metrics.jsonl`'s lines), the workers' liveness, the checkpoints and the GAN health signals.
//! Served at `--metrics-listen` by [`dcgan_process::telemetry::MetricsListener`]; without it no
//! recorder is installed and recording costs next to nothing.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use crate::health::Health;
use crate::metrics_log::StepRecord;

pub const STEP: &str = "dcgan_step";
pub const EPOCH: &str = "dcgan_epoch";
pub const TOTAL_STEPS: &str = "dcgan_total_steps";
pub const STEPS_TOTAL: &str = "dcgan_steps_total";
pub const IMAGES_TOTAL: &str = "dcgan_images_total";
pub const IMAGES_PER_SECOND: &str = "dcgan_images_per_second";
pub const GLOBAL_BATCH: &str = "dcgan_global_batch";
pub const LOSS_D: &str = "dcgan_loss_d";
pub const LOSS_G: &str = "dcgan_loss_g";
pub const D_X: &str = "dcgan_d_x";
/// D(G(z)) with label `when="before_d_update"` (d_g_z1) or `"after_d_update"` (d_g_z2).
pub const D_G_Z: &str = "dcgan_d_g_z";
pub const PHASE_SECONDS: &str = "dcgan_step_phase_seconds";
pub const PHASE_DURATION: &str = "dcgan_step_phase_duration_seconds";
pub const WORKERS: &str = "dcgan_workers";
pub const WORKERS_ALIVE: &str = "dcgan_workers_alive";
pub const RESTARTS: &str = "dcgan_worker_restarts_total";
pub const GENERATION: &str = "dcgan_generation";
pub const RANK_STEP: &str = "dcgan_rank_step";
pub const RANK_HEARTBEAT_AGE: &str = "dcgan_rank_heartbeat_age_seconds";
pub const CHECKPOINT_STEP: &str = "dcgan_checkpoint_step";
pub const CHECKPOINT_SIZE: &str = "dcgan_checkpoint_size_bytes";
pub const CHECKPOINT_AGE: &str = "dcgan_checkpoint_age_seconds";
pub const CHECKPOINTS_TOTAL: &str = "dcgan_checkpoints_stored_total";
pub const HEALTH_D_WON: &str = "dcgan_health_d_won";
pub const HEALTH_D_WON_STREAK: &str = "dcgan_health_d_won_streak_steps";
pub const HEALTH_NONFINITE: &str = "dcgan_health_nonfinite_loss";
pub const HEALTH_MODE_COLLAPSE: &str = "dcgan_health_mode_collapse";
pub const SAMPLE_DIVERSITY_RATIO: &str = "dcgan_sample_diversity_ratio";
pub const SAMPLE_PAIRWISE_DISTANCE: &str = "dcgan_sample_pairwise_distance";
pub const RUN_INFO: &str = "dcgan_run_info";
pub const FID: &str = "dcgan_fid";
pub const FID_EPOCH: &str = "dcgan_fid_epoch";

/// The step phases as `metrics.jsonl` names them (without `_seconds`).
pub const PHASES: [&str; 3] = ["data", "compute", "all_reduce"];

/// Help texts, and the series that exist from the start (so a scrape before the first step
/// already shows the run).
pub fn describe(run_id: &str, dataset: &str, generation: u64, world: u32, total_steps: u64) {
    describe_gauge!(STEP, "Global steps completed (aggregated over every rank).");
    describe_gauge!(FID, "FID of the latest evaluated checkpoint's samples (--eval-every); lower is better.");
    describe_gauge!(FID_EPOCH, "Epoch (0-based) whose end the latest FID evaluated.");
    describe_gauge!(EPOCH, "Epoch of the latest aggregated step (0-based).");
    describe_gauge!(TOTAL_STEPS, "Global steps the run will train in all.");
    describe_counter!(STEPS_TOTAL, "Steps aggregated by this coordinator process.");
    describe_counter!(IMAGES_TOTAL, "Real images trained on (global batches) since this coordinator started.");
    describe_gauge!(IMAGES_PER_SECOND, "Sum over ranks of local batch / step wall time, latest step.");
    describe_gauge!(GLOBAL_BATCH, "Global batch of the latest step.");
    describe_gauge!(LOSS_D, "Discriminator loss of the latest step (mean over ranks weighted by local batch).");
    describe_gauge!(LOSS_G, "Generator loss of the latest step.");
    describe_gauge!(D_X, "Mean D(x) on real images, latest step.");
    describe_gauge!(D_G_Z, "Mean D(G(z)) on fakes, before and after D's update, latest step.");
    describe_gauge!(PHASE_SECONDS, metrics::Unit::Seconds, "Slowest rank's time of the latest step by phase.");
    describe_histogram!(PHASE_DURATION, metrics::Unit::Seconds, "Slowest rank's step time by phase.");
    describe_gauge!(WORKERS, "Ranks in the run (world size).");
    describe_gauge!(
        WORKERS_ALIVE,
        "Joined ranks that are neither finished nor failed and sent a message within the heartbeat timeout."
    );
    describe_counter!(RESTARTS, "Generations restarted by this coordinator after a worker's failure (--max-restarts).");
    describe_gauge!(GENERATION, "The run's generation (a resume starts the next one).");
    describe_gauge!(RANK_STEP, "Latest step each rank reported or heartbeated.");
    describe_gauge!(RANK_HEARTBEAT_AGE, metrics::Unit::Seconds, "Seconds since each rank's last message.");
    describe_gauge!(CHECKPOINT_STEP, "Step of the latest stored checkpoint.");
    describe_gauge!(CHECKPOINT_SIZE, metrics::Unit::Bytes, "Total size of the latest stored checkpoint's files.");
    describe_gauge!(CHECKPOINT_AGE, metrics::Unit::Seconds, "Seconds since the latest checkpoint was stored.");
    describe_counter!(CHECKPOINTS_TOTAL, "Checkpoints stored by this coordinator process.");
    describe_gauge!(HEALTH_D_WON, "1 while D(x) > 0.99 and D(G(z)) < 0.01 have held for --d-won-steps steps.");
    describe_gauge!(HEALTH_D_WON_STREAK, "Consecutive steps with D(x) > 0.99 and D(G(z)) < 0.01.");
    describe_gauge!(HEALTH_NONFINITE, "1 once a loss or D output was NaN or infinite.");
    describe_gauge!(
        HEALTH_MODE_COLLAPSE,
        "1 while the fixed-noise samples are less varied than --collapse-fraction of the real ones."
    );
    describe_gauge!(
        SAMPLE_DIVERSITY_RATIO,
        "Mean pairwise distance of the latest fixed-noise samples over the real samples'."
    );
    describe_gauge!(SAMPLE_PAIRWISE_DISTANCE, "Mean pairwise L2 distance of the real or the latest fake sample grid.");
    describe_gauge!(RUN_INFO, "Always 1; labels name the run.");

    gauge!(RUN_INFO, "run_id" => run_id.to_string(), "dataset" => dataset.to_string()).set(1.0);
    gauge!(GENERATION).set(generation as f64);
    gauge!(WORKERS).set(f64::from(world));
    gauge!(TOTAL_STEPS).set(total_steps as f64);
    gauge!(WORKERS_ALIVE).set(0.0);
    counter!(RESTARTS).absolute(0);
    counter!(STEPS_TOTAL).absolute(0);
    counter!(CHECKPOINTS_TOTAL).absolute(0);
    record_health(&Health::default());
}

/// Records one aggregated step (one line of `metrics.jsonl`).
pub fn record_step(r: &StepRecord) {
    gauge!(STEP).set(r.step as f64);
    gauge!(EPOCH).set(r.epoch as f64);
    counter!(STEPS_TOTAL).increment(1);
    counter!(IMAGES_TOTAL).increment(u64::from(r.global_batch));
    gauge!(IMAGES_PER_SECOND).set(r.images_per_sec);
    gauge!(GLOBAL_BATCH).set(f64::from(r.global_batch));
    gauge!(LOSS_D).set(f64::from(r.loss_d));
    gauge!(LOSS_G).set(f64::from(r.loss_g));
    gauge!(D_X).set(f64::from(r.d_x));
    gauge!(D_G_Z, "when" => "before_d_update").set(f64::from(r.d_g_z1));
    gauge!(D_G_Z, "when" => "after_d_update").set(f64::from(r.d_g_z2));
    for (phase, v) in PHASES.iter().zip([r.data_seconds, r.compute_seconds, r.all_reduce_seconds]) {
        gauge!(PHASE_SECONDS, "phase" => *phase).set(v);
        histogram!(PHASE_DURATION, "phase" => *phase).record(v);
    }
}

/// Records the health signals' current values.
pub fn record_health(h: &Health) {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge!(HEALTH_D_WON).set(flag(h.d_won()));
    gauge!(HEALTH_D_WON_STREAK).set(h.d_won_streak as f64);
    gauge!(HEALTH_NONFINITE).set(flag(h.nonfinite()));
    gauge!(HEALTH_MODE_COLLAPSE).set(flag(h.mode_collapse()));
    if let Some(r) = h.diversity_ratio() {
        gauge!(SAMPLE_DIVERSITY_RATIO).set(r);
    }
    if let Some(d) = h.real_distance {
        gauge!(SAMPLE_PAIRWISE_DISTANCE, "set" => "real").set(d);
    }
    if let Some((_, d)) = h.fake_distance {
        gauge!(SAMPLE_PAIRWISE_DISTANCE, "set" => "fake").set(d);
    }
}

/// Records a stored checkpoint.
/// A new generation after a worker's failure.
pub fn record_restart(generation: u64) {
    counter!(RESTARTS).increment(1);
    gauge!(GENERATION).set(generation as f64);
}

pub fn record_fid(epoch: u64, fid: f64) {
    gauge!(FID).set(fid);
    gauge!(FID_EPOCH).set(epoch as f64);
}

pub fn record_checkpoint(step: u64, bytes: u64) {
    gauge!(CHECKPOINT_STEP).set(step as f64);
    gauge!(CHECKPOINT_SIZE).set(bytes as f64);
    gauge!(CHECKPOINT_AGE).set(0.0);
    counter!(CHECKPOINTS_TOTAL).increment(1);
}

/// One rank's liveness, for the per-rank series.
pub struct RankLiveness {
    pub rank: usize,
    pub step: u64,
    pub heartbeat_age_seconds: f64,
}

/// Who is alive at one moment ([`crate::run::Run::liveness`]).
pub struct Liveness {
    /// Workers joined, neither finished nor failed, heard from within the heartbeat timeout.
    pub alive: usize,
    pub ranks: Vec<RankLiveness>,
    /// Seconds since the last stored checkpoint, once there is one.
    pub checkpoint_age_seconds: Option<f64>,
}

/// Records the periodic gauges (every second from the generation's watch loop).
pub fn record_liveness(liveness: &Liveness) {
    gauge!(WORKERS_ALIVE).set(liveness.alive as f64);
    for r in &liveness.ranks {
        let rank = r.rank.to_string();
        gauge!(RANK_STEP, "rank" => rank.clone()).set(r.step as f64);
        gauge!(RANK_HEARTBEAT_AGE, "rank" => rank).set(r.heartbeat_age_seconds);
    }
    if let Some(age) = liveness.checkpoint_age_seconds {
        gauge!(CHECKPOINT_AGE).set(age);
    }
}
