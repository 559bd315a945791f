//! `--eval-every`: the FID of the generator at the end of every few epochs, the number a GAN
//! researcher watches first. The same classifier, reference set and maths as `dcgan evaluate
//! fid` ([`dcgan_fid::fid_score`]), so the figures of a run and of the command agree.
//!
//! It runs beside the training, on the coordinator: the classifier is trained (or loaded from
//! its cache in the run directory) while the first epoch trains, and each evaluation works on the
//! checkpoint rank 0 uploaded, so no worker ever waits for it. Results go to `evals.jsonl`, the
//! `dcgan_fid` gauge and `GetStatus`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use data::SampleStore;

/// Samples the FID classifier learns from (the first ones of the set): all of MNIST or
/// CIFAR-10, and a bounded amount of a large set, which the coordinator otherwise never holds.
pub const CLASSIFIER_SAMPLES: usize = 60_000;
use dcgan_fid::fid_score::{ClassifierOptions, FidReference};
use kernels::{CheckpointFiles, Gan};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics_log::{MetricsLog, Stepped};
use crate::tensorboard::TensorBoard;

/// A checkpoint to evaluate.
pub struct EvalRequest {
    pub epoch: u64,
    pub step: u64,
    pub files: Vec<(String, Vec<u8>)>,
}

/// One line of `evals.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub epoch: u64,
    pub step: u64,
    pub fid: f64,
    pub count: u32,
    /// Seed of the generated samples' z (`dcgan evaluate fid --seed` reproduces the figure).
    pub seed: u64,
    /// Wall time of the evaluation (generation, features, distance).
    pub seconds: f64,
}

impl Stepped for EvalRecord {
    fn step(&self) -> u64 {
        self.step
    }
}

impl EvalRecord {
    pub fn to_proto(&self) -> proto::v1::Evaluation {
        proto::v1::Evaluation { epoch: self.epoch, step: self.step, fid: self.fid, count: self.count }
    }
}

/// The evaluations so far, as `GetStatus` lists them: a resumed run's earlier ones, then each
/// new one as the evaluator finishes it.
#[derive(Clone, Default)]
pub struct Evaluations(Arc<std::sync::Mutex<Vec<proto::v1::Evaluation>>>);

impl Evaluations {
    pub fn restored(records: &[EvalRecord]) -> Self {
        Self(Arc::new(std::sync::Mutex::new(records.iter().map(EvalRecord::to_proto).collect())))
    }

    fn push(&self, record: &EvalRecord) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(record.to_proto());
    }

    pub fn list(&self) -> Vec<proto::v1::Evaluation> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the evaluator needs, fixed for the run.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    /// Evaluate after every this many epochs (and after the last); 0 turns evaluation off.
    pub every_epochs: u32,
    /// Images generated, and real images in the reference set.
    pub count: usize,
    /// The dataset spec (the classifier's cache key).
    pub dataset: String,
    /// The classifier's cache file.
    pub classifier: PathBuf,
    /// Seed of the generated samples: the same z at every evaluation, so the figures compare.
    pub seed: u64,
}

impl EvalSettings {
    /// Whether the checkpoint ending `epoch` (0-based) is evaluated.
    pub fn due(&self, epoch: u64, is_final: bool) -> bool {
        self.every_epochs > 0 && (is_final || (epoch + 1) % u64::from(self.every_epochs) == 0)
    }

    /// Refuses, before the run starts, a dataset FID cannot be computed on.
    pub fn check(&self, dataset: &SampleStore) -> anyhow::Result<()> {
        if !dataset.has_labels() {
            bail!(
                "--eval-every needs a labelled dataset (its FID classifier learns the labels); {} has none",
                self.dataset
            );
        }
        if dataset.len() < self.count {
            bail!("--eval-count {} is more than the {} images of dataset {}", self.count, dataset.len(), self.dataset);
        }
        Ok(())
    }
}

/// Prepares the FID reference, then scores each requested checkpoint until the senders are gone.
/// Each result goes to `evals.jsonl` (`log`), `results`, TensorBoard and Prometheus.
pub async fn evaluate(
    settings: EvalSettings,
    samples: Arc<SampleStore>,
    mut log: MetricsLog<EvalRecord>,
    mut requests: mpsc::UnboundedReceiver<EvalRequest>,
    results: Evaluations,
    tensorboard: TensorBoard,
) -> anyhow::Result<()> {
    let prepared = {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || {
            let dataset = samples.head(Some(CLASSIFIER_SAMPLES.max(s.count)))?;
            let labels = dataset.labels.as_deref().context("the dataset has no labels")?;
            FidReference::prepare(
                &s.dataset,
                &dataset,
                labels,
                s.count,
                &ClassifierOptions::default(),
                Some(&s.classifier),
            )
        })
    };
    let mut reference = prepared.await.context("the FID classifier's training panicked")??;
    tracing::info!(
        classifier = %reference.classifier_path.display(),
        accuracy = reference.classifier.train_accuracy,
        "FID reference ready"
    );
    while let Some(req) = requests.recv().await {
        let (epoch, step, seed) = (req.epoch, req.step, settings.seed);
        let started = Instant::now();
        let (back, fid) = tokio::task::spawn_blocking(move || {
            let fid = Gan::load(&CheckpointFiles { files: req.files })
                .map_err(anyhow::Error::from)
                .and_then(|(mut gan, _)| reference.score_generator(&mut gan, seed));
            (reference, fid)
        })
        .await
        .context("the FID evaluation panicked")?;
        reference = back;
        let fid = fid.with_context(|| format!("FID of the checkpoint of step {step}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let record = EvalRecord { epoch, step, fid, count: settings.count as u32, seed, seconds };
        log.append(&record)?;
        tracing::info!(epoch, step, fid, seconds = record.seconds, "FID evaluated");
        crate::observability::record_fid(record.epoch, record.fid);
        results.push(&record);
        tensorboard.fid(record.step, record.fid);
    }
    Ok(())
}
