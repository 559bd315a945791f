//! The networks and their collective on the device this worker trains on: the CPU with the TCP
//! ring, or a GPU with NCCL. The training loop calls the same five things either way.

use anyhow::Context;
use kernels::cuda::{CudaGan, DeviceCollective, Gpu, NcclCollective, SingleGpu};
use kernels::{CheckpointFiles, Collective, Gan, StepShare, StepStats, Tensor, TrainingState, Watchdog};

/// Where a GPU rank sits in its run, and when it stops waiting for the others.
pub struct GpuRanks<'a> {
    pub rank: usize,
    pub world: usize,
    /// Rank 0's NCCL unique id (ignored at one rank).
    pub nccl_id: &'a [u8],
    pub watchdog: Watchdog,
}

pub enum Engine {
    Cpu { gan: Box<Gan>, collective: Box<dyn Collective + Send> },
    Cuda { gan: Box<CudaGan>, collective: Box<dyn DeviceCollective> },
}

impl Engine {
    /// Moves `gan` onto GPU `ordinal` with room for `max_batch` samples per step, its gradients
    /// averaged over NCCL (communicator built from rank 0's `nccl_id`, abandoned when
    /// `watchdog` gives up) when `world > 1`. The communicator is not `Send`: call this on the
    /// thread that trains.
    pub fn on_gpu(gan: &Gan, ordinal: usize, max_batch: usize, ranks: GpuRanks<'_>) -> anyhow::Result<Self> {
        let GpuRanks { rank, world, nccl_id, watchdog } = ranks;
        let gpu = Gpu::open(ordinal).with_context(|| format!("cuda:{ordinal}"))?;
        gpu.bind_to_thread()?;
        let mut cuda = CudaGan::from_gan(std::sync::Arc::clone(&gpu), gan, max_batch).context("networks to the GPU")?;
        cuda.set_sync_batch_norm(gan.sync_batch_norm());
        let collective: Box<dyn DeviceCollective> = if world == 1 {
            Box::new(SingleGpu)
        } else {
            Box::new(NcclCollective::new(&gpu, nccl_id, rank, world, watchdog).context("NCCL communicator")?)
        };
        tracing::info!(rank, world, max_batch, gpu = %gpu.info().name, "training on cuda:{ordinal}");
        Ok(Engine::Cuda { gan: Box::new(cuda), collective })
    }

    /// One training step; on the CPU its kernels run on `pool`, on a GPU on this thread's stream.
    /// `share.vote` comes back averaged over the ranks in [`StepStats::vote`].
    pub fn train_step(
        &mut self,
        pool: &rayon::ThreadPool,
        real: &Tensor,
        z: &Tensor,
        share: StepShare,
    ) -> Result<StepStats, kernels::KernelError> {
        match self {
            Engine::Cpu { gan, collective } => pool.install(|| gan.train_step(real, z, share, collective.as_mut())),
            Engine::Cuda { gan, collective, .. } => gan.train_step(real, z, share, collective.as_mut()),
        }
    }

    pub fn save(&self, state: &TrainingState) -> Result<CheckpointFiles, kernels::KernelError> {
        match self {
            Engine::Cpu { gan, .. } => gan.save(state),
            Engine::Cuda { gan, .. } => gan.save(state),
        }
    }

    /// The fingerprint the ranks compare to prove they hold the same model.
    ///
    /// With sync-BN every rank computes the same BatchNorm statistics, so everything must agree,
    /// running statistics included. Without it each rank's running statistics follow its own
    /// batches (by design, as with DDP, where rank 0's are the ones saved), so only the
    /// parameters and Adam states, which the all-reduce keeps identical, are compared.
    pub fn consistency_checksum(&self, sync_bn: bool) -> anyhow::Result<u64> {
        Ok(match self {
            Engine::Cpu { gan, .. } if sync_bn => gan.state_checksum(),
            Engine::Cpu { gan, .. } => gan.parameter_checksum(),
            Engine::Cuda { gan, .. } if sync_bn => gan.state_checksum()?,
            Engine::Cuda { gan, .. } => gan.parameter_checksum()?,
        })
    }
}
