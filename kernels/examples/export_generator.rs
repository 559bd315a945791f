//! Writes the generator that the PyTorch round-trip fixture loads:
//! `cargo run -p kernels --example export_generator`, then rerun
//! `kernels/fixtures/make_fixtures.py`. The test `rust_generator_loads_in_pytorch` rebuilds the
//! same generator from the same seed and checks PyTorch's images against ours.

use kernels::{Gan, ModelConfig, OptimConfig, Tensor};

/// The generator the fixture describes: size 32, nc 1, nz 8, ngf 8, seed 11, with running
/// statistics made non-trivial by two training steps on the built-in noise.
pub fn fixture_generator() -> Result<Gan, kernels::KernelError> {
    let cfg = ModelConfig { image_size: 32, nc: 1, nz: 8, ngf: 8, ndf: 8 };
    let mut gan = Gan::new(cfg, OptimConfig::default(), 11)?;
    for step in 0..2 {
        let z = kernels::rng::noise(11, 0, step, 6, 8);
        let real = Tensor::new(vec![6, 1, 32, 32], (0..6 * 32 * 32).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect())?;
        gan.train_step(&real, &z, 1.0, &mut kernels::SingleProcess)?;
    }
    Ok(gan)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gan = fixture_generator()?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rust_generator.safetensors");
    std::fs::write(&path, gan.generator_safetensors()?)?;
    println!("wrote {}", path.display());
    Ok(())
}
