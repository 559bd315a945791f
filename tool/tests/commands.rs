//! Runs the real `dcgan` binary on a tiny checkpoint trained here (ngf = ndf = 8, 32x32, a few
//! steps on the built-in shapes data), checking each command's images: their sizes and the
//! relations between them that hold for any weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use image::RgbImage;
use kernels::{Gan, ModelConfig, OptimConfig, SingleProcess, Tensor, TrainingState};

const NZ: usize = 16;
/// A tile of a grid: 32 pixels and the 2-pixel padding.
const CELL: u32 = 34;

struct Fixture {
    _dir: tempfile::TempDir,
    run: PathBuf,
    checkpoint: PathBuf,
}

/// Trains once per test binary and writes a run directory with one checkpoint.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = data::DatasetSpec::Shapes.load(32, Some(256)).unwrap();
        let model = ModelConfig { image_size: 32, nc: 3, nz: NZ, ngf: 8, ndf: 8 };
        let mut gan = Gan::new(model, OptimConfig::default(), 5).unwrap();
        let b = 16;
        for step in 0..12u64 {
            let start = (step as usize * b) % (data.len - b);
            let real = Tensor::new(vec![b, 3, 32, 32], data.pixels[start * 3072..(start + b) * 3072].to_vec()).unwrap();
            let z = kernels::rng::noise(5, 0, step, b, NZ);
            gan.train_step(&real, &z, 1.0, &mut SingleProcess).unwrap();
        }
        let state = TrainingState { step: 12, epoch: 0, step_in_epoch: 12, seed: 5, config: serde_json::json!({}) };
        let run = dir.path().join("run");
        let checkpoint = run.join("checkpoints/step_00000012");
        gan.save(&state).unwrap().write_to_dir(&checkpoint).unwrap();
        Fixture { _dir: dir, run, checkpoint }
    })
}

fn dcgan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dcgan")).args(args).output().expect("the dcgan binary runs")
}

fn ok(args: &[&str]) -> Output {
    let out = dcgan(args);
    assert!(
        out.status.success(),
        "dcgan {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail, returning its stderr; a panic is a failure of the test. The
/// failure is said as every binary of the project says it, `error: ...` and exit 1 (2 for a
/// usage error), with no backtrace even under `RUST_BACKTRACE=1`.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dcgan"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the dcgan binary runs");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "dcgan {args:?} should fail");
    assert!(!err.contains("panicked"), "dcgan {args:?} panicked:\n{err}");
    assert!(matches!(out.status.code(), Some(1 | 2)), "dcgan {args:?} exited {:?}", out.status.code());
    assert!(err.lines().any(|l| l.starts_with("error: ")), "dcgan {args:?} does not say `error: `:\n{err}");
    let anyhow_style = err.lines().any(|l| l.starts_with("Error: "));
    assert!(!anyhow_style && !err.to_lowercase().contains("stack backtrace"), "dcgan {args:?}:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn png(p: &Path) -> RgbImage {
    image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8()
}

fn size(p: &Path) -> (u32, u32) {
    png(p).dimensions()
}

/// Grid size for `cols` x `rows` tiles of 32 pixels.
fn grid(cols: u32, rows: u32) -> (u32, u32) {
    (cols * CELL + 2, rows * CELL + 2)
}

/// Tile (col, row) of a grid as raw RGB bytes.
fn tile(img: &RgbImage, col: u32, row: u32) -> Vec<u8> {
    image::imageops::crop_imm(img, col * CELL + 2, row * CELL + 2, 32, 32).to_image().into_raw()
}

/// Largest per-channel difference of two tiles.
fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

fn read_z(p: &Path) -> Vec<Vec<f32>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    serde_json::from_value(v["z"].clone()).unwrap()
}

#[test]
fn generate_writes_a_grid_single_images_and_the_z() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("g");
    ok(&["generate", "--checkpoint", s(&f.run), "--count", "10", "--nrow", "5", "--out", s(&o)]);
    assert_eq!(size(&o.join("samples.png")), grid(5, 2));
    let z = read_z(&o.join("z.json"));
    assert_eq!((z.len(), z[0].len()), (10, NZ));

    // The same z from the file, one PNG each, gives the same pictures.
    let e = out.path().join("each");
    ok(&["generate", "--checkpoint", s(&f.checkpoint), "--z-file", s(&o.join("z.json")), "--each", "--out", s(&e)]);
    let g = png(&o.join("samples.png"));
    for i in 0..10u32 {
        let one = png(&e.join(format!("sample_{i:04}.png")));
        assert_eq!(one.dimensions(), (32, 32), "image-size PNGs with no border");
        assert!(max_diff(one.as_raw(), &tile(&g, i % 5, i / 5)) <= 1, "sample {i}");
    }
}

#[test]
fn interpolation_ends_equal_generate_on_the_same_z() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let (g, w) = (out.path().join("g"), out.path().join("w"));
    ok(&["generate", "--checkpoint", s(&f.run), "--seed", "3", "--count", "8", "--nrow", "8", "--out", s(&g)]);
    ok(&[
        "interpolate",
        "--checkpoint",
        s(&f.run),
        "--seed",
        "3",
        "--count",
        "8",
        "--indices",
        "1,4,6",
        "--out",
        s(&w),
    ]);
    let samples = png(&g.join("samples.png"));
    for name in ["linear.png", "spherical.png"] {
        let walk = png(&w.join(name));
        assert_eq!(walk.dimensions(), grid(11, 2), "{name}");
        for (row, a, b) in [(0, 1, 4), (1, 4, 6)] {
            assert!(max_diff(&tile(&walk, 0, row), &tile(&samples, a, 0)) <= 1, "{name} row {row} start");
            assert!(max_diff(&tile(&walk, 10, row), &tile(&samples, b, 0)) <= 1, "{name} row {row} end");
        }
    }
}

#[test]
fn arithmetic_decodes_mean_a_minus_b_plus_c() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let (g, a) = (out.path().join("g"), out.path().join("a"));
    ok(&["generate", "--checkpoint", s(&f.run), "--count", "12", "--out", s(&g)]);
    ok(&[
        "arithmetic",
        "--checkpoint",
        s(&f.run),
        "--count",
        "12",
        "--a",
        "0,1",
        "--b",
        "2,3",
        "--c",
        "4,5,6",
        "--variations",
        "5",
        "--out",
        s(&a),
    ]);
    // Rows A, B, C and the results, each 6 wide (results: 1 + 5 variations).
    assert_eq!(size(&a.join("arithmetic.png")), grid(6, 4));
    let z = read_z(&g.join("z.json"));
    let r = read_z(&a.join("result_z.json"));
    assert_eq!(r.len(), 6);
    for j in 0..NZ {
        let want = (z[0][j] + z[1][j]) / 2.0 - (z[2][j] + z[3][j]) / 2.0 + (z[4][j] + z[5][j] + z[6][j]) / 3.0;
        assert!((r[0][j] - want).abs() < 1e-5);
    }
    assert!(r[1] != r[0], "variations add noise");
}

#[test]
fn ablating_no_maps_changes_nothing_and_removing_maps_does() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let n = out.path().join("none");
    ok(&["ablate", "--checkpoint", s(&f.run), "--count", "9", "--maps", "none", "--out", s(&n)]);
    let (orig, abl) = (png(&n.join("original.png")), png(&n.join("ablated.png")));
    assert_eq!(orig.dimensions(), grid(3, 3));
    assert_eq!(orig, abl);
    assert_eq!(size(&n.join("side_by_side.png")), (2 * grid(3, 3).0 + 8, grid(3, 3).1));

    let some = out.path().join("some");
    ok(&[
        "ablate",
        "--checkpoint",
        s(&f.run),
        "--count",
        "9",
        "--layer",
        "1",
        "--maps",
        "0,1,2,3,4,5,6,7",
        "--out",
        s(&some),
    ]);
    assert_ne!(png(&some.join("original.png")), png(&some.join("ablated.png")));

    let marked = out.path().join("marked");
    ok(&[
        "ablate",
        "--checkpoint",
        s(&f.run),
        "--count",
        "9",
        "--mark",
        "0:0,0,16,16",
        "--mark",
        "3:8,8,32,24",
        "--out",
        s(&marked),
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(marked.join("removed_maps.json")).unwrap()).unwrap();
    assert_eq!(report["layer"], 2);
    assert!(report["fit_accuracy"].as_f64().unwrap() > 0.5);
}

#[test]
fn visualize_draws_filters_and_top_activations() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let v = out.path().join("v");
    ok(&[
        "visualize",
        "--checkpoint",
        s(&f.run),
        "--dataset",
        "shapes",
        "--limit",
        "64",
        "--layer",
        "1",
        "--features",
        "0,3",
        "--top",
        "4",
        "--out",
        s(&v),
    ]);
    // 8 filters of 4x4 drawn at 32x32, 3 per row.
    assert_eq!(size(&v.join("filters.png")), grid(3, 3));
    // Per feature a row of images and a row of maps.
    assert_eq!(size(&v.join("features_layer1.png")), grid(4, 4));
}

#[test]
fn nearest_finds_neighbours_in_pixels_and_features() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("n");
    ok(&[
        "nearest",
        "--checkpoint",
        s(&f.run),
        "--count",
        "3",
        "--k",
        "2",
        "--dataset",
        "shapes",
        "--limit",
        "100",
        "--out",
        s(&o),
    ]);
    assert_eq!(size(&o.join("nearest_pixels.png")), grid(3, 3));
    assert_eq!(size(&o.join("nearest_features.png")), grid(3, 3));
}

fn fid_of(json: &Path) -> f64 {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    v["fid"].as_f64().unwrap()
}

#[test]
fn fid_is_zero_against_itself_large_against_noise_and_the_classifier_is_reused() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let clf = out.path().join("clf.safetensors");
    let common = [
        "evaluate",
        "fid",
        "--dataset",
        "shapes",
        "--count",
        "300",
        "--train-limit",
        "600",
        "--classifier-epochs",
        "1",
        "--classifier-width",
        "8",
        "--classifier",
        s(&clf),
    ];
    let j = |name: &str| out.path().join(name);
    let first = ok(&[&common[..], &["--against", "shapes", "--json", s(&j("self.json"))]].concat());
    assert!(String::from_utf8_lossy(&first.stderr).contains("training the FID classifier"));
    assert!(clf.is_file());
    let second = ok(&[&common[..], &["--against-noise", "--json", s(&j("noise.json"))]].concat());
    assert!(String::from_utf8_lossy(&second.stderr).contains("reusing FID classifier"));
    let (same, noise) = (fid_of(&j("self.json")), fid_of(&j("noise.json")));
    assert!(same < 1e-6, "FID of a set with itself: {same}");
    assert!(noise > 1.0 && noise > 1e4 * same.max(1e-9), "FID against noise: {noise}");
    ok(&[&common[..], &["--checkpoint", s(&f.run), "--json", s(&j("gan.json"))]].concat());
    assert!(fid_of(&j("gan.json")).is_finite());
}

#[test]
fn d_features_reports_a_test_accuracy() {
    let f = fixture();
    let out = ok(&[
        "evaluate",
        "d-features",
        "--checkpoint",
        s(&f.run),
        "--dataset",
        "shapes",
        "--test-dataset",
        "shapes",
        "--train-limit",
        "200",
        "--test-limit",
        "100",
        "--epochs",
        "3",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("test accuracy"));
}

#[test]
fn a_generator_file_alone_generates_but_cannot_be_inspected() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let g = f.checkpoint.join("generator.safetensors");
    ok(&["generate", "--checkpoint", s(&g), "--count", "4", "--out", s(&out.path().join("g"))]);
    let e = fails(&["visualize", "--checkpoint", s(&g), "--out", s(&out.path().join("v"))]);
    assert!(e.contains("needs a trained discriminator"), "{e}");
}

/// Writes a 1-channel IDX image file of `n` 28x28 images, an MNIST stand-in.
fn tiny_idx(dir: &Path, n: u32) -> PathBuf {
    let p = dir.join("train-images-idx3-ubyte");
    let mut b = Vec::new();
    for v in [2051u32, n, 28, 28] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend((0..n * 784).map(|i| (i % 251) as u8));
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn bad_inputs_give_clear_errors_and_a_non_zero_exit() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = s(&out);
    let run = s(&f.run);

    let e = fails(&["generate", "--checkpoint", "/no/such/dir", "--out", o]);
    assert!(e.contains("no such file or directory"), "{e}");
    let e = fails(&["generate", "--checkpoint", s(tmp.path()), "--out", o]);
    assert!(e.contains("is not a checkpoint"), "{e}");
    let partial = tmp.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::copy(f.checkpoint.join("state.json"), partial.join("state.json")).unwrap();
    let e = fails(&["generate", "--checkpoint", s(&partial), "--out", o]);
    assert!(e.contains("incomplete") && e.contains("generator.safetensors"), "{e}");
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for name in ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::write(broken.join(name), b"not a checkpoint").unwrap();
    }
    let e = fails(&["generate", "--checkpoint", s(&broken), "--out", o]);
    assert!(e.contains("state.json"), "{e}");
    let pth = tmp.path().join("netG.pth");
    std::fs::write(&pth, b"x").unwrap();
    let e = fails(&["generate", "--checkpoint", s(&pth), "--out", o]);
    assert!(e.contains("netG.pth") && e.contains("not a PyTorch .pth file"), "{e}");

    let e = fails(&["interpolate", "--checkpoint", run, "--count", "8", "--indices", "0,99", "--out", o]);
    assert!(e.contains("index 99 is outside the grid of 8"), "{e}");
    let e = fails(&["arithmetic", "--checkpoint", run, "--count", "8", "--a", "0", "--b", "1", "--c", "8", "--out", o]);
    assert!(e.contains("--c: index 8 is outside the grid"), "{e}");
    let e = fails(&["ablate", "--checkpoint", run, "--count", "4", "--maps", "999", "--out", o]);
    assert!(e.contains("map 999 does not exist"), "{e}");
    let e = fails(&["ablate", "--checkpoint", run, "--count", "4", "--mark", "7:0,0,8,8", "--out", o]);
    assert!(e.contains("outside the grid"), "{e}");
    let e = fails(&["ablate", "--checkpoint", run, "--layer", "9", "--maps", "0", "--out", o]);
    assert!(e.contains("--layer 9"), "{e}");
    let e = fails(&["visualize", "--checkpoint", run, "--features", "500", "--limit", "8", "--out", o]);
    assert!(e.contains("feature 500 does not exist"), "{e}");

    let zf = tmp.path().join("z.json");
    std::fs::write(&zf, r#"{"nz": 3, "z": [[0, 1, 2]]}"#).unwrap();
    let e = fails(&["generate", "--checkpoint", run, "--z-file", s(&zf), "--out", o]);
    assert!(e.contains("nz = 3") && e.contains(&format!("nz = {NZ}")), "{e}");

    // A 1-channel dataset against the 3-channel checkpoint.
    let idx = tiny_idx(tmp.path(), 4);
    let spec = format!("mnist:{}", idx.display());
    let e = fails(&["nearest", "--checkpoint", run, "--dataset", &spec, "--out", o]);
    assert!(e.contains("1 channel(s)") && e.contains("have 3"), "{e}");
    let e = fails(&["evaluate", "fid", "--dataset", &spec, "--checkpoint", run, "--count", "2"]);
    assert!(e.contains("no labels"), "{e}");
    let e = fails(&["evaluate", "fid", "--dataset", "shapes", "--count", "10"]);
    assert!(e.contains("--against-noise"), "{e}");

    let e = fails(&["convert", "--input", s(&pth), "--output", s(&tmp.path().join("x.png"))]);
    assert!(e.contains(".safetensors"), "{e}");
    // .pth -> safetensors is native: no Python is run, a bad file is named.
    let e = fails(&[
        "convert",
        "--input",
        s(&pth),
        "--output",
        s(&tmp.path().join("g.safetensors")),
        "--python",
        "/no/python3",
    ]);
    assert!(e.contains("netG.pth") && e.contains("not a PyTorch .pth file"), "{e}");
    // safetensors -> .pth needs Python with torch.
    let generator = f.checkpoint.join("generator.safetensors");
    let back = tmp.path().join("back.pth");
    let e = fails(&["convert", "--input", s(&generator), "--output", s(&back), "--python", "/no/python3"]);
    assert!(e.contains("cannot run `/no/python3`"), "{e}");
    let torch = Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !torch {
        let e = fails(&["convert", "--input", s(&generator), "--output", s(&back)]);
        assert!(e.contains("PyTorch is not installed"), "{e}");
    }
}
