//! The seam between the compute and the network: whatever averages gradients across ranks.
//!
//! The training step calls a [`Collective`] between backward and Adam (and, with synchronised
//! BatchNorm, inside the forward pass) so that `kernels` never knows whether the ranks talk over a
//! TCP ring, NCCL, or not at all.

/// Why a collective operation failed: a peer vanished, a socket broke, a size disagreed.
pub type CollectiveError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An all-reduce across the ranks of one training run.
///
/// Every rank must call the same operations in the same order with buffers of the same length.
pub trait Collective {
    /// Number of ranks taking part (1 for a single worker).
    fn world_size(&self) -> usize;

    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Replaces `buf` on every rank with the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces `buf` on every rank with the element-wise mean of all ranks' `buf`.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)?;
        let world = self.world_size();
        if world > 1 {
            let inv = 1.0 / world as f32;
            buf.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }
}

/// The collective of a run with one rank: every reduction is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}
