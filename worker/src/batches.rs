//! The worker's local batches, step by step, from the coordinator's shard stream or from a
//! local copy of the dataset.
//!
//! Both sources feed the same bounded channel a few steps ahead of the compute thread, so data
//! arrives while the previous step trains and memory stays bounded whatever the dataset's size.

use std::sync::Arc;

use anyhow::{Context, bail};
use data::{Dataset, DatasetSpec};
use proto::framing::decode_f32_le;
use proto::v1;
use tokio::sync::mpsc;

use crate::client::Client;

/// Steps of data buffered ahead of the compute thread.
pub const PREFETCH_STEPS: usize = 3;

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

/// Loads a local copy of the dataset and checks that it is the coordinator's.
pub fn load_local(spec: &DatasetSpec, config: &v1::RunConfig) -> anyhow::Result<Dataset> {
    let limit = (config.data_limit > 0).then_some(config.data_limit as usize);
    let d = spec
        .load(config.image_size as usize, limit)
        .with_context(|| format!("cannot load the local dataset {spec}"))?;
    if d.len as u64 != config.dataset_len || d.nc as u32 != config.nc {
        bail!(
            "local dataset {spec} has {} samples of {} channels; the coordinator's has {} of {}",
            d.len,
            d.nc,
            config.dataset_len,
            config.nc
        );
    }
    Ok(d)
}

/// Draws this rank's batches from a local copy, with the same order and split as the
/// coordinator (both use `data::shard`).
pub fn from_local(dataset: Arc<Dataset>, plan: Plan, tx: mpsc::Sender<Batch>) -> anyhow::Result<()> {
    let mut order: Option<(u64, Vec<u32>)> = None;
    for step in plan.start_step..plan.total_steps {
        let epoch = step / plan.steps_per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, data::epoch_order(plan.seed, epoch, dataset.len)));
        }
        let Some((_, o)) = order.as_ref() else {
            continue;
        };
        let indices =
            data::rank_batch(o, (step % plan.steps_per_epoch) as usize, plan.global_batch, plan.world, plan.rank)
                .to_vec();
        let mut pixels = Vec::new();
        dataset.gather(&indices, &mut pixels);
        if tx.blocking_send(Batch { step, indices, pixels }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
