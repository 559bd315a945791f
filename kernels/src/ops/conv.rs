//! Convolution and transposed convolution (no bias) as GEMMs over the whole batch.
//!
//! Weights keep PyTorch's layouts: Conv2d `[out, in, k, k]`, ConvTranspose2d `[in, out, k, k]`,
//! so checkpoints need no reshuffling. Activations are channel-major (C, N, H, W).

use super::bf16;
use super::im2col::{Geometry, col2im, col2im_images, folds_by_images, im2col};
use super::matmul::{Gemm, Operand, Output, Window};
use crate::Precision;
use rayon::prelude::*;
use std::cell::RefCell;
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

    /// This layer on `batch` square inputs of `side` pixels.
    pub fn on(self, batch: usize, side: usize) -> ConvParams {
        ConvParams { shape: self, batch, side }
    }
}

/// What one call of a convolution needs besides its buffers: the layer, and the batch and input
/// side it runs on (the batch changes from call to call, the layer does not). The CPU and CUDA
/// convolutions take the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams {
    pub shape: ConvShape,
    pub batch: usize,
    /// Side of the square input: the big side of a convolution, the small one of a transpose.
    pub side: usize,
}

impl ConvParams {
    /// The unrolling of a convolution: its input is the big side.
    pub fn conv_geometry(&self) -> Geometry {
        let s = &self.shape;
        Geometry::for_conv(s.in_channels, self.batch, self.side, self.side, s.kernel, s.stride, s.padding)
    }

    /// The unrolling of a transposed convolution: its output is the big side.
    pub fn conv_transpose_geometry(&self) -> Geometry {
        let s = &self.shape;
        Geometry::for_conv_transpose(s.out_channels, self.batch, self.side, self.side, s.kernel, s.stride, s.padding)
    }
}

/// The gradients a convolution's backward computes, each only when asked for: the weight
/// gradient is added into `weight`, the input gradient written to `input`. `D` is the buffer, a
/// slice here and a device view for [`crate::cuda::ops`].
#[derive(Debug)]
pub struct ConvGrads<'a, D: ?Sized = [f32]> {
    pub weight: Option<&'a mut D>,
    pub input: Option<&'a mut D>,
}

/// Conv2d forward: `y (OC, N*OH*OW) = W (OC, IC*k*k) x im2col(x)`; `cols` keeps the unrolled
/// input for the weight gradient.
pub fn conv2d_forward(p: &ConvParams, x: &[f32], w: &[f32], cols: &mut Vec<f32>, y: &mut [f32], precision: Precision) {
    let g = p.conv_geometry();
    cols.resize(g.rows() * g.cols(), 0.0);
    im2col(&g, x, cols);
    let s = Gemm { m: p.shape.out_channels, n: g.cols(), k: g.rows() };
    precision.matmul(s, Operand::normal(w), Operand::normal(cols), Output::overwrite(y));
}

/// Where a convolution's backward finds the unrolled input its weight gradient reads.
#[derive(Clone, Copy, Debug)]
pub enum Unrolled<'a> {
    /// `cols` as the forward left it.
    Kept(&'a [f32]),
    /// The layer's input (C, N, H, W), unrolled again into `scratch`.
    Recompute(&'a [f32]),
}

/// Conv2d backward. `gw += dy x cols^T` when `grads.weight` is given; `dx = col2im(W^T x dy)`
/// when `grads.input` is. `scratch` holds the recomputed unrolled input, then the unrolled input
/// gradient.
pub fn conv2d_backward(
    p: &ConvParams,
    dy: &[f32],
    w: &[f32],
    unrolled: Unrolled<'_>,
    grads: ConvGrads<'_>,
    scratch: &mut Vec<f32>,
    precision: Precision,
) {
    let s = &p.shape;
    let g = p.conv_geometry();
    let ConvGrads { weight: gw, input: dx } = grads;
    if let Some(gw) = gw {
        let _span = trace_span!("conv_backward_weight").entered();
        let tmp_len = s.out_channels * g.rows();
        let shape = Gemm { m: s.out_channels, n: g.rows(), k: g.cols() };
        match unrolled {
            Unrolled::Kept(cols) => {
                scratch.resize(tmp_len, 0.0);
                add_weight_gradient(shape, dy, cols, gw, scratch, precision);
            }
            Unrolled::Recompute(x) => {
                let cols_len = g.rows() * g.cols();
                scratch.resize(cols_len + tmp_len, 0.0);
                let (cols, tmp) = scratch.split_at_mut(cols_len);
                im2col(&g, x, cols);
                add_weight_gradient(shape, dy, cols, gw, tmp, precision);
            }
        }
    }
    if let Some(dx) = dx {
        let _span = trace_span!("conv_backward_data").entered();
        fold_product(&g, s.out_channels, w, dy, dx, scratch, precision);
    }
}

/// ConvTranspose2d forward: `y = col2im(W^T (OC*k*k, IC) x x (IC, N*H*W))`.
pub fn conv_transpose2d_forward(
    p: &ConvParams,
    x: &[f32],
    w: &[f32],
    scratch: &mut Vec<f32>,
    y: &mut [f32],
    precision: Precision,
) {
    fold_product(&p.conv_transpose_geometry(), p.shape.in_channels, w, x, y, scratch, precision);
}

/// `big = col2im(W^T x X)`, with W stored (inner x rows) and X (inner x cols): a convolution's
/// input gradient, or a transposed convolution's output. Where W is small, the product and its
/// fold run one block of images at a time on each thread, so the unrolled block is folded while
/// it is still in the core's cache instead of making a round trip through memory (64 MB at
/// DCGAN-64's 64->128 layer, batch 64); the result is the same, bit for bit. Elsewhere, one
/// product over the whole batch into `scratch`, then one fold.
fn fold_product(
    g: &Geometry,
    inner: usize,
    w: &[f32],
    x: &[f32],
    big: &mut [f32],
    scratch: &mut Vec<f32>,
    precision: Precision,
) {
    match images_per_fold_block(g, inner) {
        Some(images) => fold_product_by_blocks(g, inner, w, x, big, images, precision),
        None => {
            scratch.resize(g.rows() * g.cols(), 0.0);
            let s = Gemm { m: g.rows(), n: g.cols(), k: inner };
            precision.matmul(s, Operand::transposed(w), Operand::normal(x), Output::overwrite(scratch));
            col2im(g, scratch, big);
        }
    }
}

/// Largest weight matrix worth a block-by-block product: the `gemm` crate packs it again for
/// every block, which costs more than the cache saves beyond this (DCGAN's 128->256 layers, 2 MiB,
/// were slower in blocks; the 64->128 ones, 512 KiB, 15-30% faster).
const MAX_BLOCKED_WEIGHT_BYTES: usize = 1 << 20;

/// Size of a block's unrolled product: half of this machine class's 2 MiB L2.
const FOLD_BLOCK_BYTES: usize = 1 << 20;

/// How many images [`fold_product_by_blocks`] takes at a time, or `None` where the whole-batch
/// path is the faster one.
fn images_per_fold_block(g: &Geometry, inner: usize) -> Option<usize> {
    let weight_bytes = g.rows() * inner * size_of::<f32>();
    if !folds_by_images(g) || weight_bytes > MAX_BLOCKED_WEIGHT_BYTES {
        return None;
    }
    let image_bytes = g.rows() * g.small_h * g.small_w * size_of::<f32>();
    Some((FOLD_BLOCK_BYTES / image_bytes.max(1)).clamp(1, g.batch.max(1)))
}

fn fold_product_by_blocks(
    g: &Geometry,
    inner: usize,
    w: &[f32],
    x: &[f32],
    big: &mut [f32],
    images: usize,
    precision: Precision,
) {
    thread_local! {
        /// A block's unrolled product and the fold's phase planes, reused from call to call.
        static BLOCK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    assert_eq!(big.len(), g.big_len());
    assert!(x.len() >= inner * g.cols(), "input too short for {inner}x{}", g.cols());
    let segment = g.small_h * g.small_w;
    let out = TensorPtr(big.as_mut_ptr());
    (0..g.batch.div_ceil(images)).into_par_iter().for_each(|block| {
        let first = block * images;
        let count = images.min(g.batch - first);
        let width = count * segment;
        // Nothing inside calls into the pool, so no other task can run on this thread (and
        // borrow BLOCK) before this one returns.
        BLOCK.with_borrow_mut(|(cols, split)| {
            cols.resize(g.rows() * width, 0.0);
            let s = Gemm { m: g.rows(), n: width, k: inner };
            let block = Window { data: &x[first * segment..], row_stride: g.cols() };
            precision.matmul_column_block(s, Operand::transposed(w), block, cols);
            // SAFETY: `out` is `big`, of `g`'s shape (asserted); the blocks' images are disjoint.
            unsafe { col2im_images(g, cols, width, first, count, out.get(), split) }
        });
    });
}

/// The output tensor's address, shared by tasks that each write their own images' planes.
#[derive(Clone, Copy)]
struct TensorPtr(*mut f32);
// SAFETY: see `fold_product_by_blocks`: the tasks write disjoint planes.
unsafe impl Send for TensorPtr {}
unsafe impl Sync for TensorPtr {}
impl TensorPtr {
    /// A method, not the field, so closures capture the whole (Send) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// ConvTranspose2d backward: with `dcols = im2col(dy)`, `gw += x x dcols^T` and
/// `dx = W x dcols`.
pub fn conv_transpose2d_backward(
    p: &ConvParams,
    dy: &[f32],
    w: &[f32],
    x: &[f32],
    grads: ConvGrads<'_>,
    scratch: &mut Vec<f32>,
    precision: Precision,
) {
    let s = &p.shape;
    let g = p.conv_transpose_geometry();
    let ConvGrads { weight: gw, input: dx } = grads;
    // The unrolled gradient, then room for the weight gradient's transposed product.
    let unrolled_len = g.rows() * g.cols();
    scratch.resize(unrolled_len + s.in_channels * g.rows(), 0.0);
    let (dcols, tmp) = scratch.split_at_mut(unrolled_len);
    trace_span!("conv_backward_im2col").in_scope(|| im2col(&g, dy, dcols));
    if let Some(gw) = gw {
        let _span = trace_span!("conv_backward_weight").entered();
        add_weight_gradient(Gemm { m: s.in_channels, n: g.rows(), k: g.cols() }, x, dcols, gw, tmp, precision);
    }
    if let Some(dx) = dx {
        let _span = trace_span!("conv_backward_data").entered();
        let shape = Gemm { m: s.in_channels, n: g.cols(), k: g.rows() };
        precision.matmul(shape, Operand::normal(w), Operand::normal(dcols), Output::overwrite(dx));
    }
}

/// `gw (m x n) += a (m x k) x b^T`, with `b` stored n x k: a weight gradient, whose k (every
/// output pixel of the batch) is long and whose m x n is small. The `gemm` crate runs such a
/// product 1.3-2x faster with the larger side as its rows (measured on DCGAN's layers, e.g.
/// 113 against 228 GFLOP/s for 128 x 1024 x 16384 on one core), so when `n > m` the transposed
/// product goes to `tmp` (at least n x m) and its transpose is added; the bf16 products choose
/// by their own tile padding ([`bf16::transposed_product_is_cheaper`]). Both products split `k`
/// between the threads ([`super::matmul::matmul_nt_split_k`]).
fn add_weight_gradient(s: Gemm, a: &[f32], b: &[f32], gw: &mut [f32], tmp: &mut [f32], precision: Precision) {
    let Gemm { m, n, k } = s;
    let transposed = match precision {
        Precision::F32 => n > m,
        Precision::Bf16 => bf16::transposed_product_is_cheaper(m, n),
    };
    if !transposed {
        precision.matmul_nt_split_k(s, a, b, gw);
        return;
    }
    let tmp = &mut tmp[..n * m];
    tmp.fill(0.0);
    precision.matmul_nt_split_k(Gemm { m: n, n: m, k }, b, a, tmp);
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

#[cfg(test)]
mod tests {
    use super::super::matmul::matmul;
    use super::*;

    /// The block-by-block product and fold gives the whole-batch one's result bit for bit: with
    /// several images per block, a last block that is short, and on several threads.
    #[test]
    fn folding_by_image_blocks_matches_the_whole_batch_fold() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        // (channels of the big side, inner, batch, big side): a conv's input gradient at 16x16
        // (8 images a block), and at 32x32 (one image a block).
        for (channels, inner, batch, side) in [(16, 24, 19, 16), (64, 16, 5, 32)] {
            let g = Geometry::for_conv(channels, batch, side, side, 4, 2, 1);
            let images = images_per_fold_block(&g, inner).expect("small weights fold by blocks");
            assert!(images < batch, "{g:?}: one block would leave the split untested");
            let w: Vec<f32> = (0..inner * g.rows()).map(|i| ((i * 7919) % 23) as f32 / 23.0 - 0.5).collect();
            let x: Vec<f32> = (0..inner * g.cols()).map(|i| ((i * 104729) % 17) as f32 / 17.0 - 0.5).collect();
            let mut whole = vec![f32::NAN; g.big_len()];
            let mut cols = vec![0.0; g.rows() * g.cols()];
            let s = Gemm { m: g.rows(), n: g.cols(), k: inner };
            matmul(s, Operand::transposed(&w), Operand::normal(&x), Output::overwrite(&mut cols));
            col2im(&g, &cols, &mut whole);
            for (blocks, threads_note) in [(images, "as chosen"), (3, "three images a block")] {
                let mut blocked = vec![f32::NAN; g.big_len()];
                pool.install(|| fold_product_by_blocks(&g, inner, &w, &x, &mut blocked, blocks, Precision::F32));
                assert!(
                    whole.iter().zip(&blocked).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{g:?}, {threads_note}: blocked fold differs"
                );
            }
        }
    }

    /// Large weights (repacked for every block) and layers off the polyphase path keep the
    /// whole-batch product.
    #[test]
    fn only_small_weights_on_the_polyphase_path_fold_by_blocks() {
        let conv = |c, batch, side| Geometry::for_conv(c, batch, side, side, 4, 2, 1);
        assert!(images_per_fold_block(&conv(64, 64, 16), 128).is_some());
        assert_eq!(images_per_fold_block(&conv(128, 64, 8), 256), None, "2 MiB of weights");
        assert_eq!(images_per_fold_block(&conv(3, 64, 64), 64), None, "three channels");
    }
}
