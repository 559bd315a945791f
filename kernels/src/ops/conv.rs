//! Convolution and transposed convolution (no bias) as GEMMs over the whole batch.
//!
//! Weights keep PyTorch's layouts: Conv2d `[out, in, k, k]`, ConvTranspose2d `[in, out, k, k]`,
//! so checkpoints need no reshuffling. Activations are channel-major (C, N, H, W).

use super::im2col::{Geometry, col2im, im2col};
use super::matmul::{Layout, matmul};
use tracing::trace_span;

/// Shape of one convolution layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn weight_len(&self) -> usize {
        self.in_channels * self.out_channels * self.kernel * self.kernel
    }

    /// Output side of a convolution reading `input` pixels per side.
    pub fn conv_output(&self, input: usize) -> usize {
        (input + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Output side of a transposed convolution reading `input` pixels per side.
    pub fn conv_transpose_output(&self, input: usize) -> usize {
        (input - 1) * self.stride + self.kernel - 2 * self.padding
    }
}

/// Conv2d forward: `y (OC, N*OH*OW) = W (OC, IC*k*k) x im2col(x)`; `cols` keeps the unrolled
/// input for the weight gradient.
pub fn conv2d_forward(
    s: &ConvShape,
    batch: usize,
    side: usize,
    x: &[f32],
    w: &[f32],
    cols: &mut Vec<f32>,
    y: &mut [f32],
) {
    let g = Geometry::for_conv(s.in_channels, batch, side, side, s.kernel, s.stride, s.padding);
    cols.resize(g.rows() * g.cols(), 0.0);
    im2col(&g, x, cols);
    matmul(s.out_channels, g.cols(), g.rows(), w, Layout::Normal, cols, Layout::Normal, y, false);
}

/// Conv2d backward. `gw += dy x cols^T` when `gw` is given; `dx = col2im(W^T x dy)` when `dx`
/// is given (`scratch` holds the unrolled input gradient).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    s: &ConvShape,
    batch: usize,
    side: usize,
    dy: &[f32],
    w: &[f32],
    cols: &[f32],
    gw: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) {
    let g = Geometry::for_conv(s.in_channels, batch, side, side, s.kernel, s.stride, s.padding);
    if let Some(gw) = gw {
        let _span = trace_span!("conv_backward_weight").entered();
        matmul(s.out_channels, g.rows(), g.cols(), dy, Layout::Normal, cols, Layout::Transposed, gw, true);
    }
    if let Some(dx) = dx {
        let _span = trace_span!("conv_backward_data").entered();
        scratch.resize(g.rows() * g.cols(), 0.0);
        matmul(g.rows(), g.cols(), s.out_channels, w, Layout::Transposed, dy, Layout::Normal, scratch, false);
        col2im(&g, scratch, dx);
    }
}

/// ConvTranspose2d forward: `y = col2im(W^T (OC*k*k, IC) x x (IC, N*H*W))`.
pub fn conv_transpose2d_forward(
    s: &ConvShape,
    batch: usize,
    side: usize,
    x: &[f32],
    w: &[f32],
    scratch: &mut Vec<f32>,
    y: &mut [f32],
) {
    let g = Geometry::for_conv_transpose(s.out_channels, batch, side, side, s.kernel, s.stride, s.padding);
    scratch.resize(g.rows() * g.cols(), 0.0);
    matmul(g.rows(), g.cols(), s.in_channels, w, Layout::Transposed, x, Layout::Normal, scratch, false);
    col2im(&g, scratch, y);
}

/// ConvTranspose2d backward: with `dcols = im2col(dy)`, `gw += x x dcols^T` and
/// `dx = W x dcols`.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward(
    s: &ConvShape,
    batch: usize,
    side: usize,
    dy: &[f32],
    w: &[f32],
    x: &[f32],
    gw: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) {
    let g = Geometry::for_conv_transpose(s.out_channels, batch, side, side, s.kernel, s.stride, s.padding);
    scratch.resize(g.rows() * g.cols(), 0.0);
    trace_span!("conv_backward_im2col").in_scope(|| im2col(&g, dy, scratch));
    if let Some(gw) = gw {
        let _span = trace_span!("conv_backward_weight").entered();
        matmul(s.in_channels, g.rows(), g.cols(), x, Layout::Normal, scratch, Layout::Transposed, gw, true);
    }
    if let Some(dx) = dx {
        let _span = trace_span!("conv_backward_data").entered();
        matmul(s.in_channels, g.cols(), g.rows(), w, Layout::Normal, scratch, Layout::Normal, dx, false);
    }
}
