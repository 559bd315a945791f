//! Averaging gradients between GPUs: the device-side twin of [`crate::Collective`], with NCCL
//! behind it, and a single-rank identity.
//!
//! Bootstrap: rank 0 calls [`nccl_unique_id`] and the coordinator hands the 128 bytes to every
//! rank; each rank then builds its communicator with [`NcclCollective::new`].
//!
//! The communicator is **nonblocking** (`ncclConfig_t::blocking = 0`): no NCCL call ever blocks
//! the host thread, which instead polls NCCL's async error and the step's completion, asking
//! the run's [`Watchdog`] between polls. A dead or stuck peer therefore cannot wedge a rank: when
//! the worker is told to stop, or nothing progresses for the run's timeout, the communicator is
//! aborted (`ncclCommAbort`), the step fails with the reason, and the worker rejoins.
//!
//! This is written on cudarc's `nccl::result` layer rather than its `Comm`: `Comm` offers no
//! nonblocking configuration, hides the handle that an abort needs, and panics in `Drop` when
//! an abort fails.
//!
//! The communicator is not `Send` (NCCL's calls for one communicator must come from one
//! thread): create it on the worker's GPU thread and keep it there, beside the
//! [`super::CudaGan`] it serves.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream, CudaViewMut, DevicePtrMut};
use cudarc::nccl::{Id, result, sys};

use super::device::Gpu;
use super::libs::NCCL;
use crate::KernelError;
use crate::collective::CollectiveError;
use crate::watchdog::{Pending, Watchdog, wait_until_done};

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

    /// Waits until `done`, an event recorded after the step's reductions, has completed. NCCL
    /// polls and gives up as its watchdog says; with nothing to wait for from peers, this blocks.
    fn wait(&mut self, done: &CudaEvent) -> Result<(), CollectiveError> {
        done.synchronize().map_err(|e| format!("waiting for the step to finish on the GPU: {e:?}").into())
    }
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
    let id = Id::new().map_err(|e| KernelError::Cuda(format!("ncclGetUniqueId: {}", describe(e.0 as u32))))?;
    Ok(id.internal().map(|c| c as u8))
}

/// Rebuilds NCCL's id from the bytes rank 0 sent, refusing any other length.
fn id_from_bytes(bytes: &[u8]) -> Result<sys::ncclUniqueId, KernelError> {
    let raw: &[u8; NCCL_ID_BYTES] = bytes
        .try_into()
        .map_err(|_| KernelError::Config(format!("an NCCL unique id is {NCCL_ID_BYTES} bytes, got {}", bytes.len())))?;
    Ok(sys::ncclUniqueId { internal: raw.map(|b| b as core::ffi::c_char) })
}

/// `NCCL_CONFIG_UNDEF_INT`: "leave this setting to NCCL" (the C macro initialiser's value).
const CONFIG_UNDEF_INT: i32 = i32::MIN;
/// `NCCL_VERSION(2, 30, 0)`: the layout of cudarc's `ncclConfig_t`. NCCL reads the fields it
/// knows, so an older library takes it too.
const CONFIG_VERSION: u32 = 2 * 10_000 + 30 * 100;

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other setting left to NCCL.
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
        graphUsageMode: CONFIG_UNDEF_INT,
        numRmaCtx: CONFIG_UNDEF_INT,
        maxP2pPeers: CONFIG_UNDEF_INT,
    }
}

const NCCL_SUCCESS: u32 = 0;
const NCCL_IN_PROGRESS: u32 = 7;

/// NCCL's name for a result code, read as a plain number (a newer library may return codes
/// that cudarc's enum lacks).
fn describe(code: u32) -> String {
    let name = match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError (a CUDA call failed inside NCCL)",
        2 => "ncclSystemError (a system call or the network failed: a peer may have died)",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError (a peer failed or went away)",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        _ => "an NCCL error this build does not know",
    };
    format!("{name} [{code}]")
}

/// A communicator's state as the poll loop sees it: its async error, and optionally an event
/// that marks the end of the work queued behind it.
struct CommPoll<'a> {
    comm: sys::ncclComm_t,
    until: Option<&'a CudaEvent>,
}

impl Pending for CommPoll<'_> {
    fn poll(&mut self) -> Result<bool, String> {
        let mut code: u32 = NCCL_SUCCESS;
        // SAFETY: `comm` is a live communicator (not yet aborted); NCCL writes one
        // `ncclResult_t`, a 32-bit C enum, which is read back as a number.
        let call = unsafe { sys::ncclCommGetAsyncError(self.comm, (&mut code as *mut u32).cast()) };
        if call != sys::ncclResult_t::ncclSuccess {
            return Err(format!("ncclCommGetAsyncError: {}", describe(call as u32)));
        }
        match code {
            NCCL_IN_PROGRESS => Ok(false),
            NCCL_SUCCESS => match self.until {
                Some(event) => event.try_is_complete().map_err(|e| format!("the step failed on the GPU: {e:?}")),
                None => Ok(true),
            },
            other => Err(describe(other)),
        }
    }

    fn abort(&mut self) -> Result<(), String> {
        // SAFETY: called once per communicator; the owner marks it aborted and never uses it again.
        unsafe { result::comm_abort(self.comm) }.map(|_| ()).map_err(|e| describe(e.0 as u32))
    }
}

/// NCCL's all-reduce on the GPU's stream. Not `Send`: see the module documentation.
pub struct NcclCollective {
    /// Null once aborted (or after a failed start): nothing may use it then.
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    watchdog: Watchdog,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("aborted", &self.comm.is_null())
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Joins the communicator `id` (the bytes of rank 0's [`nccl_unique_id`]) as `rank` of
    /// `world`, on `gpu`'s stream, so that reductions are ordered after the backward that wrote
    /// the gradients. Waits until every rank has joined, or until `watchdog` gives up (a peer
    /// that never comes), aborting the half-built communicator then.
    pub fn new(gpu: &Gpu, id: &[u8], rank: usize, world: usize, watchdog: Watchdog) -> Result<Self, KernelError> {
        if world == 0 || rank >= world {
            return Err(KernelError::Config(format!("NCCL rank {rank} is not in a world of {world}")));
        }
        let id = id_from_bytes(id)?;
        NCCL.require()?;
        // ncclCommInitRankConfig uses the calling thread's current device.
        gpu.bind_to_thread()?;
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; NCCL copies the config.
        let started = unsafe { result::comm_init_rank_config(&mut comm, world as i32, id, rank as i32, &mut config) };
        let mut this = Self { comm, stream: gpu.stream().clone(), rank, world, watchdog };
        if let Err(e) = started {
            return Err(this.failed(&format!("ncclCommInitRankConfig (rank {rank} of {world})"), describe(e.0 as u32)));
        }
        this.settle(None)
            .map_err(|e| this.failed(&format!("joining the NCCL communicator as rank {rank} of {world}"), e))?;
        Ok(this)
    }

    /// Polls until NCCL has finished what was asked of it (and `until`, if given, has passed).
    fn settle(&mut self, until: Option<&CudaEvent>) -> Result<(), String> {
        if self.comm.is_null() {
            return Err("the NCCL communicator was aborted earlier in this generation".into());
        }
        let mut poll = CommPoll { comm: self.comm, until };
        let waited = wait_until_done(&mut poll, &self.watchdog);
        if let Err(crate::watchdog::WaitError::GaveUp { .. }) = &waited {
            // Aborted inside the wait: the handle is gone.
            self.comm = std::ptr::null_mut();
        }
        waited.map_err(|e| e.to_string())
    }

    /// Aborts what is left of the communicator after an error, and says what failed.
    fn failed(&mut self, what: &str, error: String) -> KernelError {
        self.abort_quietly();
        KernelError::Cuda(format!("{what}: {error}"))
    }

    /// `ncclCommAbort`, logging (never panicking on) a failure: used on errors and on drop.
    fn abort_quietly(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        // SAFETY: a live communicator, aborted once (the handle is cleared first).
        if let Err(e) = unsafe { result::comm_abort(comm) } {
            tracing::warn!(rank = self.rank, "ncclCommAbort failed: {}", describe(e.0 as u32));
        }
    }

    fn reduce(
        &mut self,
        buf: &mut CudaViewMut<'_, f32>,
        op: sys::ncclRedOp_t,
        name: &str,
    ) -> Result<(), CollectiveError> {
        if self.comm.is_null() {
            return Err("the NCCL communicator was aborted earlier in this generation".into());
        }
        let len = buf.len();
        let rank = self.rank;
        let context =
            |e: String| -> CollectiveError { format!("NCCL {name} of {len} values on rank {rank}: {e}").into() };
        let stream = Arc::clone(&self.stream);
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        let ptr = ptr as *mut core::ffi::c_void;
        // SAFETY: in place on a live device buffer of `len` f32s, on the stream that owns it;
        // `_sync` keeps cudarc's stream-ordering guard alive until the call has been queued.
        let queued = unsafe {
            result::all_reduce(
                ptr,
                ptr,
                len,
                sys::ncclDataType_t::ncclFloat32,
                op,
                self.comm,
                stream.cu_stream().cast(),
            )
        };
        queued.map_err(|e| describe(e.0 as u32)).map_err(context)?;
        // Nonblocking: the call may still be in progress on the host side; it must settle before
        // the next NCCL call.
        self.settle(None).map_err(context)
    }
}

impl DeviceCollective for NcclCollective {
    fn world_size(&self) -> usize {
        self.world
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&mut self, buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError> {
        self.reduce(buf, sys::ncclRedOp_t::ncclSum, "all-reduce (sum)")
    }
    fn all_reduce_mean(&mut self, buf: &mut CudaViewMut<'_, f32>) -> Result<(), CollectiveError> {
        // NCCL's own average (ncclAvg, NCCL 2.10+): one pass, no separate scaling kernel.
        self.reduce(buf, sys::ncclRedOp_t::ncclAvg, "all-reduce (mean)")
    }
    fn wait(&mut self, done: &CudaEvent) -> Result<(), CollectiveError> {
        self.settle(Some(done)).map_err(|e| format!("waiting for the step on rank {}: {e}", self.rank).into())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        self.abort_quietly();
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
        let back: Vec<u8> = id.internal.iter().map(|c| *c as u8).collect();
        assert_eq!(back, bytes);
    }

    /// The C initialiser's values: NCCL refuses a config without its magic, and reads `size`
    /// and `version` to know which fields follow.
    #[test]
    fn the_config_is_the_c_initialiser_but_nonblocking() {
        let c = nonblocking_config();
        assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, 23_000, 0));
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!((c.minCTAs, c.maxCTAs, c.cgaClusterSize), (i32::MIN, i32::MIN, i32::MIN));
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn result_codes_are_named_even_unknown_ones() {
        assert!(describe(6).starts_with("ncclRemoteError"));
        assert_eq!(describe(42), "an NCCL error this build does not know [42]");
    }
}
