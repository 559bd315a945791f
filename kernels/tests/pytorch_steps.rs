//! Three whole DCGAN training steps against the PyTorch example's loop, and the generator
//! checkpoint's round trip to and from PyTorch.

mod common;

#[path = "../examples/export_generator.rs"]
#[allow(dead_code)]
mod export_generator;

use common::{Fixture, assert_close, relative_error};
use kernels::checkpoint::GENERATOR_FILE;
use kernels::{Gan, ModelConfig, OptimConfig, Precision, SingleProcess, Tensor, TrainingState};
use safetensors::SafeTensors;

const TOL: f64 = 1e-4;

fn tensor(f: &Fixture, key: &str) -> Tensor {
    Tensor::new(f.shape(key).to_vec(), f.get(key).to_vec()).unwrap()
}

/// Reads a network's state out of a saved checkpoint file as name -> values.
fn state_of(bytes: &[u8]) -> Vec<(String, Vec<f32>)> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = match v.dtype() {
                safetensors::Dtype::I64 => vec![i64::from_le_bytes(v.data().try_into().unwrap()) as f32],
                _ => v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            };
            (n, vals)
        })
        .collect()
}

fn whole_steps(name: &str) {
    let f = Fixture::open(name);
    let s = f.shape("real1").to_vec();
    let noise = f.shape("noise1").to_vec();
    let cfg = ModelConfig { image_size: s[2], nc: s[1], nz: noise[1], ngf: 0, ndf: 0 };
    // ngf/ndf from the weights: G's last conv is [ngf, nc, 4, 4], D's first [ndf, nc, 4, 4].
    let g_last = f
        .tensors
        .keys()
        .filter(|k| k.starts_with("g.main.") && f.shape(k).len() == 4)
        .max_by_key(|k| k.split('.').nth(2).and_then(|i| i.parse::<usize>().ok()).unwrap_or(0));
    let ngf = f.shape(g_last.unwrap())[0];
    let ndf = f.shape("d.main.0.weight")[0];
    let cfg = ModelConfig { ngf, ndf, ..cfg };
    let lr = OptimConfig::default().lr as f64;

    let mut gan = Gan::new(cfg, OptimConfig::default(), 0).unwrap();
    gan.load_generator_state(&f.state_dict_file("g"), "fixture g").unwrap();
    gan.load_discriminator_state(&f.state_dict_file("d"), "fixture d").unwrap();

    for k in 1..=3 {
        let st = gan
            .train_step(&tensor(&f, &format!("real{k}")), &tensor(&f, &format!("noise{k}")), 1.0, &mut SingleProcess)
            .unwrap();
        // Losses and D outputs: after Adam's first updates (see below) a few parameters may differ
        // by 2*lr, which moves these by far less than the tolerance.
        for (what, got) in
            [("errD", st.loss_d), ("errG", st.loss_g), ("D_x", st.d_x), ("D_G_z1", st.d_g_z1), ("D_G_z2", st.d_g_z2)]
        {
            let want = f.scalar(&format!("{what}{k}"));
            let tol = TOL;
            assert!(((got - want) / want).abs() as f64 <= tol, "{name} step {k} {what}: {got} vs {want}");
        }
        if k == 1 {
            for (pname, g) in gan.discriminator_gradients_named() {
                assert_close(&format!("{name} gradD1.{pname}"), g, f.get(&format!("gradD1.{pname}")), TOL);
            }
            for (pname, g) in gan.generator_gradients_named() {
                assert_close(&format!("{name} gradG1.{pname}"), g, f.get(&format!("gradG1.{pname}")), TOL);
            }
        }
        if k == 1 || k == 3 {
            let files = gan
                .save(&TrainingState { step: k, epoch: 0, step_in_epoch: k, seed: 0, config: serde_json::Value::Null })
                .unwrap();
            for (prefix, file) in [("g", GENERATOR_FILE), ("d", kernels::checkpoint::DISCRIMINATOR_FILE)] {
                for (tname, got) in state_of(files.get(file).unwrap()) {
                    let want = f.get(&format!("{prefix}{k}.{tname}"));
                    if tname.ends_with("num_batches_tracked") {
                        assert_eq!(got, want, "{name} {prefix}{k}.{tname}");
                    } else if tname.contains("running") {
                        assert_close(&format!("{name} {prefix}{k}.{tname}"), &got, want, TOL);
                    } else {
                        // Adam's first steps move each parameter by about lr * sign(gradient),
                        // whatever the gradient's size; where a gradient is within rounding of
                        // zero the sign can differ between two correct implementations, so a
                        // parameter may differ by up to 2*lr per step. Everything else agrees to
                        // 1e-4 of the tensor's scale.
                        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                        for (i, (a, b)) in got.iter().zip(want).enumerate() {
                            let d = (*a as f64 - *b as f64).abs();
                            assert!(
                                d <= TOL * scale + 2.0 * lr * k as f64,
                                "{name} {prefix}{k}.{tname}[{i}]: {a} vs {b}"
                            );
                        }
                        let e = relative_error(&got, want);
                        assert!(e < 0.05, "{name} {prefix}{k}.{tname}: {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn dcgan32_three_steps_match_pytorch() {
    whole_steps("step_dcgan32");
}

#[test]
fn dcgan64_three_steps_match_pytorch() {
    whole_steps("step_dcgan64");
}

#[test]
fn pytorch_generator_loads_and_generates_the_same_images() {
    let path = common::fixture_path("torch_generator.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let mut gan = Gan::from_generator_file(&bytes, "torch_generator.safetensors", 0).unwrap();
    assert_eq!(gan.model_config(), &ModelConfig { image_size: 32, nc: 1, nz: 8, ngf: 8, ndf: 8 });
    let f = Fixture::open("generator_roundtrip");
    let z = tensor(&f, "rt_z");
    assert_close("eval images", gan.generate_eval(&z).unwrap().data(), f.get("rt_images_eval"), TOL);
    assert_close("train-mode images", gan.generate(&z).unwrap().data(), f.get("rt_images_train"), TOL);
}

#[test]
fn rust_generator_loads_in_pytorch_and_generates_the_same_images() {
    // `rust_generator.safetensors` was written by this crate (examples/export_generator.rs) and
    // loaded by PyTorch with `load_state_dict(strict=True)`, which produced `images_eval`.
    let committed = std::fs::read(common::fixture_path("rust_generator.safetensors")).unwrap();
    let mut gan = Gan::from_generator_file(&committed, "rust_generator.safetensors", 0).unwrap();
    assert_eq!(gan.generator_safetensors().unwrap(), committed, "load then save reproduces the file byte for byte");
    let f = Fixture::open("rust_generator_outputs");
    let images = gan.generate_eval(&tensor(&f, "z")).unwrap();
    assert_close("images from PyTorch's load of our generator", images.data(), f.get("images_eval"), TOL);
    // And the writer still writes what it wrote then: same weights, same layout.
    let fresh = export_generator::fixture_generator().unwrap();
    let st = SafeTensors::deserialize(&committed).unwrap();
    let ours = fresh.generator_safetensors().unwrap();
    let ours = SafeTensors::deserialize(&ours).unwrap();
    let mut names: Vec<_> = st.names();
    names.sort();
    let mut our_names: Vec<_> = ours.names();
    our_names.sort();
    assert_eq!(names, our_names);
    for n in names {
        let (a, b) = (st.tensor(n).unwrap(), ours.tensor(n).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{n}");
    }
}

/// The first step of DCGAN-32 with bf16 products, against PyTorch's fp32 step. Rounding the
/// products' operands to bf16 (8 bits of mantissa) moves the gradients by up to about 10% of
/// their largest value at this fixture's batch of 4 (BatchNorm's backward subtracts nearly
/// equal terms); PyTorch's own bf16 step (CPU autocast, `step_dcgan32_bf16`) moves them as far,
/// so each gradient may be at most twice PyTorch's bf16 distance from the fp32 one.
#[test]
fn dcgan32_step_in_bf16_is_as_close_to_fp32_as_pytorch_bf16() {
    if let Err(refusal) = Precision::Bf16.check_supported() {
        assert!(refusal.to_string().contains("AVX512-BF16"), "{refusal}");
        eprintln!("no AVX512-BF16 on this CPU: checked the refusal, the bf16 step not compared");
        return;
    }
    let f = Fixture::open("step_dcgan32");
    let torch_bf16 = Fixture::open("step_dcgan32_bf16");
    let cfg = ModelConfig {
        image_size: f.shape("real1")[2],
        nc: f.shape("real1")[1],
        nz: f.shape("noise1")[1],
        ngf: f.shape("g.main.9.weight")[0],
        ndf: f.shape("d.main.0.weight")[0],
    };
    let mut gan = Gan::new(cfg, OptimConfig::default(), 0).unwrap();
    gan.load_generator_state(&f.state_dict_file("g"), "fixture g").unwrap();
    gan.load_discriminator_state(&f.state_dict_file("d"), "fixture d").unwrap();
    gan.set_precision(Precision::Bf16).unwrap();
    let st = gan.train_step(&tensor(&f, "real1"), &tensor(&f, "noise1"), 1.0, &mut SingleProcess).unwrap();
    for (what, got) in [("errD", st.loss_d), ("errG", st.loss_g), ("D_x", st.d_x), ("D_G_z1", st.d_g_z1)] {
        let want = f.scalar(&format!("{what}1"));
        assert!(((got - want) / want).abs() <= 1e-2, "step 1 {what}: {got} vs {want}");
    }
    let ours = gan.discriminator_gradients_named().into_iter().map(|(n, g)| (format!("gradD1.{n}"), g.to_vec()));
    let ours =
        ours.chain(gan.generator_gradients_named().into_iter().map(|(n, g)| (format!("gradG1.{n}"), g.to_vec())));
    let mut largest = 0.0f64;
    for (key, got) in ours.collect::<Vec<_>>() {
        let fp32 = f.get(&key);
        let (e, torch_e) = (relative_error(&got, fp32), relative_error(torch_bf16.get(&key), fp32));
        assert!(e <= 2.0 * torch_e + 5e-3, "{key}: {e:.3e} from fp32, PyTorch's bf16 step {torch_e:.3e}");
        largest = largest.max(e);
    }
    assert!(largest > 1e-3, "the bf16 step's gradients equal the fp32 ones ({largest:.1e}): bf16 is not in use");
}
