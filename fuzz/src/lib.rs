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

/// A fresh, empty directory `name` in the scratch directory. Each harness has its own, so the
/// regression test's harnesses can run on parallel threads.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz input directory");
    dir
}

/// What every loaded [`data::Dataset`] must satisfy, however strange its file was.
fn check_dataset(d: &data::Dataset, limit: Option<usize>) {
    assert!(limit.is_none_or(|l| d.len <= l), "the limit is honoured");
    assert_eq!(d.pixels.len(), d.len * d.sample_len(), "samples and pixels agree");
    assert!(d.pixels.iter().all(|v| (-1.0..=1.0).contains(v)), "pixels are normalised");
    if let Some(labels) = &d.labels {
        assert_eq!(labels.len(), d.len, "one label per sample");
    }
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
    let dir = fresh_dir(kind);
    let path = dir.join(format!("{name}{}", suffix(bytes)));
    std::fs::write(&path, bytes).expect("write the fuzz input");
    let spec: data::DatasetSpec = format!("{kind}:{}", path.display()).parse().expect("a valid spec");
    if let Ok(d) = spec.load(16, Some(64)) {
        check_dataset(&d, Some(64));
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

/// A torchvision CIFAR-10 python batch (a pickle): the file `data_batch_1` of a directory,
/// loaded through the directory as `cifar10:DIR` finds it, whole and at the native size. Input
/// that is not a pickle is read as binary records, as a user's file would be.
pub fn cifar_py(bytes: &[u8]) {
    let dir = fresh_dir("cifar10-py");
    std::fs::write(dir.join("data_batch_1"), bytes).expect("write the fuzz input");
    if let Ok(d) = data::DatasetSpec::Cifar10(dir).load(32, None) {
        check_dataset(&d, None);
        assert_eq!((d.nc, d.image_size), (3, 32), "CIFAR-10's shape");
        let labels = d.labels.as_deref().expect("CIFAR-10 has labels");
        assert!(labels.iter().all(|&l| l < 10), "labels are classes 0-9");
    }
}

/// The shard files every `manifest` input is read beside, as `prepare` would have left them:
/// three samples of 3x4x4 bytes in two shards, each with its labels file. The seed
/// `corpus/manifest/valid` describes exactly these (sha256s included); fuzzed manifests may
/// describe them as other shapes, name the same file twice, or name `manifest.json` itself.
pub fn prepared_files() -> [(&'static str, Vec<u8>); 4] {
    [
        ("shard-000000.u8", (0..48u8).collect()),
        ("shard-000000.labels", vec![3]),
        ("shard-000001.u8", (0..96u8).map(|b| 255 - b).collect()),
        ("shard-000001.labels", vec![7, 1]),
    ]
}

/// Writes `manifest.json` with `bytes` beside [`prepared_files`] in the fresh scratch directory
/// `name`.
pub fn prepared_dir(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = fresh_dir(name);
    for (name, content) in prepared_files() {
        std::fs::write(dir.join(name), content).expect("write a shard file");
    }
    std::fs::write(dir.join(data::prepared::MANIFEST_FILE), bytes).expect("write the fuzz input");
    dir
}

/// A prepared data set's `manifest.json`: opened as a trainer opens it, then a few samples
/// gathered and the labels read; whatever opens must read consistently or fail cleanly.
pub fn manifest(bytes: &[u8]) {
    let dir = prepared_dir("prepared", bytes);
    let Ok(set) = data::PreparedSet::open(&dir) else { return };
    let _ = set.manifest().content_id();
    let len = set.len();
    let mut indices: Vec<u32> = [0, 1, len / 2, len.saturating_sub(1)]
        .into_iter()
        .filter(|&i| i < len)
        .filter_map(|i| u32::try_from(i).ok())
        .collect();
    indices.dedup();
    if !indices.is_empty() {
        let mut out = Vec::new();
        if set.gather(&indices, &mut out).is_ok() {
            assert_eq!(out.len(), indices.len() * set.sample_len(), "one sample per index");
            assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)), "pixels are normalised");
        }
    }
    if let Ok(Some(labels)) = set.labels() {
        assert_eq!(labels.len(), len, "one label per sample");
    }
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
