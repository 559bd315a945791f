//! The worker's local batches, step by step, from samples it reads itself (the prepared shards,
//! the built-in set, or a copy decoded into memory) or from the coordinator's gRPC stream.
//!
//! Both sources feed the same bounded channel a few steps ahead of the compute thread, so data
//! arrives while the previous step trains and memory stays bounded whatever the dataset's size.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};
use data::{Dataset, DatasetSpec, PreparedSet, SampleStore};
use proto::framing::decode_f32_le;
use proto::v1;
use tokio::sync::mpsc;

use crate::client::Client;

/// Steps of data buffered ahead of the compute thread.
pub const PREFETCH_STEPS: usize = 3;

/// Steps whose samples a worker reading shards asks the disk for ahead of reading them.
const READ_AHEAD_STEPS: usize = 4;

/// One step's local batch.
#[derive(Debug)]
pub struct Batch {
    /// Global step index (0-based: the number of steps done before this one).
    pub step: u64,
    pub indices: Vec<u32>,
    /// NCHW pixels in [-1, 1].
    pub pixels: Vec<f32>,
}

/// What a data source needs to know about the run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rank: usize,
    pub world: usize,
    pub seed: u64,
    pub global_batch: usize,
    pub steps_per_epoch: u64,
    pub start_step: u64,
    pub total_steps: u64,
    pub sample_len: usize,
}

/// Streams this rank's batches from the coordinator into `tx`, epoch after epoch.
pub async fn from_coordinator(client: Client, plan: Plan, tx: mpsc::Sender<Batch>) -> anyhow::Result<()> {
    let mut step = plan.start_step;
    while step < plan.total_steps {
        let epoch = step / plan.steps_per_epoch;
        let mut stream = client.shard(epoch, step % plan.steps_per_epoch).await?;
        let mut indices = Vec::new();
        let mut pixels = Vec::new();
        while let Some(chunk) = stream.message().await.with_context(|| format!("shard of epoch {epoch}"))? {
            let expected = step % plan.steps_per_epoch;
            check_chunk(&chunk, epoch, expected)?;
            decode_f32_le(&chunk.pixels, &mut pixels).context("shard pixels")?;
            indices.extend_from_slice(&chunk.indices);
            if !chunk.last_in_step {
                continue;
            }
            if indices.len() != chunk.step_batch as usize || pixels.len() != indices.len() * plan.sample_len {
                bail!(
                    "shard of epoch {epoch} step {expected}: {} samples and {} values, expected {} samples of {} values",
                    indices.len(),
                    pixels.len(),
                    chunk.step_batch,
                    plan.sample_len
                );
            }
            let batch = Batch { step, indices: std::mem::take(&mut indices), pixels: std::mem::take(&mut pixels) };
            if tx.send(batch).await.is_err() {
                return Ok(()); // The trainer stopped.
            }
            step += 1;
            if step >= plan.total_steps {
                return Ok(());
            }
        }
        if step % plan.steps_per_epoch != 0 {
            bail!(
                "the shard stream of epoch {epoch} ended at step {} of {}",
                step % plan.steps_per_epoch,
                plan.steps_per_epoch
            );
        }
    }
    Ok(())
}

fn check_chunk(chunk: &v1::ShardChunk, epoch: u64, step_in_epoch: u64) -> anyhow::Result<()> {
    if chunk.epoch != epoch || chunk.step_in_epoch != step_in_epoch {
        bail!(
            "shard chunk for epoch {} step {} arrived while expecting epoch {epoch} step {step_in_epoch}",
            chunk.epoch,
            chunk.step_in_epoch
        );
    }
    Ok(())
}

/// Where a worker's samples come from (`--data`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataChoice {
    /// The coordinator's prepared directory if this worker sees it (same content id), else
    /// the gRPC stream.
    Auto,
    /// The coordinator's prepared directory, or fail.
    Disk,
    /// The gRPC stream.
    Stream,
    /// The coordinator's source decoded into memory by this worker.
    Memory,
    /// A prepared directory at another path (another mount of the same volume).
    Prepared(PathBuf),
    /// Another copy of the source, decoded into memory.
    Local(DatasetSpec),
}

impl FromStr for DataChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DataChoice::Auto),
            "disk" => Ok(DataChoice::Disk),
            "stream" => Ok(DataChoice::Stream),
            "memory" => Ok(DataChoice::Memory),
            _ => {
                if let Some(dir) = s.strip_prefix("prepared:").filter(|d| !d.is_empty()) {
                    return Ok(DataChoice::Prepared(PathBuf::from(dir)));
                }
                if let Some(spec) = s.strip_prefix("local:") {
                    return spec.parse().map(DataChoice::Local).map_err(|e| e.to_string());
                }
                Err(format!(
                    "'{s}': expected auto, disk, stream, memory, prepared:DIR or local:SPEC (e.g. local:mnist:/data/mnist)"
                ))
            }
        }
    }
}

/// How batches reach the trainer.
pub enum Source {
    /// Over gRPC from the coordinator.
    Stream,
    /// Read here, by index.
    Store(Arc<SampleStore>),
}

/// Decides where this worker's samples come from, and opens them (blocking: it may read a
/// manifest or decode a whole source).
pub fn choose(choice: &DataChoice, config: &v1::RunConfig) -> anyhow::Result<Source> {
    let coordinators: DatasetSpec =
        config.dataset.parse().with_context(|| format!("the coordinator's dataset {:?}", config.dataset))?;
    let size = config.image_size as usize;
    let store = match choice {
        DataChoice::Stream => return Ok(Source::Stream),
        DataChoice::Auto | DataChoice::Disk if config.prepared_dir.is_empty() => {
            let Some(set) = coordinators.drawn() else {
                if *choice == DataChoice::Disk {
                    bail!("--data disk: the coordinator named no prepared directory for {coordinators}");
                }
                return Ok(Source::Stream);
            };
            // A drawn set (shapes, fake) is drawn here, sample by sample, as the coordinator would.
            SampleStore::Drawn { set, len: config.dataset_len as usize, image_size: size }
        }
        DataChoice::Auto | DataChoice::Disk => match open_prepared(Path::new(&config.prepared_dir), config) {
            Ok(set) => SampleStore::Prepared(set),
            Err(e) if *choice == DataChoice::Auto => {
                tracing::info!("receiving samples over gRPC: {e:#}");
                return Ok(Source::Stream);
            }
            Err(e) => return Err(e.context("--data disk")),
        },
        DataChoice::Prepared(dir) => SampleStore::Prepared(open_prepared(dir, config)?),
        DataChoice::Memory => SampleStore::Memory(load_local(&coordinators, config)?),
        DataChoice::Local(spec) => SampleStore::Memory(load_local(spec, config)?),
    };
    if store.len() as u64 != config.dataset_len || store.nc() as u32 != config.nc || store.image_size() != size {
        bail!(
            "the local samples are {} of {}x{s}x{s}; the coordinator's are {} of {}x{size}x{size}",
            store.len(),
            store.nc(),
            config.dataset_len,
            config.nc,
            s = store.image_size()
        );
    }
    let how = match &store {
        SampleStore::Prepared(p) => format!("prepared shards in {}", p.dir().display()),
        SampleStore::Drawn { set, .. } => format!("the {} set, drawn here", set.name()),
        SampleStore::Memory(d) => format!("{} decoded into memory", d.name),
    };
    tracing::info!(samples = store.len(), "reading samples from {how}");
    Ok(Source::Store(Arc::new(store)))
}

/// Opens a prepared directory and checks it holds the coordinator's samples (same content
/// id), limited as the coordinator's are.
fn open_prepared(dir: &Path, config: &v1::RunConfig) -> anyhow::Result<PreparedSet> {
    let limit = (config.data_limit > 0).then_some(config.data_limit as usize);
    let set = PreparedSet::open(dir)?.with_limit(limit);
    let id = set.manifest().content_id();
    if !config.data_id.is_empty() && id != config.data_id {
        bail!(
            "{} holds other samples than the coordinator's (content id {id}, the coordinator's {})",
            dir.display(),
            config.data_id
        );
    }
    Ok(set)
}

/// Loads a local copy of the dataset into memory.
fn load_local(spec: &DatasetSpec, config: &v1::RunConfig) -> anyhow::Result<Dataset> {
    let limit = (config.data_limit > 0).then_some(config.data_limit as usize);
    spec.load(config.image_size as usize, limit).with_context(|| format!("cannot load the local dataset {spec}"))
}

/// Draws this rank's batches from samples read here, with the same order and split as the
/// coordinator (both use `data::shard`).
pub fn from_store(store: Arc<SampleStore>, plan: Plan, tx: mpsc::Sender<Batch>) -> anyhow::Result<()> {
    let mut order: Option<(u64, Vec<u32>)> = None;
    for step in plan.start_step..plan.total_steps {
        let epoch = step / plan.steps_per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, data::epoch_order(plan.seed, epoch, store.len())));
        }
        let Some((_, o)) = order.as_ref() else {
            continue;
        };
        let in_epoch = (step % plan.steps_per_epoch) as usize;
        // The disk reads the next steps' samples in the background while this one is copied.
        let ahead = if step == plan.start_step { 0..=READ_AHEAD_STEPS } else { READ_AHEAD_STEPS..=READ_AHEAD_STEPS };
        for k in ahead {
            if in_epoch + k < plan.steps_per_epoch as usize {
                store.will_need(data::rank_batch(o, in_epoch + k, plan.global_batch, plan.world, plan.rank));
            }
        }
        let indices = data::rank_batch(o, in_epoch, plan.global_batch, plan.world, plan.rank).to_vec();
        let mut pixels = Vec::new();
        store.gather(&indices, &mut pixels).with_context(|| format!("samples of step {step}"))?;
        if tx.blocking_send(Batch { step, indices, pixels }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
