//! End to end: the real coordinator launches real workers on loopback, they train, and the run
//! directory holds what a user expects.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(300);

/// 100 samples, global batch 24: 4 steps per epoch, the last taking 28 (the remainder).
fn args(workers: u32, run_dir: &Path, extra: &[&str]) -> Vec<String> {
    with_flags(with_flags(small_run(workers, run_dir), &["--data-limit", "100"]), extra)
}

fn assert_run_dir(run_dir: &Path, workers: u64, steps: u64, nc: u64) {
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(run["workers"], workers);
    assert_eq!(run["total_steps"], steps);
    assert_eq!(run["nc"], nc);

    let lines = metrics(run_dir);
    let got: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().expect("step")).collect();
    assert_eq!(got, (1..=steps).collect::<Vec<_>>(), "one metrics line per step");
    for l in &lines {
        for key in [
            "epoch",
            "loss_d",
            "loss_g",
            "d_x",
            "d_g_z1",
            "d_g_z2",
            "images_per_sec",
            "data_seconds",
            "compute_seconds",
            "all_reduce_seconds",
        ] {
            assert!(l[key].is_number(), "metrics line lacks {key}: {l}");
        }
        assert!(l["loss_d"].as_f64().is_some_and(f64::is_finite));
        // The epoch's last step takes the remainder of 100 = 4 * 24 + 4.
        let step = l["step"].as_u64().unwrap_or(0);
        assert_eq!(l["global_batch"], if step % 4 == 0 { 28 } else { 24 }, "{l}");
    }
    // Checksums are compared every 2 steps (and at the last); the run would have failed on a
    // mismatch, and the agreed value is recorded.
    for l in &lines {
        let step = l["step"].as_u64().unwrap_or(0);
        assert_eq!(l.get("parameter_checksum").is_some(), step % 2 == 0 || step == steps, "{l}");
    }

    assert!(run_dir.join("samples/real.png").is_file());
    for epoch in 0..=((steps - 1) / 4) {
        let p = run_dir.join(format!("samples/fake_epoch_{epoch:03}.png"));
        assert!(p.is_file(), "missing {}", p.display());
    }
    let steps_stored = checkpoint_steps(run_dir);
    assert_eq!(steps_stored.last(), Some(&steps), "final checkpoint stored");
    for s in steps_stored {
        let dir = run_dir.join(format!("checkpoints/step_{s:08}"));
        let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).expect("SHA256SUMS");
        let names: Vec<&str> = sums.lines().filter_map(|l| l.split_once("  ").map(|(_, n)| n)).collect();
        for n in ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors", "state.json"] {
            assert!(names.contains(&n), "{n} not in {sums}");
        }
        for line in sums.lines() {
            let (digest, name) = line.split_once("  ").expect("sha256sum format");
            let bytes = std::fs::read(dir.join(name)).expect("checkpoint file");
            assert_eq!(proto::framing::sha256_hex(&bytes), digest, "{name} of step {s}");
        }
    }
    assert!(
        !run_dir
            .join("checkpoints")
            .read_dir()
            .expect("list")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
    );
}

fn train_builtin(workers: u32) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let a = args(workers, &run_dir, &["--max-steps", "6", "--checkpoint-every", "3", "--checksum-every", "2"]);
    let f = run_coordinator(&a, TIMEOUT);
    f.assert_success();
    assert!(f.stdout.contains("run completed: 6 steps"), "{}", f.stdout);
    assert_run_dir(&run_dir, workers as u64, 6, 3);
    // Every 3 steps, the epoch's end (4) and the run's end (6); the last 3 are kept.
    assert_eq!(checkpoint_steps(&run_dir), vec![3, 4, 6]);
    for r in 0..workers {
        assert!(run_dir.join(format!("logs/worker-{r}.log")).is_file());
    }
}

#[test]
fn one_worker_trains_on_builtin_data() {
    train_builtin(1);
}

#[test]
fn two_workers_train_on_builtin_data() {
    train_builtin(2);
}

#[test]
fn three_workers_train_on_builtin_data() {
    train_builtin(3);
}

fn train_mnist(workers: u32) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let idx = tmp.path().join("train-images-idx3-ubyte");
    write_mnist(&idx, 120);
    let run_dir = tmp.path().join("run");
    let dataset = format!("mnist:{}", idx.display());
    let a = args(workers, &run_dir, &["--dataset", &dataset, "--max-steps", "5", "--checksum-every", "2"]);
    let f = run_coordinator(&a, TIMEOUT);
    f.assert_success();
    assert_run_dir(&run_dir, workers as u64, 5, 1);
}

#[test]
fn one_worker_trains_on_an_mnist_file() {
    train_mnist(1);
}

#[test]
fn two_workers_train_on_an_mnist_file() {
    train_mnist(2);
}

#[test]
fn three_workers_train_on_an_mnist_file() {
    train_mnist(3);
}

/// Workers that read the dataset themselves train on exactly the batches the coordinator would
/// have streamed: same losses, same parameters.
#[test]
fn local_data_gives_the_same_run_as_streamed_shards() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir) = (tmp.path().join("streamed"), tmp.path().join("local"));
    run_coordinator(&args(2, &a_dir, &["--max-steps", "5", "--checksum-every", "1"]), TIMEOUT).assert_success();
    run_coordinator(&args(2, &b_dir, &["--max-steps", "5", "--checksum-every", "1", "--workers-local-data"]), TIMEOUT)
        .assert_success();
    let (a, b) = (metrics(&a_dir), metrics(&b_dir));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["parameter_checksum"], y["parameter_checksum"], "{x}\n{y}");
        assert_eq!(x["loss_d"], y["loss_d"]);
    }
}

/// Stopping after K steps and resuming for K more ends exactly where 2K uninterrupted steps do.
#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, split) = (tmp.path().join("full"), tmp.path().join("split"));
    run_coordinator(&args(2, &full, &["--max-steps", "6", "--checksum-every", "1"]), TIMEOUT).assert_success();
    run_coordinator(&args(2, &split, &["--max-steps", "3", "--checksum-every", "1"]), TIMEOUT).assert_success();
    // Settings not given again come from run.json; the step target is raised.
    let resume = resume_args(&split, 6, &[]);
    let f = run_coordinator(&resume, TIMEOUT);
    f.assert_success();

    let (a, b) = (metrics(&full), metrics(&split));
    assert_eq!(b.len(), 6, "the resumed run's metrics continue the first part's");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["loss_d"], y["loss_d"], "{x}\n{y}");
        assert_eq!(x["loss_g"], y["loss_g"], "{x}\n{y}");
        assert_eq!(x["parameter_checksum"], y["parameter_checksum"], "{x}\n{y}");
    }
    for file in ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(full.join("checkpoints/step_00000006").join(file)).expect("full run file");
        let y = std::fs::read(split.join("checkpoints/step_00000006").join(file)).expect("resumed run file");
        assert!(x == y, "{file} differs between the uninterrupted and the resumed run");
    }
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(run["generation"], 2);
    assert_eq!(run["ngf"], 8);
}

/// A coordinator with no `worker` binary beside it (as after `cargo run --bin coordinator` on a
/// fresh checkout) launches copies of itself in worker mode.
#[test]
fn without_a_worker_binary_the_coordinator_launches_itself() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let exe = dir.path().join("coordinator");
    if std::fs::hard_link(coordinator_bin(), &exe).is_err() {
        std::fs::copy(coordinator_bin(), &exe).expect("copy coordinator");
    }
    let run_dir = dir.path().join("run");
    let mut a = args(2, &run_dir, &["--max-steps", "2"]);
    let i = a.iter().position(|s| s == "--worker-bin").expect("flag");
    a.drain(i..i + 2);
    let child = std::process::Command::new(&exe)
        .args(&a)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the copied coordinator");
    let f = wait_output(child, TIMEOUT);
    f.assert_success();
    assert_eq!(metrics(&run_dir).len(), 2);
}

/// `--precision bf16` reaches the workers: two of them train with bf16 products, their
/// parameters stay identical (the checksums agree every 2 steps), and run.json records it. On a
/// CPU without AVX512-BF16 the coordinator refuses before launching anything.
#[test]
fn two_workers_train_with_bf16_products() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let a = args(2, &run_dir, &["--max-steps", "6", "--checkpoint-every", "3", "--checksum-every", "2"]);
    let f = run_coordinator(&with_flags(a, &["--precision", "bf16"]), TIMEOUT);
    if let Err(refusal) = kernels::Precision::Bf16.check_supported() {
        assert!(!f.status.success() && f.stderr.contains("AVX512-BF16"), "{refusal}: {}", f.stderr);
        return;
    }
    f.assert_success();
    assert_run_dir(&run_dir, 2, 6, 3);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(run["precision"], "bf16");
    let log = std::fs::read_to_string(run_dir.join("logs/worker-1.log")).expect("worker log");
    assert!(log.contains("precision=bf16"), "{log}");
}
