//! Trains a small DCGAN on one process with kernels directly, writing a run directory the
//! `dcgan` commands accept (`OUT/checkpoints/step_NNNNNNNN/`). For the docs' example models,
//! where the coordinator and its workers would add nothing but setup.
//!
//! cargo run --release -p dcgan-tool --example train_small -- \
//!     --dataset mnist:/work/shared/data/mnist --out runs/mnist --epochs 2 --ngf 32 --ndf 32

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use data::DatasetSpec;
use kernels::{Gan, ModelConfig, OptimConfig, SingleProcess, Tensor, TrainingState};
use rand::seq::SliceRandom;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    dataset: DatasetSpec,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    #[arg(long, default_value_t = 32)]
    ngf: usize,
    #[arg(long, default_value_t = 32)]
    ndf: usize,
    #[arg(long, default_value_t = 100)]
    nz: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let data = a.dataset.load(a.image_size, a.limit).with_context(|| format!("loading {}", a.dataset))?;
    let model = ModelConfig { image_size: a.image_size, nc: data.nc, nz: a.nz, ngf: a.ngf, ndf: a.ndf };
    let mut gan = Gan::new(model.clone(), OptimConfig::default(), a.seed)?;
    let steps_per_epoch = data.len / a.batch;
    let mut rng = kernels::rng::stream(&[0xDA7A, a.seed]);
    let mut order: Vec<u32> = (0..data.len as u32).collect();
    let (mut batch, mut step) = (Vec::new(), 0u64);
    let start = Instant::now();
    for epoch in 0..a.epochs {
        order.shuffle(&mut rng);
        for s in 0..steps_per_epoch {
            data.gather(&order[s * a.batch..(s + 1) * a.batch], &mut batch);
            let real = Tensor::new(vec![a.batch, data.nc, a.image_size, a.image_size], batch.clone())?;
            let z = kernels::rng::noise(a.seed, 0, step, a.batch, a.nz);
            let st = gan.train_step(&real, &z, 1.0, &mut SingleProcess)?;
            step += 1;
            if step % 100 == 0 {
                eprintln!(
                    "epoch {epoch} step {step}: loss_d {:.3} loss_g {:.3} D(x) {:.3} D(G(z)) {:.3} ({:.1} img/s)",
                    st.loss_d,
                    st.loss_g,
                    st.d_x,
                    st.d_g_z1,
                    (step as usize * a.batch) as f64 / start.elapsed().as_secs_f64()
                );
            }
        }
    }
    let state = TrainingState {
        step,
        epoch: a.epochs as u64,
        step_in_epoch: 0,
        seed: a.seed,
        config: serde_json::json!({ "dataset": a.dataset.to_string(), "model": model, "batch": a.batch, "trainer": "tool/examples/train_small.rs" }),
    };
    let dir = a.out.join("checkpoints").join(format!("step_{step:08}"));
    gan.save(&state)?.write_to_dir(&dir)?;
    eprintln!("trained {step} steps in {:.0} s; wrote {}", start.elapsed().as_secs_f64(), dir.display());
    Ok(())
}
