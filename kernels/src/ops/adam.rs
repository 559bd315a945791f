//! Adam on a flat parameter buffer, with PyTorch's update order and bias correction.

use serde::{Deserialize, Serialize};

use crate::OptimConfig;

/// First and second moments for every parameter of one network, and the step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub step: u64,
}

impl Adam {
    pub fn new(len: usize) -> Self {
        Self { exp_avg: vec![0.0; len], exp_avg_sq: vec![0.0; len], step: 0 }
    }

    /// One update of `params` from `grads`, as `torch.optim.Adam` (no weight decay, no amsgrad):
    /// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
    pub fn step(&mut self, cfg: &OptimConfig, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len());
        assert_eq!(params.len(), self.exp_avg.len());
        self.step += 1;
        let (step_size, bias2_sqrt) = bias_correction(cfg, self.step);
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.exp_avg.par_chunks_mut(CHUNK))
            .zip(self.exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    m[i] += (g[i] - m[i]) * (1.0 - b1);
                    v[i] = v[i] * b2 + (1.0 - b2) * g[i] * g[i];
                    let denom = v[i].sqrt() / bias2_sqrt + eps;
                    p[i] -= step_size * (m[i] / denom);
                }
            });
    }
}

/// `(lr / (1 - beta1^t), sqrt(1 - beta2^t))` for step `t` (from 1), computed in f64 and rounded
/// once, as PyTorch does; shared with the CUDA kernel so both backends use the same numbers.
pub fn bias_correction(cfg: &OptimConfig, t: u64) -> (f32, f32) {
    let t = t.min(i32::MAX as u64) as i32;
    let bias1 = 1.0 - (cfg.beta1 as f64).powi(t);
    let bias2_sqrt = (1.0 - (cfg.beta2 as f64).powi(t)).sqrt() as f32;
    ((cfg.lr as f64 / bias1) as f32, bias2_sqrt)
}
