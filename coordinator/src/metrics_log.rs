//! Per-step metrics: combining the ranks' reports into one record, checking that the ranks'
//! parameters agree, and appending the record to `metrics.jsonl`.
//!
//! Ranks report independently and asynchronously; a step is complete when every rank has
//! reported it. Because each rank reports its steps in order and a step cannot finish on any
//! rank before every rank has finished the one before (the all-reduce is a barrier), steps
//! complete in order.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::run_dir::{RunDirError, write_atomic};

/// How far ahead of the slowest rank a report may be; more means a broken client.
const MAX_STEPS_AHEAD: u64 = 1024;

/// One rank's report of one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankReport {
    pub rank: usize,
    /// Global steps completed after this one (1-based).
    pub step: u64,
    pub epoch: u64,
    pub local_batch: u32,
    pub loss_d: f32,
    pub loss_g: f32,
    pub d_x: f32,
    pub d_g_z1: f32,
    pub d_g_z2: f32,
    pub data_seconds: f64,
    pub compute_seconds: f64,
    pub all_reduce_seconds: f64,
    pub step_seconds: f64,
    pub checksum: Option<u64>,
}

/// One line of `metrics.jsonl`: a step aggregated across ranks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    /// Means across ranks, weighted by local batch.
    pub loss_d: f32,
    pub loss_g: f32,
    pub d_x: f32,
    pub d_g_z1: f32,
    pub d_g_z2: f32,
    /// Sum across ranks of local batch / step wall time.
    pub images_per_sec: f64,
    /// Maxima across ranks: the slowest rank sets the pace of a synchronous step.
    pub data_seconds: f64,
    pub compute_seconds: f64,
    pub all_reduce_seconds: f64,
    pub global_batch: u32,
    /// The ranks' common parameter checksum, on the steps where it was checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_checksum: Option<u64>,
}

/// A report that cannot be taken, or ranks that disagree.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    #[error("rank {rank} reported step {step}, outside the steps {first}..={last} this run still expects")]
    StepOutOfRange { rank: usize, step: u64, first: u64, last: u64 },
    #[error("rank {rank} reported step {step} twice")]
    Duplicate { rank: usize, step: u64 },
    #[error("rank {rank} is outside a world of {world}")]
    BadRank { rank: usize, world: usize },
    #[error("parameter checksums differ at step {step}: {}", describe(.by_rank))]
    ChecksumMismatch { step: u64, by_rank: Vec<(usize, Option<u64>)> },
}

fn describe(by_rank: &[(usize, Option<u64>)]) -> String {
    by_rank
        .iter()
        .map(|(r, c)| match c {
            Some(c) => format!("rank {r} = {c:#018x}"),
            None => format!("rank {r} sent none"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Collects the ranks' reports until a step is complete.
#[derive(Debug)]
pub struct StepAggregator {
    world: usize,
    /// The first step not yet aggregated.
    next: u64,
    last: u64,
    pending: BTreeMap<u64, Vec<Option<RankReport>>>,
}

impl StepAggregator {
    /// Expects steps `first..=last` from `world` ranks.
    pub fn new(world: usize, first: u64, last: u64) -> Self {
        Self { world, next: first, last, pending: BTreeMap::new() }
    }

    /// The last step aggregated so far (first - 1 before any).
    pub fn completed(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    /// Takes a report; returns the steps it completed, in order.
    pub fn add(&mut self, report: RankReport) -> Result<Vec<StepRecord>, AggregateError> {
        let (rank, step) = (report.rank, report.step);
        if rank >= self.world {
            return Err(AggregateError::BadRank { rank, world: self.world });
        }
        if step < self.next || step > self.last || step > self.next + MAX_STEPS_AHEAD {
            return Err(AggregateError::StepOutOfRange {
                rank,
                step,
                first: self.next,
                last: self.last.min(self.next + MAX_STEPS_AHEAD),
            });
        }
        let slots = self.pending.entry(step).or_insert_with(|| vec![None; self.world]);
        if slots[rank].is_some() {
            return Err(AggregateError::Duplicate { rank, step });
        }
        slots[rank] = Some(report);

        let mut done = Vec::new();
        while let Some(slots) = self.pending.get(&self.next) {
            if slots.iter().any(Option::is_none) {
                break;
            }
            let reports: Vec<RankReport> =
                self.pending.remove(&self.next).unwrap_or_default().into_iter().flatten().collect();
            done.push(aggregate(self.next, &reports)?);
            self.next += 1;
        }
        Ok(done)
    }
}

/// Combines one step's reports (one per rank, in rank order).
fn aggregate(step: u64, reports: &[RankReport]) -> Result<StepRecord, AggregateError> {
    let checksums: Vec<(usize, Option<u64>)> = reports.iter().map(|r| (r.rank, r.checksum)).collect();
    let parameter_checksum = if checksums.iter().any(|(_, c)| c.is_some()) {
        let first = checksums[0].1;
        if first.is_none() || checksums.iter().any(|(_, c)| *c != first) {
            return Err(AggregateError::ChecksumMismatch { step, by_rank: checksums });
        }
        first
    } else {
        None
    };
    let total: u32 = reports.iter().map(|r| r.local_batch).sum();
    let weight = |r: &RankReport| {
        if total == 0 { 1.0 / reports.len() as f32 } else { r.local_batch as f32 / total as f32 }
    };
    let mean = |f: fn(&RankReport) -> f32| reports.iter().map(|r| f(r) * weight(r)).sum::<f32>();
    let max = |f: fn(&RankReport) -> f64| reports.iter().map(f).fold(0.0, f64::max);
    Ok(StepRecord {
        step,
        epoch: reports.iter().map(|r| r.epoch).max().unwrap_or(0),
        loss_d: mean(|r| r.loss_d),
        loss_g: mean(|r| r.loss_g),
        d_x: mean(|r| r.d_x),
        d_g_z1: mean(|r| r.d_g_z1),
        d_g_z2: mean(|r| r.d_g_z2),
        images_per_sec: reports
            .iter()
            .filter(|r| r.step_seconds > 0.0)
            .map(|r| r.local_batch as f64 / r.step_seconds)
            .sum(),
        data_seconds: max(|r| r.data_seconds),
        compute_seconds: max(|r| r.compute_seconds),
        all_reduce_seconds: max(|r| r.all_reduce_seconds),
        global_batch: total,
        parameter_checksum,
    })
}

/// A line of a JSON-lines log that belongs to a step (so a resumed run can drop later ones).
pub trait Stepped: Serialize + DeserializeOwned {
    fn step(&self) -> u64;
}

impl Stepped for StepRecord {
    fn step(&self) -> u64 {
        self.step
    }
}

/// `metrics.jsonl` (one line per aggregated step) or `evals.jsonl` (one per evaluation),
/// appended and flushed line by line, so `tail -f` and a crash both see whole lines.
pub struct MetricsLog<T: Stepped = StepRecord> {
    path: PathBuf,
    file: File,
    _records: std::marker::PhantomData<fn(&T)>,
}

impl<T: Stepped> MetricsLog<T> {
    /// Starts a fresh log (truncating any old one).
    pub fn create(path: &Path) -> Result<Self, RunDirError> {
        let file = File::create(path).map_err(|e| RunDirError::new(path, "create", e))?;
        Ok(Self { path: path.to_path_buf(), file, _records: std::marker::PhantomData })
    }

    /// Continues a log from a checkpoint at `step`: lines of later steps (written after that
    /// checkpoint by a run that then stopped) are dropped, since the resumed run redoes them.
    /// Returns the log and the records kept.
    pub fn resume(path: &Path, step: u64) -> Result<(Self, Vec<T>), RunDirError> {
        let mut kept = String::new();
        let mut records = Vec::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(|e| RunDirError::new(path, "read", e))?;
                    match serde_json::from_str::<T>(&line) {
                        Ok(r) if r.step() <= step => {
                            kept.push_str(&line);
                            kept.push('\n');
                            records.push(r);
                        }
                        Ok(_) => {}
                        Err(_) if line.trim().is_empty() => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), "dropping a line that does not parse: {e}")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RunDirError::new(path, "open", e)),
        }
        write_atomic(path, kept.as_bytes())?;
        let file =
            OpenOptions::new().append(true).open(path).map_err(|e| RunDirError::new(path, "open for appending", e))?;
        Ok((Self { path: path.to_path_buf(), file, _records: std::marker::PhantomData }, records))
    }

    pub fn append(&mut self, record: &T) -> Result<(), RunDirError> {
        let mut line = serde_json::to_string(record)
            .map_err(|e| RunDirError::new(&self.path, "encode a line", std::io::Error::other(e)))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| RunDirError::new(&self.path, "append", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rank: usize, step: u64, local_batch: u32, loss_d: f32, checksum: Option<u64>) -> RankReport {
        RankReport {
            rank,
            step,
            local_batch,
            loss_d,
            step_seconds: 0.5,
            compute_seconds: rank as f64,
            checksum,
            ..Default::default()
        }
    }

    #[test]
    fn weighted_means_sums_and_maxima() {
        let mut a = StepAggregator::new(2, 1, 10);
        assert!(a.add(report(0, 1, 3, 1.0, None)).unwrap().is_empty());
        let done = a.add(report(1, 1, 1, 5.0, None)).unwrap();
        assert_eq!(done.len(), 1);
        let r = &done[0];
        assert_eq!(r.loss_d, 2.0); // (3*1 + 1*5) / 4
        assert_eq!(r.images_per_sec, 8.0); // 3/0.5 + 1/0.5
        assert_eq!(r.compute_seconds, 1.0);
        assert_eq!(r.global_batch, 4);
        assert_eq!(a.completed(), 1);
    }

    #[test]
    fn steps_complete_in_order_even_when_a_rank_runs_ahead() {
        let mut a = StepAggregator::new(2, 1, 10);
        a.add(report(0, 1, 1, 0.0, None)).unwrap();
        a.add(report(0, 2, 1, 0.0, None)).unwrap();
        a.add(report(1, 1, 1, 0.0, None)).unwrap();
        let done = a.add(report(1, 2, 1, 0.0, None)).unwrap();
        assert_eq!(done.iter().map(|r| r.step).collect::<Vec<_>>(), vec![2]);
        assert!(matches!(a.add(report(1, 2, 1, 0.0, None)), Err(AggregateError::StepOutOfRange { .. })));
        assert!(matches!(a.add(report(1, 11, 1, 0.0, None)), Err(AggregateError::StepOutOfRange { .. })));
        a.add(report(1, 3, 1, 0.0, None)).unwrap();
        assert_eq!(a.add(report(1, 3, 1, 0.0, None)), Err(AggregateError::Duplicate { rank: 1, step: 3 }));
    }

    #[test]
    fn checksum_mismatch_names_step_and_ranks() {
        let mut a = StepAggregator::new(3, 1, 10);
        a.add(report(0, 1, 1, 0.0, Some(7))).unwrap();
        a.add(report(1, 1, 1, 0.0, Some(7))).unwrap();
        let e = a.add(report(2, 1, 1, 0.0, Some(8))).unwrap_err().to_string();
        assert!(e.contains("step 1") && e.contains("rank 2 = 0x0000000000000008"), "{e}");
        let mut a = StepAggregator::new(2, 1, 10);
        a.add(report(0, 1, 1, 0.0, Some(7))).unwrap();
        let done = a.add(report(1, 1, 1, 0.0, Some(7))).unwrap();
        assert_eq!(done[0].parameter_checksum, Some(7));
    }

    #[test]
    fn log_resume_drops_steps_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log: MetricsLog = MetricsLog::create(&p).unwrap();
        for step in 1..=5 {
            log.append(&StepRecord { step, ..Default::default() }).unwrap();
        }
        drop(log);
        let (mut log, kept): (MetricsLog, _) = MetricsLog::resume(&p, 3).unwrap();
        assert_eq!(kept.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3]);
        log.append(&StepRecord { step: 4, loss_d: 1.5, ..Default::default() }).unwrap();
        let lines: Vec<StepRecord> =
            std::fs::read_to_string(&p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(lines[3].loss_d, 1.5);
    }
}
