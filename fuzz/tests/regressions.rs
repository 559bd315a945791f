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
