//! The worker's own Prometheus series (every one carries the global label `rank`), recorded by
//! the compute thread after each step and by the uploader. Without `--metrics-listen` no
//! recorder is installed and these calls cost next to nothing.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const STEP: &str = "dcgan_worker_step";
pub const STEPS_TOTAL: &str = "dcgan_worker_steps_total";
pub const IMAGES_TOTAL: &str = "dcgan_worker_images_total";
pub const IMAGES_PER_SECOND: &str = "dcgan_worker_images_per_second";
pub const PHASE_SECONDS: &str = "dcgan_worker_step_phase_seconds";
pub const PHASE_DURATION: &str = "dcgan_worker_step_phase_duration_seconds";
pub const UPLOAD_DURATION: &str = "dcgan_worker_checkpoint_upload_duration_seconds";
pub const RESIDENT_MEMORY: &str = "dcgan_worker_resident_memory_bytes";

/// The phases of a step as the worker times them (`compute` excludes the all-reduce).
pub const PHASES: [&str; 4] = ["data", "compute", "all_reduce", "total"];

/// Gives each series its help text (once, after the recorder is installed).
pub fn describe() {
    describe_gauge!(STEP, "Global steps this rank has completed.");
    describe_counter!(STEPS_TOTAL, "Steps this rank has trained since it started.");
    describe_counter!(IMAGES_TOTAL, "Real images this rank has trained on since it started.");
    describe_gauge!(IMAGES_PER_SECOND, "This rank's local batch over its last step's wall time.");
    describe_gauge!(
        PHASE_SECONDS,
        metrics::Unit::Seconds,
        "Time of this rank's last step by phase: data (waiting for the batch), compute (forward, backward, Adam), all_reduce, total."
    );
    describe_histogram!(PHASE_DURATION, metrics::Unit::Seconds, "Distribution of this rank's step time by phase.");
    describe_histogram!(
        UPLOAD_DURATION,
        metrics::Unit::Seconds,
        "Time to stream one checkpoint to the coordinator (rank 0)."
    );
    describe_gauge!(RESIDENT_MEMORY, metrics::Unit::Bytes, "Resident memory of the worker process (Linux).");
}

/// One step's timings as the worker measured them.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimes {
    pub step: u64,
    pub local_batch: usize,
    pub data_seconds: f64,
    pub compute_seconds: f64,
    pub all_reduce_seconds: f64,
    pub total_seconds: f64,
}

/// Records one completed step.
pub fn record_step(t: &StepTimes) {
    gauge!(STEP).set(t.step as f64);
    counter!(STEPS_TOTAL).increment(1);
    counter!(IMAGES_TOTAL).increment(t.local_batch as u64);
    if t.total_seconds > 0.0 {
        gauge!(IMAGES_PER_SECOND).set(t.local_batch as f64 / t.total_seconds);
    }
    let values = [t.data_seconds, t.compute_seconds, t.all_reduce_seconds, t.total_seconds];
    for (phase, v) in PHASES.iter().zip(values) {
        gauge!(PHASE_SECONDS, "phase" => *phase).set(v);
        histogram!(PHASE_DURATION, "phase" => *phase).record(v);
    }
    if let Some(bytes) = resident_memory_bytes() {
        gauge!(RESIDENT_MEMORY).set(bytes as f64);
    }
}

/// Records one checkpoint upload.
pub fn record_upload(seconds: f64) {
    histogram!(UPLOAD_DURATION).record(seconds);
}

/// The process's resident set size from `/proc/self/statm` (Linux; `None` elsewhere).
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
