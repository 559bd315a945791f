//! The run's samples: opened (a raw source prepared into the cache first) and verified before
//! anything starts; what the coordinator then holds is their shape and shard files, never
//! their pixels.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use data::{DatasetSpec, SampleStore};

use crate::config::DatasetFacts;

/// Opens `spec` for a run at `image_size`: prepares it into `cache_root` if it is a raw source
/// (logging progress), checks every shard's sha256, and returns the store the shard server,
/// the sample grids and the evaluator read from.
pub async fn open(
    spec: &DatasetSpec,
    image_size: usize,
    limit: Option<u64>,
    cache_root: &Path,
) -> anyhow::Result<Arc<SampleStore>> {
    let limit = limit.map(|l| l as usize);
    tracing::info!(dataset = %spec, image_size, "opening dataset");
    let (open_spec, root) = (spec.clone(), cache_root.to_path_buf());
    let store = tokio::task::spawn_blocking(move || -> anyhow::Result<SampleStore> {
        let progress = LoggedProgress::new(&open_spec);
        let store = SampleStore::open(&open_spec, image_size, limit, &root, &progress)?;
        if let Some(set) = store.prepared() {
            let started = Instant::now();
            set.verify(&|_| ())?;
            tracing::info!(
                dir = %set.dir().display(),
                shards = set.manifest().shards.len(),
                seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                "prepared data set verified (sha256 of every shard)"
            );
        }
        Ok(store)
    })
    .await
    .context("dataset loader panicked")?
    .with_context(|| format!("cannot load dataset {spec}"))?;
    if store.is_empty() {
        bail!("dataset {spec} has no samples");
    }
    tracing::info!(name = store.name(), samples = store.len(), nc = store.nc(), "dataset ready");
    Ok(Arc::new(store))
}

/// What the run's configuration records about its samples.
pub fn facts(store: &SampleStore) -> anyhow::Result<DatasetFacts> {
    let prepared = match store.prepared() {
        Some(set) => {
            let dir = std::fs::canonicalize(set.dir())
                .with_context(|| format!("{}: cannot resolve the prepared directory", set.dir().display()))?;
            Some((dir.display().to_string(), set.manifest().content_id()))
        }
        None => None,
    };
    Ok(DatasetFacts { name: store.name().to_string(), len: store.len() as u64, nc: store.nc() as u32, prepared })
}

/// A preparation's progress as log lines, at most one every few seconds: the coordinator may
/// run without a terminal (a Kubernetes pod), where a progress bar would be noise.
struct LoggedProgress {
    spec: String,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    last: std::sync::Mutex<Instant>,
}

impl LoggedProgress {
    fn new(spec: &DatasetSpec) -> Self {
        let now = Instant::now();
        LoggedProgress {
            spec: spec.to_string(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: now,
            last: std::sync::Mutex::new(now),
        }
    }
}

impl data::prepared::Progress for LoggedProgress {
    fn begin(&self, total: Option<u64>, done: u64) {
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
        tracing::info!(dataset = %self.spec, images = total, "preparing the dataset into u8 shards (once; later runs reuse them)");
    }

    fn advance(&self, images: u64) {
        let done = self.done.fetch_add(images, Ordering::Relaxed) + images;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < Duration::from_secs(5) {
            return;
        }
        *last = Instant::now();
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let total = self.total.load(Ordering::Relaxed);
        tracing::info!(dataset = %self.spec, done, total, images_per_sec = rate.round(), "preparing");
    }

    fn note(&self, msg: &str) {
        tracing::info!(dataset = %self.spec, "{msg}");
    }
}
