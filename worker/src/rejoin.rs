//! When and how fast a worker tries again after its generation ended without it: the coordinator
//! restarting the run from a checkpoint (a peer died), the coordinator itself restarting, or this
//! worker coming back from a network partition to find the run moved on.
//!
//! The coordinator decides who trains: the worker simply asks to join again, with backoff, until
//! the coordinator either takes it into a generation or says the run is over.

use std::time::Duration;

use tonic::Code;

/// The first wait before trying again.
const FIRST_WAIT: Duration = Duration::from_millis(250);
/// The longest wait between two tries, so a restarted coordinator is found within this long.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Exponential backoff with jitter (so a crowd of workers does not knock in lockstep).
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_WAIT }
    }
}

impl Backoff {
    /// The wait before the next try; each call doubles the one after, up to [`MAX_WAIT`].
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_WAIT);
        base.mul_f64(0.75 + rand::random::<f64>() * 0.5)
    }
}

/// Whether a refused `Join` (or a failed call of an ended generation) is worth trying again:
/// the coordinator is between generations, restarting, unreachable, or running a generation
/// this worker missed. `false` for answers that will not change: the run is over, the token is
/// wrong, the request is invalid.
pub fn worth_retrying(status: &tonic::Status) -> bool {
    match status.code() {
        // Between generations, or the coordinator is not (yet) listening.
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::Internal => true,
        // A generation formed without this worker, or its ranks are taken: the next one may not be.
        Code::FailedPrecondition | Code::ResourceExhausted | Code::AlreadyExists => true,
        // Over (Aborted), wrong token, invalid request, unknown run.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= FIRST_WAIT.mul_f64(0.75) && waits[0] <= FIRST_WAIT.mul_f64(1.25), "{waits:?}");
        assert!(waits[3] > waits[0], "{waits:?}");
        assert!(waits.iter().all(|w| *w <= MAX_WAIT.mul_f64(1.25)), "{waits:?}");
        assert!(waits[9] >= MAX_WAIT.mul_f64(0.75), "{waits:?}");
    }

    #[test]
    fn only_answers_that_can_change_are_retried() {
        assert!(worth_retrying(&tonic::Status::unavailable("between generations")));
        assert!(worth_retrying(&tonic::Status::failed_precondition("the run has formed")));
        assert!(worth_retrying(&tonic::Status::resource_exhausted("all 3 ranks are taken")));
        assert!(!worth_retrying(&tonic::Status::aborted("the run is over: completed")));
        assert!(!worth_retrying(&tonic::Status::unauthenticated("wrong token")));
        assert!(!worth_retrying(&tonic::Status::invalid_argument("rank 7 is outside a world of 3")));
    }
}
