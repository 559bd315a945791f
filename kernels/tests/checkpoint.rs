//! Checkpoints: a save/load round trip continues training bit for bit, and every kind of bad
//! file is refused with an error naming the file and the tensor.

use kernels::checkpoint::{DISCRIMINATOR_FILE, GENERATOR_FILE, OPTIMIZER_FILE};
use kernels::{CheckpointFiles, Gan, KernelError, ModelConfig, OptimConfig, SingleProcess, Tensor, TrainingState};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn small() -> ModelConfig {
    ModelConfig { image_size: 32, nc: 1, nz: 8, ngf: 4, ndf: 4 }
}

fn batch(step: u64) -> (Tensor, Tensor) {
    let real = Tensor::new(
        vec![4, 1, 32, 32],
        (0..4 * 32 * 32).map(|i| (((i as u64 * 31 + step * 7) % 101) as f32 / 50.0) - 1.0).collect(),
    )
    .unwrap();
    (real, kernels::rng::noise(5, 0, step, 4, 8))
}

fn state(step: u64) -> TrainingState {
    TrainingState { step, epoch: 1, step_in_epoch: 2, seed: 5, config: serde_json::json!({"note": "test"}) }
}

#[test]
fn a_loaded_checkpoint_continues_exactly_as_the_original() {
    let mut a = Gan::new(small(), OptimConfig::default(), 5).unwrap();
    for s in 0..2 {
        let (r, z) = batch(s);
        a.train_step(&r, &z, 1.0, &mut SingleProcess).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    a.save(&state(2)).unwrap().write_to_dir(dir.path()).unwrap();
    let (mut b, st) = Gan::load(&CheckpointFiles::read_from_dir(dir.path()).unwrap()).unwrap();
    assert_eq!(st, state(2));
    assert_eq!(a.state_checksum(), b.state_checksum());
    for s in 2..4 {
        let (r, z) = batch(s);
        let x = a.train_step(&r, &z, 1.0, &mut SingleProcess).unwrap();
        let y = b.train_step(&r, &z, 1.0, &mut SingleProcess).unwrap();
        assert_eq!((x.loss_d, x.loss_g), (y.loss_d, y.loss_g));
    }
    assert_eq!(a.state_checksum(), b.state_checksum(), "Adam state and BN buffers came back too");
}

/// Rewrites one file of a checkpoint, letting `edit` drop or change tensors.
fn rewrite(
    bytes: &[u8],
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| edit(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec()).map(|(d, s, b)| (n, d, s, b)))
        .collect();
    let views: Vec<_> =
        owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

fn load_with(file: &str, bytes: Vec<u8>) -> String {
    let gan = Gan::new(small(), OptimConfig::default(), 5).unwrap();
    let mut files = gan.save(&state(0)).unwrap();
    for (n, b) in files.files.iter_mut() {
        if n == file {
            *b = bytes.clone();
        }
    }
    match Gan::load(&files) {
        Err(e @ KernelError::Checkpoint { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("a bad {file} was accepted"),
    }
}

fn good(file: &str) -> Vec<u8> {
    let gan = Gan::new(small(), OptimConfig::default(), 5).unwrap();
    gan.save(&state(0)).unwrap().get(file).unwrap().to_vec()
}

#[test]
fn a_truncated_file_is_refused_naming_it() {
    let b = good(GENERATOR_FILE);
    let msg = load_with(GENERATOR_FILE, b[..b.len() - 10].to_vec());
    assert!(msg.contains(GENERATOR_FILE), "{msg}");
}

#[test]
fn a_missing_tensor_is_refused_naming_it() {
    let b = rewrite(&good(DISCRIMINATOR_FILE), |n, d, s, b| (n != "main.3.running_var").then_some((d, s, b)));
    let msg = load_with(DISCRIMINATOR_FILE, b);
    assert!(msg.contains(DISCRIMINATOR_FILE) && msg.contains("main.3.running_var") && msg.contains("missing"), "{msg}");
}

#[test]
fn a_wrong_shape_is_refused_naming_the_tensor() {
    let b = rewrite(&good(GENERATOR_FILE), |n, d, s, b| {
        if n == "main.0.weight" { Some((d, vec![s[1], s[0], s[2], s[3]], b)) } else { Some((d, s, b)) }
    });
    let msg = load_with(GENERATOR_FILE, b);
    assert!(msg.contains("main.0.weight") && msg.contains("shape"), "{msg}");
}

#[test]
fn a_wrong_dtype_is_refused_naming_the_tensor() {
    let b = rewrite(&good(GENERATOR_FILE), |n, d, s, b| {
        if n == "main.1.bias" {
            let halves: Vec<u8> = b.chunks_exact(4).flat_map(|c| [c[2], c[3]]).collect();
            Some((Dtype::F16, s, halves))
        } else {
            Some((d, s, b))
        }
    });
    let msg = load_with(GENERATOR_FILE, b);
    assert!(msg.contains("main.1.bias") && msg.contains("dtype"), "{msg}");
}

#[test]
fn a_broken_optimizer_state_is_refused() {
    let b = rewrite(&good(OPTIMIZER_FILE), |n, d, s, b| (n != "generator.exp_avg_sq").then_some((d, s, b)));
    let msg = load_with(OPTIMIZER_FILE, b);
    assert!(msg.contains("generator.exp_avg_sq"), "{msg}");
}

#[test]
fn a_checkpoint_of_another_architecture_is_refused() {
    let other = Gan::new(ModelConfig { ngf: 8, ..small() }, OptimConfig::default(), 1).unwrap();
    let msg = load_with(GENERATOR_FILE, other.generator_safetensors().unwrap());
    assert!(msg.contains("shape"), "{msg}");
}

#[test]
fn the_state_document_is_checked() {
    let msg = load_with(kernels::checkpoint::STATE_FILE, b"{not json".to_vec());
    assert!(msg.contains("state.json"), "{msg}");
}
