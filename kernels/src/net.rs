//! A feed-forward stack of (convolution, optional BatchNorm, activation) blocks with its
//! parameters and their gradients in one flat buffer each, so that a collective can average all
//! of a network's gradients in one call and Adam can update them in one pass.

use std::ops::Range;
use tracing::trace_span;

use crate::Precision;
use crate::collective::{Collective, CollectiveError};
use crate::ops::activation::Activation;
use crate::ops::adam::Adam;
use crate::ops::batchnorm::{BatchNorm, BnMode};
use crate::ops::conv::{self, ConvGrads, ConvShape, Unrolled};

/// A strided convolution keeps its unrolled input from forward to backward up to this size
/// (DCGAN-64's largest at batch 64), which saves unrolling it again for the weight gradient.
/// Larger ones are unrolled again from the block's input, which the network keeps anyway: at
/// batch 256 D's kept unrolled inputs took 500 MB, and peak RSS rose above PyTorch's.
const KEEP_UNROLLED_MAX_BYTES: usize = 64 << 20;

/// Whether a block's convolution is strided (D) or fractional-strided (G).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKind {
    Conv,
    Transposed,
}

/// One block's BatchNorm: the layer, and where its affine parameters sit in the flat buffer.
#[derive(Clone, Debug)]
pub struct BnParams {
    pub layer: BatchNorm,
    pub gamma: Range<usize>,
    pub beta: Range<usize>,
}

/// Convolution, optional BatchNorm, activation: one step of the DCGAN ladder.
#[derive(Clone, Debug)]
pub struct Block {
    pub kind: ConvKind,
    pub shape: ConvShape,
    pub in_side: usize,
    pub out_side: usize,
    pub weight: Range<usize>,
    pub bn: Option<BnParams>,
    pub activation: Activation,
    /// Unrolled input (Conv only), kept from forward for the weight gradient when
    /// `keeps_unrolled`.
    cols: Vec<f32>,
    keeps_unrolled: bool,
    /// The block's output after the activation, (C, N*H*W).
    out: Vec<f32>,
}

impl Block {
    pub fn output(&self) -> &[f32] {
        &self.out
    }
}

/// Describes one block before the flat buffer is laid out.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    pub kind: ConvKind,
    pub shape: ConvShape,
    pub batch_norm: bool,
    pub activation: Activation,
}

/// A network: blocks, flat parameters and gradients, and its Adam state.
#[derive(Clone, Debug)]
pub struct Net {
    pub blocks: Vec<Block>,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    pub adam: Adam,
    input_side: usize,
    input: Vec<f32>,
    batch: usize,
    scratch: Vec<f32>,
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
    keep_unrolled_max_bytes: usize,
    precision: Precision,
}

impl Net {
    /// Lays out the blocks' parameters in order: each block's conv weight, then its BN gamma
    /// and beta. Parameters start at zero; the caller initialises them.
    pub fn new(input_side: usize, specs: &[BlockSpec]) -> Self {
        let mut offset = 0;
        let mut side = input_side;
        let mut blocks = Vec::with_capacity(specs.len());
        for spec in specs {
            let weight = offset..offset + spec.shape.weight_len();
            offset = weight.end;
            let bn = spec.batch_norm.then(|| {
                let c = spec.shape.out_channels;
                let gamma = offset..offset + c;
                let beta = gamma.end..gamma.end + c;
                offset = beta.end;
                BnParams { layer: BatchNorm::new(c), gamma, beta }
            });
            let out_side = match spec.kind {
                ConvKind::Conv => spec.shape.conv_output(side),
                ConvKind::Transposed => spec.shape.conv_transpose_output(side),
            };
            blocks.push(Block {
                kind: spec.kind,
                shape: spec.shape,
                in_side: side,
                out_side,
                weight,
                bn,
                activation: spec.activation,
                cols: Vec::new(),
                keeps_unrolled: false,
                out: Vec::new(),
            });
            side = out_side;
        }
        Self {
            blocks,
            params: vec![0.0; offset],
            grads: vec![0.0; offset],
            adam: Adam::new(offset),
            input_side,
            input: Vec::new(),
            batch: 0,
            scratch: Vec::new(),
            grad_a: Vec::new(),
            grad_b: Vec::new(),
            keep_unrolled_max_bytes: KEEP_UNROLLED_MAX_BYTES,
            precision: Precision::F32,
        }
    }

    /// Takes over `other`'s scratch buffer (the unrolled matrices, the largest buffers of a
    /// step), keeping the larger of the two and freeing the other: networks that never compute
    /// at the same time (G and D in a step) then share one instead of holding one each.
    pub fn take_scratch_from(&mut self, other: &mut Net) {
        let theirs = std::mem::take(&mut other.scratch);
        if theirs.capacity() > self.scratch.capacity() {
            self.scratch = theirs;
        }
    }

    /// The largest unrolled input a strided convolution keeps from forward to backward;
    /// larger ones are unrolled again for the weight gradient (less memory, one more im2col).
    pub fn set_keep_unrolled_max_bytes(&mut self, bytes: usize) {
        self.keep_unrolled_max_bytes = bytes;
    }

    /// The precision of the convolutions' products; the caller checks that the CPU supports it
    /// ([`Precision::check_supported`]).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn input_side(&self) -> usize {
        self.input_side
    }

    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    /// Runs the network on `input` (C, N, H, W) and returns the last block's output
    /// (C, N*H*W). Keeps what backward needs.
    pub fn forward(
        &mut self,
        input: &[f32],
        batch: usize,
        mode: BnMode,
        sync: Option<&mut (dyn Collective + '_)>,
    ) -> Result<&[f32], CollectiveError> {
        self.forward_with_hook(input, batch, mode, sync, &mut |_, _| {})
    }

    /// [`Net::forward`], calling `hook(block, output)` on each block's output (C, N*H*W) after
    /// its activation, before the next block reads it: for inspecting or editing feature maps
    /// (the paper's removal of generator filters).
    pub fn forward_with_hook(
        &mut self,
        input: &[f32],
        batch: usize,
        mode: BnMode,
        mut sync: Option<&mut (dyn Collective + '_)>,
        hook: &mut dyn FnMut(usize, &mut [f32]),
    ) -> Result<&[f32], CollectiveError> {
        let first = &self.blocks[0];
        assert_eq!(
            input.len(),
            first.shape.in_channels * batch * self.input_side * self.input_side,
            "network input size"
        );
        self.batch = batch;
        for block in &mut self.blocks {
            let unrolled_bytes =
                block.shape.in_channels * block.shape.kernel.pow(2) * batch * block.out_side.pow(2) * 4;
            block.keeps_unrolled = block.kind == ConvKind::Conv && unrolled_bytes <= self.keep_unrolled_max_bytes;
            if !block.keeps_unrolled {
                block.cols = Vec::new();
            }
        }
        // A weight gradient reads the first block's input again only where nothing else keeps
        // it: a transposed convolution's, or a strided one's that does not keep its unrolling.
        self.input.clear();
        if !self.blocks[0].keeps_unrolled {
            self.input.extend_from_slice(input);
        }
        for i in 0..self.blocks.len() {
            let (before, rest) = self.blocks.split_at_mut(i);
            let block = &mut rest[0];
            let x: &[f32] = if i == 0 { input } else { &before[i - 1].out };
            let _block = block_span(i, block).entered();
            let out_len = block.shape.out_channels * batch * block.out_side * block.out_side;
            block.out.resize(out_len, 0.0);
            let w = &self.params[block.weight.clone()];
            let p = block.shape.on(batch, block.in_side);
            trace_span!("conv_forward").in_scope(|| match block.kind {
                ConvKind::Conv => {
                    let cols = if block.keeps_unrolled { &mut block.cols } else { &mut self.scratch };
                    conv::conv2d_forward(&p, x, w, cols, &mut block.out, self.precision)
                }
                ConvKind::Transposed => {
                    conv::conv_transpose2d_forward(&p, x, w, &mut self.scratch, &mut block.out, self.precision)
                }
            });
            if let Some(bn) = &mut block.bn {
                let gamma = &self.params[bn.gamma.clone()];
                let beta = &self.params[bn.beta.clone()];
                trace_span!("batch_norm_forward")
                    .in_scope(|| bn.layer.forward(&mut block.out, gamma, beta, mode, sync.as_deref_mut()))?;
            }
            trace_span!("activation_forward").in_scope(|| block.activation.forward_in_place(&mut block.out));
            hook(i, &mut block.out);
        }
        Ok(&self.blocks[self.blocks.len() - 1].out)
    }

    /// Back-propagates `d_out` (gradient of the loss with respect to the last block's output)
    /// through the last forward. Adds weight gradients into `grads` when `weight_grads`, and
    /// returns the input gradient (C, N, H, W) when `input_grad`. Work that neither needs is
    /// skipped: the first layer's input gradient in D's own step, D's weight gradients in G's.
    pub fn backward(
        &mut self,
        d_out: &[f32],
        weight_grads: bool,
        input_grad: bool,
        sync: Option<&mut (dyn Collective + '_)>,
    ) -> Result<Option<&[f32]>, CollectiveError> {
        let last = self.blocks.len() - 1;
        self.backward_from(last, d_out, weight_grads, input_grad, false, sync)
    }

    /// The input gradient of a quantity of block `block`'s output (`d_out`, the gradient with
    /// respect to that output) by guided backpropagation (Springenberg et al.), as the DCGAN
    /// paper used to show what D's features respond to: at each rectifier only positive
    /// gradients pass. No weight gradients are computed.
    pub fn guided_input_gradient(&mut self, block: usize, d_out: &[f32]) -> Result<&[f32], CollectiveError> {
        let g = self.backward_from(block, d_out, false, true, true, None)?;
        Ok(g.unwrap_or_default())
    }

    fn backward_from(
        &mut self,
        start: usize,
        d_out: &[f32],
        weight_grads: bool,
        input_grad: bool,
        guided: bool,
        mut sync: Option<&mut (dyn Collective + '_)>,
    ) -> Result<Option<&[f32]>, CollectiveError> {
        let batch = self.batch;
        self.grad_a.clear();
        self.grad_a.extend_from_slice(d_out);
        for i in (0..=start).rev() {
            let (before, rest) = self.blocks.split_at_mut(i);
            let block = &mut rest[0];
            assert_eq!(self.grad_a.len(), block.out.len(), "gradient size at block {i}");
            let _block = block_span(i, block).entered();
            trace_span!("activation_backward")
                .in_scope(|| block.activation.backward_in_place(&block.out, &mut self.grad_a));
            if guided && matches!(block.activation, Activation::Relu | Activation::LeakyRelu) {
                self.grad_a.iter_mut().for_each(|g| *g = g.max(0.0));
            }
            if let Some(bn) = &block.bn {
                let gamma_range = bn.gamma.clone();
                let (gamma_slice, gbeta_grads) = if weight_grads {
                    // gamma and beta are adjacent: split the grads buffer to borrow both.
                    let (g, b) = self.grads[gamma_range.start..bn.beta.end].split_at_mut(gamma_range.len());
                    (Some(g), Some(b))
                } else {
                    (None, None)
                };
                let grads = gamma_slice.zip(gbeta_grads);
                trace_span!("batch_norm_backward").in_scope(|| {
                    bn.layer.backward(&mut self.grad_a, &self.params[gamma_range], grads, sync.as_deref_mut())
                })?;
            }
            let x: &[f32] = if i == 0 { &self.input } else { &before[i - 1].out };
            let need_dx = i > 0 || input_grad;
            let in_len = block.shape.in_channels * batch * block.in_side * block.in_side;
            if need_dx {
                self.grad_b.resize(in_len, 0.0);
            }
            let w = &self.params[block.weight.clone()];
            let grads = ConvGrads {
                weight: if weight_grads { Some(&mut self.grads[block.weight.clone()]) } else { None },
                input: if need_dx { Some(&mut self.grad_b[..]) } else { None },
            };
            let p = block.shape.on(batch, block.in_side);
            match block.kind {
                ConvKind::Conv => conv::conv2d_backward(
                    &p,
                    &self.grad_a,
                    w,
                    if block.keeps_unrolled { Unrolled::Kept(&block.cols) } else { Unrolled::Recompute(x) },
                    grads,
                    &mut self.scratch,
                    self.precision,
                ),
                ConvKind::Transposed => {
                    conv::conv_transpose2d_backward(&p, &self.grad_a, w, x, grads, &mut self.scratch, self.precision)
                }
            }
            if !need_dx {
                return Ok(None);
            }
            std::mem::swap(&mut self.grad_a, &mut self.grad_b);
        }
        Ok(Some(&self.grad_a))
    }

    /// The running statistics of every BatchNorm, in block order.
    pub fn batch_norms(&self) -> impl Iterator<Item = &BatchNorm> {
        self.blocks.iter().filter_map(|b| b.bn.as_ref().map(|bn| &bn.layer))
    }
}

/// The span around one block's work: its index and what it is, for per-layer profiles
/// (`step_bench --profile`). TRACE level: free unless a subscriber asks for it.
fn block_span(index: usize, block: &Block) -> tracing::Span {
    let kind = match block.kind {
        ConvKind::Conv => "conv",
        ConvKind::Transposed => "convT",
    };
    tracing::trace_span!(
        "block",
        block = index,
        layer = %format_args!(
            "{kind} {}->{} {}->{}",
            block.shape.in_channels,
            block.shape.out_channels,
            block.in_side,
            block.out_side
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::models::discriminator_specs;

    /// A network that unrolls its inputs again in backward computes exactly what one that keeps
    /// them does: the same weight and input gradients, bit for bit.
    #[test]
    fn unrolling_again_gives_the_gradients_of_keeping() {
        let cfg = ModelConfig { image_size: 32, nc: 3, nz: 8, ngf: 8, ndf: 8 };
        let mut keeps = Net::new(32, &discriminator_specs(&cfg));
        keeps.params.iter_mut().enumerate().for_each(|(i, p)| *p = ((i * 37 % 101) as f32 - 50.0) * 1e-3);
        let mut unrolls_again = keeps.clone();
        unrolls_again.set_keep_unrolled_max_bytes(0);
        let batch = 4;
        let input: Vec<f32> = (0..3 * batch * 32 * 32).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 105.0).collect();
        let d_out: Vec<f32> = (0..batch).map(|i| i as f32 - 1.5).collect();
        let mut results = Vec::new();
        for net in [&mut keeps, &mut unrolls_again] {
            net.forward(&input, batch, BnMode::Train { update_running: true }, None).unwrap();
            let dx = net.backward(&d_out, true, true, None).unwrap().unwrap().to_vec();
            results.push((net.grads.clone(), dx));
        }
        assert!(keeps.blocks.iter().all(|b| b.keeps_unrolled));
        assert!(unrolls_again.blocks.iter().all(|b| !b.keeps_unrolled && b.cols.is_empty()));
        assert!(results[0].0.iter().any(|&g| g != 0.0), "the gradients must not be trivially zero");
        assert_eq!(results[0], results[1]);
    }
}
