//! When a rank stops waiting for its peers. One rule for both backends: give up at once when
//! the worker is told to stop (the coordinator failed the generation because a peer died or
//! went silent, the heartbeat lost the coordinator, a signal), and give up on a collective that
//! has made no progress for the run's timeout (a peer that is alive but stuck).
//!
//! The CPU ring blocks in socket calls, so it applies the rule through its socket timeouts and
//! an abort handle that the stop breaks; NCCL runs on the GPU while the host thread is free, so
//! its wait is a poll ([`wait_until_done`]) that asks the [`Watchdog`] between polls and aborts
//! the communicator when it gives up. The poll loop is generic over what it waits for, so its
//! decisions are tested here, on the CPU.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whatever tells the compute thread to stop (the worker's stop flag), asked between polls.
pub trait StopSignal: Send + Sync {
    /// Why the worker is stopping, once it is.
    fn stop_reason(&self) -> Option<String>;
}

/// No stop signal: only the timeout ends a wait (tests, benchmarks, the research tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NeverStop;

impl StopSignal for NeverStop {
    fn stop_reason(&self) -> Option<String> {
        None
    }
}

/// Why a rank gave up on a collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    /// The worker is stopping; the reason it was given.
    Stopped(String),
    /// Nothing completed for this long: a peer is stuck, or the network dropped it silently.
    TimedOut(Duration),
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::Stopped(reason) => write!(f, "abandoned because the worker is stopping: {reason}"),
            GiveUp::TimedOut(waited) => write!(
                f,
                "no progress for {:.1}s: a peer is stuck or unreachable (raise --ring-timeout if steps are this slow)",
                waited.as_secs_f64()
            ),
        }
    }
}

/// Decides, between polls, whether to keep waiting.
#[derive(Clone)]
pub struct Watchdog {
    timeout: Duration,
    stop: Arc<dyn StopSignal>,
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watchdog").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Watchdog {
    pub fn new(timeout: Duration, stop: Arc<dyn StopSignal>) -> Self {
        Self { timeout, stop }
    }

    /// A watchdog that only times out.
    pub fn timeout_only(timeout: Duration) -> Self {
        Self::new(timeout, Arc::new(NeverStop))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `None` to keep waiting for something that has been pending since `since`; the stop
    /// comes first, so a stopping worker never waits out the timeout.
    pub fn verdict(&self, since: Instant, now: Instant) -> Option<GiveUp> {
        if let Some(reason) = self.stop.stop_reason() {
            return Some(GiveUp::Stopped(reason));
        }
        let waited = now.saturating_duration_since(since);
        (waited >= self.timeout).then_some(GiveUp::TimedOut(waited))
    }
}

/// Something running elsewhere (a GPU stream, NCCL's proxy thread) that the host polls.
pub trait Pending {
    /// `Ok(true)` once it has completed; an error it reported on its own (NCCL's async error).
    fn poll(&mut self) -> Result<bool, String>;
    /// Abandons it for good (NCCL: `ncclCommAbort`); called once, when the watchdog gives up.
    fn abort(&mut self) -> Result<(), String>;
}

/// How a wait ended when it did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// The work reported an error of its own.
    Failed(String),
    /// The watchdog gave up and the work was aborted (`abort_error` when aborting failed too).
    GaveUp { why: GiveUp, abort_error: Option<String> },
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Failed(e) => f.write_str(e),
            WaitError::GaveUp { why, abort_error: None } => write!(f, "{why}"),
            WaitError::GaveUp { why, abort_error: Some(e) } => write!(f, "{why} (and aborting failed: {e})"),
        }
    }
}

impl std::error::Error for WaitError {}

/// Polls `work` until it completes, fails, or `watchdog` gives up (then aborts it). Spins with
/// `yield_now` for the first millisecond, which a GPU step usually needs no more than, then
/// sleeps 100 µs between polls so a long wait costs no core.
pub fn wait_until_done(work: &mut dyn Pending, watchdog: &Watchdog) -> Result<(), WaitError> {
    let since = Instant::now();
    loop {
        if work.poll().map_err(WaitError::Failed)? {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(why) = watchdog.verdict(since, now) {
            let abort_error = work.abort().err();
            return Err(WaitError::GaveUp { why, abort_error });
        }
        if now - since < Duration::from_millis(1) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A stop flag the test sets.
    #[derive(Default)]
    struct Flag(Mutex<Option<String>>);

    impl StopSignal for Flag {
        fn stop_reason(&self) -> Option<String> {
            self.0.lock().unwrap().clone()
        }
    }

    /// Completes after `done_after` polls, or fails at `fail_at`; can set `flag` at `stop_at`.
    #[derive(Default)]
    struct Work {
        polls: usize,
        done_after: Option<usize>,
        fail_at: Option<usize>,
        stop_at: Option<(usize, Arc<Flag>)>,
        aborted: usize,
        abort_fails: bool,
    }

    impl Pending for Work {
        fn poll(&mut self) -> Result<bool, String> {
            self.polls += 1;
            if let Some((_, flag)) = self.stop_at.as_ref().filter(|(at, _)| *at == self.polls) {
                *flag.0.lock().unwrap() = Some("the coordinator failed the generation".into());
            }
            if self.fail_at == Some(self.polls) {
                return Err("NCCL: remote process exited".into());
            }
            Ok(self.done_after.is_some_and(|n| self.polls >= n))
        }
        fn abort(&mut self) -> Result<(), String> {
            self.aborted += 1;
            if self.abort_fails { Err("ncclCommAbort: internal error".into()) } else { Ok(()) }
        }
    }

    #[test]
    fn the_stop_comes_before_the_timeout() {
        let flag = Arc::new(Flag::default());
        let w = Watchdog::new(Duration::from_secs(60), flag.clone());
        let t0 = Instant::now();
        assert_eq!(w.verdict(t0, t0 + Duration::from_secs(59)), None);
        assert_eq!(w.verdict(t0, t0 + Duration::from_secs(60)), Some(GiveUp::TimedOut(Duration::from_secs(60))));
        *flag.0.lock().unwrap() = Some("SIGTERM".into());
        assert_eq!(w.verdict(t0, t0), Some(GiveUp::Stopped("SIGTERM".into())));
        assert_eq!(w.verdict(t0, t0 + Duration::from_secs(61)), Some(GiveUp::Stopped("SIGTERM".into())));
    }

    #[test]
    fn completed_work_is_never_aborted() {
        let mut work = Work { done_after: Some(5), ..Default::default() };
        wait_until_done(&mut work, &Watchdog::timeout_only(Duration::from_secs(60))).unwrap();
        assert_eq!((work.polls, work.aborted), (5, 0));
    }

    #[test]
    fn an_error_of_its_own_is_reported_without_an_abort() {
        let mut work = Work { fail_at: Some(3), ..Default::default() };
        let e = wait_until_done(&mut work, &Watchdog::timeout_only(Duration::from_secs(60))).unwrap_err();
        assert_eq!(e, WaitError::Failed("NCCL: remote process exited".into()));
        assert_eq!(work.aborted, 0, "NCCL aborts a failed communicator when it is dropped");
    }

    #[test]
    fn a_stop_during_the_wait_aborts_once() {
        let flag = Arc::new(Flag::default());
        let mut work = Work { stop_at: Some((4, flag.clone())), ..Default::default() };
        let e = wait_until_done(&mut work, &Watchdog::new(Duration::from_secs(60), flag)).unwrap_err();
        let why = GiveUp::Stopped("the coordinator failed the generation".into());
        assert_eq!(e, WaitError::GaveUp { why, abort_error: None });
        assert_eq!((work.polls, work.aborted), (4, 1));
        assert!(e.to_string().contains("worker is stopping: the coordinator failed the generation"), "{e}");
    }

    #[test]
    fn a_silent_peer_times_out_and_a_failed_abort_is_said() {
        let mut work = Work { abort_fails: true, ..Default::default() };
        let t0 = Instant::now();
        let e = wait_until_done(&mut work, &Watchdog::timeout_only(Duration::from_millis(30))).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(matches!(&e, WaitError::GaveUp { why: GiveUp::TimedOut(_), abort_error: Some(_) }), "{e:?}");
        assert_eq!(work.aborted, 1);
        let text = e.to_string();
        assert!(text.contains("no progress for 0.0s") && text.contains("aborting failed: ncclCommAbort"), "{text}");
    }
}
