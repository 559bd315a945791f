//! Latent vectors: drawing them, saving and reading them, walking between them.
//!
//! Every command that starts from "the samples of seed S" draws them with
//! [`kernels::rng::fixed_noise`], the stream behind a training run's sample grids, so that
//! `--seed` equal to the run's seed shows the very samples the run showed, and sample `i` of a
//! `generate` grid is the same z in `interpolate`, `arithmetic` and `ablate`.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use kernels::Tensor;
use serde::{Deserialize, Serialize};

/// A batch of latent vectors, one row of length `nz` each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latents {
    pub nz: usize,
    pub z: Vec<Vec<f32>>,
}

impl Latents {
    /// `count` vectors of the fixed-noise stream of `seed`.
    pub fn from_seed(seed: u64, count: usize, nz: usize) -> Self {
        let t = kernels::rng::fixed_noise(seed, count, nz);
        Self { nz, z: t.data().chunks(nz).map(<[f32]>::to_vec).collect() }
    }

    pub fn len(&self) -> usize {
        self.z.len()
    }

    pub fn is_empty(&self) -> bool {
        self.z.is_empty()
    }

    /// The vectors as the generator's input, [n, nz, 1, 1].
    pub fn to_tensor(&self) -> Result<Tensor> {
        let data: Vec<f32> = self.z.iter().flatten().copied().collect();
        Ok(Tensor::new(vec![self.z.len(), self.nz, 1, 1], data)?)
    }

    /// Reads a file written by [`Latents::save`], checking it fits a generator with `nz`.
    pub fn load(path: &Path, nz: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading z file {}", path.display()))?;
        let l: Latents = serde_json::from_str(&text)
            .with_context(|| format!("z file {}: expected {{\"nz\": N, \"z\": [[...], ...]}}", path.display()))?;
        ensure!(!l.z.is_empty(), "z file {}: holds no vectors", path.display());
        ensure!(
            l.nz == nz,
            "z file {}: vectors have nz = {}, but the checkpoint's generator takes nz = {nz}",
            path.display(),
            l.nz
        );
        for (i, v) in l.z.iter().enumerate() {
            ensure!(v.len() == nz, "z file {}: vector {i} has {} values, expected {nz}", path.display(), v.len());
            ensure!(v.iter().all(|x| x.is_finite()), "z file {}: vector {i} is not finite", path.display());
        }
        Ok(l)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The vectors at `indices`, each checked against the batch size.
    pub fn pick(&self, indices: &[usize], what: &str) -> Result<Vec<Vec<f32>>> {
        indices
            .iter()
            .map(|&i| {
                self.z.get(i).cloned().with_context(|| {
                    format!("{what}: index {i} is outside the grid of {} samples (0..{})", self.len(), self.len())
                })
            })
            .collect()
    }
}

/// The latents a command works on: from `--z-file` if given, else `count` from `--seed`.
pub fn source(z_file: Option<&Path>, seed: u64, count: usize, nz: usize) -> Result<Latents> {
    match z_file {
        Some(p) => Latents::load(p, nz),
        None => {
            ensure!(count > 0, "--count must be at least 1");
            ensure!(count <= 100_000, "--count {count} is more than 100000 samples");
            Ok(Latents::from_seed(seed, count, nz))
        }
    }
}

/// `a + t (b - a)`.
pub fn lerp(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + t * (y - x)).collect()
}

/// Spherical interpolation (White, 2016): follows the great circle between `a` and `b`, which
/// keeps intermediate points at the norm a Gaussian z typically has, where a straight line
/// passes through the low-norm centre that G rarely saw. Falls back to `lerp` for (anti)parallel
/// vectors, where the circle is undefined.
pub fn slerp(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = (dot / (na * nb).max(1e-12)).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let so = omega.sin();
    if so.abs() < 1e-6 {
        return lerp(a, b, t);
    }
    let t = t as f64;
    let (ka, kb) = (((1.0 - t) * omega).sin() / so, (t * omega).sin() / so);
    a.iter().zip(b).map(|(x, y)| (ka * *x as f64 + kb * *y as f64) as f32).collect()
}

/// Parses "0,3,5" into indices.
pub fn parse_indices(s: &str) -> Result<Vec<usize>> {
    let out: Result<Vec<usize>> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<usize>().with_context(|| format!("'{p}' in '{s}' is not a sample index")))
        .collect();
    let out = out?;
    if out.is_empty() {
        bail!("'{s}' names no index; expected a comma-separated list such as 0,3,5");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_hit_their_ends() {
        let a = [1.0, 0.0, 2.0];
        let b = [0.0, 3.0, -1.0];
        for f in [lerp, slerp] {
            let s = f(&a, &b, 0.0);
            let e = f(&a, &b, 1.0);
            for i in 0..3 {
                assert!((s[i] - a[i]).abs() < 1e-5 && (e[i] - b[i]).abs() < 1e-5);
            }
        }
        // Orthogonal unit vectors: slerp stays on the unit circle.
        let m = slerp(&[1.0, 0.0], &[0.0, 1.0], 0.5);
        assert!(((m[0] * m[0] + m[1] * m[1]).sqrt() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn indices_parse_and_refuse() {
        assert_eq!(parse_indices("0, 3,5").unwrap(), vec![0, 3, 5]);
        assert!(parse_indices("a").is_err());
        assert!(parse_indices(",").is_err());
        let l = Latents::from_seed(1, 4, 2);
        assert!(l.pick(&[4], "x").unwrap_err().to_string().contains("outside the grid"));
    }
}
