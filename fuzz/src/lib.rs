//! What each fuzz target does with its input, shared by the targets (`cargo fuzz run NAME`) and
//! by the regression test that replays the kept corpora in every `cargo test`.
//!
//! Every harness feeds untrusted bytes to a real loader the way a user's file would reach it;
//! an `Err` is the correct answer to garbage, a panic, an abort or a runaway allocation is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

use kernels::checkpoint::{DISCRIMINATOR_FILE, GENERATOR_FILE, OPTIMIZER_FILE, STATE_FILE};
use kernels::{CheckpointFiles, Gan, ModelConfig, OptimConfig, TrainingState};

/// A scratch directory of this process (the loaders read files, not buffers).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("dcgan-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch directory");
        d
    })
}

/// Compressed inputs go through the decompressors too: the file is named after its magic.
fn suffix(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x1f, 0x8b, ..] => ".gz",
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => ".xz",
        _ => "",
    }
}

/// Loads `bytes` as the file `name` of a dataset of kind `kind`, small limits so that one input
/// stays fast; the result is only checked for consistency.
fn load_as(kind: &str, name: &str, bytes: &[u8]) {
    let dir = scratch().join(kind);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz dataset directory");
    let path = dir.join(format!("{name}{}", suffix(bytes)));
    std::fs::write(&path, bytes).expect("write the fuzz input");
    let spec: data::DatasetSpec = format!("{kind}:{}", path.display()).parse().expect("a valid spec");
    if let Ok(d) = spec.load(16, Some(64)) {
        assert!(d.len <= 64, "the limit is honoured");
        assert_eq!(d.pixels.len(), d.len * d.sample_len(), "samples and pixels agree");
        assert!(d.pixels.iter().all(|v| (-1.0..=1.0).contains(v)), "pixels are normalised");
    }
}

/// An MNIST-style IDX images file.
pub fn idx(bytes: &[u8]) {
    load_as("mnist", "train-images-idx3-ubyte", bytes);
}

/// A CIFAR-10 binary batch.
pub fn cifar(bytes: &[u8]) {
    load_as("cifar10", "data_batch_1.bin", bytes);
}

/// A valid checkpoint of a small model, the base every checkpoint input mutates.
pub fn valid_checkpoint() -> &'static CheckpointFiles {
    static FILES: OnceLock<CheckpointFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        let model = ModelConfig { image_size: 32, nc: 1, nz: 4, ngf: 2, ndf: 2 };
        let gan = Gan::new(model, OptimConfig::default(), 7).expect("a small model");
        gan.save(&TrainingState { step: 3, epoch: 0, step_in_epoch: 3, seed: 7, config: Default::default() })
            .expect("save")
    })
}

/// The checkpoint files, in the order the first input byte picks from.
pub const CHECKPOINT_FILES: [&str; 4] = [STATE_FILE, GENERATOR_FILE, DISCRIMINATOR_FILE, OPTIMIZER_FILE];

/// A checkpoint with one of its files replaced: the first byte picks which, the rest is its new
/// content. Mutating one file of a valid checkpoint reaches deeper than four random files.
pub fn checkpoint(bytes: &[u8]) {
    let Some((&pick, content)) = bytes.split_first() else { return };
    let target = CHECKPOINT_FILES[pick as usize % CHECKPOINT_FILES.len()];
    let mut files = valid_checkpoint().clone();
    for (name, data) in &mut files.files {
        if name == target {
            *data = content.to_vec();
        }
    }
    if let Ok((gan, state)) = Gan::load(&files) {
        // Whatever loads must be usable: save it again and get the same state back.
        let again = gan.save(&state).expect("a loaded checkpoint saves");
        let (_, state2) = Gan::load(&again).expect("and loads again");
        assert_eq!(state.step, state2.step);
    }
}
