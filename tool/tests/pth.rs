//! PyTorch `.pth` files taken natively: `dcgan convert` without Python, and `--checkpoint`
//! naming a `netG.pth` directly. The files are pyformats' committed fixtures (written by torch
//! through `pyformats/tests/fixtures/make_pth.py`), so no torch is needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pyformats/tests/fixtures").join(name)
}

fn dcgan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dcgan")).args(args).output().expect("the dcgan binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = dcgan(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "dcgan {args:?} failed:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_pytorch_generator_converts_without_python_and_generates_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("generator.safetensors");
    // No Python may run: the interpreter named does not exist.
    let said = ok(&["convert", "--input", s(&fixture("netG.pth")), "--output", s(&st), "--python", "/no/python3"]);
    assert!(said.contains("19 tensors") && said.contains("32x32 images, nc 3, nz 4, ngf 4"), "{said}");

    // Every tensor holds what torch saved (expected.json: sha256 of the f32 / i64 values).
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap();
    let bytes = std::fs::read(&st).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let want = expected["files"]["netG.pth"].as_array().unwrap();
    assert_eq!(file.len(), want.len());
    for w in want {
        let name = w["name"].as_str().unwrap();
        let t = file.tensor(name).unwrap();
        let sha: String = Sha256::digest(t.data()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sha, w["sha256"].as_str().unwrap(), "{name}");
    }

    // --checkpoint takes the .pth itself, and DataParallel's prefixed file, with the same samples.
    let mut grids = Vec::new();
    for (source, out) in [(st.clone(), "a"), (fixture("netG.pth"), "b"), (fixture("netG_module.pth"), "c")] {
        let out = tmp.path().join(out);
        ok(&["generate", "--checkpoint", s(&source), "--count", "4", "--seed", "3", "--out", s(&out)]);
        grids.push(std::fs::read(out.join("samples.png")).unwrap());
    }
    assert!(grids[0] == grids[1] && grids[1] == grids[2], "the three sources give different samples");
}

#[test]
fn a_discriminator_or_legacy_file_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for (file, want) in [("netD.pth", "netD.pth"), ("legacy.pth", "torch < 1.6")] {
        let run = dcgan(&["generate", "--checkpoint", s(&fixture(file)), "--out", s(&out)]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && err.contains(want) && !err.contains("panicked"), "{file}: {err}");
    }
    let run =
        dcgan(&["convert", "--input", s(&fixture("legacy.pth")), "--output", s(&tmp.path().join("l.safetensors"))]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("legacy.pth") && err.contains("_use_new_zipfile_serialization=True"),
        "{err}"
    );
}
