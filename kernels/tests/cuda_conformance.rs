//! The CUDA backend against the CPU reference: every operation, then three whole training
//! steps, on the same inputs, to 1e-4 of each tensor's scale in fp32 (TF32 off).
//!
//! Every test needs an NVIDIA GPU; on a GPU machine:
//! `cargo test --release -p kernels --test cuda_conformance -- --ignored --test-threads=1`
//! (or `scripts/gpu-check.sh`, which runs the prebuilt test binary).

mod common;

use std::sync::Arc;

use common::{assert_close, relative_error};
use kernels::cuda::{self, CudaGan, CudaSlice, DeviceCollective, Gpu, NcclCollective, SingleGpu, ops};
use kernels::ops::activation::Activation;
use kernels::ops::adam::Adam;
use kernels::ops::batchnorm::{BatchNorm, BnMode};
use kernels::ops::conv::{self, ConvGrads, ConvShape, Unrolled};
use kernels::ops::im2col::{self, Geometry};
use kernels::ops::loss;
use kernels::ops::matmul::{self, Gemm, Layout, Operand, Output};
use kernels::{
    Collective, CollectiveError, Gan, ModelConfig, OptimConfig, Precision, SingleProcess, StepShare, StopSignal,
    Tensor, TrainingState, Watchdog, rng,
};

const GPU: &str = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh";
const TOL: f64 = 1e-4;

fn open() -> Arc<Gpu> {
    let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("{GPU}: {e}"));
    assert!(!gpu.tf32(), "conformance is checked in full fp32");
    gpu
}

fn randn(key: u64, len: usize) -> Vec<f32> {
    let mut r = rng::stream(&[0xC0DA, key]);
    let mut v = vec![0.0; len];
    rng::fill_normal(&mut r, 0.0, 1.0, &mut v);
    v
}

fn up(gpu: &Gpu, v: &[f32]) -> CudaSlice<f32> {
    gpu.upload(v).unwrap()
}

fn down(gpu: &Gpu, v: &CudaSlice<f32>) -> Vec<f32> {
    gpu.download(&v.as_view()).unwrap()
}

/// The DCGAN layers' geometries and a few odd ones (stride 1 and 3, odd sizes, padding 2).
const GEOMETRIES: [(usize, usize, usize, usize); 8] =
    [(8, 4, 2, 1), (4, 4, 1, 0), (5, 3, 2, 1), (7, 3, 1, 1), (9, 3, 3, 1), (7, 4, 2, 2), (64, 4, 2, 1), (1, 4, 1, 0)];

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn im2col_and_col2im_match_the_cpu() {
    let gpu = open();
    for (i, &(h, k, s, p)) in GEOMETRIES.iter().enumerate() {
        if h + 2 * p < k {
            continue;
        }
        let g = Geometry::for_conv(3, 2, h, h, k, s, p);
        let x = randn(i as u64, g.big_len());
        let y = randn(100 + i as u64, g.rows() * g.cols());
        let mut cols = vec![0.0; g.rows() * g.cols()];
        im2col::im2col(&g, &x, &mut cols);
        let mut dcols = up(&gpu, &vec![f32::NAN; cols.len()]);
        ops::im2col(&gpu, &g, &up(&gpu, &x).as_view(), &mut dcols.as_view_mut()).unwrap();
        assert_eq!(down(&gpu, &dcols), cols, "im2col {g:?}");

        let mut big = vec![0.0; g.big_len()];
        im2col::col2im(&g, &y, &mut big);
        let mut dbig = up(&gpu, &vec![f32::NAN; big.len()]);
        ops::col2im(&gpu, &g, &up(&gpu, &y).as_view(), &mut dbig.as_view_mut()).unwrap();
        assert_close(&format!("col2im {g:?}"), &down(&gpu, &dbig), &big, 1e-6);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn matmul_matches_the_cpu_in_every_layout() {
    let gpu = open();
    for &(m, n, k) in &[(7, 5, 9), (64, 1024, 48), (512, 16, 1600), (1, 128, 8192)] {
        let a = randn(1, m * k);
        let b = randn(2, k * n);
        let c0 = randn(3, m * n);
        for la in [Layout::Normal, Layout::Transposed] {
            for lb in [Layout::Normal, Layout::Transposed] {
                for accumulate in [false, true] {
                    let mut want = c0.clone();
                    let (oa, ob) = (Operand { data: &a[..], layout: la }, Operand { data: &b[..], layout: lb });
                    matmul::matmul(Gemm { m, n, k }, oa, ob, Output { data: &mut want[..], accumulate });
                    let mut c = up(&gpu, &c0);
                    let (da, db) = (up(&gpu, &a), up(&gpu, &b));
                    let (da, db) = (da.as_view(), db.as_view());
                    let (oa, ob) = (Operand { data: &da, layout: la }, Operand { data: &db, layout: lb });
                    ops::matmul(&gpu, Gemm { m, n, k }, oa, ob, Output { data: &mut c.as_view_mut(), accumulate })
                        .unwrap();
                    assert_close(
                        &format!("matmul {m}x{n}x{k} {la:?} {lb:?} acc={accumulate}"),
                        &down(&gpu, &c),
                        &want,
                        TOL,
                    );
                }
            }
        }
    }
}

/// The DCGAN-64 layers of both networks, plus odd shapes.
fn conv_cases() -> Vec<(ConvShape, usize)> {
    let c = |i, o, k, s, p| ConvShape { in_channels: i, out_channels: o, kernel: k, stride: s, padding: p };
    vec![
        (c(3, 64, 4, 2, 1), 64),
        (c(64, 128, 4, 2, 1), 32),
        (c(512, 1, 4, 1, 0), 4),
        (c(100, 512, 4, 1, 0), 1),
        (c(128, 64, 4, 2, 1), 16),
        (c(64, 3, 4, 2, 1), 32),
        (c(5, 7, 3, 1, 1), 9),
        (c(4, 6, 3, 3, 1), 10),
    ]
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn convolution_forward_and_backward_match_the_cpu() {
    let gpu = open();
    let batch = 3;
    for (i, (s, side)) in conv_cases().into_iter().enumerate() {
        // G's first layer reads a 1x1 input: only a transposed convolution can.
        if side + 2 * s.padding < s.kernel {
            continue;
        }
        let seed = 10 * i as u64;
        let g = Geometry::for_conv(s.in_channels, batch, side, side, s.kernel, s.stride, s.padding);
        let p = s.on(batch, side);
        let out_side = s.conv_output(side);
        let x = randn(seed, s.in_channels * batch * side * side);
        let w = randn(seed + 1, s.weight_len());
        let dy = randn(seed + 2, s.out_channels * batch * out_side * out_side);
        let gw0 = randn(seed + 3, s.weight_len());

        let (mut cols, mut y) = (Vec::new(), vec![0.0; dy.len()]);
        conv::conv2d_forward(&p, &x, &w, &mut cols, &mut y, Precision::F32);
        let (mut gw, mut dx, mut scratch) = (gw0.clone(), vec![0.0; x.len()], Vec::new());
        let grads = ConvGrads { weight: Some(&mut gw[..]), input: Some(&mut dx[..]) };
        conv::conv2d_backward(&p, &dy, &w, Unrolled::Kept(&cols), grads, &mut scratch, Precision::F32);

        let (dx_, dw_, ddy) = (up(&gpu, &x), up(&gpu, &w), up(&gpu, &dy));
        let mut dcols = gpu.zeros(g.rows() * g.cols()).unwrap();
        let mut dyv = gpu.zeros(y.len()).unwrap();
        ops::conv2d_forward(&gpu, &p, &dx_.as_view(), &dw_.as_view(), &mut dcols.as_view_mut(), &mut dyv.as_view_mut())
            .unwrap();
        assert_close(&format!("conv2d forward {s:?}"), &down(&gpu, &dyv), &y, TOL);
        let (mut dgw, mut ddx) = (up(&gpu, &gw0), gpu.zeros(x.len()).unwrap());
        let mut dscratch = gpu.zeros(g.rows() * g.cols()).unwrap();
        ops::conv2d_backward(
            &gpu,
            &p,
            &ddy.as_view(),
            &dw_.as_view(),
            &dcols.as_view(),
            ConvGrads { weight: Some(&mut dgw.as_view_mut()), input: Some(&mut ddx.as_view_mut()) },
            &mut dscratch.as_view_mut(),
        )
        .unwrap();
        assert_close(&format!("conv2d weight gradient {s:?}"), &down(&gpu, &dgw), &gw, TOL);
        assert_close(&format!("conv2d input gradient {s:?}"), &down(&gpu, &ddx), &dx, TOL);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn transposed_convolution_forward_and_backward_match_the_cpu() {
    let gpu = open();
    let batch = 3;
    for (i, (s, side)) in conv_cases().into_iter().enumerate() {
        // As a transposed convolution the same shape reads `side` and writes the larger side.
        if (side - 1) * s.stride + s.kernel < 2 * s.padding + 1 {
            continue;
        }
        let seed = 1000 + 10 * i as u64;
        let g = Geometry::for_conv_transpose(s.out_channels, batch, side, side, s.kernel, s.stride, s.padding);
        let p = s.on(batch, side);
        let out_side = s.conv_transpose_output(side);
        let x = randn(seed, s.in_channels * batch * side * side);
        let w = randn(seed + 1, s.weight_len());
        let dy = randn(seed + 2, s.out_channels * batch * out_side * out_side);
        let gw0 = randn(seed + 3, s.weight_len());

        let (mut scratch, mut y) = (Vec::new(), vec![0.0; dy.len()]);
        conv::conv_transpose2d_forward(&p, &x, &w, &mut scratch, &mut y, Precision::F32);
        let (mut gw, mut dx) = (gw0.clone(), vec![0.0; x.len()]);
        let grads = ConvGrads { weight: Some(&mut gw[..]), input: Some(&mut dx[..]) };
        conv::conv_transpose2d_backward(&p, &dy, &w, &x, grads, &mut scratch, Precision::F32);

        let (dx_, dw_, ddy) = (up(&gpu, &x), up(&gpu, &w), up(&gpu, &dy));
        let mut dscratch = gpu.zeros(g.rows() * g.cols()).unwrap();
        let mut dyv = gpu.zeros(y.len()).unwrap();
        ops::conv_transpose2d_forward(
            &gpu,
            &p,
            &dx_.as_view(),
            &dw_.as_view(),
            &mut dscratch.as_view_mut(),
            &mut dyv.as_view_mut(),
        )
        .unwrap();
        assert_close(&format!("conv_transpose2d forward {s:?}"), &down(&gpu, &dyv), &y, TOL);
        let (mut dgw, mut ddx) = (up(&gpu, &gw0), gpu.zeros(x.len()).unwrap());
        ops::conv_transpose2d_backward(
            &gpu,
            &p,
            &ddy.as_view(),
            &dw_.as_view(),
            &dx_.as_view(),
            ConvGrads { weight: Some(&mut dgw.as_view_mut()), input: Some(&mut ddx.as_view_mut()) },
            &mut dscratch.as_view_mut(),
        )
        .unwrap();
        assert_close(&format!("conv_transpose2d weight gradient {s:?}"), &down(&gpu, &dgw), &gw, TOL);
        assert_close(&format!("conv_transpose2d input gradient {s:?}"), &down(&gpu, &ddx), &dx, TOL);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn activations_forward_and_backward_match_the_cpu() {
    let gpu = open();
    let mut x = randn(7, 10_000);
    // Exact zeros and large values: the conventions at 0 and saturation must agree too.
    x[..8].copy_from_slice(&[0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30, 88.0, -88.0]);
    let dy = randn(8, x.len());
    for act in
        [Activation::Relu, Activation::LeakyRelu, Activation::Tanh, Activation::Sigmoid, Activation::SigmoidInLoss]
    {
        let mut y = x.clone();
        act.forward_in_place(&mut y);
        let mut d = dy.clone();
        act.backward_in_place(&y, &mut d);

        let mut dev = up(&gpu, &x);
        ops::activation_forward(&gpu, act, &mut dev.as_view_mut(), x.len()).unwrap();
        let got = down(&gpu, &dev);
        assert_close(&format!("{act:?} forward"), &got, &y, 1e-6);
        let mut dd = up(&gpu, &dy);
        ops::activation_backward(&gpu, act, &up(&gpu, &y).as_view(), &mut dd.as_view_mut(), x.len()).unwrap();
        assert_close(&format!("{act:?} backward"), &down(&gpu, &dd), &d, 1e-6);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn batchnorm_matches_the_cpu_in_training_and_eval() {
    let gpu = open();
    // M below a block (3x1 .. 5x255: one part per channel, most threads idle), one part of a
    // whole block's multiple, and M split over several blocks per channel (unevenly for 300_001).
    let cases = [(3, 1), (8, 2), (5, 255), (512, 48), (64, 4096), (3, 200_000), (16, 300_001)];
    assert!(ops::bn_parts(5, 255) == 1 && ops::bn_parts(3, 200_000) > 1 && ops::bn_parts(16, 300_001) > 1);
    for &(c, m) in &cases {
        // An offset mean (|mean| >> std in some channels) checks the two-pass variance.
        let mut x = randn(c as u64, c * m);
        x.iter_mut().enumerate().for_each(|(i, v)| *v = *v * 0.5 + ((i / m) % 5) as f32 * 3.0);
        let mut gamma_beta = randn(1 + c as u64, 2 * c);
        gamma_beta[..c].iter_mut().for_each(|g| *g += 1.0);
        let dy = randn(2 + c as u64, c * m);
        let grads0 = randn(3 + c as u64, 2 * c);

        let mut bn = BatchNorm::new(c);
        bn.running_mean = randn(4, c);
        bn.running_var = randn(5, c).iter().map(|v| v.abs() + 0.5).collect();
        let (rm0, rv0) = (bn.running_mean.clone(), bn.running_var.clone());
        let mut y = x.clone();
        let (gamma, beta) = gamma_beta.split_at(c);
        bn.forward(&mut y, gamma, beta, BnMode::Train { update_running: true }, None).unwrap();
        let mut dx = dy.clone();
        let (mut gg, mut gb) = (grads0[..c].to_vec(), grads0[c..].to_vec());
        bn.backward(&mut dx, gamma, Some((&mut gg, &mut gb)), None).unwrap();
        let mut dx_no_grads = dy.clone();
        bn.backward(&mut dx_no_grads, gamma, None, None).unwrap();

        let (mut dy_, mut xhat, mut saved) = (up(&gpu, &x), gpu.zeros(c * m).unwrap(), gpu.zeros(2 * c).unwrap());
        let (mut rm, mut rv, gb_) = (up(&gpu, &rm0), up(&gpu, &rv0), up(&gpu, &gamma_beta));
        // NaN-filled, so that a partial sum read before it is written shows.
        let mut scratch = gpu.stream().clone_htod(&vec![f64::NAN; ops::bn_scratch_len(c, m)]).unwrap();
        ops::batchnorm_forward_train(
            &gpu,
            c,
            m,
            &mut dy_.as_view_mut(),
            &mut xhat.as_view_mut(),
            ops::BnBuffers {
                gamma_beta: &gb_.as_view(),
                saved: &mut saved.as_view_mut(),
                running_mean: &mut rm.as_view_mut(),
                running_var: &mut rv.as_view_mut(),
                scratch: &mut scratch.as_view_mut(),
            },
            true,
        )
        .unwrap();
        assert_close(&format!("batchnorm train forward c={c} m={m}"), &down(&gpu, &dy_), &y, TOL);
        assert_close(&format!("running mean c={c} m={m}"), &down(&gpu, &rm), &bn.running_mean, TOL);
        assert_close(&format!("running var c={c} m={m}"), &down(&gpu, &rv), &bn.running_var, TOL);

        let backward = |ddx: &mut CudaSlice<f32>, grads: Option<&mut CudaSlice<f32>>, scratch: &mut CudaSlice<f64>| {
            let mut g = grads.map(|g| g.as_view_mut());
            ops::batchnorm_backward(
                &gpu,
                c,
                m,
                &mut ddx.as_view_mut(),
                ops::BnGradBuffers {
                    xhat: &xhat.as_view(),
                    gamma_beta: &gb_.as_view(),
                    saved: &saved.as_view(),
                    grad_gamma_beta: g.as_mut(),
                    scratch: &mut scratch.as_view_mut(),
                },
            )
            .unwrap()
        };
        let (mut ddx, mut dgrads) = (up(&gpu, &dy), up(&gpu, &grads0));
        backward(&mut ddx, Some(&mut dgrads), &mut scratch);
        assert_close(&format!("batchnorm input gradient c={c} m={m}"), &down(&gpu, &ddx), &dx, TOL);
        let want_grads: Vec<f32> = gg.iter().chain(&gb).copied().collect();
        assert_close(&format!("batchnorm gamma/beta gradients c={c} m={m}"), &down(&gpu, &dgrads), &want_grads, TOL);
        // The sums are added in a fixed order (no atomics): a second run is bit-identical.
        let (mut again, mut again_grads) = (up(&gpu, &dy), up(&gpu, &grads0));
        backward(&mut again, Some(&mut again_grads), &mut scratch);
        assert!(down(&gpu, &again) == down(&gpu, &ddx), "batchnorm backward c={c} m={m} is not reproducible");
        assert!(down(&gpu, &again_grads) == down(&gpu, &dgrads), "batchnorm gradients c={c} m={m} not reproducible");
        let mut ddx2 = up(&gpu, &dy);
        backward(&mut ddx2, None, &mut scratch);
        assert_close(
            &format!("batchnorm input gradient, no weight grads, c={c}"),
            &down(&gpu, &ddx2),
            &dx_no_grads,
            TOL,
        );

        // Eval mode with the (updated) running statistics.
        let mut ye = x.clone();
        bn.forward(&mut ye, gamma, beta, BnMode::Eval, None).unwrap();
        let mut dye = up(&gpu, &x);
        let (rm_now, rv_now) = (up(&gpu, &bn.running_mean), up(&gpu, &bn.running_var));
        ops::batchnorm_forward_eval(
            &gpu,
            c,
            m,
            &mut dye.as_view_mut(),
            &gb_.as_view(),
            &rm_now.as_view(),
            &rv_now.as_view(),
        )
        .unwrap();
        assert_close(&format!("batchnorm eval forward c={c}"), &down(&gpu, &dye), &ye, TOL);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn bce_loss_matches_the_cpu() {
    let gpu = open();
    for &n in &[1usize, 7, 128, 1000] {
        let mut logits: Vec<f32> = randn(n as u64, n).iter().map(|v| v * 4.0).collect();
        if n >= 7 {
            logits[..6].copy_from_slice(&[0.0, 17.5, -17.5, 40.0, -40.0, 1e-8]);
        }
        for target in [0.0f32, 1.0] {
            let mut grad = vec![0.0; n];
            let (l, p) = loss::bce_with_logits(&logits, target, &mut grad);
            let (mut dgrad, mut out) = (gpu.zeros(n).unwrap(), gpu.zeros(2).unwrap());
            ops::bce_with_logits(
                &gpu,
                &up(&gpu, &logits).as_view(),
                n,
                target,
                &mut dgrad.as_view_mut(),
                &mut out.as_view_mut(),
            )
            .unwrap();
            let out = down(&gpu, &out);
            assert!(((out[0] - l) / l.max(1e-6)).abs() as f64 <= TOL, "loss n={n} t={target}: {} vs {l}", out[0]);
            assert!(((out[1] - p) / p.max(1e-6)).abs() as f64 <= TOL, "mean p n={n} t={target}: {} vs {p}", out[1]);
            assert_close(&format!("loss gradient n={n} t={target}"), &down(&gpu, &dgrad), &grad, 1e-6);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn adam_matches_the_cpu_over_several_steps() {
    let gpu = open();
    let n = 100_003;
    let cfg = OptimConfig::default();
    let mut params = randn(1, n);
    let mut adam = Adam::new(n);
    let (mut dp, mut dm, mut dv) = (up(&gpu, &params), gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    for step in 1..=5u64 {
        let grads = randn(10 + step, n);
        adam.step(&cfg, &mut params, &grads);
        let dg = up(&gpu, &grads);
        ops::adam_step(
            &gpu,
            &cfg,
            step,
            &mut dp.as_view_mut(),
            &dg.as_view(),
            &mut dm.as_view_mut(),
            &mut dv.as_view_mut(),
        )
        .unwrap();
        assert_close(&format!("adam params step {step}"), &down(&gpu, &dp), &params, 1e-6);
        assert_close(&format!("adam m step {step}"), &down(&gpu, &dm), &adam.exp_avg, 1e-6);
        assert_close(&format!("adam v step {step}"), &down(&gpu, &dv), &adam.exp_avg_sq, 1e-6);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn transpose_and_scale_match_the_cpu() {
    let gpu = open();
    let (a, b, rest) = (5, 3, 7);
    let x = randn(1, a * b * rest);
    let mut want = vec![0.0; x.len()];
    kernels::tensor::swap_leading_axes(&x, a, b, rest, &mut want);
    let mut out = gpu.zeros(x.len()).unwrap();
    ops::swap_leading_axes(&gpu, &up(&gpu, &x).as_view(), a, b, rest, &mut out.as_view_mut()).unwrap();
    assert_eq!(down(&gpu, &out), want);
    let mut d = up(&gpu, &x);
    ops::scale(&gpu, &mut d.as_view_mut(), 0.25).unwrap();
    assert_eq!(down(&gpu, &d), x.iter().map(|v| v * 0.25).collect::<Vec<_>>());
}

/// A small DCGAN-64 (ngf = ndf = 16), a DCGAN-32 grayscale and the full DCGAN-64.
fn step_configs() -> Vec<(ModelConfig, usize)> {
    vec![
        (ModelConfig { image_size: 64, nc: 3, nz: 100, ngf: 16, ndf: 16 }, 8),
        (ModelConfig::dcgan32_gray(), 8),
        (ModelConfig::dcgan64(), 16),
    ]
}

fn real_batch(cfg: &ModelConfig, n: usize, step: u64) -> Tensor {
    let s = cfg.image_size;
    let data = randn(5000 + step, n * cfg.nc * s * s).iter().map(|v| v.tanh()).collect();
    Tensor::new(vec![n, cfg.nc, s, s], data).unwrap()
}

/// Parameters after Adam: within 1e-4 of the scale, except that a parameter whose gradient was
/// within rounding of zero may have moved by lr the other way in each step (see
/// `pytorch_steps.rs`).
fn assert_params_close(what: &str, got: &[f32], want: &[f32], steps: u64) {
    let lr = OptimConfig::default().lr as f64;
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (*a as f64 - *b as f64).abs();
        assert!(d <= TOL * scale + 2.0 * lr * steps as f64, "{what}[{i}]: {a} vs {b}");
    }
    let e = relative_error(got, want);
    assert!(e < 0.05, "{what}: {e}");
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn three_training_steps_match_the_cpu() {
    let gpu = open();
    for (cfg, n) in step_configs() {
        let name = format!("{cfg:?} batch {n}");
        let mut cpu = Gan::new(cfg.clone(), OptimConfig::default(), 42).unwrap();
        let mut dev = CudaGan::new(gpu.clone(), cfg.clone(), OptimConfig::default(), 42, n).unwrap();
        let start = dev.to_gan().unwrap();
        assert_eq!(start.generator_params(), cpu.generator_params(), "{name}: same initial G");
        assert_eq!(start.discriminator_params(), cpu.discriminator_params(), "{name}: same initial D");

        for step in 1..=3u64 {
            let real = real_batch(&cfg, n, step);
            let z = rng::noise(42, 0, step, n, cfg.nz);
            let want = cpu.train_step(&real, &z, 1.0, &mut SingleProcess).unwrap();
            let got = dev.train_step(&real, &z, 1.0, &mut SingleGpu).unwrap();
            for (what, g, w) in [
                ("loss_d", got.loss_d, want.loss_d),
                ("loss_g", got.loss_g, want.loss_g),
                ("d_x", got.d_x, want.d_x),
                ("d_g_z1", got.d_g_z1, want.d_g_z1),
                ("d_g_z2", got.d_g_z2, want.d_g_z2),
            ] {
                assert!(((g - w) / w).abs() as f64 <= TOL, "{name} step {step} {what}: {g} vs {w}");
            }
            let now = dev.to_gan().unwrap();
            if step == 1 {
                assert_close(&format!("{name} D grads"), now.discriminator_grads(), cpu.discriminator_grads(), TOL);
                assert_close(&format!("{name} G grads"), now.generator_grads(), cpu.generator_grads(), TOL);
            }
            assert_params_close(&format!("{name} step {step} G"), now.generator_params(), cpu.generator_params(), step);
            assert_params_close(
                &format!("{name} step {step} D"),
                now.discriminator_params(),
                cpu.discriminator_params(),
                step,
            );
        }

        // BatchNorm buffers and Adam state travel through the checkpoint, in the CPU format.
        let state = TrainingState { step: 3, epoch: 0, step_in_epoch: 3, seed: 42, config: serde_json::Value::Null };
        let (from_gpu, _) = Gan::load(&dev.save(&state).unwrap()).unwrap();
        let (from_cpu, _) = Gan::load(&cpu.save(&state).unwrap()).unwrap();
        let (mut a, mut b) = (from_gpu, from_cpu);
        for generator in [true, false] {
            let (na, nb) = if generator {
                (a.generator_net(), b.generator_net())
            } else {
                (a.discriminator_net(), b.discriminator_net())
            };
            for (x, y) in na.batch_norms().zip(nb.batch_norms()) {
                assert_eq!(x.num_batches_tracked, y.num_batches_tracked, "{name}");
                assert_close(&format!("{name} running mean"), &x.running_mean, &y.running_mean, TOL);
                assert_close(&format!("{name} running var"), &x.running_var, &y.running_var, TOL);
            }
            assert_eq!(na.adam.step, nb.adam.step, "{name} Adam step");
            assert_close(&format!("{name} Adam exp_avg"), &na.adam.exp_avg, &nb.adam.exp_avg, 1e-3);
        }

        // Samples, with batch statistics and with running statistics, from the same weights (the
        // GPU's, downloaded), so that Adam's sign flips above do not enter.
        let mut reference = dev.to_gan().unwrap();
        let z = rng::fixed_noise(42, n, cfg.nz);
        assert_close(
            &format!("{name} samples"),
            dev.generate(&z).unwrap().data(),
            reference.generate(&z).unwrap().data(),
            TOL,
        );
        assert_close(
            &format!("{name} eval samples"),
            dev.generate_eval(&z).unwrap().data(),
            reference.generate_eval(&z).unwrap().data(),
            TOL,
        );

        // And back: a GPU GAN rebuilt from the downloaded state continues identically.
        let mut again = CudaGan::from_gan(gpu.clone(), &dev.to_gan().unwrap(), n).unwrap();
        let real = real_batch(&cfg, n, 9);
        let z = rng::noise(42, 0, 9, n, cfg.nz);
        let s1 = dev.train_step(&real, &z, 1.0, &mut SingleGpu).unwrap();
        let s2 = again.train_step(&real, &z, 1.0, &mut SingleGpu).unwrap();
        for (g, w) in [(s1.loss_d, s2.loss_d), (s1.loss_g, s2.loss_g), (s1.d_x, s2.d_x)] {
            assert!(
                ((g - w) / w).abs() <= 1e-6,
                "{name}: a round trip through the CPU changes the step: {s1:?} {s2:?}"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn a_smaller_batch_than_the_maximum_and_a_too_large_one() {
    let gpu = open();
    let cfg = ModelConfig { image_size: 32, nc: 1, nz: 16, ngf: 8, ndf: 8 };
    let mut cpu = Gan::new(cfg.clone(), OptimConfig::default(), 3).unwrap();
    let mut dev = CudaGan::new(gpu, cfg.clone(), OptimConfig::default(), 3, 16).unwrap();
    let (real, z) = (real_batch(&cfg, 5, 1), rng::noise(3, 0, 1, 5, cfg.nz));
    let want = cpu.train_step(&real, &z, 1.0, &mut SingleProcess).unwrap();
    let got = dev.train_step(&real, &z, 1.0, &mut SingleGpu).unwrap();
    assert!(((got.loss_d - want.loss_d) / want.loss_d).abs() as f64 <= TOL, "{got:?} vs {want:?}");
    let (real, z) = (real_batch(&cfg, 17, 1), rng::noise(3, 0, 1, 17, cfg.nz));
    let e = dev.train_step(&real, &z, 1.0, &mut SingleGpu).unwrap_err().to_string();
    assert!(e.contains("larger than the 16"), "{e}");
}

/// NCCL with one rank: the communicator forms from a serialised id, and averaging (or summing)
/// over one rank leaves the buffer as it was.
#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn nccl_all_reduce_with_one_rank() {
    let gpu = open();
    let id = cuda::nccl_unique_id().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(id.len(), cuda::NCCL_ID_BYTES);
    let mut comm = NcclCollective::new(&gpu, &id, 0, 1, patient()).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let x = randn(77, 1 << 20);
    let mut buf = up(&gpu, &x);
    comm.all_reduce_mean(&mut buf.as_view_mut()).unwrap();
    comm.all_reduce_sum(&mut buf.slice_mut(..1000)).unwrap();
    assert_eq!(down(&gpu, &buf), x);

    // A whole step through NCCL with one rank is the step without it.
    let cfg = ModelConfig { image_size: 32, nc: 1, nz: 16, ngf: 8, ndf: 8 };
    let mut a = CudaGan::new(gpu.clone(), cfg.clone(), OptimConfig::default(), 5, 4).unwrap();
    let mut b = CudaGan::new(gpu, cfg.clone(), OptimConfig::default(), 5, 4).unwrap();
    let (real, z) = (real_batch(&cfg, 4, 1), rng::noise(5, 0, 1, 4, cfg.nz));
    let sa = a.train_step(&real, &z, 1.0, &mut comm).unwrap();
    let sb = b.train_step(&real, &z, 1.0, &mut SingleGpu).unwrap();
    assert_eq!((sa.loss_d, sa.loss_g), (sb.loss_d, sb.loss_g));
    assert_eq!(a.parameter_checksum().unwrap(), b.parameter_checksum().unwrap());
}

/// A watchdog that would only give up after a minute.
fn patient() -> Watchdog {
    Watchdog::timeout_only(std::time::Duration::from_secs(60))
}

/// A CPU collective of "two ranks" whose other rank has exactly this rank's gradients: the sum
/// doubles them and the mean halves them back, both exact in binary, so the CPU step takes the
/// weighted, averaged path whose result a one-rank NCCL communicator must reproduce.
struct Mirror;

impl Collective for Mirror {
    fn world_size(&self) -> usize {
        2
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        buf.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }
}

/// The averaged-gradient path (weight, then ncclAvg, with the stop vote in the generator's
/// buffer) through a real communicator agrees with the CPU's.
#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn weighted_gradients_and_the_vote_through_nccl_match_the_cpu() {
    let gpu = open();
    let id = cuda::nccl_unique_id().unwrap_or_else(|e| panic!("{e}"));
    let mut comm = NcclCollective::new(&gpu, &id, 0, 1, patient()).unwrap();
    let cfg = ModelConfig { image_size: 32, nc: 1, nz: 16, ngf: 8, ndf: 8 };
    let mut cpu = Gan::new(cfg.clone(), OptimConfig::default(), 8).unwrap();
    let mut dev = CudaGan::new(gpu, cfg.clone(), OptimConfig::default(), 8, 6).unwrap();
    for step in 1..=2u64 {
        let (real, z) = (real_batch(&cfg, 6, step), rng::noise(8, 0, step, 6, cfg.nz));
        let share = StepShare { grad_weight: 0.75, vote: if step == 2 { 4.0 } else { 0.0 } };
        let want = cpu.train_step(&real, &z, share, &mut Mirror).unwrap();
        let got = dev.train_step(&real, &z, share, &mut comm).unwrap();
        assert_eq!(got.vote, want.vote, "step {step}: the vote comes back as cast");
        assert!(((got.loss_g - want.loss_g) / want.loss_g).abs() as f64 <= TOL, "{got:?} vs {want:?}");
        let now = dev.to_gan().unwrap();
        assert_params_close(&format!("step {step} G"), now.generator_params(), cpu.generator_params(), step);
        assert_params_close(&format!("step {step} D"), now.discriminator_params(), cpu.discriminator_params(), step);
    }
}

/// A stop flag for the abort test.
struct StopAfter(std::time::Instant);

impl StopSignal for StopAfter {
    fn stop_reason(&self) -> Option<String> {
        (self.0.elapsed() > std::time::Duration::from_millis(500))
            .then(|| "the coordinator failed the generation".into())
    }
}

/// A peer that never comes: joining a two-rank communicator alone gives up when the watchdog
/// says (stop first, then the timeout), aborts without a panic, and the GPU still works after.
#[test]
#[ignore = "needs an NVIDIA GPU with CUDA: run scripts/gpu-check.sh"]
fn nccl_without_its_peer_is_abandoned_and_the_gpu_still_works() {
    use std::time::{Duration, Instant};
    let gpu = open();
    let id = cuda::nccl_unique_id().unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let stopping = Watchdog::new(Duration::from_secs(60), Arc::new(StopAfter(t0)));
    let e = NcclCollective::new(&gpu, &id, 0, 2, stopping).unwrap_err().to_string();
    assert!(e.contains("worker is stopping: the coordinator failed the generation"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "gave up after {:?}", t0.elapsed());

    let id = cuda::nccl_unique_id().unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let e = NcclCollective::new(&gpu, &id, 0, 2, Watchdog::timeout_only(Duration::from_secs(2))).unwrap_err();
    assert!(e.to_string().contains("no progress for"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "gave up after {:?}", t0.elapsed());

    let id = cuda::nccl_unique_id().unwrap_or_else(|e| panic!("{e}"));
    let mut comm = NcclCollective::new(&gpu, &id, 0, 1, patient()).unwrap();
    let x = randn(5, 4096);
    let mut buf = up(&gpu, &x);
    comm.all_reduce_sum(&mut buf.as_view_mut()).unwrap();
    assert_eq!(down(&gpu, &buf), x);
}
