//! Ranks as threads, joined by an in-process all-reduce: for tests of what several ranks
//! compute together, without sockets.

use std::sync::{Arc, Barrier, Mutex};

use kernels::{Collective, CollectiveError};

/// What the threads of one group share: a barrier and the running sum.
pub type Shared = Arc<(Barrier, Mutex<Vec<f32>>)>;

/// The shared state of a group of `world` ranks.
pub fn shared(world: usize) -> Shared {
    Arc::new((Barrier::new(world), Mutex::new(Vec::new())))
}

/// An all-reduce between threads: every rank adds its buffer into a shared sum, then all copy
/// it back, so every rank ends with the same bits.
pub struct ThreadCollective {
    pub rank: usize,
    pub world: usize,
    pub shared: Shared,
}

impl Collective for ThreadCollective {
    fn world_size(&self) -> usize {
        self.world
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (barrier, acc) = &*self.shared;
        if self.rank == 0 {
            *acc.lock().unwrap() = vec![0.0; buf.len()];
        }
        barrier.wait();
        // Add in rank order so the sum does not depend on thread timing.
        for r in 0..self.world {
            if r == self.rank {
                let mut a = acc.lock().unwrap();
                a.iter_mut().zip(buf.iter()).for_each(|(s, v)| *s += v);
            }
            barrier.wait();
        }
        buf.copy_from_slice(&acc.lock().unwrap());
        barrier.wait();
        Ok(())
    }
}
