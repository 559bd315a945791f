//! The run's configuration: built from the command line and the dataset, checked before anything
//! starts, written to `run.json`, and sent to every worker.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::flags::{Cli, Explicit};
use crate::run_dir::RunDirError;

/// A setting that cannot work, named so the user knows which flag to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] RunDirError),
    #[error("{}: not a valid run.json: {source}", .path.display())]
    BadRunJson {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl ConfigError {
    /// As an `anyhow` error in which an invalid setting is a usage error (exit 2).
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            ConfigError::Invalid(m) => dcgan_process::exit::usage(m),
            other => other.into(),
        }
    }
}

/// A model or optimizer setting the kernels refused, said with the flag's name
/// ("--image-size must be 32, 64 or 128, got 48") rather than the field's.
fn as_flag_error(e: kernels::KernelError) -> ConfigError {
    let said = match e {
        kernels::KernelError::Config(m) => m,
        other => other.to_string(),
    };
    let flagged = ["image_size", "nz", "ngf", "ndf", "lr", "beta1"]
        .iter()
        .find(|field| said.strip_prefix(**field).is_some_and(|rest| rest.starts_with(' ')))
        .map(|field| format!("--{}{}", field.replace('_', "-"), &said[field.len()..]));
    ConfigError::Invalid(flagged.unwrap_or(said))
}

/// Everything about a run, as written to `run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Names the run in every message; a worker of another run is refused.
    pub run_id: String,
    /// 1 for a fresh run; each resume starts the next generation, so messages from workers of
    /// an earlier one are refused.
    pub generation: u64,
    pub workers: u32,
    /// The dataset spec as given (`shapes`, `mnist:PATH`, ...).
    pub dataset: String,
    pub dataset_name: String,
    /// Samples used (after --data-limit).
    pub dataset_len: u64,
    pub data_limit: Option<u64>,
    pub nc: u32,
    pub image_size: u32,
    pub nz: u32,
    pub ngf: u32,
    pub ndf: u32,
    pub lr: f32,
    pub beta1: f32,
    pub seed: u64,
    /// The global batch.
    pub batch_size: u32,
    pub epochs: u32,
    pub max_steps: Option<u64>,
    pub steps_per_epoch: u64,
    /// min(epochs * steps_per_epoch, max_steps).
    pub total_steps: u64,
    pub checkpoint_every: u64,
    /// Steps between fixed-noise grids (each from a checkpoint of its step); 0: only at epoch
    /// ends. Older run.json files have none (0).
    #[serde(default)]
    pub sample_every: u64,
    pub keep_checkpoints: u32,
    pub checksum_every: u64,
    pub sync_bn: bool,
    /// `f32` or `bf16`; older run.json files have none (f32).
    #[serde(default)]
    pub precision: kernels::Precision,
    /// Where launched workers train: `auto`, `cpu` or `cuda`; older run.json files have none
    /// (auto). A resume keeps it unless `--device` is given.
    #[serde(default)]
    pub device: DeviceChoice,
    pub external_workers: bool,
    /// How launched workers get their samples; older run.json files have none (auto).
    #[serde(default)]
    pub worker_data: WorkerData,
    /// The prepared data set's directory (absolute), empty for the built-in set; older
    /// run.json files have none.
    #[serde(default)]
    pub prepared_dir: String,
    /// The prepared set's content id ([`data::prepared::Manifest::content_id`]): a resumed
    /// run refuses a set whose samples changed.
    #[serde(default)]
    pub data_id: String,
    pub worker_threads: u32,
    pub heartbeat_timeout_secs: u64,
    /// FID every this many epochs (0: never); older run.json files have none.
    #[serde(default)]
    pub eval_every: u32,
    /// Images per FID set.
    #[serde(default = "default_eval_count")]
    pub eval_count: u32,
    /// When the run was first created (UTC, `YYYYMMDD-HHMMSS`).
    pub created: String,
}

fn default_eval_count() -> u32 {
    1000
}

/// Where launched workers train (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// One GPU each when a CUDA driver sees at least `--workers` GPUs, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// Worker i on GPU i, or an error.
    Cuda,
}

/// How launched workers get their samples (their `--data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkerData {
    /// The prepared shards where the coordinator has them if the worker sees them, else over
    /// gRPC.
    #[default]
    Auto,
    /// The prepared shards from disk, or fail: no pixels cross the network.
    Disk,
    /// Receive every batch from the coordinator over gRPC (workers that cannot see the data).
    Stream,
    /// Decode the source into memory, each worker on its own (the path before prepared sets;
    /// bit-identical batches).
    Memory,
}

impl std::fmt::Display for WorkerData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerData::Auto => "auto",
            WorkerData::Disk => "disk",
            WorkerData::Stream => "stream",
            WorkerData::Memory => "memory",
        })
    }
}

/// What the dataset contributes to the configuration.
#[derive(Clone, Debug)]
pub struct DatasetFacts {
    pub name: String,
    pub len: u64,
    pub nc: u32,
    /// The prepared directory and its content id, where the samples come from one.
    pub prepared: Option<(String, String)>,
}

impl RunConfig {
    /// Checks what the command line alone decides (batch against world, the networks' shape,
    /// Adam's settings), so a typo is reported before a large dataset is read. `nc` is the
    /// dataset's channel count, or any valid one before the dataset is known.
    pub fn check_cli(cli: &Cli, nc: u32) -> Result<(), ConfigError> {
        if cli.batch_size < cli.workers {
            return Err(ConfigError::Invalid(format!(
                "--batch-size {} is smaller than --workers {}: every worker needs at least one sample per step",
                cli.batch_size, cli.workers
            )));
        }
        let model = kernels::ModelConfig {
            image_size: cli.image_size as usize,
            nc: nc as usize,
            nz: cli.nz as usize,
            ngf: cli.ngf as usize,
            ndf: cli.ndf as usize,
        };
        model.validate().map_err(as_flag_error)?;
        let optim = kernels::OptimConfig { lr: cli.lr, beta1: cli.beta1, ..Default::default() };
        optim.validate().map_err(as_flag_error)?;
        let precision = cli.precision;
        // Launched workers asked onto GPUs must be able to train this run there (with
        // `--device auto` the coordinator asks again once it knows whether there are GPUs).
        if cli.device == DeviceChoice::Cuda {
            if let Some(why) = kernels::Device::Cuda(0).refusal(&Self::demands(cli)) {
                return Err(ConfigError::Invalid(why));
            }
        }
        // Launched workers run on this machine's CPU; external ones check their own.
        if !cli.external_workers {
            precision.check_for(kernels::Device::Cpu).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// What the run asks of each rank's device, for [`kernels::Device::refusal`].
    pub fn demands(cli: &Cli) -> kernels::RunDemands {
        kernels::RunDemands { precision: cli.precision, sync_batch_norm: cli.sync_bn, world: cli.workers as usize }
    }

    /// Builds and checks the configuration of a fresh run.
    pub fn from_cli(cli: &Cli, data: &DatasetFacts, run_id: String, created: String) -> Result<Self, ConfigError> {
        Self::check_cli(cli, data.nc)?;
        let steps_per_epoch = data::steps_per_epoch(data.len as usize, cli.batch_size as usize)
            .map_err(|e| ConfigError::Invalid(format!("dataset {}: {e}", cli.dataset)))?
            as u64;
        let all_steps = steps_per_epoch.saturating_mul(cli.epochs as u64);
        let total_steps = cli.max_steps.map_or(all_steps, |m| m.min(all_steps));
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        Ok(Self {
            run_id,
            generation: 1,
            workers: cli.workers,
            dataset: cli.dataset.clone(),
            dataset_name: data.name.clone(),
            dataset_len: data.len,
            data_limit: cli.data_limit,
            nc: data.nc,
            image_size: cli.image_size,
            nz: cli.nz,
            ngf: cli.ngf,
            ndf: cli.ndf,
            lr: cli.lr,
            beta1: cli.beta1,
            seed: cli.seed,
            batch_size: cli.batch_size,
            epochs: cli.epochs,
            max_steps: cli.max_steps,
            steps_per_epoch,
            total_steps,
            checkpoint_every: cli.checkpoint_every,
            sample_every: cli.sample_every,
            keep_checkpoints: cli.keep_checkpoints,
            checksum_every: cli.checksum_every,
            sync_bn: cli.sync_bn,
            precision: cli.precision,
            device: cli.device,
            external_workers: cli.external_workers,
            worker_data: cli.worker_data,
            prepared_dir: data.prepared.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
            data_id: data.prepared.as_ref().map(|p| p.1.clone()).unwrap_or_default(),
            worker_threads: cli.worker_threads.unwrap_or((cores / cli.workers).max(1)),
            heartbeat_timeout_secs: cli.heartbeat_timeout,
            eval_every: cli.eval_every,
            eval_count: cli.eval_count,
            created,
        })
    }

    pub fn model(&self) -> kernels::ModelConfig {
        kernels::ModelConfig {
            image_size: self.image_size as usize,
            nc: self.nc as usize,
            nz: self.nz as usize,
            ngf: self.ngf as usize,
            ndf: self.ndf as usize,
        }
    }

    /// What the workers are told.
    pub fn to_proto(&self) -> proto::v1::RunConfig {
        proto::v1::RunConfig {
            dataset: self.dataset.clone(),
            image_size: self.image_size,
            nc: self.nc,
            nz: self.nz,
            ngf: self.ngf,
            ndf: self.ndf,
            lr: self.lr,
            beta1: self.beta1,
            seed: self.seed,
            batch_size: self.batch_size,
            epochs: self.epochs,
            dataset_len: self.dataset_len,
            steps_per_epoch: self.steps_per_epoch,
            total_steps: self.total_steps,
            checkpoint_every: self.checkpoint_every,
            sample_every: self.sample_every,
            checksum_every: self.checksum_every,
            sync_bn: self.sync_bn,
            data_limit: self.data_limit.unwrap_or(0),
            precision: match self.precision {
                kernels::Precision::F32 => proto::v1::Precision::F32,
                kernels::Precision::Bf16 => proto::v1::Precision::Bf16,
            } as i32,
            prepared_dir: self.prepared_dir.clone(),
            data_id: self.data_id.clone(),
        }
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| RunDirError::new(path, "read", e))?;
        serde_json::from_slice(&bytes).map_err(|source| ConfigError::BadRunJson { path: path.to_path_buf(), source })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Prepares the command line of a resumed run: every setting not given explicitly takes
/// `previous`'s value; a given one that would change what is computed (the model, the data, the
/// batch, the seed, the world) is refused, because the run could then not continue exactly.
pub fn merge_for_resume(cli: &mut Cli, explicit: &Explicit, previous: &RunConfig) -> Result<(), ConfigError> {
    let mut conflicts = Vec::new();
    macro_rules! fixed {
        ($($field:ident => $flag:literal),* $(,)?) => {$(
            let prev = previous.$field.clone();
            if explicit.contains(stringify!($field)) && cli.$field != prev {
                conflicts.push(format!("--{} {:?} (run.json has {:?})", $flag, cli.$field, prev));
            }
            cli.$field = prev;
        )*};
    }
    fixed!(
        workers => "workers", dataset => "dataset", image_size => "image-size", nz => "nz",
        ngf => "ngf", ndf => "ndf", lr => "lr", beta1 => "beta1", seed => "seed",
        batch_size => "batch-size", sync_bn => "sync-bn", data_limit => "data-limit",
    );
    if explicit.contains("precision") && cli.precision != previous.precision {
        let (given, recorded) = (cli.precision.to_string(), previous.precision.to_string());
        conflicts.push(format!("--precision {given:?} (run.json has {recorded:?})"));
    }
    cli.precision = previous.precision;
    if !conflicts.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "--resume continues a run exactly, so these settings cannot change: {}",
            conflicts.join(", ")
        )));
    }
    macro_rules! free {
        ($($field:ident <- $prev:expr),* $(,)?) => {$(
            if !explicit.contains(stringify!($field)) {
                cli.$field = $prev;
            }
        )*};
    }
    free!(
        epochs <- previous.epochs,
        max_steps <- previous.max_steps,
        checkpoint_every <- previous.checkpoint_every,
        sample_every <- previous.sample_every,
        keep_checkpoints <- previous.keep_checkpoints,
        checksum_every <- previous.checksum_every,
        external_workers <- previous.external_workers,
        worker_data <- previous.worker_data,
        device <- previous.device,
        worker_threads <- Some(previous.worker_threads),
        heartbeat_timeout <- previous.heartbeat_timeout_secs,
        eval_every <- previous.eval_every,
        eval_count <- previous.eval_count,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> DatasetFacts {
        DatasetFacts { name: "shapes".into(), len: 1000, nc: 3, prepared: None }
    }

    fn cli(args: &[&str]) -> (Cli, Explicit) {
        let mut v = vec!["coordinator"];
        v.extend_from_slice(args);
        Cli::try_parse_with_sources(v).unwrap()
    }

    #[test]
    fn steps_and_limits() {
        let (c, _) = cli(&["--batch-size", "64", "--epochs", "3"]);
        let cfg = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap();
        assert_eq!(cfg.steps_per_epoch, 15);
        assert_eq!(cfg.total_steps, 45);
        let (c, _) = cli(&["--max-steps", "7"]);
        assert_eq!(RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap().total_steps, 7);
    }

    #[test]
    fn clear_errors_for_impossible_settings() {
        let (c, _) = cli(&["--workers", "4", "--batch-size", "3"]);
        let e = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap_err().to_string();
        assert!(e.contains("--batch-size 3 is smaller than --workers 4"), "{e}");
        let (c, _) = cli(&["--batch-size", "2000"]);
        let e = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap_err().to_string();
        assert!(e.contains("1000 samples"), "{e}");
        let (c, _) = cli(&["--image-size", "48"]);
        let e = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap_err().to_string();
        assert_eq!(e, "--image-size must be 32, 64 or 128, got 48", "named as the flag");
        let (c, _) = cli(&["--lr=-1"]);
        assert!(RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).is_err());
    }

    #[test]
    fn resume_takes_previous_settings_and_refuses_changes() {
        let (c, _) = cli(&["--ngf", "16", "--max-steps", "4"]);
        let prev = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap();
        let (mut c, explicit) = cli(&["--max-steps", "8"]);
        merge_for_resume(&mut c, &explicit, &prev).unwrap();
        assert_eq!((c.ngf, c.max_steps), (16, Some(8)));
        assert_eq!(c.precision.to_string(), "f32");
        let (mut c, explicit) = cli(&["--ngf", "32", "--seed", "1", "--precision", "bf16"]);
        let e = merge_for_resume(&mut c, &explicit, &prev).unwrap_err().to_string();
        assert!(e.contains("--ngf 32") && e.contains("--seed 1") && e.contains("--precision \"bf16\""), "{e}");
    }

    /// A run.json written before `--precision` existed reads as an fp32 run.
    #[test]
    fn run_json_without_a_precision_is_fp32() {
        let (c, _) = cli(&[]);
        let mut json: serde_json::Value =
            serde_json::from_str(&RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap().to_json())
                .unwrap();
        json.as_object_mut().unwrap().remove("precision");
        let back: RunConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.precision.to_string(), "f32");
    }

    /// The launch device is part of run.json: a resume keeps it, `--device` changes it, and a
    /// run.json from before the setting reads as `auto`.
    #[test]
    fn the_launch_device_is_recorded_and_a_resume_keeps_it_unless_told() {
        let (c, _) = cli(&["--device", "cpu"]);
        let prev = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&prev.to_json()).unwrap();
        assert_eq!(json["device"], "cpu");
        let (mut c, explicit) = cli(&[]);
        merge_for_resume(&mut c, &explicit, &prev).unwrap();
        assert_eq!(c.device, DeviceChoice::Cpu);
        let (mut c, explicit) = cli(&["--device", "cuda"]);
        merge_for_resume(&mut c, &explicit, &prev).unwrap();
        assert_eq!(c.device, DeviceChoice::Cuda);
        let mut json = json;
        json.as_object_mut().unwrap().remove("device");
        let back: RunConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.device, DeviceChoice::Auto);
    }

    #[test]
    fn run_json_round_trips() {
        let (c, _) = cli(&[]);
        let cfg = RunConfig::from_cli(&c, &facts(), "r".into(), "t".into()).unwrap();
        let back: RunConfig = serde_json::from_str(&cfg.to_json()).unwrap();
        assert_eq!(back, cfg);
    }
}
