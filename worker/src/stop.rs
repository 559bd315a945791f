//! One flag that tells every part of a worker to stop, with the first reason given.
//!
//! Any task can set it (the reporter when the coordinator says the run failed, the heartbeat
//! when the coordinator is gone, the data source on a broken stream); the compute thread checks
//! it between steps. The first reason is kept because later ones are usually its echoes.
//!
//! [`StopRequest`] is the gentle kind (SIGTERM, or the coordinator stopping the run): the ranks
//! agree on a step through the collective, rank 0 checkpoints it, and every worker leaves
//! cleanly, so the run can be resumed from there.
//! [`watch_signals`] sets it on the first SIGTERM or Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dcgan_process::signals::StopSignals;

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

/// The GPU path's watchdog asks the same flag between polls (the CPU ring is broken by `arm`).
impl kernels::StopSignal for Stop {
    fn stop_reason(&self) -> Option<String> {
        self.reason()
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

/// A worker's handling: the first signal asks for a clean stop (the ranks agree on a step, rank
/// 0 checkpoints it), the second exits at once.
pub async fn watch_signals(mut signals: StopSignals, request: Arc<StopRequest>) {
    let name = signals.next().await;
    tracing::warn!("{name}: finishing the current step, then stopping with a checkpoint (again to stop at once)");
    request.set(format!("{name} received"));
    let name = signals.next().await;
    eprintln!("{name} received again: stopping at once");
    std::process::exit(1);
}

/// The clean-stop vote as one value that rides in the step's gradient average
/// ([`kernels::StepShare::vote`]): rank r < [`NAMED_RANKS`] votes 2^r, any higher rank votes
/// 2^NAMED_RANKS. Every contribution is non-negative, so the mean is positive exactly when
/// someone voted; and while the sum stays below 2^(NAMED_RANKS+1) it is recovered exactly from
/// the mean (its rounding error is far below one half), so every rank can name who asked.
pub const NAMED_RANKS: usize = 20;

/// This rank's vote: 0 when it does not ask to stop.
pub fn stop_vote(rank: usize, asks: bool) -> f32 {
    if asks { (1u32 << rank.min(NAMED_RANKS)) as f32 } else { 0.0 }
}

/// Who asked to stop, read back from the votes' mean over `world` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Askers {
    Nobody,
    /// The ranks below [`NAMED_RANKS`] that asked, and whether some higher rank did too.
    Ranks {
        named: Vec<usize>,
        higher: bool,
    },
    /// Too many high ranks asked for the sum to be read back exactly.
    Several,
}

impl Askers {
    pub fn from_mean(mean: f32, world: usize) -> Self {
        if mean <= 0.0 || mean.is_nan() {
            return Askers::Nobody;
        }
        let sum = (mean as f64 * world as f64).round();
        if sum >= (1u64 << (NAMED_RANKS + 1)) as f64 || sum < 1.0 {
            return Askers::Several;
        }
        let bits = sum as u64;
        let named = (0..NAMED_RANKS).filter(|r| bits & (1 << r) != 0).collect();
        Askers::Ranks { named, higher: bits & (1 << NAMED_RANKS) != 0 }
    }

    pub fn any(&self) -> bool {
        *self != Askers::Nobody
    }

    /// "rank 1, rank 2 asked to stop", as the coordinator reports it.
    pub fn describe(&self) -> String {
        match self {
            Askers::Nobody => "nobody asked to stop".into(),
            Askers::Several => "several ranks asked to stop".into(),
            Askers::Ranks { named, higher } => {
                let mut who: Vec<String> = named.iter().map(|r| format!("rank {r}")).collect();
                if *higher {
                    who.push(format!("a rank from {NAMED_RANKS} up"));
                }
                format!("{} asked to stop", who.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mean as the ring computes it (sum, then times 1/world, in f32).
    fn ring_mean(votes: &[f32]) -> f32 {
        votes.iter().sum::<f32>() * (1.0 / votes.len() as f32)
    }

    #[test]
    fn the_vote_names_who_asked() {
        for world in [1, 2, 3, 7, 20, 21, 64, 1000] {
            assert_eq!(Askers::from_mean(ring_mean(&vec![0.0; world]), world), Askers::Nobody, "world {world}");
            for asker in [0, world / 2, world - 1] {
                let votes: Vec<f32> = (0..world).map(|r| stop_vote(r, r == asker)).collect();
                let askers = Askers::from_mean(ring_mean(&votes), world);
                assert!(askers.any(), "world {world} asker {asker}");
                if asker < NAMED_RANKS {
                    assert_eq!(askers, Askers::Ranks { named: vec![asker], higher: false }, "world {world}");
                    assert_eq!(askers.describe(), format!("rank {asker} asked to stop"));
                } else {
                    assert_eq!(askers, Askers::Ranks { named: vec![], higher: true }, "world {world}");
                }
            }
        }
    }

    #[test]
    fn every_rank_asking_is_still_a_stop() {
        for world in [3, 20, 21, 22, 1000] {
            let votes: Vec<f32> = (0..world).map(|r| stop_vote(r, true)).collect();
            let askers = Askers::from_mean(ring_mean(&votes), world);
            assert!(askers.any(), "world {world}");
            if world <= NAMED_RANKS {
                assert_eq!(askers, Askers::Ranks { named: (0..world).collect(), higher: false });
            }
        }
        let two = Askers::from_mean(ring_mean(&[0.0, 2.0, 4.0]), 3);
        assert_eq!(two.describe(), "rank 1, rank 2 asked to stop");
    }

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
