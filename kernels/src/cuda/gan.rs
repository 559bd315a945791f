//! The whole DCGAN training step on one GPU: [`crate::Gan::train_step`]'s semantics, with the
//! batch uploaded once, every buffer allocated when the step is built, no host synchronisation
//! until the step's numbers are read back at its end, and gradients averaged by a
//! [`DeviceCollective`] (NCCL between GPUs).

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaViewMut};

use super::OrCuda;
use super::device::Gpu;
use super::nccl::DeviceCollective;
use super::net::CudaNet;
use super::ops;
use crate::ops::batchnorm::BnMode;
use crate::{CheckpointFiles, Gan, KernelError, ModelConfig, OptimConfig, StepShare, StepStats, Tensor, TrainingState};

/// Values read back per step: three `[loss, mean D output]` pairs and the vote.
const STATS: usize = 7;

/// Generator and discriminator with their Adam states, on one GPU, for batches of up to
/// `max_batch` images. Built from (and converted back to) a CPU [`Gan`], so both backends start
/// from the same weights and share the checkpoint format.
pub struct CudaGan {
    gpu: Arc<Gpu>,
    model: ModelConfig,
    optim: OptimConfig,
    g: CudaNet,
    d: CudaNet,
    sync_batch_norm: bool,
    max_batch: usize,
    /// The batch as uploaded (NCHW), then channel-major for the networks.
    real_nchw: CudaSlice<f32>,
    real_cnhw: CudaSlice<f32>,
    z_nchw: CudaSlice<f32>,
    z_cnhw: CudaSlice<f32>,
    /// The loss's gradient with respect to D's logits.
    logit_grad: CudaSlice<f32>,
    /// `[loss, mean D output]` of the three losses (real, fake, G's), then the vote's mean
    /// ([`StepStats::vote`]), read back once per step.
    stats: CudaSlice<f32>,
    stats_host: Vec<f32>,
    /// Recorded around the two all-reduces, to report their time without synchronising, and
    /// at the step's end, for the collective to wait on.
    events: [CudaEvent; 5],
}

impl std::fmt::Debug for CudaGan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGan")
            .field("gpu", &self.gpu)
            .field("model", &self.model)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl CudaGan {
    /// A fresh GAN with the DCGAN initialisation drawn from `seed`: the same weights as
    /// `Gan::new(model, optim, seed)` (they are drawn on the CPU and uploaded).
    pub fn new(
        gpu: Arc<Gpu>,
        model: ModelConfig,
        optim: OptimConfig,
        seed: u64,
        max_batch: usize,
    ) -> Result<Self, KernelError> {
        let gan = Gan::new(model, optim, seed)?;
        Self::from_gan(gpu, &gan, max_batch)
    }

    /// Uploads a CPU GAN (weights, gradients, Adam states, BatchNorm running statistics; e.g. one
    /// just loaded from a checkpoint) and allocates every workspace for batches of up to
    /// `max_batch` images.
    pub fn from_gan(gpu: Arc<Gpu>, gan: &Gan, max_batch: usize) -> Result<Self, KernelError> {
        let model = gan.model_config().clone();
        let s = model.image_size;
        gpu.bind_to_thread()?;
        let g = CudaNet::from_net(&gpu, &gan.g, max_batch)?;
        let d = CudaNet::from_net(&gpu, &gan.d, max_batch)?;
        let image_len = max_batch * model.nc * s * s;
        let z_len = max_batch * model.nz;
        let event = || gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).or_cuda("creating an event");
        Ok(Self {
            real_nchw: gpu.zeros(image_len)?,
            real_cnhw: gpu.zeros(image_len)?,
            z_nchw: gpu.zeros(z_len)?,
            z_cnhw: gpu.zeros(z_len)?,
            logit_grad: gpu.zeros(max_batch)?,
            stats: gpu.zeros(STATS)?,
            stats_host: vec![0.0; STATS],
            events: [event()?, event()?, event()?, event()?, event()?],
            optim: gan.optim_config().clone(),
            sync_batch_norm: gan.sync_batch_norm(),
            model,
            g,
            d,
            max_batch,
            gpu,
        })
    }

    /// The GAN's whole state downloaded into a CPU [`Gan`]: for checkpoints, checksums, samples
    /// on the CPU, or to continue there.
    pub fn to_gan(&self) -> Result<Gan, KernelError> {
        let mut gan = Gan::uninitialised(self.model.clone(), self.optim.clone())?;
        gan.set_sync_batch_norm(self.sync_batch_norm);
        self.copy_to_gan(&mut gan)?;
        Ok(gan)
    }

    /// Downloads the state into an existing CPU [`Gan`] of the same configuration.
    pub fn copy_to_gan(&self, gan: &mut Gan) -> Result<(), KernelError> {
        if gan.model_config() != &self.model {
            return Err(KernelError::Config(format!(
                "cannot copy a GPU GAN of {:?} into a CPU GAN of {:?}",
                self.model,
                gan.model_config()
            )));
        }
        self.g.copy_to_net(&self.gpu, &mut gan.g)?;
        self.d.copy_to_net(&self.gpu, &mut gan.d)
    }

    /// A checkpoint in the CPU backend's format ([`Gan::save`]).
    pub fn save(&self, state: &TrainingState) -> Result<CheckpointFiles, KernelError> {
        self.to_gan()?.save(state)
    }

    /// [`Gan::parameter_checksum`] of the downloaded state: ranks compare it whatever their
    /// device, since both backends keep the same numbers in the same layout.
    pub fn parameter_checksum(&self) -> Result<u64, KernelError> {
        Ok(self.to_gan()?.parameter_checksum())
    }

    /// [`Gan::state_checksum`] of the downloaded state.
    pub fn state_checksum(&self) -> Result<u64, KernelError> {
        Ok(self.to_gan()?.state_checksum())
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    pub fn optim_config(&self) -> &OptimConfig {
        &self.optim
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Synchronised BatchNorm is not implemented on the GPU yet: a step with it on and more
    /// than one rank is refused (one rank computes the same either way).
    pub fn set_sync_batch_norm(&mut self, on: bool) {
        self.sync_batch_norm = on;
    }

    fn check_inputs(&self, real: Option<&Tensor>, z: &Tensor) -> Result<usize, KernelError> {
        let n = z.shape().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(KernelError::Config("the batch is empty".into()));
        }
        if n > self.max_batch {
            return Err(KernelError::Config(format!(
                "a batch of {n} images is larger than the {} this GPU GAN was built for",
                self.max_batch
            )));
        }
        z.expect_shape("noise z", &[n, self.model.nz, 1, 1])?;
        if let Some(real) = real {
            let s = self.model.image_size;
            real.expect_shape("real batch", &[n, self.model.nc, s, s])?;
        }
        Ok(n)
    }

    /// Copies `z` (and `real`) to the GPU and transposes them to channel-major.
    fn upload(&mut self, real: Option<&Tensor>, z: &Tensor, n: usize) -> Result<(), KernelError> {
        let gpu = &*self.gpu;
        let stream = gpu.stream();
        if let Some(real) = real {
            let len = real.len();
            let s = self.model.image_size;
            stream.memcpy_htod(real.data(), &mut self.real_nchw.slice_mut(..len)).or_cuda("uploading the batch")?;
            let src = self.real_nchw.slice(..len);
            ops::swap_leading_axes(gpu, &src, n, self.model.nc, s * s, &mut self.real_cnhw.slice_mut(..len))?;
        }
        let len = z.len();
        stream.memcpy_htod(z.data(), &mut self.z_nchw.slice_mut(..len)).or_cuda("uploading the noise")?;
        ops::swap_leading_axes(gpu, &self.z_nchw.slice(..len), n, self.model.nz, 1, &mut self.z_cnhw.slice_mut(..len))
    }

    /// One training step, as [`Gan::train_step`]: D on the real batch with label 1 and on
    /// G(z).detach() with label 0, gradients averaged, Adam on D; then D(G(z)) with label 1
    /// back-propagated through D (input gradient only) into G, averaged, Adam on G.
    ///
    /// `real` is NCHW in [-1, 1], `z` is [n, nz, 1, 1], n at most [`CudaGan::max_batch`];
    /// `share` weighs this rank's gradients and carries its vote (see [`Gan::train_step`]).
    /// The gradients always go through `collective`, even at one rank (a single-rank NCCL
    /// communicator reduces for real). The only host synchronisation is the collective's wait
    /// for the step's end; `all_reduce_seconds` is measured with CUDA events around the
    /// reductions (0 with drivers older than CUDA 12.8).
    pub fn train_step(
        &mut self,
        real: &Tensor,
        z: &Tensor,
        share: impl Into<StepShare>,
        collective: &mut dyn DeviceCollective,
    ) -> Result<StepStats, KernelError> {
        let start = Instant::now();
        let share = share.into();
        let n = self.check_inputs(Some(real), z)?;
        let world = collective.world_size();
        if self.sync_batch_norm && world > 1 {
            return Err(KernelError::Config(
                "synchronised BatchNorm is not implemented on the CUDA backend: train without --sync-bn, or on \
                 the CPU"
                    .into(),
            ));
        }
        self.gpu.bind_to_thread()?;
        self.upload(Some(real), z, n)?;
        let gpu = &*self.gpu;
        let train = BnMode::Train { update_running: true };
        let real_len = real.len();

        // D on real, label 1.
        self.d.zero_grads(gpu)?;
        self.d.forward(gpu, &self.real_cnhw.slice(..real_len), n, train)?;
        loss(gpu, &self.d, n, 1.0, &mut self.logit_grad, &mut self.stats, 0)?;
        self.d.backward(gpu, &self.logit_grad.slice(..n), true, false)?;

        // D on G(z).detach(), label 0.
        self.g.forward(gpu, &self.z_cnhw.slice(..z.len()), n, train)?;
        self.d.forward(gpu, &self.g.output(), n, train)?;
        loss(gpu, &self.d, n, 0.0, &mut self.logit_grad, &mut self.stats, 1)?;
        self.d.backward(gpu, &self.logit_grad.slice(..n), true, false)?;
        let d_params = self.d.params.len();
        let mut d_grads = self.d.grads.slice_mut(..d_params);
        reduce(gpu, &mut d_grads, share.grad_weight, None, collective, &self.events[..2])?;
        self.d.adam_step(gpu, &self.optim)?;

        // G through D, label 1.
        self.g.zero_grads(gpu)?;
        self.d.forward(gpu, &self.g.output(), n, train)?;
        loss(gpu, &self.d, n, 1.0, &mut self.logit_grad, &mut self.stats, 2)?;
        self.d.backward(gpu, &self.logit_grad.slice(..n), false, true)?;
        self.g.backward(gpu, &self.d.input_grad(), true, false)?;
        // The vote rides in the generator's gradient buffer's extra slot, and is copied out
        // beside the losses, so it costs no transfer of its own.
        let mut g_grads = self.g.grads.as_view_mut();
        reduce(gpu, &mut g_grads, share.grad_weight, Some(share.vote), collective, &self.events[2..4])?;
        let g_params = self.g.params.len();
        let vote = self.g.grads.slice(g_params..g_params + 1);
        gpu.stream().memcpy_dtod(&vote, &mut self.stats.slice_mut(6..7)).or_cuda("copying the vote")?;
        self.g.adam_step(gpu, &self.optim)?;

        self.events[4].record(gpu.stream()).or_cuda("recording the step's end")?;
        collective.wait(&self.events[4]).map_err(KernelError::Collective)?;
        gpu.stream().memcpy_dtoh(&self.stats, &mut self.stats_host).or_cuda("reading the losses")?;
        // cudarc's CUDA 13 bindings time events with cuEventElapsedTime_v2, which drivers older
        // than 12.8 lack (cudarc would panic): those report no all-reduce time.
        let all_reduce_seconds = if self.gpu.info().driver_cuda_version >= 12080 {
            let ms = |a: &CudaEvent, b: &CudaEvent| a.elapsed_ms(b).or_cuda("timing the all-reduce");
            (ms(&self.events[0], &self.events[1])? + ms(&self.events[2], &self.events[3])?) as f64 / 1e3
        } else {
            0.0
        };
        let total = start.elapsed().as_secs_f64();
        let st = &self.stats_host;
        Ok(StepStats {
            loss_d: st[0] + st[2],
            loss_g: st[4],
            d_x: st[1],
            d_g_z1: st[3],
            d_g_z2: st[5],
            compute_seconds: (total - all_reduce_seconds).max(0.0),
            all_reduce_seconds,
            vote: st[6],
        })
    }

    /// Images G makes from `z` (NCHW, in [-1, 1]) with the batch's own statistics, leaving the
    /// running statistics alone, as [`Gan::generate`].
    pub fn generate(&mut self, z: &Tensor) -> Result<Tensor, KernelError> {
        self.generate_with(z, BnMode::Train { update_running: false })
    }

    /// Images from `z` with the running statistics, as [`Gan::generate_eval`].
    pub fn generate_eval(&mut self, z: &Tensor) -> Result<Tensor, KernelError> {
        self.generate_with(z, BnMode::Eval)
    }

    fn generate_with(&mut self, z: &Tensor, mode: BnMode) -> Result<Tensor, KernelError> {
        let n = self.check_inputs(None, z)?;
        self.gpu.bind_to_thread()?;
        self.upload(None, z, n)?;
        let gpu = &*self.gpu;
        self.g.forward(gpu, &self.z_cnhw.slice(..z.len()), n, mode)?;
        let s = self.model.image_size;
        let len = n * self.model.nc * s * s;
        ops::swap_leading_axes(gpu, &self.g.output(), self.model.nc, n, s * s, &mut self.real_nchw.slice_mut(..len))?;
        let images = gpu.download(&self.real_nchw.slice(..len))?;
        Tensor::new(vec![n, self.model.nc, s, s], images)
    }
}

/// BCE of D's last output against `target`: the gradient into `grad`, `[loss, mean D output]`
/// into `stats[2 * slot..]`.
fn loss(
    gpu: &Gpu,
    d: &CudaNet,
    n: usize,
    target: f32,
    grad: &mut CudaSlice<f32>,
    stats: &mut CudaSlice<f32>,
    slot: usize,
) -> Result<(), KernelError> {
    ops::bce_with_logits(
        gpu,
        &d.output(),
        n,
        target,
        &mut grad.slice_mut(..n),
        &mut stats.slice_mut(2 * slot..2 * slot + 2),
    )
}

/// Scales this rank's gradients (all of `grads` but the last slot when a `vote` rides in it)
/// by its share of the global batch, then averages them, between two recorded events. Always
/// through the collective: [`SingleGpu`](super::SingleGpu)'s is the identity, and a one-rank NCCL
/// communicator is exercised for real.
fn reduce(
    gpu: &Gpu,
    grads: &mut CudaViewMut<'_, f32>,
    weight: f32,
    vote: Option<f32>,
    coll: &mut dyn DeviceCollective,
    events: &[CudaEvent],
) -> Result<(), KernelError> {
    events[0].record(gpu.stream()).or_cuda("recording an event")?;
    let len = grads.len();
    let weighted = if vote.is_some() { len.saturating_sub(1) } else { len };
    if weight != 1.0 {
        ops::scale(gpu, &mut grads.slice_mut(..weighted), weight)?;
    }
    if let Some(vote) = vote {
        gpu.stream().memcpy_htod(&[vote], &mut grads.slice_mut(weighted..len)).or_cuda("placing the vote")?;
    }
    coll.all_reduce_mean(grads).map_err(KernelError::Collective)?;
    events[1].record(gpu.stream()).or_cuda("recording an event")
}
