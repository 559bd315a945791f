//! One core's peak rate for the two instructions a bf16 mode chooses between, the fp32 FMA and
//! the AVX512-BF16 pair dot product (`kernels::ops::isa_rate` says how and why). Prints one JSON
//! line; `bf16_over_f32` above 1 is where `--precision bf16` can be the faster mode.

use anyhow::{Result, bail};
use clap::Parser;
use kernels::ops::isa_rate;

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

fn main() -> Result<()> {
    let args = Args::parse();
    let Some(fma) = isa_rate::fma_f32_gflops(args.iterations, args.repeats) else {
        bail!("this CPU has no AVX-512: there is no bf16 dot product to compare");
    };
    let bf16 = isa_rate::dot_bf16_gflops(args.iterations, args.repeats);
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
