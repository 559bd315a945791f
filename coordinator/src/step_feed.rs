//! The one task that hands every aggregated step, in order, to each consumer of step records
//! (`metrics.jsonl`, Prometheus, the health checks, the live page's history, TensorBoard).
//!
//! [`crate::run::Run`] only aggregates and queues; the sinks run here, outside its lock, so a
//! slow disk delays an output, never a worker's report. A new output is one [`StepSink`] and
//! one line where the generation lists its sinks.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics_log::{MetricsLog, StepRecord};

/// A consumer of aggregated steps.
pub trait StepSink: Send {
    /// Takes the next step. An error fails the run, with the error as its reason.
    fn take(&mut self, record: &StepRecord) -> anyhow::Result<()>;

    /// The feed ends (the generation is over): hand anything buffered to the system.
    fn close(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The sending end, held by the run: records go in the order the run aggregated them.
pub struct StepFeed {
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<StepRecord>>>,
}

/// The receiving end, until [`spawn`] hands it to the feeding task.
pub struct StepQueue(mpsc::UnboundedReceiver<StepRecord>);

#[cfg(test)]
impl StepQueue {
    /// The next queued record, if any (what the feeding task would get next).
    pub fn try_recv(&mut self) -> Option<StepRecord> {
        self.0.try_recv().ok()
    }
}

impl StepFeed {
    pub fn channel() -> (StepFeed, StepQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        (StepFeed { tx: std::sync::Mutex::new(Some(tx)) }, StepQueue(rx))
    }

    /// Queues one record (dropped once the feed is closed: the generation is over).
    pub fn send(&self, record: StepRecord) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(record);
        }
    }

    /// No more records: the task feeds what is queued, closes the sinks and ends.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Feeds the queued records to `sinks` until the feed is closed. The first sink error calls
/// `fail` with its message (a running run fails at once) and ends the feeding; the task returns
/// it too, for an error that comes after the run is over (a completed run's last steps).
pub fn spawn(
    queue: StepQueue,
    mut sinks: Vec<Box<dyn StepSink>>,
    fail: impl Fn(String) + Send + 'static,
) -> JoinHandle<anyhow::Result<()>> {
    let StepQueue(mut rx) = queue;
    tokio::spawn(async move {
        while let Some(record) = rx.recv().await {
            if let Err(e) = sinks.iter_mut().try_for_each(|s| s.take(&record)) {
                fail(format!("{e:#}"));
                return Err(e);
            }
        }
        let mut first = Ok(());
        for sink in &mut sinks {
            if let Err(e) = sink.close() {
                fail(format!("{e:#}"));
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    })
}

/// `metrics.jsonl`: a line per step; a write that fails fails the run.
impl StepSink for MetricsLog<StepRecord> {
    fn take(&mut self, record: &StepRecord) -> anyhow::Result<()> {
        self.append(record).map_err(|e| anyhow::anyhow!("cannot write metrics: {e}"))
    }
}

/// The Prometheus gauges and counters of a step.
pub struct PrometheusSteps;

impl StepSink for PrometheusSteps {
    fn take(&mut self, record: &StepRecord) -> anyhow::Result<()> {
        crate::observability::record_step(record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Keeps the steps it is given; fails on `fail_at`.
    struct Keep {
        seen: Arc<Mutex<Vec<u64>>>,
        fail_at: Option<u64>,
        closed: Arc<Mutex<bool>>,
    }

    impl StepSink for Keep {
        fn take(&mut self, r: &StepRecord) -> anyhow::Result<()> {
            if Some(r.step) == self.fail_at {
                anyhow::bail!("cannot keep step {}", r.step);
            }
            self.seen.lock().unwrap().push(r.step);
            Ok(())
        }

        fn close(&mut self) -> anyhow::Result<()> {
            *self.closed.lock().unwrap() = true;
            Ok(())
        }
    }

    fn record(step: u64) -> StepRecord {
        StepRecord { step, ..Default::default() }
    }

    /// Feeds steps `1..=last` to `sinks` and closes the feed; the failures it reported.
    async fn feed_steps(sinks: Vec<Box<dyn StepSink>>, last: u64) -> Vec<String> {
        let (feed, queue) = StepFeed::channel();
        let failures = Arc::new(Mutex::new(Vec::new()));
        let f = Arc::clone(&failures);
        let task = spawn(queue, sinks, move |why| f.lock().unwrap().push(why));
        for step in 1..=last {
            feed.send(record(step));
        }
        feed.close();
        feed.send(record(last + 1));
        let _ = task.await.unwrap();
        Arc::try_unwrap(failures).unwrap().into_inner().unwrap()
    }

    #[tokio::test]
    async fn every_sink_sees_every_step_in_order_then_closes() {
        let (a, b) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let closed = Arc::new(Mutex::new(false));
        let sinks: Vec<Box<dyn StepSink>> = vec![
            Box::new(Keep { seen: Arc::clone(&a), fail_at: None, closed: Arc::clone(&closed) }),
            Box::new(Keep { seen: Arc::clone(&b), fail_at: None, closed: Arc::new(Mutex::new(false)) }),
        ];
        let failures = feed_steps(sinks, 5).await;
        assert_eq!(*a.lock().unwrap(), [1, 2, 3, 4, 5]);
        assert_eq!(*b.lock().unwrap(), [1, 2, 3, 4, 5]);
        assert!(*closed.lock().unwrap());
        assert!(failures.is_empty());
    }

    #[tokio::test]
    async fn a_sink_error_fails_the_run_once_with_its_message() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sinks: Vec<Box<dyn StepSink>> =
            vec![Box::new(Keep { seen: Arc::clone(&seen), fail_at: Some(3), closed: Arc::new(Mutex::new(false)) })];
        let failures = feed_steps(sinks, 5).await;
        assert_eq!(*seen.lock().unwrap(), [1, 2]);
        assert_eq!(failures, ["cannot keep step 3"]);
    }

    /// The task also returns the error, for a run that is already over when it comes.
    #[tokio::test]
    async fn the_feed_returns_its_first_error() {
        let (feed, queue) = StepFeed::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sinks: Vec<Box<dyn StepSink>> =
            vec![Box::new(Keep { seen: Arc::clone(&seen), fail_at: Some(2), closed: Arc::new(Mutex::new(false)) })];
        let task = spawn(queue, sinks, |_| {});
        for step in 1..=3 {
            feed.send(record(step));
        }
        feed.close();
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "cannot keep step 2");
        assert_eq!(*seen.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn the_metrics_log_sink_appends_a_line_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::<StepRecord>::create(&path).unwrap();
        log.take(&record(1)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }
}
