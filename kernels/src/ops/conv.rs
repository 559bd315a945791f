//! Convolution and transposed convolution (no bias) as GEMMs over the whole batch.
//!
//! Weights keep PyTorch's layouts: Conv2d `[out, in, k, k]`, ConvTranspose2d `[in, out, k, k]`,
//! so checkpoints need no reshuffling. Activations are channel-major (C, N, H, W).

use super::im2col::{Geometry, col2im, im2col};
use super::matmul::{Layout, matmul, matmul_nt_split_k};
use rayon::prelude::*;
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

/// Where a convolution's backward finds the unrolled input its weight gradient reads.
#[derive(Clone, Copy, Debug)]
pub enum Unrolled<'a> {
    /// `cols` as the forward left it.
    Kept(&'a [f32]),
    /// The layer's input (C, N, H, W), unrolled again into `scratch`.
    Recompute(&'a [f32]),
}

/// Conv2d backward. `gw += dy x cols^T` when `gw` is given; `dx = col2im(W^T x dy)` when `dx`
/// is given. `scratch` holds the recomputed unrolled input, then the unrolled input gradient.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    s: &ConvShape,
    batch: usize,
    side: usize,
    dy: &[f32],
    w: &[f32],
    unrolled: Unrolled<'_>,
    gw: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) {
    let g = Geometry::for_conv(s.in_channels, batch, side, side, s.kernel, s.stride, s.padding);
    if let Some(gw) = gw {
        let _span = trace_span!("conv_backward_weight").entered();
        let tmp_len = s.out_channels * g.rows();
        match unrolled {
            Unrolled::Kept(cols) => {
                scratch.resize(tmp_len, 0.0);
                add_weight_gradient(s.out_channels, g.rows(), g.cols(), dy, cols, gw, scratch);
            }
            Unrolled::Recompute(x) => {
                let cols_len = g.rows() * g.cols();
                scratch.resize(cols_len + tmp_len, 0.0);
                let (cols, tmp) = scratch.split_at_mut(cols_len);
                im2col(&g, x, cols);
                add_weight_gradient(s.out_channels, g.rows(), g.cols(), dy, cols, gw, tmp);
            }
        }
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
    // The unrolled gradient, then room for the weight gradient's transposed product.
    let unrolled_len = g.rows() * g.cols();
    scratch.resize(unrolled_len + s.in_channels * g.rows(), 0.0);
    let (dcols, tmp) = scratch.split_at_mut(unrolled_len);
    trace_span!("conv_backward_im2col").in_scope(|| im2col(&g, dy, dcols));
    if let Some(gw) = gw {
        let _span = trace_span!("conv_backward_weight").entered();
        add_weight_gradient(s.in_channels, g.rows(), g.cols(), x, dcols, gw, tmp);
    }
    if let Some(dx) = dx {
        let _span = trace_span!("conv_backward_data").entered();
        matmul(s.in_channels, g.cols(), g.rows(), w, Layout::Normal, dcols, Layout::Normal, dx, false);
    }
}

/// `gw (m x n) += a (m x k) x b^T`, with `b` stored n x k: a weight gradient, whose k (every
/// output pixel of the batch) is long and whose m x n is small. The `gemm` crate runs such a
/// product 1.3-2x faster with the larger side as its rows (measured on DCGAN's layers, e.g.
/// 113 against 228 GFLOP/s for 128 x 1024 x 16384 on one core), so when `n > m` the transposed
/// product goes to `tmp` (at least n x m) and its transpose is added. Both products split `k`
/// between the threads ([`matmul_nt_split_k`]).
fn add_weight_gradient(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], gw: &mut [f32], tmp: &mut [f32]) {
    if n <= m {
        matmul_nt_split_k(m, n, k, a, b, gw);
        return;
    }
    let tmp = &mut tmp[..n * m];
    tmp.fill(0.0);
    matmul_nt_split_k(n, m, k, b, a, tmp);
    // gw[i][j] += tmp[j][i], in tiles that stay in L1 on both sides, rows of gw in parallel.
    const TILE: usize = 32;
    let tmp = &*tmp;
    gw[..m * n].par_chunks_mut(TILE * n).enumerate().for_each(|(bi, rows)| {
        let i0 = bi * TILE;
        for j0 in (0..n).step_by(TILE) {
            for (di, row) in rows.chunks_exact_mut(n).enumerate() {
                let i = i0 + di;
                for j in j0..(j0 + TILE).min(n) {
                    row[j] += tmp[j * m + i];
                }
            }
        }
    });
}
