//! The Fréchet distance between two sets of feature vectors (Heusel et al., 2017): the
//! distance between the Gaussians with the sets' means and covariances,
//! `|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`.
//!
//! Everything is in f64: the trace of the matrix square root is a difference of large,
//! nearly equal numbers, and in f32 a distance of a set to itself comes out visibly non-zero.
//! `tr((C1 C2)^(1/2))` is computed as `tr((S C2 S)^(1/2))` with `S = C1^(1/2)`: the two
//! matrices are similar, and `S C2 S` is symmetric positive semi-definite, so a symmetric
//! eigen-decomposition (stable, real eigenvalues) suffices where the general product would
//! need a non-symmetric square root.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and covariance of a set of feature vectors.
#[derive(Clone, Debug)]
pub struct GaussianStats {
    pub mean: DVector<f64>,
    pub cov: DMatrix<f64>,
    pub count: usize,
}

impl GaussianStats {
    /// Statistics of `n` row-major vectors of length `d`; the covariance is the unbiased one
    /// (divided by n - 1), as numpy's `cov` that reference FID code uses.
    pub fn of(features: &[f32], d: usize) -> Self {
        let n = features.len() / d;
        assert!(n >= 2, "the Fréchet distance needs at least two vectors per set");
        let x = DMatrix::from_row_iterator(n, d, features.iter().map(|v| *v as f64));
        let mean = DVector::from_iterator(d, (0..d).map(|j| x.column(j).sum() / n as f64));
        let mut centred = x;
        for j in 0..d {
            let m = mean[j];
            centred.column_mut(j).iter_mut().for_each(|v| *v -= m);
        }
        let cov = centred.transpose() * &centred / (n as f64 - 1.0);
        Self { mean, cov, count: n }
    }
}

/// The square root of a symmetric positive semi-definite matrix; eigenvalues that rounding
/// made slightly negative are taken as zero.
pub fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (m + m.transpose()) * 0.5;
    let eig = SymmetricEigen::new(sym);
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// `tr(A^(1/2))` of a symmetric positive semi-definite matrix.
fn trace_sqrt_psd(m: &DMatrix<f64>) -> f64 {
    let sym = (m + m.transpose()) * 0.5;
    SymmetricEigen::new(sym).eigenvalues.iter().map(|l| l.max(0.0).sqrt()).sum()
}

/// The Fréchet distance between two Gaussians.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> f64 {
    let diff = &a.mean - &b.mean;
    let s = sqrt_psd(&a.cov);
    let cross = trace_sqrt_psd(&(&s * &b.cov * &s));
    let d = diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * cross;
    // Rounding can leave a tiny negative value for identical sets.
    d.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize, d: usize, shift: f32, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = kernels::rng::stream(&[seed]);
        let mut x = vec![0.0; n * d];
        kernels::rng::fill_normal(&mut rng, shift, scale, &mut x);
        x
    }

    #[test]
    fn square_root_squares_back() {
        let a = DMatrix::from_row_slice(3, 3, &[4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0]);
        let s = sqrt_psd(&a);
        assert!((&s * &s - &a).abs().max() < 1e-10);
    }

    #[test]
    fn identical_sets_are_zero_and_known_cases_match() {
        let x = gaussian(500, 8, 0.0, 1.0, 1);
        let s = GaussianStats::of(&x, 8);
        assert!(frechet_distance(&s, &s) < 1e-9);
        // Diagonal covariances: FID = |mu1-mu2|^2 + sum (sigma1 - sigma2)^2.
        let mut a = GaussianStats::of(&x, 8);
        let mut b = a.clone();
        a.mean.fill(0.0);
        b.mean.fill(1.0);
        a.cov = DMatrix::from_diagonal_element(8, 8, 4.0);
        b.cov = DMatrix::from_diagonal_element(8, 8, 1.0);
        assert!((frechet_distance(&a, &b) - (8.0 + 8.0 * 1.0)).abs() < 1e-9);
        // Samples of the same distribution are close; a shifted one is far.
        let y = GaussianStats::of(&gaussian(500, 8, 0.0, 1.0, 2), 8);
        let z = GaussianStats::of(&gaussian(500, 8, 2.0, 1.0, 3), 8);
        let near = frechet_distance(&s, &y);
        let far = frechet_distance(&s, &z);
        assert!(near < 0.5 && far > 25.0, "{near} {far}");
    }
}
