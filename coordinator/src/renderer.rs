//! The fixed-noise grids due from stored checkpoints (epoch ends, `--sample-every` steps),
//! queued by the upload handler and drawn one at a time by one task, off the request path.
//! Each drawn epoch grid also feeds the mode-collapse check, TensorBoard and the FID evaluator.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::evaluation::{EvalRequest, EvalSettings};
use crate::health::HealthMonitor;
use crate::samples::{self, GridNames};
use crate::tensorboard::TensorBoard;

/// A grid to draw. The checkpoint's files travel with it, so pruning old checkpoints cannot
/// race the drawing.
pub struct GridRequest {
    pub step: u64,
    pub epoch: u64,
    pub is_final: bool,
    pub names: GridNames,
    pub files: Vec<(String, Vec<u8>)>,
}

/// The sending end, with the count of grids asked for and not yet drawn: the last one is drawn
/// after the run completes, so the live page keeps polling until it is 0.
#[derive(Clone)]
pub struct SampleQueue {
    tx: Arc<Mutex<Option<mpsc::UnboundedSender<GridRequest>>>>,
    pending: Arc<AtomicUsize>,
}

/// The receiving end, until [`Renderer::spawn`] takes it.
pub struct GridRequests {
    rx: mpsc::UnboundedReceiver<GridRequest>,
    pending: Arc<AtomicUsize>,
}

impl SampleQueue {
    pub fn channel() -> (SampleQueue, GridRequests) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        (
            SampleQueue { tx: Arc::new(Mutex::new(Some(tx))), pending: Arc::clone(&pending) },
            GridRequests { rx, pending },
        )
    }

    /// Asks for a grid, counted as pending until the renderer is done with it. Ignored once
    /// the queue is closed.
    pub fn request(&self, request: GridRequest) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = tx.as_ref() else { return };
        self.pending.fetch_add(1, Ordering::SeqCst);
        if tx.send(request).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Nothing more will be asked for: the renderer draws what is queued and ends.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Grids asked for and not yet drawn.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// What the renderer writes to and feeds.
pub struct Renderer {
    pub dir: PathBuf,
    pub seed: u64,
    pub health: HealthMonitor,
    pub tensorboard: TensorBoard,
    /// `--eval-every`: the evaluator's queue and when it is due.
    pub evaluations: Option<(mpsc::UnboundedSender<EvalRequest>, EvalSettings)>,
}

impl Renderer {
    /// Draws the requested grids until the queue is closed ([`SampleQueue::close`]), then ends.
    pub fn spawn(self, requests: GridRequests) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tokio::spawn(self.run(requests))
    }

    async fn run(self, requests: GridRequests) -> anyhow::Result<()> {
        let GridRequests { mut rx, pending } = requests;
        let done = || {
            let _ = pending.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        };
        while let Some(GridRequest { step, epoch, is_final, names, files }) = rx.recv().await {
            let epoch_grid = names.epoch.is_some();
            if let Some((tx, settings)) = &self.evaluations {
                if epoch_grid && settings.due(epoch, is_final) {
                    let _ = tx.send(EvalRequest { epoch, step, files: files.clone() });
                }
            }
            let (dir, seed) = (self.dir.clone(), self.seed);
            let drawn = tokio::task::spawn_blocking(move || samples::write_fake(&dir, files, seed, names)).await;
            done();
            let grids = drawn.context("sample renderer panicked")??;
            let Some(grid) = grids.first() else { continue };
            for g in &grids {
                tracing::info!(step, epoch, path = %g.path.display(), diversity = g.diversity, "samples drawn");
            }
            // Mode collapse is judged at epoch ends, as its grace period counts epochs.
            if epoch_grid {
                self.health.observe_samples(epoch, grid.diversity);
            }
            if self.tensorboard.is_on() {
                let png =
                    tokio::fs::read(&grid.path).await.with_context(|| format!("reading {}", grid.path.display()))?;
                // Grids are RGB (gray images are drawn as gray RGB).
                self.tensorboard.grid(step, &png, grid.size, 3);
            }
        }
        Ok(())
    }
}
