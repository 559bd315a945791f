//! The generator, the discriminator and their optimisers: one DCGAN training step, split the
//! way data parallelism needs it (backward, then the collective, then Adam).

use std::hash::{Hash, Hasher};
use std::time::Instant;

use crate::collective::Collective;
use crate::models;
use crate::net::Net;
use crate::ops::batchnorm::BnMode;
use crate::ops::loss::bce_with_logits;
use crate::tensor::swap_leading_axes;
use crate::{CheckpointFiles, KernelError, ModelConfig, OptimConfig, Precision, Tensor, TrainingState};

/// What one training step reports, with the PyTorch example's names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    /// errD = errD_real + errD_fake.
    pub loss_d: f32,
    /// errG, the non-saturating generator loss.
    pub loss_g: f32,
    /// Mean D(x) on the real batch.
    pub d_x: f32,
    /// Mean D(G(z)) before D's update.
    pub d_g_z1: f32,
    /// Mean D(G(z)) after D's update.
    pub d_g_z2: f32,
    /// Wall time of the step less the time in the collective.
    pub compute_seconds: f64,
    /// Wall time spent averaging gradients (and BatchNorm statistics with sync-BN).
    pub all_reduce_seconds: f64,
    /// The mean over the ranks of [`StepShare::vote`]: the value that rode in the generator's
    /// gradient average (this rank's own vote with one rank).
    pub vote: f32,
}

/// What a rank brings to a step besides its batch: the weight of its gradients, and one value
/// that is averaged over the ranks with the generator's gradients (the workers' clean-stop
/// vote), so that agreeing on it costs no reduction of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepShare {
    /// Scales this rank's gradients before they are averaged: local_n * world / global_n, 1
    /// when every rank has the same batch, so that uneven last batches still give the global
    /// mean.
    pub grad_weight: f32,
    /// Averaged over the ranks as is (not weighted); comes back in [`StepStats::vote`].
    pub vote: f32,
}

impl From<f32> for StepShare {
    /// A share with this gradient weight and no vote.
    fn from(grad_weight: f32) -> Self {
        Self { grad_weight, vote: 0.0 }
    }
}

/// Generator and discriminator with their Adam states.
#[derive(Clone, Debug)]
pub struct Gan {
    pub(crate) model: ModelConfig,
    pub(crate) optim: OptimConfig,
    pub(crate) g: Net,
    pub(crate) d: Net,
    sync_batch_norm: bool,
    real_cnhw: Vec<f32>,
    z_cnhw: Vec<f32>,
    d_logits: Vec<f32>,
    fake_grad: Vec<f32>,
}

/// A collective that measures how long its calls take, for the step's time breakdown.
struct Timed<'a> {
    inner: &'a mut dyn Collective,
    seconds: f64,
}

impl Collective for Timed<'_> {
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), crate::CollectiveError> {
        let t = Instant::now();
        let r = self.inner.all_reduce_sum(buf);
        self.seconds += t.elapsed().as_secs_f64();
        r
    }
}

impl Gan {
    /// Builds both networks with the DCGAN initialisation drawn from `seed`: every rank that
    /// uses the same seed starts from the same weights, with no broadcast.
    pub fn new(model: ModelConfig, optim: OptimConfig, seed: u64) -> Result<Self, KernelError> {
        let mut gan = Self::uninitialised(model, optim)?;
        models::initialise(&mut gan.g, seed, 0);
        models::initialise(&mut gan.d, seed, 1);
        Ok(gan)
    }

    /// Both networks with zero parameters, to be filled from a checkpoint.
    pub(crate) fn uninitialised(model: ModelConfig, optim: OptimConfig) -> Result<Self, KernelError> {
        model.validate()?;
        optim.validate()?;
        Ok(Self {
            g: models::generator(&model),
            d: models::discriminator(&model),
            model,
            optim,
            sync_batch_norm: false,
            real_cnhw: Vec::new(),
            z_cnhw: Vec::new(),
            d_logits: Vec::new(),
            fake_grad: Vec::new(),
        })
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    pub fn optim_config(&self) -> &OptimConfig {
        &self.optim
    }

    /// With sync-BN on, BatchNorm statistics are all-reduced across ranks in every training
    /// forward, so N workers with batch B/N compute what one worker with batch B does.
    pub fn set_sync_batch_norm(&mut self, on: bool) {
        self.sync_batch_norm = on;
    }

    pub fn sync_batch_norm(&self) -> bool {
        self.sync_batch_norm
    }

    /// The precision of both networks' convolution products; refused where the CPU cannot run
    /// it. Parameters, gradients and Adam's moments stay fp32 either way.
    pub fn set_precision(&mut self, precision: Precision) -> Result<(), KernelError> {
        precision.check_supported()?;
        self.g.set_precision(precision);
        self.d.set_precision(precision);
        Ok(())
    }

    pub fn precision(&self) -> Precision {
        self.g.precision()
    }

    /// Generator parameters, flat, in block order (weight, then BN gamma and beta).
    pub fn generator_params(&self) -> &[f32] {
        &self.g.params
    }

    pub fn discriminator_params(&self) -> &[f32] {
        &self.d.params
    }

    /// Gradients of the last step, before they were averaged and applied: D's, then G's.
    pub fn generator_grads(&self) -> &[f32] {
        &self.g.grads
    }

    pub fn discriminator_grads(&self) -> &[f32] {
        &self.d.grads
    }

    fn check_inputs(&self, real: Option<&Tensor>, z: &Tensor) -> Result<usize, KernelError> {
        let n = z.shape().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(KernelError::Config("the batch is empty".into()));
        }
        z.expect_shape("noise z", &[n, self.model.nz, 1, 1])?;
        if let Some(real) = real {
            let s = self.model.image_size;
            real.expect_shape("real batch", &[n, self.model.nc, s, s])?;
        }
        Ok(n)
    }

    /// One training step as the PyTorch example does it: D on the real batch with label 1 and on
    /// G(z).detach() with label 0, gradients averaged, Adam on D; then D(G(z)) with label 1
    /// back-propagated through D (input gradient only) into G, averaged, Adam on G.
    ///
    /// `real` is NCHW in [-1, 1] and `z` is [n, nz, 1, 1]; `share` says how this rank's
    /// gradients weigh in the average (a bare `f32` is a weight without a vote).
    pub fn train_step(
        &mut self,
        real: &Tensor,
        z: &Tensor,
        share: impl Into<StepShare>,
        collective: &mut dyn Collective,
    ) -> Result<StepStats, KernelError> {
        let start = Instant::now();
        let share = share.into();
        let grad_weight = share.grad_weight;
        let n = self.check_inputs(Some(real), z)?;
        let mut coll = Timed { inner: collective, seconds: 0.0 };
        let sync = self.sync_batch_norm && coll.world_size() > 1;
        let train = BnMode::Train { update_running: true };
        let err = KernelError::Collective;
        let s = self.model.image_size;
        self.real_cnhw.resize(real.len(), 0.0);
        swap_leading_axes(real.data(), n, self.model.nc, s * s, &mut self.real_cnhw);
        self.z_cnhw.resize(z.len(), 0.0);
        swap_leading_axes(z.data(), n, self.model.nz, 1, &mut self.z_cnhw);

        // Each phase is a tracing span (free when no subscriber listens), so a trace of a step
        // shows where its time went on every rank.
        use tracing::info_span as phase;

        // D on real, label 1. G and D take turns with one scratch buffer (at DCGAN-64 batch
        // 256 each needs 256 MB of it).
        self.d.take_scratch_from(&mut self.g);
        self.d.zero_grads();
        let logits = phase!("d_forward", batch = "real")
            .in_scope(|| self.d.forward(&self.real_cnhw, n, train, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?;
        self.d_logits.resize(n, 0.0);
        let (loss_real, d_x) = bce_with_logits(logits, 1.0, &mut self.d_logits);
        phase!("d_backward", batch = "real")
            .in_scope(|| self.d.backward(&self.d_logits, true, false, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?;

        // D on G(z).detach(), label 0.
        self.g.take_scratch_from(&mut self.d);
        phase!("g_forward")
            .in_scope(|| self.g.forward(&self.z_cnhw, n, train, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?;
        self.d.take_scratch_from(&mut self.g);
        let fake = self.g.blocks.last().map(|b| b.output()).unwrap_or_default();
        let logits = phase!("d_forward", batch = "fake")
            .in_scope(|| self.d.forward(fake, n, train, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?;
        let (loss_fake, d_g_z1) = bce_with_logits(logits, 0.0, &mut self.d_logits);
        phase!("d_backward", batch = "fake")
            .in_scope(|| self.d.backward(&self.d_logits, true, false, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?;
        phase!("all_reduce", net = "d").in_scope(|| reduce(&mut self.d.grads, grad_weight, &mut coll))?;
        phase!("optimizer", net = "d").in_scope(|| self.d.adam.step(&self.optim, &mut self.d.params, &self.d.grads));

        // G through D, label 1.
        self.g.zero_grads();
        let fake = self.g.blocks.last().map(|b| b.output()).unwrap_or_default();
        let logits = phase!("d_forward", batch = "fake_for_g")
            .in_scope(|| self.d.forward(fake, n, train, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?;
        let (loss_g, d_g_z2) = bce_with_logits(logits, 1.0, &mut self.d_logits);
        let d_fake = phase!("d_backward", batch = "fake_for_g")
            .in_scope(|| self.d.backward(&self.d_logits, false, true, sync.then_some(&mut coll as &mut dyn Collective)))
            .map_err(err)?
            .unwrap_or_default();
        self.fake_grad.clear();
        self.fake_grad.extend_from_slice(d_fake);
        self.g.take_scratch_from(&mut self.d);
        phase!("g_backward")
            .in_scope(|| {
                self.g.backward(&self.fake_grad, true, false, sync.then_some(&mut coll as &mut dyn Collective))
            })
            .map_err(err)?;
        let vote =
            phase!("all_reduce", net = "g").in_scope(|| reduce_with_vote(&mut self.g.grads, share, &mut coll))?;
        phase!("optimizer", net = "g").in_scope(|| self.g.adam.step(&self.optim, &mut self.g.params, &self.g.grads));

        let total = start.elapsed().as_secs_f64();
        Ok(StepStats {
            loss_d: loss_real + loss_fake,
            loss_g,
            d_x,
            d_g_z1,
            d_g_z2,
            compute_seconds: total - coll.seconds,
            all_reduce_seconds: coll.seconds,
            vote,
        })
    }

    /// Images G makes from `z` (NCHW, in [-1, 1]) with the batch's own statistics, as the
    /// example's `netG(fixed_noise)` in training mode, but leaving the running statistics alone
    /// so that looking at samples never changes the run.
    pub fn generate(&mut self, z: &Tensor) -> Result<Tensor, KernelError> {
        self.generate_with(z, BnMode::Train { update_running: false })
    }

    /// Images from `z` with the running statistics, as `netG.eval()`.
    pub fn generate_eval(&mut self, z: &Tensor) -> Result<Tensor, KernelError> {
        self.generate_with(z, BnMode::Eval)
    }

    fn generate_with(&mut self, z: &Tensor, mode: BnMode) -> Result<Tensor, KernelError> {
        let n = self.check_inputs(None, z)?;
        let mut zc = vec![0.0; z.len()];
        swap_leading_axes(z.data(), n, self.model.nz, 1, &mut zc);
        let out = self.g.forward(&zc, n, mode, None).map_err(KernelError::Collective)?;
        let s = self.model.image_size;
        let mut images = vec![0.0; out.len()];
        swap_leading_axes(out, self.model.nc, n, s * s, &mut images);
        Tensor::new(vec![n, self.model.nc, s, s], images)
    }

    /// D's logits for NCHW images, with running statistics (eval mode).
    pub fn discriminate_eval(&mut self, images: &Tensor) -> Result<Vec<f32>, KernelError> {
        let s = self.model.image_size;
        let n = images.shape().first().copied().unwrap_or(0);
        images.expect_shape("images", &[n, self.model.nc, s, s])?;
        let mut xc = vec![0.0; images.len()];
        swap_leading_axes(images.data(), n, self.model.nc, s * s, &mut xc);
        Ok(self.d.forward(&xc, n, BnMode::Eval, None).map_err(KernelError::Collective)?.to_vec())
    }

    /// The generator, for inspection (feature maps, hooks) by the research tools.
    pub fn generator_net(&mut self) -> &mut Net {
        &mut self.g
    }

    /// The discriminator, for inspection (features, guided backpropagation).
    pub fn discriminator_net(&mut self) -> &mut Net {
        &mut self.d
    }

    /// A fingerprint of both networks' parameters and Adam states, bit for bit. These are the
    /// same on every rank of a data-parallel run (every rank applies the same averaged update),
    /// so ranks whose fingerprints differ have diverged.
    pub fn parameter_checksum(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for net in [&self.g, &self.d] {
            for v in net.params.iter().chain(&net.adam.exp_avg).chain(&net.adam.exp_avg_sq) {
                v.to_bits().hash(&mut h);
            }
            net.adam.step.hash(&mut h);
        }
        h.finish()
    }

    /// [`Gan::parameter_checksum`] plus every BatchNorm buffer. Ranks agree on these only when
    /// they normalise with the same statistics: one rank, or synchronised BatchNorm; with
    /// per-rank statistics (the default, as in DDP) each rank's running averages follow its own
    /// batches.
    pub fn state_checksum(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.parameter_checksum().hash(&mut h);
        for net in [&self.g, &self.d] {
            for bn in net.batch_norms() {
                bn.running_mean.iter().chain(&bn.running_var).for_each(|v| v.to_bits().hash(&mut h));
                bn.num_batches_tracked.hash(&mut h);
            }
        }
        h.finish()
    }

    pub fn save(&self, state: &TrainingState) -> Result<CheckpointFiles, KernelError> {
        crate::checkpoint::save(self, state)
    }

    pub fn load(files: &CheckpointFiles) -> Result<(Self, TrainingState), KernelError> {
        crate::checkpoint::load(files)
    }
}

/// Scales this rank's gradients by its share of the global batch, then averages them.
fn reduce(grads: &mut [f32], weight: f32, coll: &mut dyn Collective) -> Result<(), KernelError> {
    if coll.world_size() <= 1 {
        return Ok(());
    }
    if weight != 1.0 {
        grads.iter_mut().for_each(|g| *g *= weight);
    }
    coll.all_reduce_mean(grads).map_err(KernelError::Collective)
}

/// [`reduce`] with `share.vote` appended to the gradients for the length of the average (after
/// the weighting, which must not touch it); returns the vote's mean over the ranks. The buffer
/// keeps the extra slot's capacity, so only the first step grows it.
fn reduce_with_vote(grads: &mut Vec<f32>, share: StepShare, coll: &mut dyn Collective) -> Result<f32, KernelError> {
    if coll.world_size() <= 1 {
        return Ok(share.vote);
    }
    if share.grad_weight != 1.0 {
        grads.iter_mut().for_each(|g| *g *= share.grad_weight);
    }
    grads.push(share.vote);
    let averaged = coll.all_reduce_mean(grads);
    let vote = grads.pop().unwrap_or_default();
    averaged.map_err(KernelError::Collective)?;
    Ok(vote)
}
