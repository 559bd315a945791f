//! `dcgan convert` against real PyTorch: the DCGAN example's `netG` saved by `torch.save`,
//! converted to safetensors, generates here what it generates in PyTorch; converted back, it
//! loads into the example's class with `strict=True` and every tensor is equal.
//!
//! PyTorch (about 5 GB with its CUDA libraries) is not a test dependency, so this test is
//! ignored by default. Run it with a Python that has torch:
//! `DCGAN_TORCH_PYTHON=/path/to/venv/bin/python cargo test -p dcgan-tool --test convert_torch -- --ignored`

use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("DCGAN_TORCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
#[ignore = "needs Python with PyTorch: DCGAN_TORCH_PYTHON=PATH cargo test -p dcgan-tool --test convert_torch -- --ignored"]
fn a_pytorch_example_checkpoint_converts_both_ways() {
    let py = python();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torch_example.py");
    let version = run(&py, &[s(&script), "make", s(dir)]);
    eprintln!("torch {}", version.trim());

    // .pth -> safetensors, loaded by this project: the same images as PyTorch's eval mode.
    let st = dir.join("generator.safetensors");
    let dcgan = env!("CARGO_BIN_EXE_dcgan");
    run(dcgan, &["convert", "--input", s(&dir.join("netG.pth")), "--output", s(&st), "--python", &py]);
    let bytes = std::fs::read(&st).expect("converted file");
    let mut gan = kernels::Gan::from_generator_file(&bytes, s(&st), 0).expect("the converted generator loads");
    let cfg = gan.model_config().clone();
    assert_eq!((cfg.image_size, cfg.nc, cfg.nz, cfg.ngf), (64, 3, 16, 8));
    let z: Vec<Vec<f32>> = serde_json::from_str(&std::fs::read_to_string(dir.join("z.json")).unwrap()).unwrap();
    let want: Vec<f32> = serde_json::from_str(&std::fs::read_to_string(dir.join("out.json")).unwrap()).unwrap();
    let flat: Vec<f32> = z.iter().flatten().copied().collect();
    let z = kernels::Tensor::new(vec![z.len(), cfg.nz, 1, 1], flat).expect("z");
    let got = gan.generate_eval(&z).expect("generate");
    assert_eq!(got.data().len(), want.len());
    let worst = got.data().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "images differ from PyTorch's by up to {worst}");

    // safetensors -> .pth, loaded by the example's class with strict=True: every tensor equal.
    let back = dir.join("back.pth");
    run(dcgan, &["convert", "--input", s(&st), "--output", s(&back), "--python", &py]);
    let said = run(&py, &[s(&script), "check", s(&back), s(&dir.join("netG.pth"))]);
    assert!(said.contains("tensors equal"), "{said}");
}
