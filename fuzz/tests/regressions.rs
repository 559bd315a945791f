//! Replays every kept fuzz input through its harness: the seeds and every input that once
//! found a bug (`fuzz/regressions/TARGET/`), so a fixed crash stays fixed without libFuzzer.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).expect("kept fuzz input");
            eprintln!("{target}: {}", path.display());
            harness(&bytes);
            count += 1;
        }
    }
    assert!(count > 0, "no kept inputs for {target}: the seeds are missing");
}

#[test]
fn idx_inputs() {
    replay("idx", dcgan_fuzz::idx);
}

#[test]
fn cifar_inputs() {
    replay("cifar", dcgan_fuzz::cifar);
}

#[test]
fn checkpoint_inputs() {
    replay("checkpoint", dcgan_fuzz::checkpoint);
}

#[test]
fn cifar_py_inputs() {
    replay("cifar_py", dcgan_fuzz::cifar_py);
}

#[test]
fn manifest_inputs() {
    replay("manifest", dcgan_fuzz::manifest);
}

/// The seeds that should load do, so that mutating them starts deep in the loaders rather than
/// at their first check.
#[test]
fn seeds_reach_the_loaders() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let loading = [("protocol-2", 4), ("protocol-4", 4), ("protocol-5", 4), ("protocol-4-small-1-records", 1)];
    for (seed, records) in loading {
        let d = data::DatasetSpec::Cifar10(corpus.join("cifar_py").join(seed)).load(32, None).expect(seed);
        assert_eq!(d.len, records, "{seed}");
    }
    let valid = std::fs::read(corpus.join("manifest/valid")).expect("the valid manifest seed");
    let set = data::PreparedSet::open(&dcgan_fuzz::prepared_dir("prepared-seed", &valid)).expect("it opens");
    assert_eq!((set.len(), set.nc(), set.image_size()), (3, 3, 4));
    set.verify(&|_| {}).expect("its sha256s are those of dcgan_fuzz::prepared_files");
    assert_eq!(set.labels().expect("labels"), Some(vec![3, 7, 1]));
}
