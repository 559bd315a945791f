//! The CUDA twin of every CPU operation in [`crate::ops`], on device buffers, with the same
//! arguments, layouts (channel-major activations, PyTorch weight layouts) and numerics.
//!
//! Everything is queued on the GPU's one stream and returns at once: nothing here allocates or
//! waits for the device. Buffers may be longer than an operation needs (workspaces are sized
//! for the largest batch); too short is an error, never an out-of-bounds access.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm as _, GemmConfig};
use cudarc::driver::{CudaFunction, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::OrCuda;
use super::device::Gpu;
use crate::ops::activation::Activation;
use crate::ops::adam::bias_correction;
use crate::ops::batchnorm::{EPS, MOMENTUM};
use crate::ops::conv::{ConvGrads, ConvParams};
use crate::ops::im2col::Geometry;
use crate::ops::matmul::{Gemm, Layout, Operand, Output};
use crate::{KernelError, OptimConfig};

/// Threads per block of every kernel; the block reductions need a multiple of 32.
const THREADS: u32 = 256;

/// Enough blocks to fill any current GPU several times over; larger work loops (grid-stride).
const MAX_BLOCKS: usize = 1 << 15;

/// A grid-stride launch over `total` elements.
fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `n` blocks of [`THREADS`], each reducing its own share (the loss: one block in all).
fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Refuses a buffer shorter than an operation needs: a kernel would read or write past it.
fn need(what: &str, got: usize, need: usize) -> Result<(), KernelError> {
    if got < need {
        return Err(KernelError::Shape { what: format!("GPU buffer {what}"), expected: vec![need], got: vec![got] });
    }
    Ok(())
}

fn int(what: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v)
        .map_err(|_| KernelError::Config(format!("{what} = {v} does not fit the GPU kernels' 32-bit sizes")))
}

/// The geometry's sizes as the kernels take them: C, N, H, W, SH, SW, K, S, P.
fn geometry_args(g: &Geometry) -> Result<[i32; 9], KernelError> {
    Ok([
        int("channels", g.channels)?,
        int("batch", g.batch)?,
        int("height", g.big_h)?,
        int("width", g.big_w)?,
        int("height", g.small_h)?,
        int("width", g.small_w)?,
        int("kernel", g.kernel)?,
        int("stride", g.stride)?,
        int("padding", g.padding)?,
    ])
}

fn launch_geometry(
    gpu: &Gpu,
    f: &CudaFunction,
    name: &str,
    g: &Geometry,
    src: &CudaView<'_, f32>,
    dst: &mut CudaViewMut<'_, f32>,
    total: usize,
) -> Result<(), KernelError> {
    let a = geometry_args(g)?;
    let mut b = gpu.stream().launch_builder(f);
    b.arg(src).arg(dst);
    for v in &a {
        b.arg(v);
    }
    // SAFETY: the kernel's signature is (const float*, float*, 9 x int), and the callers checked
    // that both buffers hold what the geometry addresses.
    unsafe { b.launch(elementwise(total)) }.or_cuda(name)?;
    Ok(())
}

/// Unrolls `big` (C, N, H, W) into `cols` (C*k*k, N*OH*OW), as [`crate::ops::im2col::im2col`].
pub fn im2col(
    gpu: &Gpu,
    g: &Geometry,
    big: &CudaView<'_, f32>,
    cols: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    need("im2col input", big.len(), g.big_len())?;
    need("im2col output", cols.len(), g.rows() * g.cols())?;
    launch_geometry(gpu, &gpu.kernels.im2col, "im2col", g, big, cols, g.rows() * g.cols())
}

/// Folds `cols` back into `big`, adding overlapping entries; `big` is overwritten. As
/// [`crate::ops::im2col::col2im`].
pub fn col2im(
    gpu: &Gpu,
    g: &Geometry,
    cols: &CudaView<'_, f32>,
    big: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    need("col2im input", cols.len(), g.rows() * g.cols())?;
    need("col2im output", big.len(), g.big_len())?;
    launch_geometry(gpu, &gpu.kernels.col2im, "col2im", g, cols, big, g.big_len())
}

/// `c (m x n) = a (m x k) * b (k x n)` (+ the old `c` when `c.accumulate`), all row-major, each
/// operand stored as its [`Layout`] says: [`crate::ops::matmul::matmul`] on cuBLAS.
///
/// cuBLAS is column-major: a row-major `c` is a column-major `c^T = b^T a^T`, so the operands
/// are passed swapped, each with the transpose flag its storage needs.
pub fn matmul(
    gpu: &Gpu,
    s: Gemm,
    a: Operand<'_, CudaView<'_, f32>>,
    b: Operand<'_, CudaView<'_, f32>>,
    c: Output<'_, CudaViewMut<'_, f32>>,
) -> Result<(), KernelError> {
    let Gemm { m, n, k } = s;
    need("matmul lhs", a.data.len(), m * k)?;
    need("matmul rhs", b.data.len(), k * n)?;
    need("matmul output", c.data.len(), m * n)?;
    if m == 0 || n == 0 || k == 0 {
        return Err(KernelError::Config(format!("empty matrix product {m}x{k} x {k}x{n}")));
    }
    let (transa, lda) = match b.layout {
        Layout::Normal => (cublasOperation_t::CUBLAS_OP_N, n),
        Layout::Transposed => (cublasOperation_t::CUBLAS_OP_T, k),
    };
    let (transb, ldb) = match a.layout {
        Layout::Normal => (cublasOperation_t::CUBLAS_OP_N, k),
        Layout::Transposed => (cublasOperation_t::CUBLAS_OP_T, m),
    };
    let cfg = GemmConfig {
        transa,
        transb,
        m: int("n", n)?,
        n: int("m", m)?,
        k: int("k", k)?,
        alpha: 1.0f32,
        lda: int("lda", lda)?,
        ldb: int("ldb", ldb)?,
        beta: if c.accumulate { 1.0 } else { 0.0 },
        ldc: int("ldc", n)?,
    };
    // SAFETY: the lengths were checked against the shapes above, and the handle's stream is the
    // stream every buffer is used on.
    unsafe { gpu.blas().gemm(cfg, b.data, a.data, c.data) }.or_cuda("cublasSgemm")
}

/// Conv2d forward, as [`crate::ops::conv::conv2d_forward`]: `y = W x im2col(x)`; `cols` keeps
/// the unrolled input for the weight gradient.
pub fn conv2d_forward(
    gpu: &Gpu,
    p: &ConvParams,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    cols: &mut CudaViewMut<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let g = p.conv_geometry();
    im2col(gpu, &g, x, cols)?;
    let cols = cols.slice(..g.rows() * g.cols());
    let s = Gemm { m: p.shape.out_channels, n: g.cols(), k: g.rows() };
    matmul(gpu, s, Operand::normal(w), Operand::normal(&cols), Output::overwrite(y))
}

/// Conv2d backward, as [`crate::ops::conv::conv2d_backward`]: `gw += dy x cols^T` when
/// `grads.weight` is given; `dx = col2im(W^T x dy)` when `grads.input` is (`scratch` holds the
/// unrolled gradient).
pub fn conv2d_backward(
    gpu: &Gpu,
    p: &ConvParams,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    cols: &CudaView<'_, f32>,
    grads: ConvGrads<'_, CudaViewMut<'_, f32>>,
    scratch: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let oc = p.shape.out_channels;
    let g = p.conv_geometry();
    if let Some(gw) = grads.weight {
        let s = Gemm { m: oc, n: g.rows(), k: g.cols() };
        matmul(gpu, s, Operand::normal(dy), Operand::transposed(cols), Output::add_to(gw))?;
    }
    if let Some(dx) = grads.input {
        need("conv2d scratch", scratch.len(), g.rows() * g.cols())?;
        let mut unrolled = scratch.slice_mut(..g.rows() * g.cols());
        let s = Gemm { m: g.rows(), n: g.cols(), k: oc };
        matmul(gpu, s, Operand::transposed(w), Operand::normal(dy), Output::overwrite(&mut unrolled))?;
        col2im(gpu, &g, &unrolled.as_view(), dx)?;
    }
    Ok(())
}

/// ConvTranspose2d forward, as [`crate::ops::conv::conv_transpose2d_forward`]:
/// `y = col2im(W^T x x)`.
pub fn conv_transpose2d_forward(
    gpu: &Gpu,
    p: &ConvParams,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    scratch: &mut CudaViewMut<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let g = p.conv_transpose_geometry();
    need("conv_transpose2d scratch", scratch.len(), g.rows() * g.cols())?;
    let mut cols = scratch.slice_mut(..g.rows() * g.cols());
    let s = Gemm { m: g.rows(), n: g.cols(), k: p.shape.in_channels };
    matmul(gpu, s, Operand::transposed(w), Operand::normal(x), Output::overwrite(&mut cols))?;
    col2im(gpu, &g, &cols.as_view(), y)
}

/// ConvTranspose2d backward, as [`crate::ops::conv::conv_transpose2d_backward`]: with
/// `dcols = im2col(dy)`, `gw += x x dcols^T` and `dx = W x dcols`.
pub fn conv_transpose2d_backward(
    gpu: &Gpu,
    p: &ConvParams,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
    grads: ConvGrads<'_, CudaViewMut<'_, f32>>,
    scratch: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let ic = p.shape.in_channels;
    let g = p.conv_transpose_geometry();
    need("conv_transpose2d scratch", scratch.len(), g.rows() * g.cols())?;
    let mut dcols = scratch.slice_mut(..g.rows() * g.cols());
    im2col(gpu, &g, dy, &mut dcols)?;
    let dcols = dcols.as_view();
    if let Some(gw) = grads.weight {
        let s = Gemm { m: ic, n: g.rows(), k: g.cols() };
        matmul(gpu, s, Operand::normal(x), Operand::transposed(&dcols), Output::add_to(gw))?;
    }
    if let Some(dx) = grads.input {
        let s = Gemm { m: ic, n: g.cols(), k: g.rows() };
        matmul(gpu, s, Operand::normal(w), Operand::normal(&dcols), Output::overwrite(dx))?;
    }
    Ok(())
}

/// The activation's code in `elementwise.cu`; `None` for the one that is not applied here.
fn activation_code(act: Activation) -> Option<i32> {
    match act {
        Activation::Relu => Some(0),
        Activation::LeakyRelu => Some(1),
        Activation::Tanh => Some(2),
        Activation::Sigmoid => Some(3),
        Activation::SigmoidInLoss => None,
    }
}

/// `x <- act(x)` on the first `n` values, as [`Activation::forward_in_place`].
pub fn activation_forward(
    gpu: &Gpu,
    act: Activation,
    x: &mut CudaViewMut<'_, f32>,
    n: usize,
) -> Result<(), KernelError> {
    let Some(code) = activation_code(act) else { return Ok(()) };
    need("activation", x.len(), n)?;
    let len = n as i64;
    // SAFETY: (float*, long long, int); `x` holds `n` values.
    unsafe {
        gpu.stream().launch_builder(&gpu.kernels.activation_forward).arg(x).arg(&len).arg(&code).launch(elementwise(n))
    }
    .or_cuda("activation_forward")?;
    Ok(())
}

/// `dy <- dy * act'(x)` from the output `y`, on the first `n` values, as
/// [`Activation::backward_in_place`].
pub fn activation_backward(
    gpu: &Gpu,
    act: Activation,
    y: &CudaView<'_, f32>,
    dy: &mut CudaViewMut<'_, f32>,
    n: usize,
) -> Result<(), KernelError> {
    let Some(code) = activation_code(act) else { return Ok(()) };
    need("activation output", y.len(), n)?;
    need("activation gradient", dy.len(), n)?;
    let len = n as i64;
    // SAFETY: (const float*, float*, long long, int); both hold `n` values.
    unsafe {
        gpu.stream()
            .launch_builder(&gpu.kernels.activation_backward)
            .arg(y)
            .arg(dy)
            .arg(&len)
            .arg(&code)
            .launch(elementwise(n))
    }
    .or_cuda("activation_backward")?;
    Ok(())
}

/// The BatchNorm reductions aim for about this many blocks in all: a few per SM on any current
/// GPU (132 SMs x 8 resident blocks of 256 threads on an H100/H200 is 1056).
const BN_TARGET_BLOCKS: usize = 4096;

/// The fewest values one part of a channel's reduction sums (8 per thread), so that a block's
/// fixed cost (its block-wide sum, one write) stays small next to its loads.
const BN_MIN_PART: usize = 2048;

/// The most parts per channel: bounds the finalize kernels' serial sum (one thread per channel
/// adds its parts in order). Only channel counts below `BN_TARGET_BLOCKS / BN_MAX_PARTS` reach it.
const BN_MAX_PARTS: usize = 512;

/// Parts (blocks) per channel of the BatchNorm reductions over `channels` channels of `m`
/// values each: enough for about [`BN_TARGET_BLOCKS`] blocks in all, but none summing fewer than
/// [`BN_MIN_PART`] values (so 1 part while `m < 2 * BN_MIN_PART`), and at most
/// [`BN_MAX_PARTS`].
///
/// It depends on `(channels, m)` only, so the summation order, hence every bit of a step's
/// result, is the same run to run; and it never decreases as `m` grows, so a scratch sized by
/// [`bn_scratch_len`] for the largest batch serves every smaller one.
pub fn bn_parts(channels: usize, m: usize) -> usize {
    let for_grid = BN_TARGET_BLOCKS.div_ceil(channels.max(1));
    let for_size = m / BN_MIN_PART;
    for_grid.min(for_size).clamp(1, BN_MAX_PARTS)
}

/// `f64` values of scratch the BatchNorm training kernels need for `channels` channels of `m`
/// values: two partial sums per (channel, part), then two totals per channel (backward).
/// Non-decreasing in `m` (see [`bn_parts`]).
pub fn bn_scratch_len(channels: usize, m: usize) -> usize {
    2 * channels * (bn_parts(channels, m) + 1)
}

/// The device buffers of one BatchNorm layer that its training forward reads and writes.
pub struct BnBuffers<'a, 'b> {
    /// `[gamma (C), beta (C)]`, adjacent as in the flat parameter buffer.
    pub gamma_beta: &'a CudaView<'b, f32>,
    /// `[mean (C), inv_std (C)]` of the last training forward, for backward.
    pub saved: &'a mut CudaViewMut<'b, f32>,
    pub running_mean: &'a mut CudaViewMut<'b, f32>,
    pub running_var: &'a mut CudaViewMut<'b, f32>,
    /// The reductions' partial sums: at least [`bn_scratch_len`] values. Only used during the
    /// call, so the layers of a network (queued on one stream) can share one.
    pub scratch: &'a mut CudaViewMut<'b, f64>,
}

/// Refuses an empty BatchNorm and returns `(C, P)` as the kernels take them, where P is
/// [`bn_parts`], having checked that the reductions' `C * P` blocks fit one grid.
fn bn_sizes(channels: usize, m: usize) -> Result<(i32, usize, i32), KernelError> {
    if channels == 0 || m == 0 {
        return Err(KernelError::Config(format!("BatchNorm over {channels} channels of {m} values")));
    }
    let parts = bn_parts(channels, m);
    int("batchnorm blocks", channels * parts)?;
    Ok((int("channels", channels)?, parts, parts as i32))
}

/// BatchNorm2d training forward in place on `x` (C, M), as [`crate::ops::batchnorm::BatchNorm`]
/// with batch statistics: writes `xhat` and the saved statistics, and moves the running
/// statistics (momentum 0.1, unbiased variance) when `update_running`.
///
/// Five launches: the channels' partial sums over a (channel, part) grid, their mean; the
/// partial sums of squared deviations from it, the variance (and running statistics); then the
/// normalisation over the whole tensor.
pub fn batchnorm_forward_train(
    gpu: &Gpu,
    channels: usize,
    m: usize,
    x: &mut CudaViewMut<'_, f32>,
    xhat: &mut CudaViewMut<'_, f32>,
    bn: BnBuffers<'_, '_>,
    update_running: bool,
) -> Result<(), KernelError> {
    need("batchnorm input", x.len(), channels * m)?;
    need("batchnorm xhat", xhat.len(), channels * m)?;
    need("batchnorm gamma/beta", bn.gamma_beta.len(), 2 * channels)?;
    need("batchnorm saved statistics", bn.saved.len(), 2 * channels)?;
    need("batchnorm running mean", bn.running_mean.len(), channels)?;
    need("batchnorm running var", bn.running_var.len(), channels)?;
    need("batchnorm scratch", bn.scratch.len(), bn_scratch_len(channels, m))?;
    let (c, parts, p) = bn_sizes(channels, m)?;
    let (ml, update) = (m as i64, update_running as i32);
    let stream = gpu.stream();
    for squares in [0i32, 1] {
        // SAFETY: (const float*, const float*, double*, long long, int, int), launched with C * P
        // blocks; `x` holds C * M values, `saved` 2C (mean read when squares = 1, written by
        // bn_finalize_mean before), `scratch` at least C * P.
        unsafe {
            stream
                .launch_builder(&gpu.kernels.bn_partial_sums)
                .arg(&x.as_view())
                .arg(&bn.saved.as_view())
                .arg(&mut *bn.scratch)
                .arg(&ml)
                .arg(&p)
                .arg(&squares)
                .launch(blocks(channels * parts))
        }
        .or_cuda("bn_partial_sums")?;
        if squares == 0 {
            // SAFETY: (const double*, float*, int, int, long long); C * P partial sums, 2C saved.
            unsafe {
                stream
                    .launch_builder(&gpu.kernels.bn_finalize_mean)
                    .arg(&bn.scratch.as_view())
                    .arg(&mut *bn.saved)
                    .arg(&c)
                    .arg(&p)
                    .arg(&ml)
                    .launch(elementwise(channels))
            }
            .or_cuda("bn_finalize_mean")?;
        } else {
            // SAFETY: (const double*, float*, float*, float*, int, int, long long, int, float,
            // float); C * P partial sums, 2C saved, C running statistics each.
            unsafe {
                stream
                    .launch_builder(&gpu.kernels.bn_finalize_var)
                    .arg(&bn.scratch.as_view())
                    .arg(&mut *bn.saved)
                    .arg(&mut *bn.running_mean)
                    .arg(&mut *bn.running_var)
                    .arg(&c)
                    .arg(&p)
                    .arg(&ml)
                    .arg(&update)
                    .arg(&MOMENTUM)
                    .arg(&EPS)
                    .launch(elementwise(channels))
            }
            .or_cuda("bn_finalize_var")?;
        }
    }
    // SAFETY: (float*, float*, const float*, const float*, int, long long); `x` and `xhat` hold
    // C * M values, `gamma_beta` and `saved` 2C.
    unsafe {
        stream
            .launch_builder(&gpu.kernels.bn_normalize)
            .arg(x)
            .arg(xhat)
            .arg(bn.gamma_beta)
            .arg(&bn.saved.as_view())
            .arg(&c)
            .arg(&ml)
            .launch(elementwise(channels * m))
    }
    .or_cuda("bn_normalize")?;
    Ok(())
}

/// BatchNorm2d eval forward in place on `x` (C, M) with the running statistics.
pub fn batchnorm_forward_eval(
    gpu: &Gpu,
    channels: usize,
    m: usize,
    x: &mut CudaViewMut<'_, f32>,
    gamma_beta: &CudaView<'_, f32>,
    running_mean: &CudaView<'_, f32>,
    running_var: &CudaView<'_, f32>,
) -> Result<(), KernelError> {
    need("batchnorm input", x.len(), channels * m)?;
    need("batchnorm gamma/beta", gamma_beta.len(), 2 * channels)?;
    need("batchnorm running mean", running_mean.len(), channels)?;
    need("batchnorm running var", running_var.len(), channels)?;
    let (c, ml) = (int("channels", channels)?, m as i64);
    // SAFETY: (float*, const float*, const float*, const float*, int, long long, float).
    unsafe {
        gpu.stream()
            .launch_builder(&gpu.kernels.bn_forward_eval)
            .arg(x)
            .arg(gamma_beta)
            .arg(running_mean)
            .arg(running_var)
            .arg(&c)
            .arg(&ml)
            .arg(&EPS)
            .launch(elementwise(channels * m))
    }
    .or_cuda("bn_forward_eval")?;
    Ok(())
}

/// The device buffers BatchNorm's backward reads and writes.
pub struct BnGradBuffers<'a, 'b> {
    /// The normalised input of the last training forward, (C, M).
    pub xhat: &'a CudaView<'b, f32>,
    /// `[gamma (C), beta (C)]`.
    pub gamma_beta: &'a CudaView<'b, f32>,
    /// `[mean (C), inv_std (C)]` of the last training forward.
    pub saved: &'a CudaView<'b, f32>,
    /// `[dgamma (C), dbeta (C)]`, added into when given.
    pub grad_gamma_beta: Option<&'a mut CudaViewMut<'b, f32>>,
    /// The reductions' partial sums and the totals: at least [`bn_scratch_len`] values.
    pub scratch: &'a mut CudaViewMut<'b, f64>,
}

/// BatchNorm2d backward of the last training forward, in place (`dy` becomes `dx`); adds the
/// gradients of gamma and beta into `grad_gamma_beta` when given.
///
/// Three launches: the partial sums of `dy` and `dy * xhat` over a (channel, part) grid, their
/// totals (and the gamma/beta gradients), then `dx` over the whole tensor.
pub fn batchnorm_backward(
    gpu: &Gpu,
    channels: usize,
    m: usize,
    dy: &mut CudaViewMut<'_, f32>,
    bn: BnGradBuffers<'_, '_>,
) -> Result<(), KernelError> {
    need("batchnorm gradient", dy.len(), channels * m)?;
    need("batchnorm xhat", bn.xhat.len(), channels * m)?;
    need("batchnorm gamma/beta", bn.gamma_beta.len(), 2 * channels)?;
    need("batchnorm saved statistics", bn.saved.len(), 2 * channels)?;
    if let Some(g) = &bn.grad_gamma_beta {
        need("batchnorm gamma/beta gradients", g.len(), 2 * channels)?;
    }
    need("batchnorm scratch", bn.scratch.len(), bn_scratch_len(channels, m))?;
    let (c, parts, p) = bn_sizes(channels, m)?;
    let (ml, has_grads) = (m as i64, bn.grad_gamma_beta.is_some() as i32);
    // [partial sums of dy (C * P), of dy * xhat (C * P)], then [sum_dy (C), sum_dy_xhat (C)].
    let (mut partial, mut totals) = bn.scratch.split_at_mut(2 * channels * parts);
    let stream = gpu.stream();
    // SAFETY: (const float*, const float*, double*, int, long long, int), launched with C * P
    // blocks; `dy` and `xhat` hold C * M values, `partial` 2 * C * P.
    unsafe {
        stream
            .launch_builder(&gpu.kernels.bn_backward_partials)
            .arg(&dy.as_view())
            .arg(bn.xhat)
            .arg(&mut partial)
            .arg(&c)
            .arg(&ml)
            .arg(&p)
            .launch(blocks(channels * parts))
    }
    .or_cuda("bn_backward_partials")?;
    let partial = partial.as_view();
    let mut b = stream.launch_builder(&gpu.kernels.bn_backward_finalize);
    b.arg(&partial).arg(&mut totals);
    // Without weight gradients the kernel never touches its gradient argument; `saved` stands in
    // for it so that every pointer is a valid one.
    match bn.grad_gamma_beta {
        Some(g) => b.arg(g),
        None => b.arg(bn.saved),
    };
    b.arg(&has_grads).arg(&c).arg(&p);
    // SAFETY: (const double*, double*, float*, int, int, int); 2 * C * P partial sums, `totals`
    // at least 2C (the scratch holds 2 * C * (P + 1)), gradients 2C when has_grads.
    unsafe { b.launch(elementwise(channels)) }.or_cuda("bn_backward_finalize")?;
    // SAFETY: (float*, const float*, const float*, const float*, const double*, int, long long);
    // `dy` and `xhat` hold C * M values, `gamma_beta` and `saved` 2C, `totals` 2C.
    unsafe {
        stream
            .launch_builder(&gpu.kernels.bn_backward_dx)
            .arg(dy)
            .arg(bn.xhat)
            .arg(bn.gamma_beta)
            .arg(bn.saved)
            .arg(&totals.as_view())
            .arg(&c)
            .arg(&ml)
            .launch(elementwise(channels * m))
    }
    .or_cuda("bn_backward_dx")?;
    Ok(())
}

/// Mean BCE of `sigmoid(logits)` against `target`, as [`crate::ops::loss::bce_with_logits`]:
/// the gradient goes to `grad`, and `[loss, mean sigmoid]` to `out` (2 values), on the device,
/// so that a step reads its numbers back once.
pub fn bce_with_logits(
    gpu: &Gpu,
    logits: &CudaView<'_, f32>,
    n: usize,
    target: f32,
    grad: &mut CudaViewMut<'_, f32>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    need("loss logits", logits.len(), n)?;
    need("loss gradient", grad.len(), n)?;
    need("loss output", out.len(), 2)?;
    let count = int("batch", n)?;
    // SAFETY: (const float*, float*, float*, int, float); buffers checked above.
    unsafe {
        gpu.stream()
            .launch_builder(&gpu.kernels.bce_with_logits)
            .arg(logits)
            .arg(grad)
            .arg(out)
            .arg(&count)
            .arg(&target)
            .launch(blocks(1))
    }
    .or_cuda("bce_with_logits")?;
    Ok(())
}

/// Adam's update number `step` (from 1) of `params` from `grads`, as
/// [`crate::ops::adam::Adam::step`]; the caller keeps the step count.
pub fn adam_step(
    gpu: &Gpu,
    cfg: &OptimConfig,
    step: u64,
    params: &mut CudaViewMut<'_, f32>,
    grads: &CudaView<'_, f32>,
    exp_avg: &mut CudaViewMut<'_, f32>,
    exp_avg_sq: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let n = params.len();
    need("adam gradients", grads.len(), n)?;
    need("adam first moments", exp_avg.len(), n)?;
    need("adam second moments", exp_avg_sq.len(), n)?;
    let (step_size, bias2_sqrt) = bias_correction(cfg, step);
    let len = n as i64;
    // SAFETY: (float*, const float*, float*, float*, long long, float x 5); buffers checked.
    unsafe {
        gpu.stream()
            .launch_builder(&gpu.kernels.adam_step)
            .arg(params)
            .arg(grads)
            .arg(exp_avg)
            .arg(exp_avg_sq)
            .arg(&len)
            .arg(&cfg.beta1)
            .arg(&cfg.beta2)
            .arg(&cfg.eps)
            .arg(&step_size)
            .arg(&bias2_sqrt)
            .launch(elementwise(n))
    }
    .or_cuda("adam_step")?;
    Ok(())
}

/// `dst (b, a, rest) <- src (a, b, rest)`: NCHW <-> CNHW, as
/// [`crate::tensor::swap_leading_axes`].
pub fn swap_leading_axes(
    gpu: &Gpu,
    src: &CudaView<'_, f32>,
    a: usize,
    b: usize,
    rest: usize,
    dst: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let n = a * b * rest;
    need("transpose input", src.len(), n)?;
    need("transpose output", dst.len(), n)?;
    let (a, b, rest) = (a as i64, b as i64, rest as i64);
    // SAFETY: (const float*, float*, long long x 3); buffers checked above.
    unsafe {
        gpu.stream()
            .launch_builder(&gpu.kernels.swap_leading_axes)
            .arg(src)
            .arg(dst)
            .arg(&a)
            .arg(&b)
            .arg(&rest)
            .launch(elementwise(n))
    }
    .or_cuda("swap_leading_axes")?;
    Ok(())
}

/// `x <- x * factor`.
pub fn scale(gpu: &Gpu, x: &mut CudaViewMut<'_, f32>, factor: f32) -> Result<(), KernelError> {
    let n = x.len();
    let len = n as i64;
    // SAFETY: (float*, long long, float); `x` holds `n` values.
    unsafe { gpu.stream().launch_builder(&gpu.kernels.scale).arg(x).arg(&len).arg(&factor).launch(elementwise(n)) }
        .or_cuda("scale")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of one BatchNorm reduction launch over `c` channels of `m` values.
    fn grid(c: usize, m: usize) -> usize {
        c * bn_parts(c, m)
    }

    #[test]
    fn a_channel_smaller_than_two_minimum_parts_is_one_part() {
        for &(c, m) in &[(1, 1), (3, 1), (8, 2), (512, 48), (5, 255), (3, 256), (1, 2 * BN_MIN_PART - 1)] {
            assert_eq!(bn_parts(c, m), 1, "c={c} m={m}");
        }
        assert_eq!(bn_parts(1, 2 * BN_MIN_PART), 2);
        // An empty layer (refused before any launch) still gets a sane answer.
        assert_eq!(bn_parts(0, 0), 1);
    }

    /// DCGAN-64 at batch 256: the generator's BatchNorms (512x4x4 .. 64x32x32) and the
    /// discriminator's (128x16x16 .. 512x4x4) all launch 1024-4096 blocks, where one block per
    /// channel launched 64-512.
    #[test]
    fn dcgan64_at_batch_256_fills_the_gpu() {
        let layers = [(512, 256 * 4 * 4), (256, 256 * 8 * 8), (128, 256 * 16 * 16), (64, 256 * 32 * 32)];
        let want = [(2, 1024), (8, 2048), (32, 4096), (64, 4096)];
        for (&(c, m), &(parts, blocks)) in layers.iter().zip(&want) {
            assert_eq!((bn_parts(c, m), grid(c, m)), (parts, blocks), "c={c} m={m}");
        }
    }

    #[test]
    fn parts_are_large_enough_and_the_grid_is_bounded() {
        for c in [1, 2, 3, 7, 16, 64, 100, 512, 1000, 4096, 5000] {
            for m in [1, 100, 2047, 2048, 4095, 4096, 10_000, 200_000, 300_001, 1 << 20, 1 << 24] {
                let p = bn_parts(c, m);
                assert!((1..=BN_MAX_PARTS).contains(&p), "c={c} m={m}: {p} parts");
                // Every part (of m / p or m / p + 1 values) sums at least BN_MIN_PART values,
                // unless the channel is one part.
                assert!(p == 1 || m / p >= BN_MIN_PART, "c={c} m={m}: {p} parts of {} values", m / p);
                // No more blocks than the target needs, bar rounding up per channel.
                assert!(p == 1 || grid(c, m) < BN_TARGET_BLOCKS + c, "c={c} m={m}: {} blocks", grid(c, m));
                // A part never empty: the kernels split [p * m / P, (p + 1) * m / P).
                assert!(p <= m, "c={c} m={m}");
            }
        }
        // The conformance cases with several parts per channel.
        assert_eq!(bn_parts(3, 200_000), 97);
        assert_eq!(bn_parts(16, 300_001), 146);
        assert_eq!(bn_parts(1, 1 << 30), BN_MAX_PARTS);
    }

    /// A scratch sized at the largest batch serves every smaller one.
    #[test]
    fn parts_and_scratch_never_shrink_as_channels_grow_longer() {
        for c in [1, 3, 64, 128, 512, 5000] {
            let mut last = (0, 0);
            for m in (1..=(1 << 21)).step_by(997) {
                let now = (bn_parts(c, m), bn_scratch_len(c, m));
                assert!(now.0 >= last.0 && now.1 >= last.1, "c={c} m={m}: {now:?} after {last:?}");
                assert_eq!(now.1, 2 * c * (now.0 + 1));
                last = now;
            }
        }
    }

    #[test]
    fn empty_batchnorms_are_refused() {
        assert!(bn_sizes(0, 10).is_err());
        assert!(bn_sizes(10, 0).is_err());
        assert_eq!(bn_sizes(64, 256 * 32 * 32).unwrap(), (64, 64, 64));
    }
}
