//! Averaging gradients between GPUs: the device-side twin of [`crate::Collective`], with NCCL
//! behind it, and a single-rank identity.
//!
//! Bootstrap: rank 0 calls [`nccl_unique_id`] and the coordinator hands the 128 bytes to every
//! rank; each rank then builds its communicator with [`NcclCollective::new`] (which blocks until
//! all `world` ranks have joined).
//!
//! The communicator is not `Send` (cudarc's `Comm` holds a raw NCCL handle whose calls must come
//! from one thread): create it on the worker's GPU thread and keep it there, beside the
//! [`super::CudaGan`] it serves.

use cudarc::driver::CudaViewMut;
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::device::Gpu;
use super::libs::NCCL;
use crate::KernelError;
use crate::collective::CollectiveError;

/// Length of NCCL's unique id, the only thing ranks must share to form a communicator.
pub const NCCL_ID_BYTES: usize = 128;

/// An all-reduce across the ranks of one run, on device buffers, queued on the GPU's stream
/// (it returns before the reduction has run; later work on the stream sees its result).
///
/// Every rank must call the same operations in the same order with buffers of the same length.
pub trait DeviceCollective {
    /// Number of ranks taking part (1 for a single worker).
    fn world_size(&self) -> usize;

    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Replaces `buf` on every rank with the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&mut self, buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError>;

    /// Replaces `buf` on every rank with the element-wise mean of all ranks' `buf`.
    fn all_reduce_mean(&mut self, buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError>;
}

/// The collective of a run with one GPU: every reduction is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleGpu;

impl DeviceCollective for SingleGpu {
    fn world_size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&mut self, _buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_mean(&mut self, _buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// A new NCCL unique id, on rank 0, as the bytes the coordinator forwards to the other ranks.
/// Fails with a message naming the missing library (and how to provide `libnccl.so`) instead of
/// cudarc's panic.
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES], KernelError> {
    NCCL.require()?;
    let id = Id::new().map_err(|e| KernelError::Cuda(format!("ncclGetUniqueId: {:?}", e.0)))?;
    Ok(id.internal().map(|c| c as u8))
}

/// Rebuilds NCCL's id from the bytes rank 0 sent, refusing any other length.
fn id_from_bytes(bytes: &[u8]) -> Result<Id, KernelError> {
    let raw: &[u8; NCCL_ID_BYTES] = bytes
        .try_into()
        .map_err(|_| KernelError::Config(format!("an NCCL unique id is {NCCL_ID_BYTES} bytes, got {}", bytes.len())))?;
    Ok(Id::uninit(raw.map(|b| b as core::ffi::c_char)))
}

/// NCCL's all-reduce on the GPU's stream. Not `Send`: see the module documentation.
#[derive(Debug)]
pub struct NcclCollective {
    comm: Comm,
}

impl NcclCollective {
    /// Joins the communicator `id` (the bytes of rank 0's [`nccl_unique_id`]) as `rank` of
    /// `world`, on `gpu`'s stream, so that reductions are ordered after the backward that wrote
    /// the gradients. Blocks until every rank has joined.
    pub fn new(gpu: &Gpu, id: &[u8], rank: usize, world: usize) -> Result<Self, KernelError> {
        if world == 0 || rank >= world {
            return Err(KernelError::Config(format!("NCCL rank {rank} is not in a world of {world}")));
        }
        let id = id_from_bytes(id)?;
        NCCL.require()?;
        // ncclCommInitRank uses the calling thread's current device.
        gpu.bind_to_thread()?;
        let comm = Comm::from_rank(gpu.stream().clone(), rank, world, id)
            .map_err(|e| KernelError::Cuda(format!("ncclCommInitRank (rank {rank} of {world}): {:?}", e.0)))?;
        Ok(Self { comm })
    }

    fn reduce(&mut self, buf: &mut CudaViewMut<'_, f32>, op: ReduceOp, name: &str) -> Result<(), CollectiveError> {
        self.comm
            .all_reduce_in_place(buf, &op)
            .map(|_| ())
            .map_err(|e| format!("NCCL {name} of {} values on rank {}: {:?}", buf.len(), self.comm.rank(), e.0).into())
    }
}

impl DeviceCollective for NcclCollective {
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn all_reduce_sum(&mut self, buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError> {
        self.reduce(buf, ReduceOp::Sum, "all-reduce (sum)")
    }
    fn all_reduce_mean(&mut self, buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError> {
        // NCCL's own average (ncclAvg, NCCL 2.10+): one pass, no separate scaling kernel.
        self.reduce(buf, ReduceOp::Avg, "all-reduce (mean)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_must_be_128_bytes() {
        assert!(id_from_bytes(&[0u8; 127]).unwrap_err().to_string().contains("128 bytes, got 127"));
        let bytes: Vec<u8> = (0..128).map(|i| (i * 3) as u8).collect();
        let id = id_from_bytes(&bytes).unwrap();
        let back: Vec<u8> = id.internal().iter().map(|c| *c as u8).collect();
        assert_eq!(back, bytes);
    }
}
