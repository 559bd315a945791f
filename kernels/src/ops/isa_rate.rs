//! One core's peak rates of the two instructions a bf16 product chooses between: the fp32 fused
//! multiply-add (`vfmadd231ps zmm`, 16 lanes x 2 FLOPs) and the AVX512-BF16 pair dot product with
//! fp32 accumulation (`vdpbf16ps zmm`, 16 lanes x 2 products x 2 FLOPs).
//!
//! bf16 products pay only where the second runs at more FLOPs than the first, which depends on
//! the core (on Xeons without AMX the dot product has one port against the FMA's two), so this
//! measures it instead of assuming it: `isa_peak` prints both, and `--precision bf16` warns when
//! bf16 would be the slower mode. The operands stay in registers, so memory plays no part.

use std::time::Instant;

/// Independent accumulators: more than latency x ports for both instructions (FMA: 4 cycles x
/// 2 ports), and few enough to stay in the 32 zmm registers. With 24 the compiler spilled some
/// to the stack, which held the FMA loop to about 90 of its 150-160 GFLOP/s on a Xeon.
const CHAINS: usize = 16;

/// GFLOP/s of `iterations x 16` fp32 FMAs on zmm registers (median of `repeats`), or `None`
/// without AVX-512.
pub fn fma_f32_gflops(iterations: usize, repeats: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        let flops = (iterations * CHAINS * 16 * 2) as f64;
        // SAFETY: the feature the loop enables was detected above.
        return Some(median_gflops(repeats, flops, || unsafe { x86::fma(iterations) }));
    }
    let _ = (iterations, repeats);
    None
}

/// GFLOP/s of `iterations x 16` bf16 pair dot products into fp32 zmm accumulators (median of
/// `repeats`), or `None` without AVX512-BF16.
pub fn dot_bf16_gflops(iterations: usize, repeats: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::bf16::supported() {
        let flops = (iterations * CHAINS * 16 * 4) as f64;
        // SAFETY: the features the loop enables were detected by `supported`.
        return Some(median_gflops(repeats, flops, || unsafe { x86::dot_bf16(iterations) }));
    }
    let _ = (iterations, repeats);
    None
}

/// The bf16 dot product's rate over the fp32 FMA's on this core, from about 30 ms of loops, or
/// `None` where the CPU has no bf16 dot product. The two loops alternate after a warm-up (the
/// clock settles), and the best of each is kept: noise only ever slows a loop down.
pub fn bf16_over_f32() -> Option<f64> {
    let iterations = 300_000;
    fma_f32_gflops(iterations, 1)?;
    let (mut fma, mut dot) = (0.0f64, 0.0f64);
    for _ in 0..5 {
        fma = fma.max(fma_f32_gflops(iterations, 1)?);
        dot = dot.max(dot_bf16_gflops(iterations, 1)?);
    }
    Some(dot / fma)
}

/// What to tell a user who asked for bf16 products on a core where they are the slower mode, or
/// `None` where they are not (or cannot run at all, which `Precision::check_supported` reports).
pub fn bf16_slowdown_warning() -> Option<String> {
    let ratio = bf16_over_f32().filter(|r| *r < 1.0)?;
    Some(format!(
        "--precision bf16: this CPU's bf16 dot product runs at {ratio:.2}x the FLOP rate of its fp32 FMA, \
         so bf16 products train more slowly here than --precision f32 (it pays where the ratio is above 1)"
    ))
}

fn median_gflops(repeats: usize, flops: f64, mut run: impl FnMut() -> f32) -> f64 {
    let mut rates: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(run());
            flops / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// `iterations x CHAINS` fp32 FMAs; returns a sum so nothing is elided.
    #[target_feature(enable = "avx512f")]
    pub fn fma(iterations: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        let a = _mm512_set1_ps(1.0e-3);
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, a, *x);
            }
            // Keeps the loop from being folded into a closed form.
            std::hint::black_box(());
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    /// `iterations x CHAINS` bf16 pair dot products into fp32 accumulators.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub fn dot_bf16(iterations: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        let pairs = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0e-3), _mm512_set1_ps(1.0e-3));
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, pairs, pairs);
            }
            std::hint::black_box(());
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both loops report a rate where the CPU has the instruction: positive and finite.
    #[test]
    fn rates_are_measured_where_the_instructions_exist() {
        match fma_f32_gflops(10_000, 3) {
            Some(rate) => assert!(rate.is_finite() && rate > 0.0, "{rate}"),
            None => assert!(!cfg!(target_arch = "x86_64") || !is_x86_feature_detected!("avx512f")),
        }
        assert_eq!(dot_bf16_gflops(10_000, 3).is_some(), super::super::bf16::supported());
    }
}
