//! Linear classifiers: multinomial logistic regression trained with Adam on kernels' GEMM, and
//! the softmax cross-entropy it (and the FID classifier) minimise.
//!
//! Two places need one: the paper's feature-extractor test (a linear classifier on D's
//! features; the paper used an L2-SVM, logistic regression measures the same thing, how
//! linearly separable the classes are in D's features) and the choice of generator feature
//! maps to remove (a logistic regression predicting a marked region from activations).

use kernels::OptimConfig;
use kernels::ops::adam::Adam;
use kernels::ops::matmul::{Gemm, Operand, Output, matmul};
use rand::seq::SliceRandom;

/// Mean softmax cross-entropy of row-major logits (n x k) against `labels`, the gradient with
/// respect to the logits (already divided by n) written into `grad`, and how many rows' argmax
/// equals their label.
pub fn softmax_cross_entropy(logits: &[f32], labels: &[u8], k: usize, grad: &mut [f32]) -> (f32, usize) {
    let n = labels.len();
    assert_eq!(logits.len(), n * k);
    assert_eq!(grad.len(), n * k);
    let mut loss = 0.0f64;
    let mut correct = 0;
    for ((row, g), &y) in logits.chunks(k).zip(grad.chunks_mut(k)).zip(labels) {
        // Shifting by the maximum keeps exp() finite for any logits.
        let m = row.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
        let sum: f64 = row.iter().map(|v| ((v - m) as f64).exp()).sum();
        let log_sum = sum.ln() as f32 + m;
        loss += (log_sum - row[y as usize]) as f64;
        for (j, (gj, v)) in g.iter_mut().zip(row).enumerate() {
            let p = (v - log_sum).exp();
            *gj = (p - if j == y as usize { 1.0 } else { 0.0 }) / n as f32;
        }
        if argmax(row) == y as usize {
            correct += 1;
        }
    }
    ((loss / n.max(1) as f64) as f32, correct)
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if *v > bv { (i, *v) } else { (bi, bv) }).0
}

/// Per-feature mean and standard deviation of a training set, applied to every set, so that
/// one learning rate suits features of very different scales (D's layers differ by orders of
/// magnitude).
#[derive(Clone, Debug)]
pub struct Standardiser {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
}

impl Standardiser {
    pub fn fit(x: &[f32], d: usize) -> Self {
        let n = (x.len() / d).max(1) as f64;
        let mut mean = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        for row in x.chunks(d) {
            for j in 0..d {
                mean[j] += row[j] as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        for row in x.chunks(d) {
            for j in 0..d {
                sq[j] += (row[j] as f64 - mean[j]).powi(2);
            }
        }
        Self {
            mean: mean.iter().map(|m| *m as f32).collect(),
            inv_std: sq.iter().map(|s| (1.0 / ((s / n).sqrt() + 1e-6)) as f32).collect(),
        }
    }

    pub fn apply(&self, x: &mut [f32]) {
        let d = self.mean.len();
        for row in x.chunks_mut(d) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *v = (*v - m) * s;
            }
        }
    }
}

/// How to train a [`SoftmaxRegression`].
#[derive(Clone, Debug)]
pub struct FitOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    /// L2 penalty on the weights (not the biases).
    pub weight_decay: f32,
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self { epochs: 10, batch: 128, lr: 1e-3, weight_decay: 1e-4, seed: 0 }
    }
}

/// `logits = x W + b` with `W` d x k; parameters in one buffer (W, then b) for Adam.
#[derive(Clone, Debug)]
pub struct SoftmaxRegression {
    pub d: usize,
    pub k: usize,
    pub params: Vec<f32>,
}

impl SoftmaxRegression {
    pub fn new(d: usize, k: usize) -> Self {
        Self { d, k, params: vec![0.0; d * k + k] }
    }

    /// The weight of feature `j` for class `c`.
    pub fn weight(&self, j: usize, c: usize) -> f32 {
        self.params[j * self.k + c]
    }

    /// Row-major logits (n x k) for row-major features (n x d).
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.d;
        let mut out = vec![0.0; n * self.k];
        let w = Operand::normal(&self.params[..self.d * self.k]);
        matmul(Gemm { m: n, n: self.k, k: self.d }, Operand::normal(x), w, Output::overwrite(&mut out));
        let b = &self.params[self.d * self.k..];
        out.chunks_mut(self.k).for_each(|r| r.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        out
    }

    /// Fraction of rows whose argmax is their label.
    pub fn accuracy(&self, x: &[f32], labels: &[u8]) -> f64 {
        let logits = self.logits(x);
        let correct = logits.chunks(self.k).zip(labels).filter(|(r, y)| argmax(r) == **y as usize).count();
        correct as f64 / labels.len().max(1) as f64
    }

    /// Minibatch Adam on the mean cross-entropy; returns the last epoch's mean loss.
    pub fn fit(&mut self, x: &[f32], labels: &[u8], opts: &FitOptions) -> f32 {
        let (d, k) = (self.d, self.k);
        let n = labels.len();
        assert_eq!(x.len(), n * d);
        let cfg = OptimConfig { lr: opts.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let mut adam = Adam::new(self.params.len());
        let mut grads = vec![0.0; self.params.len()];
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = kernels::rng::stream(&[0x11EA, opts.seed]);
        let (mut xb, mut yb, mut g) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = 0.0;
        for _ in 0..opts.epochs {
            order.shuffle(&mut rng);
            let (mut total, mut batches) = (0.0, 0);
            for idx in order.chunks(opts.batch.max(1)) {
                let b = idx.len();
                xb.clear();
                yb.clear();
                for &i in idx {
                    xb.extend_from_slice(&x[i * d..(i + 1) * d]);
                    yb.push(labels[i]);
                }
                let logits = self.logits(&xb);
                g.resize(b * k, 0.0);
                let (loss, _) = softmax_cross_entropy(&logits, &yb, k, &mut g);
                total += loss;
                batches += 1;
                // dW = xb^T g, db = column sums of g.
                let (gw, gb) = grads.split_at_mut(d * k);
                matmul(Gemm { m: d, n: k, k: b }, Operand::transposed(&xb), Operand::normal(&g), Output::overwrite(gw));
                gw.iter_mut().zip(&self.params[..d * k]).for_each(|(gv, w)| *gv += opts.weight_decay * w);
                gb.fill(0.0);
                g.chunks(k).for_each(|r| gb.iter_mut().zip(r).for_each(|(a, v)| *a += v));
                adam.step(&cfg, &mut self.params, &grads);
            }
            last = total / batches.max(1) as f32;
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let logits = [0.3, -1.2, 2.0, 0.5, 0.1, -0.4];
        let labels = [2, 0];
        let mut g = [0.0; 6];
        let (l0, correct) = softmax_cross_entropy(&logits, &labels, 3, &mut g);
        assert_eq!(correct, 2);
        for i in 0..6 {
            let mut p = logits;
            p[i] += 1e-3;
            let (l1, _) = softmax_cross_entropy(&p, &labels, 3, &mut [0.0; 6]);
            assert!(((l1 - l0) / 1e-3 - g[i]).abs() < 1e-3, "{i}");
        }
    }

    #[test]
    fn separates_separable_classes() {
        // Class = which of the 3 features is largest.
        let mut rng = kernels::rng::stream(&[9]);
        let mut x = vec![0.0; 600 * 3];
        kernels::rng::fill_normal(&mut rng, 0.0, 1.0, &mut x);
        let labels: Vec<u8> = x.chunks(3).map(|r| argmax(r) as u8).collect();
        let mut m = SoftmaxRegression::new(3, 3);
        m.fit(&x, &labels, &FitOptions { epochs: 60, batch: 32, lr: 0.05, weight_decay: 0.0, seed: 1 });
        assert!(m.accuracy(&x, &labels) > 0.95, "{}", m.accuracy(&x, &labels));
    }
}
