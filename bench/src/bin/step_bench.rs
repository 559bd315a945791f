//! Images/s of whole DCGAN training steps on the CPU, one configuration per process (so that
//! the peak memory is that configuration's). Prints one JSON line; `bench/compare.py` runs it
//! beside PyTorch and prints the table.
//!
//! `cargo run --release -p dcgan-bench --bin step_bench -- --model dcgan64 --threads 2`

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use kernels::ops::matmul::{Gemm, Operand, Output};
use kernels::{Gan, ModelConfig, OptimConfig, Precision, SingleProcess, Tensor};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Model {
    /// 64x64 colour, nz 100, ngf = ndf = 64 (the PyTorch example's default).
    Dcgan64,
    /// 32x32 grayscale, nz 100, ngf = ndf = 64.
    Dcgan32,
}

#[derive(Parser, Debug)]
#[command(about = "Times whole DCGAN training steps on the CPU")]
struct Args {
    #[arg(long, value_enum, default_value = "dcgan64")]
    model: Model,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Compute threads (rayon pool size).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also time a large square f32 GEMM on the same threads: the machine's practical peak.
    #[arg(long)]
    gemm_peak: bool,
    /// Print a per-layer profile of the timed steps to stderr (forward, backward-data and
    /// backward-weight of every layer, BatchNorm, activations, all-reduce, Adam).
    #[arg(long)]
    profile: bool,
    /// The convolutions' products: f32, or bf16 (operands rounded to bf16, fp32 accumulation;
    /// needs AVX512-BF16).
    #[arg(long, default_value = "f32")]
    precision: Precision,
}

fn gemm_peak_gflops() -> f64 {
    let n = 1536;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b = a.clone();
    let mut c = vec![0.0; n * n];
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        kernels::ops::matmul::matmul(
            Gemm { m: n, n, k: n },
            Operand::normal(&a),
            Operand::normal(&b),
            Output::overwrite(&mut c),
        );
        times.push(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / dcgan_bench::median(&mut times) / 1e9
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The worker runs each step inside its compute pool (`pool.install`), so that the step's
    // parallel operations start on a pool thread instead of waking the pool from outside once
    // per operation; the benchmark does the same.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(args.threads).build().context("building the thread pool")?;
    let cfg = match args.model {
        Model::Dcgan64 => ModelConfig::dcgan64(),
        Model::Dcgan32 => ModelConfig::dcgan32_gray(),
    };
    let mut gan = Gan::new(cfg.clone(), OptimConfig::default(), 1)?;
    gan.set_precision(args.precision)?;
    let s = cfg.image_size;
    let real_len = args.batch * cfg.nc * s * s;
    let real =
        Tensor::new(vec![args.batch, cfg.nc, s, s], (0..real_len).map(|i| ((i % 255) as f32 / 127.5) - 1.0).collect())?;
    let mut times = Vec::new();
    let profile = dcgan_bench::profile::Profile::default();
    let mut profiling: Option<tracing::Dispatch> = None;
    for step in 0..args.warmup + args.steps {
        if step == args.warmup && args.profile {
            profiling = Some(profile.dispatch());
        }
        let z = kernels::rng::noise(1, 0, step as u64, args.batch, cfg.nz);
        let t = Instant::now();
        dcgan_bench::profile::run_profiled(&pool, profiling.as_ref(), || {
            gan.train_step(&real, &z, 1.0, &mut SingleProcess)
        })?;
        if step >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let step_s = dcgan_bench::median(&mut times);
    if args.profile {
        let totals = profile.totals.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!(
            "{:?} batch {} threads {}: per-layer profile over {} steps\n{}",
            args.model,
            args.batch,
            args.threads,
            args.steps,
            dcgan_bench::profile::table(&totals, args.steps, step_s)
        );
    }
    let flops = dcgan_bench::step_flops_per_image(&cfg) * args.batch as f64;
    let mut out = serde_json::json!({
        "program": "dcgan-at-scale",
        "model": format!("{:?}", args.model).to_lowercase(),
        "batch": args.batch,
        "threads": args.threads,
        "precision": args.precision.to_string(),
        "step_seconds_median": step_s,
        "images_per_sec": args.batch as f64 / step_s,
        "gflops": flops / step_s / 1e9,
        "peak_rss_mib": dcgan_bench::peak_rss_mib(),
    });
    if args.gemm_peak {
        out["gemm_peak_gflops"] = serde_json::json!(pool.install(gemm_peak_gflops));
    }
    println!("{out}");
    Ok(())
}
