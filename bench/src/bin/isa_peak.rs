//! One core's peak rate for the two instructions a bf16 mode would choose between: the fp32
//! fused multiply-add (`vfmadd231ps zmm`, 16 lanes x 2 FLOPs) and the AVX512-BF16 pair dot
//! product with fp32 accumulation (`vdpbf16ps zmm`, 16 lanes x 2 products x 2 FLOPs).
//!
//! A bf16 GEMM pays off only where the second runs at more FLOPs than the first: that depends
//! on the core (on Intel Xeons before AMX the dot product has no more throughput than two FMA
//! ports), so this measures it instead of assuming it. Many independent accumulators hide the
//! latency; the inputs stay in registers, so memory plays no part. Prints one JSON line.

use anyhow::{Result, bail};
use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Peak GFLOP/s of one core: fp32 FMA against the AVX512-BF16 dot product")]
struct Args {
    /// Timed repetitions of each instruction loop (the median is printed).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Loop iterations per repetition (16 instructions each).
    #[arg(long, default_value_t = 20_000_000)]
    iterations: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Independent accumulators: more than latency x ports for both instructions (FMA: 4 cycles
    /// x 2 ports), and few enough to stay in the 32 zmm registers. With 24 (until 2026-12-02) the
    /// compiler spilled accumulators to the stack, which held the FMA loop to about 90 of its
    /// 150-160 GFLOP/s on the Xeon VMs and made bf16 look like 0.83x of fp32 instead of 0.5x.
    pub const CHAINS: usize = 16;

    /// `iterations x CHAINS` fp32 FMAs on zmm registers; returns a sum so nothing is elided.
    #[target_feature(enable = "avx512f")]
    pub fn fma(iterations: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        let a = _mm512_set1_ps(1.0e-3);
        let b = _mm512_set1_ps(1.0e-3);
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, b, *x);
            }
            // Keeps the loop from being folded into a closed form.
            std::hint::black_box(());
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    /// `iterations x CHAINS` bf16 pair dot products into fp32 zmm accumulators.
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

#[cfg(target_arch = "x86_64")]
fn median_gflops(repeats: usize, flops: f64, mut run: impl FnMut() -> f32) -> f64 {
    let mut rates: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(run());
            flops / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    dcgan_bench::median(&mut rates)
}

#[cfg(target_arch = "x86_64")]
fn main() -> Result<()> {
    let args = Args::parse();
    if !std::arch::is_x86_feature_detected!("avx512f") {
        bail!("this CPU has no AVX-512: there is no bf16 dot product to compare");
    }
    let per_iteration = x86::CHAINS as f64 * 16.0;
    let n = args.iterations;
    // SAFETY (both calls): the features each function enables were detected above.
    let fma = median_gflops(args.repeats, per_iteration * 2.0 * n as f64, || unsafe { x86::fma(n) });
    let bf16 = std::arch::is_x86_feature_detected!("avx512bf16")
        .then(|| median_gflops(args.repeats, per_iteration * 4.0 * n as f64, || unsafe { x86::dot_bf16(n) }));
    println!(
        "{}",
        serde_json::json!({
            "fma_f32_gflops": fma,
            "dot_bf16_gflops": bf16,
            "bf16_over_f32": bf16.map(|b| b / fma),
        })
    );
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn main() -> Result<()> {
    let _ = Args::parse();
    bail!("isa_peak measures x86-64 AVX-512 instructions; this is another architecture")
}
