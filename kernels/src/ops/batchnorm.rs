//! BatchNorm2d over channel-major activations: training mode with batch statistics (optionally
//! reduced across ranks) and running statistics, eval mode with running statistics.

use rayon::prelude::*;

use crate::collective::{Collective, CollectiveError};

pub const MOMENTUM: f32 = 0.1;
pub const EPS: f32 = 1e-5;

/// How the forward pass normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics; running statistics updated when `update_running`.
    Train { update_running: bool },
    /// Running statistics, as `model.eval()` in PyTorch.
    Eval,
}

/// One BatchNorm2d layer's buffers and what its backward needs from the forward.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub channels: usize,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    /// Forward passes in training mode that updated the running statistics.
    pub num_batches_tracked: i64,
    /// Normalised input of the last training forward, (C, M).
    xhat: Vec<f32>,
    /// 1/sqrt(var + eps) per channel of the last forward.
    inv_std: Vec<f32>,
    /// Values per channel across all ranks in the last forward (N*H*W times the world size).
    count: f64,
}

impl BatchNorm {
    pub fn new(channels: usize) -> Self {
        Self {
            channels,
            running_mean: vec![0.0; channels],
            running_var: vec![1.0; channels],
            num_batches_tracked: 0,
            xhat: Vec::new(),
            inv_std: vec![0.0; channels],
            count: 0.0,
        }
    }

    /// Normalises `x` (C, M) in place into `gamma * xhat + beta`.
    ///
    /// With `sync`, the per-channel sums are all-reduced so every rank normalises with the
    /// statistics of the global batch, as one worker with the whole batch would.
    pub fn forward(
        &mut self,
        x: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        mode: BnMode,
        sync: Option<&mut (dyn Collective + '_)>,
    ) -> Result<(), CollectiveError> {
        let c = self.channels;
        let m = x.len() / c;
        assert_eq!(x.len(), c * m);
        match mode {
            BnMode::Eval => {
                x.par_chunks_mut(m).enumerate().for_each(|(ch, xs)| {
                    let inv = 1.0 / (self.running_var[ch] + EPS).sqrt();
                    let (scale, mean, b) = (gamma[ch] * inv, self.running_mean[ch], beta[ch]);
                    xs.iter_mut().for_each(|v| *v = (*v - mean) * scale + b);
                });
                Ok(())
            }
            BnMode::Train { update_running } => {
                // Two passes (mean, then squared deviations) rather than sum and sum of squares:
                // activations can have |mean| >> std, where the one-pass form cancels badly.
                let mut stats = vec![0.0f32; c + 1];
                stats[..c].par_iter_mut().enumerate().for_each(|(ch, s)| {
                    *s = sum_f64(&x[ch * m..(ch + 1) * m]) as f32;
                });
                stats[c] = m as f32;
                let mut sync = sync;
                if let Some(coll) = sync.as_deref_mut() {
                    coll.all_reduce_sum(&mut stats)?;
                }
                let count = stats[c] as f64;
                let mean: Vec<f32> = stats[..c].iter().map(|s| (*s as f64 / count) as f32).collect();
                let mut sq = vec![0.0f32; c];
                sq.par_iter_mut().enumerate().for_each(|(ch, s)| {
                    let mu = mean[ch];
                    *s = blocked_sum(&x[ch * m..(ch + 1) * m], |v| (v - mu) * (v - mu)) as f32;
                });
                if let Some(coll) = sync {
                    coll.all_reduce_sum(&mut sq)?;
                }
                self.count = count;
                self.xhat.resize(x.len(), 0.0);
                for ch in 0..c {
                    let var = sq[ch] as f64 / count;
                    self.inv_std[ch] = (1.0 / (var + EPS as f64).sqrt()) as f32;
                    if update_running {
                        let unbiased = if count > 1.0 { var * count / (count - 1.0) } else { var };
                        self.running_mean[ch] = (1.0 - MOMENTUM) * self.running_mean[ch] + MOMENTUM * mean[ch];
                        self.running_var[ch] = (1.0 - MOMENTUM) * self.running_var[ch] + MOMENTUM * unbiased as f32;
                    }
                }
                if update_running {
                    self.num_batches_tracked += 1;
                }
                let inv_std = &self.inv_std;
                x.par_chunks_mut(m).zip(self.xhat.par_chunks_mut(m)).enumerate().for_each(|(ch, (xs, hs))| {
                    let (mu, inv, g, b) = (mean[ch], inv_std[ch], gamma[ch], beta[ch]);
                    for (v, h) in xs.iter_mut().zip(hs.iter_mut()) {
                        *h = (*v - mu) * inv;
                        *v = *h * g + b;
                    }
                });
                Ok(())
            }
        }
    }

    /// Backward of the last training forward: `dy` (C, M) becomes `dx` in place; the
    /// gradients of gamma and beta are added into `ggamma`/`gbeta` when given.
    pub fn backward(
        &self,
        dy: &mut [f32],
        gamma: &[f32],
        grads: Option<(&mut [f32], &mut [f32])>,
        sync: Option<&mut (dyn Collective + '_)>,
    ) -> Result<(), CollectiveError> {
        let c = self.channels;
        let m = dy.len() / c;
        assert_eq!(self.xhat.len(), dy.len(), "BatchNorm backward without a matching forward");
        // sums[ch] = sum(dy), sums[c + ch] = sum(dy * xhat)
        let mut sums = vec![0.0f32; 2 * c];
        let (sum_dy, sum_dy_xhat) = sums.split_at_mut(c);
        sum_dy.par_iter_mut().zip(sum_dy_xhat.par_iter_mut()).enumerate().for_each(|(ch, (a, b))| {
            let d = &dy[ch * m..(ch + 1) * m];
            let h = &self.xhat[ch * m..(ch + 1) * m];
            let (s1, s2) = blocked_dot(d, h);
            *a = s1 as f32;
            *b = s2 as f32;
        });
        // gamma/beta gradients are this rank's own (they are averaged with the other
        // gradients); the input gradient needs the global sums when statistics were global.
        if let Some((ggamma, gbeta)) = grads {
            for ch in 0..c {
                gbeta[ch] += sums[ch];
                ggamma[ch] += sums[c + ch];
            }
        }
        if let Some(coll) = sync {
            coll.all_reduce_sum(&mut sums)?;
        }
        let count = self.count as f32;
        let sums = &sums;
        dy.par_chunks_mut(m).zip(self.xhat.par_chunks(m)).enumerate().for_each(|(ch, (d, h))| {
            let scale = gamma[ch] * self.inv_std[ch] / count;
            let (s1, s2) = (sums[ch], sums[c + ch]);
            for (dv, hv) in d.iter_mut().zip(h) {
                *dv = scale * (count * *dv - s1 - *hv * s2);
            }
        });
        Ok(())
    }
}

/// Lanes of the partial sums: wide enough for the compiler to keep them in vector registers.
const LANES: usize = 16;

/// Sums with 16 f32 partial sums per block of 4096 values, blocks added in f64: vectorises, and
/// keeps f32 precision for channels of millions of values.
fn sum_f64(xs: &[f32]) -> f64 {
    blocked_sum(xs, |v| v)
}

/// `sum(f(x))` with the same blocking as [`sum_f64`].
fn blocked_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks(4096) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += f(c[i]);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| f(*v)).sum();
        total += acc.iter().map(|v| *v as f64).sum::<f64>() + tail as f64;
    }
    total
}

/// `(sum(a), sum(a * b))` blocked like [`sum_f64`].
fn blocked_dot(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for (ab, bb) in a.chunks(4096).zip(b.chunks(4096)) {
        let (mut acc1, mut acc2) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (mut ca, mut cb) = (ab.chunks_exact(LANES), bb.chunks_exact(LANES));
        for (x, y) in (&mut ca).zip(&mut cb) {
            for i in 0..LANES {
                acc1[i] += x[i];
                acc2[i] += x[i] * y[i];
            }
        }
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s1 += *x as f64;
            s2 += (*x * *y) as f64;
        }
        s1 += acc1.iter().map(|v| *v as f64).sum::<f64>();
        s2 += acc2.iter().map(|v| *v as f64).sum::<f64>();
    }
    (s1, s2)
}
