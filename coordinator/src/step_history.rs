//! The run's aggregated steps, compactly, for the live page's charts: a step sink.

use std::sync::{Arc, Mutex};

use crate::metrics_log::StepRecord;
use crate::step_feed::StepSink;

/// One aggregated step as the live page charts it (about 40 bytes: a million steps fit).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepPoint {
    pub step: u64,
    pub epoch: u32,
    pub loss_d: f32,
    pub loss_g: f32,
    pub d_x: f32,
    pub d_g_z1: f32,
    pub d_g_z2: f32,
    pub images_per_sec: f32,
    pub all_reduce_seconds: f32,
}

impl From<&StepRecord> for StepPoint {
    fn from(r: &StepRecord) -> Self {
        Self {
            step: r.step,
            epoch: r.epoch as u32,
            loss_d: r.loss_d,
            loss_g: r.loss_g,
            d_x: r.d_x,
            d_g_z1: r.d_g_z1,
            d_g_z2: r.d_g_z2,
            images_per_sec: r.images_per_sec as f32,
            all_reduce_seconds: r.all_reduce_seconds as f32,
        }
    }
}

/// Every step of the run so far (a resumed run's earlier ones too), shared by the step feed
/// and the live page.
#[derive(Clone, Default)]
pub struct StepHistory(Arc<Mutex<Vec<StepPoint>>>);

impl StepHistory {
    /// Starts from the steps a resumed run had already made (the kept lines of `metrics.jsonl`).
    pub fn restored(records: &[StepRecord]) -> Self {
        Self(Arc::new(Mutex::new(records.iter().map(StepPoint::from).collect())))
    }

    /// The steps after the first `skip`, at most `limit` of them.
    pub fn page(&self, skip: usize, limit: usize) -> Vec<StepPoint> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().skip(skip).take(limit).copied().collect()
    }
}

impl StepSink for StepHistory {
    fn take(&mut self, record: &StepRecord) -> anyhow::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(StepPoint::from(record));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_continue_a_restored_history() {
        let old: Vec<StepRecord> = (1..=3).map(|step| StepRecord { step, ..Default::default() }).collect();
        let mut history = StepHistory::restored(&old);
        history.take(&StepRecord { step: 4, loss_d: 0.5, ..Default::default() }).unwrap();
        let steps: Vec<u64> = history.page(1, 10).iter().map(|p| p.step).collect();
        assert_eq!(steps, [2, 3, 4]);
        assert_eq!(history.page(3, 10)[0].loss_d, 0.5);
        assert!(history.page(4, 10).is_empty());
        assert_eq!(history.page(0, 2).len(), 2);
    }
}
