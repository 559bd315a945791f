//! Finite-difference checks of every operation's backward: for a random projection
//! L = <f(x), r>, the analytic dL/dx (and dL/dw) must match central differences.

use kernels::Precision;
use kernels::ops::activation::Activation;
use kernels::ops::batchnorm::{BatchNorm, BnMode};
use kernels::ops::conv::{self, ConvGrads, ConvShape, Unrolled};
use kernels::ops::loss::bce_with_logits;

/// A small deterministic pseudo-random sequence, enough for test inputs.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Compares `analytic` with central differences of `loss` around `x`, on a sample of indices.
fn check(what: &str, x: &[f32], analytic: &[f32], loss: &mut dyn FnMut(&[f32]) -> f64) {
    let h = 1e-2f32;
    let step = (x.len() / 40).max(1);
    let mut worst = 0.0f64;
    let scale = analytic.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
    for i in (0..x.len()).step_by(step) {
        let mut xp = x.to_vec();
        xp[i] += h;
        let lp = loss(&xp);
        xp[i] -= 2.0 * h;
        let lm = loss(&xp);
        let numeric = (lp - lm) / (2.0 * h as f64);
        worst = worst.max((numeric - analytic[i] as f64).abs() / scale);
    }
    assert!(worst < 2e-2, "{what}: finite differences disagree by {worst:.3e} of the gradient's scale");
}

#[test]
fn conv2d_gradients() {
    let s = ConvShape { in_channels: 2, out_channels: 3, kernel: 4, stride: 2, padding: 1 };
    let (n, side) = (2, 6);
    let p = s.on(n, side);
    let out = s.conv_output(side);
    let x = values(2 * n * side * side, 1);
    let w = values(s.weight_len(), 2);
    let r = values(3 * n * out * out, 3);
    let forward = |x: &[f32], w: &[f32]| {
        let mut y = vec![0.0; r.len()];
        conv::conv2d_forward(&p, x, w, &mut Vec::new(), &mut y, Precision::F32);
        dot(&y, &r)
    };
    let mut cols = Vec::new();
    let mut y = vec![0.0; r.len()];
    conv::conv2d_forward(&p, &x, &w, &mut cols, &mut y, Precision::F32);
    let (mut gw, mut gx) = (vec![0.0; w.len()], vec![0.0; x.len()]);
    let grads = ConvGrads { weight: Some(&mut gw[..]), input: Some(&mut gx[..]) };
    conv::conv2d_backward(&p, &r, &w, Unrolled::Kept(&cols), grads, &mut Vec::new(), Precision::F32);
    check("conv2d dx", &x, &gx, &mut |xp| forward(xp, &w));
    check("conv2d dw", &w, &gw, &mut |wp| forward(&x, wp));
}

#[test]
fn conv_transpose2d_gradients() {
    let s = ConvShape { in_channels: 3, out_channels: 2, kernel: 4, stride: 2, padding: 1 };
    let (n, side) = (2, 3);
    let p = s.on(n, side);
    let out = s.conv_transpose_output(side);
    let x = values(3 * n * side * side, 4);
    let w = values(s.weight_len(), 5);
    let r = values(2 * n * out * out, 6);
    let forward = |x: &[f32], w: &[f32]| {
        let mut y = vec![0.0; r.len()];
        conv::conv_transpose2d_forward(&p, x, w, &mut Vec::new(), &mut y, Precision::F32);
        dot(&y, &r)
    };
    let (mut gw, mut gx) = (vec![0.0; w.len()], vec![0.0; x.len()]);
    let grads = ConvGrads { weight: Some(&mut gw[..]), input: Some(&mut gx[..]) };
    conv::conv_transpose2d_backward(&p, &r, &w, &x, grads, &mut Vec::new(), Precision::F32);
    check("conv_transpose2d dx", &x, &gx, &mut |xp| forward(xp, &w));
    check("conv_transpose2d dw", &w, &gw, &mut |wp| forward(&x, wp));
}

#[test]
fn batchnorm_gradients() {
    let c = 3;
    let m = 20;
    let x: Vec<f32> = values(c * m, 7).iter().map(|v| v * 2.0 + 0.5).collect();
    let gamma: Vec<f32> = values(c, 8).iter().map(|v| 1.0 + 0.3 * v).collect();
    let beta = values(c, 9);
    let r = values(c * m, 10);
    let forward = |x: &[f32], gamma: &[f32], beta: &[f32]| {
        let mut y = x.to_vec();
        BatchNorm::new(c).forward(&mut y, gamma, beta, BnMode::Train { update_running: false }, None).unwrap();
        dot(&y, &r)
    };
    let mut bn = BatchNorm::new(c);
    let mut y = x.clone();
    bn.forward(&mut y, &gamma, &beta, BnMode::Train { update_running: true }, None).unwrap();
    let mut dx = r.clone();
    let (mut gg, mut gb) = (vec![0.0; c], vec![0.0; c]);
    bn.backward(&mut dx, &gamma, Some((&mut gg, &mut gb)), None).unwrap();
    check("batchnorm dx", &x, &dx, &mut |xp| forward(xp, &gamma, &beta));
    check("batchnorm dgamma", &gamma, &gg, &mut |gp| forward(&x, gp, &beta));
    check("batchnorm dbeta", &beta, &gb, &mut |bp| forward(&x, &gamma, bp));
}

#[test]
fn activation_gradients() {
    // Keep inputs away from ReLU's kink, where a finite difference straddles it.
    let x: Vec<f32> = values(64, 11).iter().map(|v| if v.abs() < 0.05 { v + 0.1 } else { v * 3.0 }).collect();
    let r = values(64, 12);
    for act in [Activation::Relu, Activation::LeakyRelu, Activation::Tanh, Activation::Sigmoid] {
        let forward = |x: &[f32]| {
            let mut y = x.to_vec();
            act.forward_in_place(&mut y);
            dot(&y, &r)
        };
        let mut y = x.clone();
        act.forward_in_place(&mut y);
        let mut g = r.clone();
        act.backward_in_place(&y, &mut g);
        check(&format!("{act:?}"), &x, &g, &mut |xp| forward(xp));
    }
}

#[test]
fn bce_gradients() {
    let x: Vec<f32> = values(16, 13).iter().map(|v| v * 4.0).collect();
    for t in [0.0, 1.0] {
        let mut g = vec![0.0; x.len()];
        bce_with_logits(&x, t, &mut g);
        check(&format!("bce target {t}"), &x, &g, &mut |xp| {
            let mut scratch = vec![0.0; xp.len()];
            bce_with_logits(xp, t, &mut scratch).0 as f64
        });
    }
}
