//! One flag that tells every part of a worker to stop, with the first reason given.
//!
//! Any task can set it (the reporter when the coordinator says the run failed, the heartbeat
//! when the coordinator is gone, the data source on a broken stream); the compute thread checks
//! it between steps. The first reason is kept because later ones are usually its echoes.
//!
//! [`StopRequest`] is the gentle kind (SIGTERM, or the coordinator stopping the run): the ranks
//! agree on a step through the collective, rank 0 checkpoints it, and every worker leaves
//! cleanly, so the run can be resumed from there.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct Stop {
    set: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Broken on `set`: the compute thread may be blocked in the all-reduce waiting for a peer
    /// that is partitioned away, and would otherwise only notice after the ring's I/O timeout.
    ring: Mutex<Option<allreduce::RingAbort>>,
}

impl Stop {
    /// Asks everything to stop; keeps the first reason.
    pub fn set(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.into());
        }
        self.set.store(true, Ordering::Release);
        drop(r);
        if let Some(ring) = self.ring.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            ring.abort();
        }
    }

    /// Hands over the ring to break when stop is asked for (at once if it already was).
    pub fn arm(&self, ring: allreduce::RingAbort) {
        let mut slot = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if self.set.load(Ordering::Acquire) {
            ring.abort();
        }
        *slot = Some(ring);
    }

    /// The reason, once stop was asked for.
    pub fn reason(&self) -> Option<String> {
        if !self.set.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A request to end the run early but cleanly, honoured between steps. Unlike [`Stop`] it is
/// not acted on alone: all ranks must leave after the same step (see `Trainer::run`).
#[derive(Default)]
pub struct StopRequest {
    reason: Mutex<Option<String>>,
}

impl StopRequest {
    /// Asks for a clean stop; keeps the first reason.
    pub fn set(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.into());
        }
    }

    /// Who asked, once someone did.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_request_keeps_the_first_reason() {
        let s = StopRequest::default();
        assert_eq!(s.reason(), None);
        s.set("SIGTERM");
        s.set("the coordinator is stopping the run");
        assert_eq!(s.reason().as_deref(), Some("SIGTERM"));
    }

    #[test]
    fn first_reason_wins() {
        let s = Stop::default();
        assert_eq!(s.reason(), None);
        s.set("a");
        s.set("b");
        assert_eq!(s.reason().as_deref(), Some("a"));
    }
}
