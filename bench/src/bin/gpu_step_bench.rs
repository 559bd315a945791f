//! Images/s of whole DCGAN training steps on one GPU (the CUDA backend), one configuration per
//! process, and NCCL's all-reduce on a buffer the size of the gradients. Prints one JSON line
//! per measurement; `bench/gpu_compare.py` runs it beside PyTorch and prints the table.
//!
//! `gpu_step_bench --model dcgan64 --batch 128`
//! `gpu_step_bench --nccl` (all-reduce of G's and D's gradient buffers, one rank)

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kernels::cuda::{CudaGan, DeviceCollective, Gpu, NcclCollective, SingleGpu, nccl_unique_id};
use kernels::{Device, Gan, ModelConfig, OptimConfig, Tensor, Watchdog};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Model {
    /// 64x64 colour, nz 100, ngf = ndf = 64 (the PyTorch example's default).
    Dcgan64,
    /// 32x32 grayscale, nz 100, ngf = ndf = 64.
    Dcgan32,
}

#[derive(Parser, Debug)]
#[command(about = "Times whole DCGAN training steps, and NCCL's all-reduce, on one GPU")]
struct Args {
    #[arg(long, value_enum, default_value = "dcgan64")]
    model: Model,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// The GPU: cuda or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    device: Device,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// TF32 tensor-core GEMMs (off by default: the conformance suite checks fp32).
    #[arg(long)]
    tf32: bool,
    /// Instead of training steps, time NCCL's all-reduce (mean) of one rank on a buffer the
    /// size of the model's gradients (G's and D's together).
    #[arg(long)]
    nccl: bool,
    /// All-reduces timed with --nccl.
    #[arg(long, default_value_t = 50)]
    iters: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let Device::Cuda(ordinal) = args.device.check()? else {
        bail!("--device must be a GPU (cuda or cuda:N), got {}", args.device);
    };
    let gpu = Gpu::open(ordinal)?;
    gpu.set_tf32(args.tf32)?;
    let cfg = match args.model {
        Model::Dcgan64 => ModelConfig::dcgan64(),
        Model::Dcgan32 => ModelConfig::dcgan32_gray(),
    };
    let model = format!("{:?}", args.model).to_lowercase();
    if args.nccl {
        return nccl_bench(&gpu, &cfg, &model, args.iters);
    }

    let mut gan = CudaGan::new(gpu.clone(), cfg.clone(), OptimConfig::default(), 1, args.batch)?;
    let s = cfg.image_size;
    let real_len = args.batch * cfg.nc * s * s;
    let real =
        Tensor::new(vec![args.batch, cfg.nc, s, s], (0..real_len).map(|i| ((i % 255) as f32 / 127.5) - 1.0).collect())?;
    let mut times = Vec::new();
    let mut last = None;
    for step in 0..args.warmup + args.steps {
        let z = kernels::rng::noise(1, 0, step as u64, args.batch, cfg.nz);
        let t = Instant::now();
        // train_step returns after reading the losses back, so the step has finished on the GPU.
        let stats = gan.train_step(&real, &z, 1.0, &mut SingleGpu)?;
        if step >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
        last = Some(stats);
    }
    let stats = last.context("no step ran")?;
    if !(stats.loss_d.is_finite() && stats.loss_g.is_finite()) {
        bail!("the losses are not finite: {stats:?}");
    }
    let step_s = dcgan_bench::median(&mut times);
    let flops = dcgan_bench::step_flops_per_image(&cfg) * args.batch as f64;
    let info = gpu.info();
    println!(
        "{}",
        serde_json::json!({
            "program": "dcgan-at-scale-cuda",
            "model": model,
            "batch": args.batch,
            "tf32": args.tf32,
            "gpu": info.name,
            "step_seconds_median": step_s,
            "images_per_sec": args.batch as f64 / step_s,
            "gflops": flops / step_s / 1e9,
            "loss_d": stats.loss_d,
            "loss_g": stats.loss_g,
        })
    );
    Ok(())
}

/// One rank's NCCL all-reduce (mean) on a buffer of the gradients' size, as the step issues it
/// (one call per network; here both networks' sizes in one buffer). With one rank there is no
/// traffic between GPUs: the bus bandwidth is 0 by definition (2(n-1)/n of the algorithm
/// bandwidth), so only the algorithm bandwidth, bytes / time, is reported.
fn nccl_bench(gpu: &Gpu, cfg: &ModelConfig, model: &str, iters: usize) -> Result<()> {
    let cpu = Gan::new(cfg.clone(), OptimConfig::default(), 1)?;
    let len = cpu.generator_params().len() + cpu.discriminator_params().len();
    let id = nccl_unique_id()?;
    let mut comm = NcclCollective::new(gpu, &id, 0, 1, Watchdog::timeout_only(std::time::Duration::from_secs(60)))?;
    let mut buf = gpu.zeros(len)?;
    for _ in 0..5 {
        comm.all_reduce_mean(&mut buf.as_view_mut()).map_err(anyhow::Error::from_boxed)?;
    }
    gpu.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters.max(1) {
        comm.all_reduce_mean(&mut buf.as_view_mut()).map_err(anyhow::Error::from_boxed)?;
    }
    gpu.synchronize()?;
    let per_call = t.elapsed().as_secs_f64() / iters.max(1) as f64;
    let bytes = (len * std::mem::size_of::<f32>()) as f64;
    println!(
        "{}",
        serde_json::json!({
            "program": "nccl-all-reduce",
            "model": model,
            "ranks": comm.world_size(),
            "floats": len,
            "bytes": bytes,
            "seconds_per_call": per_call,
            "algbw_gbps": bytes / per_call / 1e9,
            "busbw_gbps": serde_json::Value::Null,
            "note": "1 rank: no inter-GPU traffic, algbw only (busbw = algbw * 2(n-1)/n needs n >= 2 ranks)",
        })
    );
    Ok(())
}
