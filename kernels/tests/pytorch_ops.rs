//! Every operation against PyTorch on the same inputs (fixtures from `fixtures/make_fixtures.py`).

mod common;

use common::{Fixture, assert_close, swap01};
use kernels::ops::activation::Activation;
use kernels::ops::adam::Adam;
use kernels::ops::batchnorm::{BatchNorm, BnMode};
use kernels::ops::conv::{self, ConvGrads, ConvShape, Unrolled};
use kernels::ops::loss::bce_with_logits;
use kernels::{OptimConfig, Precision};

const TOL: f64 = 1e-4;

/// bf16 keeps 8 bits of mantissa: each operand is within 2^-9 of its fp32 value, so the products
/// differ from PyTorch's fp32 ones by about 2^-8 relative (checked against the largest value).
const BF16_TOL: f64 = 1e-2;

fn conv_case(name: &str, transposed: bool) {
    conv_case_in(name, transposed, Precision::F32, TOL);
}

/// The layer in `precision` against PyTorch's fp32 results, within `tol`.
fn conv_case_in(name: &str, transposed: bool, precision: Precision, tol: f64) {
    let f = Fixture::open(name);
    let (xs, ws, ys) = (f.shape("x").to_vec(), f.shape("w").to_vec(), f.shape("y").to_vec());
    let (n, side) = (xs[0], xs[2]);
    let (in_c, out_c) = if transposed { (ws[0], ws[1]) } else { (ws[1], ws[0]) };
    let shape = ConvShape {
        in_channels: in_c,
        out_channels: out_c,
        kernel: ws[2],
        stride: f.scalar("stride") as usize,
        padding: f.scalar("padding") as usize,
    };
    let p = shape.on(n, side);
    let x = swap01(f.get("x"), n, in_c);
    let gy = swap01(f.get("gy"), n, out_c);
    let w = f.get("w");
    let mut y = vec![0.0; f.get("y").len()];
    let mut gw = vec![0.0; w.len()];
    let mut gx = vec![0.0; x.len()];
    let mut scratch = Vec::new();
    if transposed {
        conv::conv_transpose2d_forward(&p, &x, w, &mut scratch, &mut y, precision);
        let grads = ConvGrads { weight: Some(&mut gw[..]), input: Some(&mut gx[..]) };
        conv::conv_transpose2d_backward(&p, &gy, w, &x, grads, &mut scratch, precision);
    } else {
        let mut cols = Vec::new();
        conv::conv2d_forward(&p, &x, w, &mut cols, &mut y, precision);
        let grads = ConvGrads { weight: Some(&mut gw[..]), input: Some(&mut gx[..]) };
        conv::conv2d_backward(&p, &gy, w, Unrolled::Kept(&cols), grads, &mut scratch, precision);
        // Unrolling the input again (what a large layer does) gives the same weight gradient.
        let mut again = vec![0.0; w.len()];
        let grads = ConvGrads { weight: Some(&mut again[..]), input: None };
        conv::conv2d_backward(&p, &gy, w, Unrolled::Recompute(&x), grads, &mut scratch, precision);
        assert_eq!(again, gw, "{name}: weight gradient from the unrolling kept and from one made again");
    }
    assert_close(&format!("{name} {precision} y"), &swap01(&y, ys[1], n), f.get("y"), tol);
    assert_close(&format!("{name} {precision} gx"), &swap01(&gx, in_c, n), f.get("gx"), tol);
    assert_close(&format!("{name} {precision} gw"), &gw, f.get("gw"), tol);
}

/// Every convolution layer with bf16 products, where the CPU has them (elsewhere the mode is
/// refused, which `ops::bf16`'s tests check).
#[test]
fn bf16_convolutions_match_pytorch_within_bf16_rounding() {
    if let Err(refusal) = Precision::Bf16.check_supported() {
        assert!(refusal.to_string().contains("AVX512-BF16"), "{refusal}");
        eprintln!("no AVX512-BF16 on this CPU: checked the refusal, bf16 layers not compared");
        return;
    }
    for (name, transposed) in [
        ("conv2d_s2p1", false),
        ("conv2d_s1p0", false),
        ("conv_transpose2d_s2p1", true),
        ("conv_transpose2d_s1p0", true),
    ] {
        conv_case_in(name, transposed, Precision::Bf16, BF16_TOL);
    }
}

#[test]
fn conv2d_stride2_matches_pytorch() {
    conv_case("conv2d_s2p1", false);
}

#[test]
fn conv2d_to_one_pixel_matches_pytorch() {
    conv_case("conv2d_s1p0", false);
}

#[test]
fn conv_transpose2d_stride2_matches_pytorch() {
    conv_case("conv_transpose2d_s2p1", true);
}

#[test]
fn conv_transpose2d_from_one_pixel_matches_pytorch() {
    conv_case("conv_transpose2d_s1p0", true);
}

#[test]
fn batchnorm_train_and_eval_match_pytorch() {
    let f = Fixture::open("batchnorm2d");
    let s = f.shape("x").to_vec();
    let (n, c) = (s[0], s[1]);
    let mut bn = BatchNorm::new(c);
    let mut x = swap01(f.get("x"), n, c);
    bn.forward(&mut x, f.get("gamma"), f.get("beta"), BnMode::Train { update_running: true }, None).unwrap();
    assert_close("bn y", &swap01(&x, c, n), f.get("y"), TOL);
    assert_close("bn running_mean", &bn.running_mean, f.get("running_mean"), TOL);
    assert_close("bn running_var", &bn.running_var, f.get("running_var"), TOL);
    assert_eq!(bn.num_batches_tracked, 1);
    let mut dy = swap01(f.get("gy"), n, c);
    let (mut gg, mut gb) = (vec![0.0; c], vec![0.0; c]);
    bn.backward(&mut dy, f.get("gamma"), Some((&mut gg, &mut gb)), None).unwrap();
    assert_close("bn gx", &swap01(&dy, c, n), f.get("gx"), TOL);
    assert_close("bn ggamma", &gg, f.get("ggamma"), TOL);
    assert_close("bn gbeta", &gb, f.get("gbeta"), TOL);

    bn.running_mean = f.get("eval_running_mean").to_vec();
    bn.running_var = f.get("eval_running_var").to_vec();
    let mut x = swap01(f.get("x"), n, c);
    bn.forward(&mut x, f.get("gamma"), f.get("beta"), BnMode::Eval, None).unwrap();
    assert_close("bn y_eval", &swap01(&x, c, n), f.get("y_eval"), TOL);
    assert_eq!(bn.num_batches_tracked, 1, "eval mode leaves the counter alone");
}

#[test]
fn activations_match_pytorch() {
    let f = Fixture::open("activations");
    for (name, act) in [
        ("relu", Activation::Relu),
        ("leaky_relu", Activation::LeakyRelu),
        ("tanh", Activation::Tanh),
        ("sigmoid", Activation::Sigmoid),
    ] {
        let mut y = f.get("x").to_vec();
        act.forward_in_place(&mut y);
        assert_close(&format!("{name} y"), &y, f.get(&format!("{name}_y")), TOL);
        let mut g = f.get("gy").to_vec();
        act.backward_in_place(&y, &mut g);
        assert_close(&format!("{name} gx"), &g, f.get(&format!("{name}_gx")), TOL);
    }
}

#[test]
fn bce_loss_values_match_pytorch_and_gradient_is_exact() {
    let f = Fixture::open("bce");
    let logits = f.get("logits");
    let target = f.get("target");
    // The kernel takes one constant target per call (D's labels are all 1 or all 0): split.
    let mut total = 0.0f64;
    let mut grad = vec![0.0; logits.len()];
    for t in [0.0f32, 1.0] {
        let idx: Vec<usize> = (0..logits.len()).filter(|&i| target[i] == t).collect();
        let xs: Vec<f32> = idx.iter().map(|&i| logits[i]).collect();
        let mut g = vec![0.0; xs.len()];
        let (loss, _) = bce_with_logits(&xs, t, &mut g);
        total += loss as f64 * xs.len() as f64;
        for (k, &i) in idx.iter().enumerate() {
            // back to the mean over all elements, as the fixture's loss is
            grad[i] = g[k] * xs.len() as f32 / logits.len() as f32;
        }
    }
    let loss = (total / logits.len() as f64) as f32;
    assert_close("bce loss", &[loss], &[f.scalar("loss")], TOL);
    let want = f.get("glogits");
    for i in 0..logits.len() {
        let exact = (kernels::ops::activation::sigmoid(logits[i]) - target[i]) / logits.len() as f32;
        assert!((grad[i] - exact).abs() < 1e-7, "gradient {i} is sigmoid(x) - t");
        if logits[i].abs() < 16.0 {
            // Outside PyTorch's f32-saturated range its gradient is the same.
            assert!(
                (grad[i] - want[i]).abs() <= 1e-4 * want[i].abs().max(1e-3),
                "logit {}: {} vs {}",
                logits[i],
                grad[i],
                want[i]
            );
        }
    }
}

#[test]
fn adam_matches_pytorch_for_three_steps() {
    let f = Fixture::open("adam");
    let cfg =
        OptimConfig { lr: f.scalar("lr"), beta1: f.scalar("beta1"), beta2: f.scalar("beta2"), eps: f.scalar("eps") };
    let mut p = f.get("param").to_vec();
    let mut adam = Adam::new(p.len());
    for k in 1..=3 {
        adam.step(&cfg, &mut p, f.get(&format!("g{k}")));
        // Parameters compared relative to the update size: p moves by ~lr per step.
        let want = f.get(&format!("p{k}"));
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6, "step {k}: {a} vs {b}");
        }
    }
    assert_close("exp_avg", &adam.exp_avg, f.get("exp_avg3"), TOL);
    assert_close("exp_avg_sq", &adam.exp_avg_sq, f.get("exp_avg_sq3"), TOL);
}
