//! The coordinator's TensorBoard event files as TensorBoard itself reads them: `read_tensorboard.py`
//! loads the directory with TensorBoard's `EventAccumulator` and prints what it found.
//! Needs `python3` with `pip install tensorboard`; without it these tests fail rather than pass.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

use coordinator::tensorboard::TensorBoardWriter;
use serde_json::Value;

/// Runs `read_tensorboard.py` on `dir` and returns its JSON.
fn tensorboard_reads(dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/read_tensorboard.py");
    let out = Command::new("python3").arg(&script).arg(dir).output().unwrap_or_else(|e| {
        panic!("cannot run python3 ({e}): these tests need python3 with TensorBoard (pip install tensorboard)")
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}); TensorBoard's reader is required (pip install tensorboard):\n{stderr}",
        script.display(),
        out.status
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: bad JSON ({e}): {}", script.display(), String::from_utf8_lossy(&out.stdout)))
}

/// A real sample grid: 6 RGB images of 8x8, 3 per row, as the coordinator writes them.
fn grid_png(dir: &Path) -> (Vec<u8>, u32, u32) {
    let (n, nc, size) = (6, 3, 8);
    let pixels: Vec<f32> = (0..n * nc * size * size).map(|i| ((i % 17) as f32 / 8.0) - 1.0).collect();
    let path = dir.join("grid.png");
    data::save_grid(&path, &pixels, n, nc, size, 3).expect("save a grid");
    let png = std::fs::read(&path).expect("read the grid");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    // torchvision's make_grid: 3 x (8 + 2) + 2 wide, 2 x (8 + 2) + 2 high.
    assert_eq!((width, height), (32, 22));
    (png, width, height)
}

fn loss_d(step: u64) -> f32 {
    1.0 / step as f32 + 0.125
}

fn loss_g(step: u64) -> f32 {
    (step as f32).sqrt() * 0.3
}

/// Asserts that TensorBoard shows `tag` with exactly one value per step `1..=5`, `expected(step)`.
fn assert_scalar(found: &Value, tag: &str, expected: impl Fn(u64) -> f32) {
    let points = found["scalars"][tag].as_array().unwrap_or_else(|| panic!("no scalar {tag:?} in {found}"));
    let steps: Vec<u64> = points.iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5], "{tag}: {found}");
    for p in points {
        let (step, value) = (p[0].as_u64().unwrap(), p[1].as_f64().unwrap());
        let want = expected(step) as f64;
        assert!((value - want).abs() <= 1e-6, "{tag} at step {step}: {value} != {want}");
    }
}

fn assert_one_image(found: &Value, width: u32, height: u32) {
    let images = found["images"]["samples"].as_array().unwrap_or_else(|| panic!("no image \"samples\" in {found}"));
    assert_eq!(images.len(), 1, "{found}");
    let img = &images[0];
    assert_eq!(img["step"], 5);
    assert_eq!((img["width"].as_u64(), img["height"].as_u64()), (Some(width.into()), Some(height.into())));
    assert_eq!(
        (img["decoded_width"].as_u64(), img["decoded_height"].as_u64()),
        (Some(width.into()), Some(height.into()))
    );
}

#[test]
fn tensorboard_reads_scalars_and_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tensorboard");
    let (png, width, height) = grid_png(tmp.path());
    let mut w = TensorBoardWriter::create(&dir, None).unwrap();
    for step in 1..=5 {
        w.add_scalars(step, 1000.0 + step as f64, &[("loss_D", loss_d(step)), ("loss_G", loss_g(step))]).unwrap();
    }
    w.add_image(5, 1005.5, "samples", &png, width, height, 3).unwrap();
    w.flush().unwrap();

    let found = tensorboard_reads(&dir);
    assert_scalar(&found, "loss_D", loss_d);
    assert_scalar(&found, "loss_G", loss_g);
    assert_one_image(&found, width, height);
}

/// A run writes steps 1..=5 and dies; it resumes from the checkpoint of step 3 and writes 4..=5
/// again (with other values): TensorBoard shows each step once, the resumed run's 4 and 5.
#[test]
fn tensorboard_shows_each_step_once_after_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tensorboard");
    let (png, width, height) = grid_png(tmp.path());
    let first = |step| loss_d(step) + 10.0;
    let mut w = TensorBoardWriter::create(&dir, None).unwrap();
    for step in 1..=5 {
        w.add_scalars(step, 1000.0 + step as f64, &[("loss_D", first(step))]).unwrap();
    }
    w.add_image(5, 1005.5, "samples", &png, width, height, 3).unwrap();
    drop(w);

    let mut w = TensorBoardWriter::create(&dir, Some(3)).unwrap();
    for step in 4..=5 {
        w.add_scalars(step, 2000.0 + step as f64, &[("loss_D", loss_d(step))]).unwrap();
    }
    w.add_image(5, 2005.5, "samples", &png, width, height, 3).unwrap();
    w.flush().unwrap();

    let found = tensorboard_reads(&dir);
    assert_scalar(&found, "loss_D", |step| if step <= 3 { first(step) } else { loss_d(step) });
    assert_one_image(&found, width, height);
}

/// A real run with `--tensorboard`, stopped after 6 steps and resumed to 12: TensorBoard's reader
/// finds every scalar tag with one value per step 1..=12, equal to `metrics.jsonl`, and one
/// fixed-noise grid per epoch of the grid's size.
#[test]
fn a_real_run_and_its_resume_write_what_tensorboard_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let (run_dir, tb) = (tmp.path().join("run"), tmp.path().join("tb"));
    let tb_arg = tb.display().to_string();
    // 100 samples, batch 24: 4 steps per epoch; 3 epochs.
    let first = with_flags(
        small_run(2, &run_dir),
        &["--data-limit", "100", "--epochs", "3", "--max-steps", "6", "--tensorboard", &tb_arg],
    );
    run_coordinator(&first, Duration::from_secs(300)).assert_success();
    let resume = resume_args(&run_dir, 12, &["--tensorboard", &tb_arg]);
    run_coordinator(&resume, Duration::from_secs(300)).assert_success();

    let found = tensorboard_reads(&tb);
    let lines = metrics(&run_dir);
    assert_eq!(lines.len(), 12);
    for (tag, key) in [
        ("loss_D", "loss_d"),
        ("loss_G", "loss_g"),
        ("D(x)", "d_x"),
        ("D(G(z))/before_D_update", "d_g_z1"),
        ("D(G(z))/after_D_update", "d_g_z2"),
        ("images_per_sec", "images_per_sec"),
        ("all_reduce_seconds", "all_reduce_seconds"),
    ] {
        let points = found["scalars"][tag].as_array().unwrap_or_else(|| panic!("no scalar {tag}: {found}"));
        let steps: Vec<u64> = points.iter().map(|p| p[0].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "{tag}: one value per step");
        for (p, line) in points.iter().zip(&lines) {
            let (got, want) = (p[1].as_f64().unwrap(), line[key].as_f64().unwrap());
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{tag} at step {}: {got} vs {want}", p[0]);
        }
    }
    // Grids at the ends of the 3 epochs (steps 4, 8, 12) and of the first run (step 6), each 8 x 8
    // images of 32 px with 2 px padding.
    let images = found["images"]["samples/fixed_noise"].as_array().unwrap_or_else(|| panic!("no grid: {found}"));
    let steps: Vec<u64> = images.iter().map(|i| i["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 6, 8, 12], "one grid per epoch and one where the first run ended");
    for i in images {
        assert_eq!((i["decoded_width"].as_u64(), i["decoded_height"].as_u64()), (Some(274), Some(274)), "{i}");
    }
}
