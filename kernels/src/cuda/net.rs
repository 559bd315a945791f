//! A network on the device: the twin of [`crate::net::Net`], with the same block layout, its
//! parameters, gradients and Adam moments in one flat device buffer each, and every workspace
//! allocated once, for the largest batch, when it is built.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView};

use super::OrCuda;
use super::device::Gpu;
use super::ops::{self, BnBuffers, BnGradBuffers};
use crate::KernelError;
use crate::OptimConfig;
use crate::net::{ConvKind, Net};
use crate::ops::activation::Activation;
use crate::ops::batchnorm::BnMode;
use crate::ops::conv::{ConvGrads, ConvShape};
use crate::ops::im2col::Geometry;

/// One block's place in the flat buffers and its sizes (copied from the CPU [`Net`]).
#[derive(Clone, Debug)]
struct Plan {
    kind: ConvKind,
    shape: ConvShape,
    in_side: usize,
    out_side: usize,
    weight: Range<usize>,
    /// gamma then beta, adjacent: `gamma.start..beta.end`.
    gamma_beta: Option<Range<usize>>,
    activation: Activation,
}

impl Plan {
    fn in_len(&self, batch: usize) -> usize {
        self.shape.in_channels * batch * self.in_side * self.in_side
    }
    fn out_len(&self, batch: usize) -> usize {
        self.shape.out_channels * batch * self.out_side * self.out_side
    }
    /// Values per channel of the output (N*H*W).
    fn per_channel(&self, batch: usize) -> usize {
        batch * self.out_side * self.out_side
    }
    fn geometry(&self, batch: usize) -> Geometry {
        let p = self.shape.on(batch, self.in_side);
        match self.kind {
            ConvKind::Conv => p.conv_geometry(),
            ConvKind::Transposed => p.conv_transpose_geometry(),
        }
    }
}

/// One BatchNorm's device state.
struct DeviceBn {
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    num_batches_tracked: i64,
    /// Normalised input of the last training forward, for backward.
    xhat: CudaSlice<f32>,
    /// `[mean (C), inv_std (C)]` of the last training forward.
    saved: CudaSlice<f32>,
}

/// A network on the GPU. See the module documentation.
pub struct CudaNet {
    plans: Vec<Plan>,
    bns: Vec<Option<DeviceBn>>,
    pub(crate) params: CudaSlice<f32>,
    /// The parameters' gradients, and one slot more: a value the ranks average with them (the
    /// clean-stop vote, see [`crate::StepShare`]) rides there at no extra reduction.
    pub(crate) grads: CudaSlice<f32>,
    exp_avg: CudaSlice<f32>,
    exp_avg_sq: CudaSlice<f32>,
    adam_step: u64,
    max_batch: usize,
    batch: usize,
    /// A copy of the last input, when the first block is transposed (its weight gradient reads
    /// the input again; a strided convolution keeps its unrolled input in `cols` instead).
    input: Option<CudaSlice<f32>>,
    /// Each block's output after its activation, (C, N*H*W).
    outs: Vec<CudaSlice<f32>>,
    /// Each strided convolution's unrolled input, kept for its weight gradient.
    cols: Vec<Option<CudaSlice<f32>>>,
    scratch: CudaSlice<f32>,
    /// The BatchNorm reductions' partial sums, shared by the layers (they run one after
    /// another on the one stream), sized for the largest layer at `max_batch`.
    bn_scratch: CudaSlice<f64>,
    grad_a: CudaSlice<f32>,
    grad_b: CudaSlice<f32>,
}

impl CudaNet {
    /// Uploads `net` (parameters, gradients, Adam state, BatchNorm running statistics) and
    /// allocates every workspace for batches of up to `max_batch` images.
    pub fn from_net(gpu: &Gpu, net: &Net, max_batch: usize) -> Result<Self, KernelError> {
        if max_batch == 0 {
            return Err(KernelError::Config("the GPU's maximum batch must be at least 1".into()));
        }
        let plans: Vec<Plan> = net
            .blocks
            .iter()
            .map(|b| Plan {
                kind: b.kind,
                shape: b.shape,
                in_side: b.in_side,
                out_side: b.out_side,
                weight: b.weight.clone(),
                gamma_beta: b.bn.as_ref().map(|bn| bn.gamma.start..bn.beta.end),
                activation: b.activation,
            })
            .collect();
        let mut bns = Vec::with_capacity(plans.len());
        let mut bn_scratch_len = 1;
        for (plan, block) in plans.iter().zip(&net.blocks) {
            if block.bn.is_some() {
                // Non-decreasing in M, so enough for every smaller batch too.
                bn_scratch_len =
                    bn_scratch_len.max(ops::bn_scratch_len(plan.shape.out_channels, plan.per_channel(max_batch)));
            }
            bns.push(match &block.bn {
                Some(bn) => Some(DeviceBn {
                    running_mean: gpu.upload(&bn.layer.running_mean)?,
                    running_var: gpu.upload(&bn.layer.running_var)?,
                    num_batches_tracked: bn.layer.num_batches_tracked,
                    xhat: gpu.zeros(plan.out_len(max_batch))?,
                    saved: gpu.zeros(2 * plan.shape.out_channels)?,
                }),
                None => None,
            });
        }
        let first = plans.first().ok_or_else(|| KernelError::Config("a network needs at least one block".into()))?;
        let input = match first.kind {
            ConvKind::Transposed => Some(gpu.zeros(first.in_len(max_batch))?),
            ConvKind::Conv => None,
        };
        let mut outs = Vec::with_capacity(plans.len());
        let mut cols = Vec::with_capacity(plans.len());
        let (mut scratch_len, mut grad_len) = (1, first.in_len(max_batch));
        for p in &plans {
            outs.push(gpu.zeros(p.out_len(max_batch))?);
            let g = p.geometry(max_batch);
            cols.push(match p.kind {
                ConvKind::Conv => Some(gpu.zeros(g.rows() * g.cols())?),
                ConvKind::Transposed => None,
            });
            scratch_len = scratch_len.max(g.rows() * g.cols());
            grad_len = grad_len.max(p.out_len(max_batch)).max(p.in_len(max_batch));
        }
        Ok(Self {
            params: gpu.upload(&net.params)?,
            grads: gpu.upload(&[net.grads.as_slice(), &[0.0]].concat())?,
            exp_avg: gpu.upload(&net.adam.exp_avg)?,
            exp_avg_sq: gpu.upload(&net.adam.exp_avg_sq)?,
            adam_step: net.adam.step,
            plans,
            bns,
            max_batch,
            batch: 0,
            input,
            outs,
            cols,
            scratch: gpu.zeros(scratch_len)?,
            bn_scratch: gpu.stream().alloc_zeros(bn_scratch_len).or_cuda("allocating GPU memory")?,
            grad_a: gpu.zeros(grad_len)?,
            grad_b: gpu.zeros(grad_len)?,
        })
    }

    /// Downloads the state a checkpoint keeps into `net` (built from the same configuration):
    /// parameters, gradients, Adam's moments and step, BatchNorm running statistics.
    pub fn copy_to_net(&self, gpu: &Gpu, net: &mut Net) -> Result<(), KernelError> {
        if net.params.len() != self.params.len() || net.blocks.len() != self.plans.len() {
            return Err(KernelError::Shape {
                what: "network to copy the GPU's state into".into(),
                expected: vec![self.plans.len(), self.params.len()],
                got: vec![net.blocks.len(), net.params.len()],
            });
        }
        net.params = gpu.download(&self.params.as_view())?;
        net.grads = gpu.download(&self.param_grads())?;
        net.adam.exp_avg = gpu.download(&self.exp_avg.as_view())?;
        net.adam.exp_avg_sq = gpu.download(&self.exp_avg_sq.as_view())?;
        net.adam.step = self.adam_step;
        for (block, bn) in net.blocks.iter_mut().zip(&self.bns) {
            if let (Some(cpu), Some(dev)) = (block.bn.as_mut(), bn) {
                cpu.layer.running_mean = gpu.download(&dev.running_mean.as_view())?;
                cpu.layer.running_var = gpu.download(&dev.running_var.as_view())?;
                cpu.layer.num_batches_tracked = dev.num_batches_tracked;
            }
        }
        Ok(())
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Values the network's input holds per image.
    pub fn input_len_per_image(&self) -> usize {
        self.plans[0].in_len(1)
    }

    /// The parameters' gradients, without the extra slot.
    pub fn param_grads(&self) -> CudaView<'_, f32> {
        self.grads.slice(..self.params.len())
    }

    pub fn zero_grads(&mut self, gpu: &Gpu) -> Result<(), KernelError> {
        gpu.stream().memset_zeros(&mut self.grads).or_cuda("zeroing gradients")
    }

    /// Runs the network on `input` (C, N, H, W) for `batch` images; the result is
    /// [`CudaNet::output`]. Keeps what backward needs.
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        input: &CudaView<'_, f32>,
        batch: usize,
        mode: BnMode,
    ) -> Result<(), KernelError> {
        if batch == 0 || batch > self.max_batch {
            return Err(KernelError::Config(format!(
                "batch of {batch} images on a GPU network built for at most {}",
                self.max_batch
            )));
        }
        let in_len = self.plans[0].in_len(batch);
        if input.len() < in_len {
            return Err(KernelError::Shape {
                what: "network input".into(),
                expected: vec![in_len],
                got: vec![input.len()],
            });
        }
        self.batch = batch;
        if let Some(copy) = &mut self.input {
            gpu.stream().memcpy_dtod(&input.slice(..in_len), &mut copy.slice_mut(..in_len)).or_cuda("copying input")?;
        }
        for i in 0..self.plans.len() {
            let plan = &self.plans[i];
            let (before, rest) = self.outs.split_at_mut(i);
            let out_len = plan.out_len(batch);
            let mut y = rest[0].slice_mut(..out_len);
            let x = if i == 0 { input.slice(..in_len) } else { before[i - 1].slice(..plan.in_len(batch)) };
            let w = self.params.slice(plan.weight.clone());
            let p = plan.shape.on(batch, plan.in_side);
            match plan.kind {
                ConvKind::Conv => {
                    let cols = self.cols[i].as_mut().expect("a strided convolution has an unrolled-input buffer");
                    ops::conv2d_forward(gpu, &p, &x, &w, &mut cols.as_view_mut(), &mut y)?
                }
                ConvKind::Transposed => {
                    ops::conv_transpose2d_forward(gpu, &p, &x, &w, &mut self.scratch.as_view_mut(), &mut y)?
                }
            }
            if let (Some(range), Some(bn)) = (&plan.gamma_beta, &mut self.bns[i]) {
                let c = plan.shape.out_channels;
                let m = plan.per_channel(batch);
                let gamma_beta = self.params.slice(range.clone());
                match mode {
                    BnMode::Train { update_running } => {
                        ops::batchnorm_forward_train(
                            gpu,
                            c,
                            m,
                            &mut y,
                            &mut bn.xhat.slice_mut(..out_len),
                            BnBuffers {
                                gamma_beta: &gamma_beta,
                                saved: &mut bn.saved.as_view_mut(),
                                running_mean: &mut bn.running_mean.as_view_mut(),
                                running_var: &mut bn.running_var.as_view_mut(),
                                scratch: &mut self.bn_scratch.as_view_mut(),
                            },
                            update_running,
                        )?;
                        if update_running {
                            bn.num_batches_tracked += 1;
                        }
                    }
                    BnMode::Eval => ops::batchnorm_forward_eval(
                        gpu,
                        c,
                        m,
                        &mut y,
                        &gamma_beta,
                        &bn.running_mean.as_view(),
                        &bn.running_var.as_view(),
                    )?,
                }
            }
            ops::activation_forward(gpu, plan.activation, &mut y, out_len)?;
        }
        Ok(())
    }

    /// The last forward's output, (C, N*H*W).
    pub fn output(&self) -> CudaView<'_, f32> {
        let last = self.plans.len() - 1;
        self.outs[last].slice(..self.plans[last].out_len(self.batch))
    }

    /// Back-propagates `d_out` (the loss's gradient with respect to [`CudaNet::output`])
    /// through the last forward, as [`Net::backward`]: adds weight gradients into the flat
    /// gradient buffer when `weight_grads`, and leaves the input gradient in
    /// [`CudaNet::input_grad`] when `input_grad`.
    pub fn backward(
        &mut self,
        gpu: &Gpu,
        d_out: &CudaView<'_, f32>,
        weight_grads: bool,
        input_grad: bool,
    ) -> Result<(), KernelError> {
        let batch = self.batch;
        let last = self.plans.len() - 1;
        let out_len = self.plans[last].out_len(batch);
        if batch == 0 || d_out.len() < out_len {
            return Err(KernelError::Shape {
                what: "gradient of the network's output (after a forward)".into(),
                expected: vec![out_len],
                got: vec![d_out.len()],
            });
        }
        gpu.stream()
            .memcpy_dtod(&d_out.slice(..out_len), &mut self.grad_a.slice_mut(..out_len))
            .or_cuda("copying the output gradient")?;
        for i in (0..=last).rev() {
            let plan = &self.plans[i];
            let out_len = plan.out_len(batch);
            let in_len = plan.in_len(batch);
            {
                let mut dy = self.grad_a.slice_mut(..out_len);
                ops::activation_backward(gpu, plan.activation, &self.outs[i].slice(..out_len), &mut dy, out_len)?;
                if let (Some(range), Some(bn)) = (&plan.gamma_beta, &self.bns[i]) {
                    let gamma_beta = self.params.slice(range.clone());
                    let mut grads = self.grads.slice_mut(range.clone());
                    ops::batchnorm_backward(
                        gpu,
                        plan.shape.out_channels,
                        plan.per_channel(batch),
                        &mut dy,
                        BnGradBuffers {
                            xhat: &bn.xhat.slice(..out_len),
                            gamma_beta: &gamma_beta,
                            saved: &bn.saved.as_view(),
                            grad_gamma_beta: if weight_grads { Some(&mut grads) } else { None },
                            scratch: &mut self.bn_scratch.as_view_mut(),
                        },
                    )?;
                }
            }
            let need_dx = i > 0 || input_grad;
            let dy = self.grad_a.slice(..out_len);
            let w = self.params.slice(plan.weight.clone());
            let mut gw = self.grads.slice_mut(plan.weight.clone());
            let mut dx = self.grad_b.slice_mut(..in_len);
            let grads = ConvGrads {
                weight: if weight_grads { Some(&mut gw) } else { None },
                input: if need_dx { Some(&mut dx) } else { None },
            };
            let mut scratch = self.scratch.as_view_mut();
            let p = plan.shape.on(batch, plan.in_side);
            match plan.kind {
                ConvKind::Conv => {
                    let cols = self.cols[i].as_ref().expect("a strided convolution has an unrolled-input buffer");
                    let g = plan.geometry(batch);
                    let cols = cols.slice(..g.rows() * g.cols());
                    ops::conv2d_backward(gpu, &p, &dy, &w, &cols, grads, &mut scratch)?
                }
                ConvKind::Transposed => {
                    let x = match (i, &self.input) {
                        (0, Some(input)) => input.slice(..in_len),
                        (0, None) => unreachable!("a transposed first block keeps its input"),
                        _ => self.outs[i - 1].slice(..in_len),
                    };
                    ops::conv_transpose2d_backward(gpu, &p, &dy, &w, &x, grads, &mut scratch)?
                }
            }
            if !need_dx {
                return Ok(());
            }
            std::mem::swap(&mut self.grad_a, &mut self.grad_b);
        }
        Ok(())
    }

    /// The input gradient left by the last [`CudaNet::backward`] with `input_grad`, (C, N, H, W).
    pub fn input_grad(&self) -> CudaView<'_, f32> {
        self.grad_a.slice(..self.plans[0].in_len(self.batch))
    }

    /// One Adam update of the parameters from the gradients.
    pub fn adam_step(&mut self, gpu: &Gpu, cfg: &OptimConfig) -> Result<(), KernelError> {
        self.adam_step += 1;
        let n = self.params.len();
        ops::adam_step(
            gpu,
            cfg,
            self.adam_step,
            &mut self.params.as_view_mut(),
            &self.grads.slice(..n),
            &mut self.exp_avg.as_view_mut(),
            &mut self.exp_avg_sq.as_view_mut(),
        )
    }
}
