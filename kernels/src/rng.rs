//! Seeded random streams: the initial weights and each rank's noise.
//!
//! Noise is drawn from a stream keyed by (seed, rank, step) rather than from one long-lived
//! generator, so a resumed run needs only the step counter to continue exactly, and each rank's
//! noise is independent of how many ranks there are before it.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::Tensor;

/// SplitMix64's finaliser: spreads nearby keys far apart before seeding.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A generator for the stream named by `keys`, the same on every machine for the same keys.
pub fn stream(keys: &[u64]) -> StdRng {
    let mut h = 0x5EED_u64;
    for &k in keys {
        h = mix(h ^ k);
    }
    StdRng::seed_from_u64(h)
}

/// Fills `out` with N(mean, std) samples from `rng`.
pub fn fill_normal(rng: &mut StdRng, mean: f32, std: f32, out: &mut [f32]) {
    for v in out.iter_mut() {
        let s: f32 = StandardNormal.sample(rng);
        *v = mean + std * s;
    }
}

/// Domain tags so that noise and weights never share a stream.
const NOISE_STREAM: u64 = 1;
/// Tag of the fixed noise used for sample grids.
const FIXED_NOISE_STREAM: u64 = 2;

/// The latent batch that `rank` uses at global `step`: shape [batch, nz, 1, 1], N(0, 1).
pub fn noise(seed: u64, rank: u64, step: u64, batch: usize, nz: usize) -> Tensor {
    let mut rng = stream(&[NOISE_STREAM, seed, rank, step]);
    let mut data = vec![0.0; batch * nz];
    fill_normal(&mut rng, 0.0, 1.0, &mut data);
    Tensor::new(vec![batch, nz, 1, 1], data).expect("length matches by construction")
}

/// The fixed noise batch behind every sample grid of a run (the example's `fixed_noise`).
pub fn fixed_noise(seed: u64, batch: usize, nz: usize) -> Tensor {
    let mut rng = stream(&[FIXED_NOISE_STREAM, seed]);
    let mut data = vec![0.0; batch * nz];
    fill_normal(&mut rng, 0.0, 1.0, &mut data);
    Tensor::new(vec![batch, nz, 1, 1], data).expect("length matches by construction")
}
