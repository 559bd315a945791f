//! Binary cross-entropy on D's logits: the values of PyTorch's `BCELoss(sigmoid(x))`, computed
//! from the logits so that nothing overflows.

use super::activation::sigmoid;

/// PyTorch's BCELoss clamps each log term at -100, so no element's loss exceeds 100.
const LOG_CLAMP: f32 = 100.0;

/// Mean BCE of `sigmoid(logits)` against the constant `target`, the gradient with respect to the
/// logits written into `grad`, and the mean of `sigmoid(logits)` (the example's D(x) / D(G(z))).
///
/// The log terms are computed from the logits (`log sigmoid(x) = -softplus(-x)`), so nothing
/// overflows or cancels. The loss values are PyTorch's: where its f32 sigmoid rounds to exactly
/// 0 or 1 (|x| > ~17) the log term is clamped at -100 as `BCELoss` does. The gradient is the
/// exact `sigmoid(x) - t` everywhere; PyTorch's vanishes in that saturated range (it divides by
/// `max(p(1-p), 1e-12)`), which would stall a discriminator that is confidently wrong.
pub fn bce_with_logits(logits: &[f32], target: f32, grad: &mut [f32]) -> (f32, f32) {
    assert_eq!(logits.len(), grad.len());
    let n = logits.len() as f32;
    let mut loss = 0.0f64;
    let mut mean_p = 0.0f64;
    for (x, g) in logits.iter().zip(grad.iter_mut()) {
        let p = sigmoid(*x);
        let log_p = if p == 0.0 { -LOG_CLAMP } else { (-softplus(-x)).max(-LOG_CLAMP) };
        let log_1mp = if p == 1.0 { -LOG_CLAMP } else { (-softplus(*x)).max(-LOG_CLAMP) };
        loss -= (target * log_p + (1.0 - target) * log_1mp) as f64;
        mean_p += p as f64;
        *g = (p - target) / n;
    }
    ((loss / n as f64) as f32, (mean_p / n as f64) as f32)
}

/// `log(1 + e^x)` without overflow.
fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}
