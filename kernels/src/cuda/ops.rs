//! The CUDA twin of every CPU operation in [`crate::ops`], on device buffers, with the same
//! arguments, layouts (channel-major activations, PyTorch weight layouts) and numerics.
//!
//! Everything is queued on the GPU's one stream and returns at once: nothing here allocates or
//! waits for the device. Buffers may be longer than an operation needs (workspaces are sized
//! for the largest batch); too short is an error, never an out-of-bounds access.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::OrCuda;
use super::device::Gpu;
use crate::ops::activation::Activation;
use crate::ops::adam::bias_correction;
use crate::ops::batchnorm::{EPS, MOMENTUM};
use crate::ops::conv::ConvShape;
use crate::ops::im2col::Geometry;
use crate::ops::matmul::Layout;
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

/// One block per channel (or one block in all, for the loss).
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

/// `c (m x n) = a (m x k) * b (k x n)` (+ the old `c` when `accumulate`), all row-major, with
/// [`Layout`] saying how each operand is stored: [`crate::ops::matmul::matmul`] on cuBLAS.
///
/// cuBLAS is column-major: a row-major `c` is a column-major `c^T = b^T a^T`, so the operands
/// are passed swapped, each with the transpose flag its storage needs.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaView<'_, f32>,
    a_layout: Layout,
    b: &CudaView<'_, f32>,
    b_layout: Layout,
    c: &mut CudaViewMut<'_, f32>,
    accumulate: bool,
) -> Result<(), KernelError> {
    need("matmul lhs", a.len(), m * k)?;
    need("matmul rhs", b.len(), k * n)?;
    need("matmul output", c.len(), m * n)?;
    if m == 0 || n == 0 || k == 0 {
        return Err(KernelError::Config(format!("empty matrix product {m}x{k} x {k}x{n}")));
    }
    let (transa, lda) = match b_layout {
        Layout::Normal => (cublasOperation_t::CUBLAS_OP_N, n),
        Layout::Transposed => (cublasOperation_t::CUBLAS_OP_T, k),
    };
    let (transb, ldb) = match a_layout {
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
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: int("ldc", n)?,
    };
    // SAFETY: the lengths were checked against the shapes above, and the handle's stream is the
    // stream every buffer is used on.
    unsafe { gpu.blas().gemm(cfg, b, a, c) }.or_cuda("cublasSgemm")
}

/// Conv2d forward, as [`crate::ops::conv::conv2d_forward`]: `y = W x im2col(x)`; `cols` keeps
/// the unrolled input for the weight gradient.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    gpu: &Gpu,
    s: &ConvShape,
    batch: usize,
    side: usize,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    cols: &mut CudaViewMut<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let g = Geometry::for_conv(s.in_channels, batch, side, side, s.kernel, s.stride, s.padding);
    im2col(gpu, &g, x, cols)?;
    let cols = cols.slice(..g.rows() * g.cols());
    matmul(gpu, s.out_channels, g.cols(), g.rows(), w, Layout::Normal, &cols, Layout::Normal, y, false)
}

/// Conv2d backward, as [`crate::ops::conv::conv2d_backward`]: `gw += dy x cols^T` when `gw` is
/// given; `dx = col2im(W^T x dy)` when `dx` is given (`scratch` holds the unrolled gradient).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    gpu: &Gpu,
    s: &ConvShape,
    batch: usize,
    side: usize,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    cols: &CudaView<'_, f32>,
    gw: Option<&mut CudaViewMut<'_, f32>>,
    dx: Option<&mut CudaViewMut<'_, f32>>,
    scratch: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let g = Geometry::for_conv(s.in_channels, batch, side, side, s.kernel, s.stride, s.padding);
    if let Some(gw) = gw {
        matmul(gpu, s.out_channels, g.rows(), g.cols(), dy, Layout::Normal, cols, Layout::Transposed, gw, true)?;
    }
    if let Some(dx) = dx {
        need("conv2d scratch", scratch.len(), g.rows() * g.cols())?;
        let mut unrolled = scratch.slice_mut(..g.rows() * g.cols());
        matmul(
            gpu,
            g.rows(),
            g.cols(),
            s.out_channels,
            w,
            Layout::Transposed,
            dy,
            Layout::Normal,
            &mut unrolled,
            false,
        )?;
        col2im(gpu, &g, &unrolled.as_view(), dx)?;
    }
    Ok(())
}

/// ConvTranspose2d forward, as [`crate::ops::conv::conv_transpose2d_forward`]:
/// `y = col2im(W^T x x)`.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_forward(
    gpu: &Gpu,
    s: &ConvShape,
    batch: usize,
    side: usize,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    scratch: &mut CudaViewMut<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let g = Geometry::for_conv_transpose(s.out_channels, batch, side, side, s.kernel, s.stride, s.padding);
    need("conv_transpose2d scratch", scratch.len(), g.rows() * g.cols())?;
    let mut cols = scratch.slice_mut(..g.rows() * g.cols());
    matmul(gpu, g.rows(), g.cols(), s.in_channels, w, Layout::Transposed, x, Layout::Normal, &mut cols, false)?;
    col2im(gpu, &g, &cols.as_view(), y)
}

/// ConvTranspose2d backward, as [`crate::ops::conv::conv_transpose2d_backward`]: with
/// `dcols = im2col(dy)`, `gw += x x dcols^T` and `dx = W x dcols`.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward(
    gpu: &Gpu,
    s: &ConvShape,
    batch: usize,
    side: usize,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
    gw: Option<&mut CudaViewMut<'_, f32>>,
    dx: Option<&mut CudaViewMut<'_, f32>>,
    scratch: &mut CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    let g = Geometry::for_conv_transpose(s.out_channels, batch, side, side, s.kernel, s.stride, s.padding);
    need("conv_transpose2d scratch", scratch.len(), g.rows() * g.cols())?;
    let mut dcols = scratch.slice_mut(..g.rows() * g.cols());
    im2col(gpu, &g, dy, &mut dcols)?;
    let dcols = dcols.as_view();
    if let Some(gw) = gw {
        matmul(gpu, s.in_channels, g.rows(), g.cols(), x, Layout::Normal, &dcols, Layout::Transposed, gw, true)?;
    }
    if let Some(dx) = dx {
        matmul(gpu, s.in_channels, g.cols(), g.rows(), w, Layout::Normal, &dcols, Layout::Normal, dx, false)?;
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

/// The device buffers of one BatchNorm layer that its kernels read and write.
pub struct BnBuffers<'a, 'b> {
    /// `[gamma (C), beta (C)]`, adjacent as in the flat parameter buffer.
    pub gamma_beta: &'a CudaView<'b, f32>,
    /// `[mean (C), inv_std (C)]` of the last training forward, for backward.
    pub saved: &'a mut CudaViewMut<'b, f32>,
    pub running_mean: &'a mut CudaViewMut<'b, f32>,
    pub running_var: &'a mut CudaViewMut<'b, f32>,
}

/// BatchNorm2d training forward in place on `x` (C, M), as [`crate::ops::batchnorm::BatchNorm`]
/// with batch statistics: writes `xhat` and the saved statistics, and moves the running
/// statistics (momentum 0.1, unbiased variance) when `update_running`.
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
    let (c, m, update) = (int("channels", channels)?, m as i64, update_running as i32);
    // SAFETY: signature (float*, float*, const float*, float*, float*, float*, int, long long,
    // int, float, float); every buffer was checked above.
    unsafe {
        gpu.stream()
            .launch_builder(&gpu.kernels.bn_forward_train)
            .arg(x)
            .arg(xhat)
            .arg(bn.gamma_beta)
            .arg(bn.saved)
            .arg(bn.running_mean)
            .arg(bn.running_var)
            .arg(&c)
            .arg(&m)
            .arg(&update)
            .arg(&MOMENTUM)
            .arg(&EPS)
            .launch(blocks(channels))
    }
    .or_cuda("bn_forward_train")?;
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

/// BatchNorm2d backward of the last training forward, in place (`dy` becomes `dx`); adds the
/// gradients of gamma and beta into `grad_gamma_beta` (`[dgamma (C), dbeta (C)]`) when given.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    gpu: &Gpu,
    channels: usize,
    m: usize,
    dy: &mut CudaViewMut<'_, f32>,
    xhat: &CudaView<'_, f32>,
    gamma_beta: &CudaView<'_, f32>,
    saved: &CudaView<'_, f32>,
    grad_gamma_beta: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<(), KernelError> {
    need("batchnorm gradient", dy.len(), channels * m)?;
    need("batchnorm xhat", xhat.len(), channels * m)?;
    need("batchnorm gamma/beta", gamma_beta.len(), 2 * channels)?;
    need("batchnorm saved statistics", saved.len(), 2 * channels)?;
    if let Some(g) = &grad_gamma_beta {
        need("batchnorm gamma/beta gradients", g.len(), 2 * channels)?;
    }
    let (c, ml, has_grads) = (int("channels", channels)?, m as i64, grad_gamma_beta.is_some() as i32);
    let stream = gpu.stream();
    let mut b = stream.launch_builder(&gpu.kernels.bn_backward);
    b.arg(dy).arg(xhat).arg(gamma_beta).arg(saved);
    // Without weight gradients the kernel never touches its gradient argument; `saved` stands in
    // for it so that every pointer is a valid one.
    match grad_gamma_beta {
        Some(g) => b.arg(g),
        None => b.arg(saved),
    };
    b.arg(&has_grads).arg(&c).arg(&ml);
    // SAFETY: (float*, const float*, const float*, const float*, float*, int, int, long long);
    // buffers checked above.
    unsafe { b.launch(blocks(channels)) }.or_cuda("bn_backward")?;
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
