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

/// `--dataset fake` (the PyTorch example's random images): two workers draw their shares
/// themselves, no file and no cache involved.
#[test]
fn two_workers_train_on_fake_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let a = args(2, &run_dir, &["--dataset", "fake", "--max-steps", "3", "--checksum-every", "2"]);
    let f = run_coordinator(&a, TIMEOUT);
    f.assert_success();
    assert_run_dir(&run_dir, 2, 3, 3);
    let log = std::fs::read_to_string(run_dir.join("logs/worker-0.log")).expect("worker log");
    assert!(log.contains("the fake set, drawn here"), "{log}");
}

/// With the output redirected (no terminal, so no progress bar), a training line every
/// `--log-every` steps, as the PyTorch example prints one per iteration.
#[test]
fn a_redirected_run_logs_a_training_line_every_n_steps() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let mut a = args(1, &run_dir, &["--max-steps", "4", "--log-every", "2"]);
    a.retain(|f| f != "--quiet");
    let f = run_coordinator(&a, TIMEOUT);
    f.assert_success();
    for step in [2, 4] {
        let line = f.stderr.lines().find(|l| l.contains(&format!("step {step}/4 epoch 1/1 loss_D ")));
        let line = line.unwrap_or_else(|| panic!("no line for step {step}:\n{}", f.stderr));
        assert!(line.contains(" img/s ETA "), "{line}");
    }
    assert!(!f.stderr.contains("step 1/4 epoch"), "only every 2 steps:\n{}", f.stderr);
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

/// Workers that draw the built-in set themselves train on exactly the batches the coordinator
/// would have streamed, or that a copy decoded into memory gives: same losses, same parameters.
#[test]
fn local_data_gives_the_same_run_as_streamed_shards() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = ["drawn", "streamed", "memory"].map(|d| tmp.path().join(d));
    for (dir, mode) in dirs.iter().zip(["auto", "stream", "memory"]) {
        let a = args(2, dir, &["--max-steps", "5", "--checksum-every", "1", "--worker-data", mode]);
        run_coordinator(&a, TIMEOUT).assert_success();
    }
    let runs = dirs.each_ref().map(|d| metrics(d));
    for other in &runs[1..] {
        assert_eq!(other.len(), runs[0].len());
        for (x, y) in runs[0].iter().zip(other) {
            assert_eq!(x["parameter_checksum"], y["parameter_checksum"], "{x}\n{y}");
            assert_eq!(x["loss_d"], y["loss_d"]);
        }
    }
}

/// The data-at-scale equivalence: a run reading prepared u8 shards from disk (the default for
/// a raw source, prepared on the fly) takes bit-identical steps to the same run on the
/// in-memory path (each worker decodes the source into f32 itself) and to one whose batches
/// stream from the coordinator, which reads them from the shards.
#[test]
fn prepared_shards_give_the_same_steps_as_the_in_memory_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let idx = tmp.path().join("digits-images-idx3-ubyte");
    write_mnist(&idx, 160);
    let dataset = format!("mnist:{}", idx.display());
    let cache = tmp.path().join("cache");
    let dirs = ["disk", "memory", "stream"].map(|d| tmp.path().join(d));
    for (dir, mode) in dirs.iter().zip(["disk", "memory", "stream"]) {
        let mut a = args(2, dir, &["--dataset", &dataset, "--max-steps", "6", "--checksum-every", "1"]);
        a.extend(["--worker-data", mode, "--data-cache", cache.to_str().expect("utf-8 path")].map(String::from));
        let f = run_coordinator(&a, TIMEOUT);
        f.assert_success();
        let logs = std::fs::read_dir(dir.join("logs"))
            .expect("worker logs")
            .map(|e| std::fs::read_to_string(e.expect("log entry").path()).unwrap_or_default())
            .collect::<String>();
        let expected = match mode {
            "disk" => "reading samples from prepared shards in",
            "memory" => "decoded into memory",
            _ => "",
        };
        assert!(logs.contains(expected), "{mode}: {logs}");
    }
    let prepared = std::fs::read_dir(&cache).expect("the cache").count();
    assert_eq!(prepared, 1, "the source is prepared once and reused");
    let runs = dirs.each_ref().map(|d| metrics(d));
    assert_eq!(runs[0].len(), 6);
    for other in &runs[1..] {
        for (x, y) in runs[0].iter().zip(other) {
            assert_eq!(x["parameter_checksum"], y["parameter_checksum"], "{x}\n{y}");
            assert_eq!((&x["loss_d"], &x["loss_g"]), (&y["loss_d"], &y["loss_g"]), "{x}\n{y}");
        }
    }
    for file in ["generator.safetensors", "discriminator.safetensors"] {
        let bytes =
            dirs.each_ref().map(|d| std::fs::read(d.join("checkpoints/step_00000006").join(file)).expect("checkpoint"));
        assert!(bytes[0] == bytes[1] && bytes[0] == bytes[2], "{file} differs between the three data paths");
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

/// A folder of PNGs written here, `n` images of `w x h`.
fn write_png_folder(dir: &Path, n: usize, w: usize, h: usize) {
    std::fs::create_dir_all(dir).expect("image folder");
    for i in 0..n {
        // A one-image grid (with make_grid's 2-pixel border) is as good a PNG as any.
        let px: Vec<f32> = (0..3 * w * h).map(|p| ((p * 7 + i * 31) % 200) as f32 / 100.0 - 1.0).collect();
        assert_eq!(w, h, "save_grid draws square images");
        data::save_grid(&dir.join(format!("img{i:04}.png")), &px, 1, 3, w, 1).expect("write png");
    }
}

/// A set made by `prepare` trains as `prepared:DIR`; run.json records where and which samples;
/// a shard changed on disk afterwards stops the next run before any training, naming the file.
#[test]
fn trains_on_a_prepared_directory_and_refuses_a_changed_shard() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    write_png_folder(&images, 60, 20, 20);
    let prepared = tmp.path().join("prepared");
    let opts = data::prepared::PrepareOptions { image_size: 32, shard_images: Some(25), ..Default::default() };
    data::prepared::prepare(&data::DatasetSpec::Folder(images), &prepared, &opts, &data::prepared::Quiet)
        .expect("prepare");
    let dataset = format!("prepared:{}", prepared.display());
    let run_dir = tmp.path().join("run");
    let a = args(2, &run_dir, &["--dataset", &dataset, "--image-size", "32", "--max-steps", "3", "--data-limit", "48"]);
    run_coordinator(&a, TIMEOUT).assert_success();
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).expect("run.json")).expect("json");
    let canonical = std::fs::canonicalize(&prepared).expect("canonical");
    assert_eq!(run_json["prepared_dir"], canonical.display().to_string());
    assert_eq!(run_json["data_id"].as_str().map(str::len), Some(64));
    assert_eq!(run_json["dataset_len"], 48);
    assert_eq!(metrics(&run_dir).len(), 3);

    let shard = prepared.join("shard-000001.u8");
    let mut bytes = std::fs::read(&shard).expect("shard");
    bytes[100] ^= 0x40;
    std::fs::write(&shard, bytes).expect("write shard");
    let f =
        run_coordinator(&args(2, &tmp.path().join("run2"), &["--dataset", &dataset, "--image-size", "32"]), TIMEOUT);
    assert!(!f.status.success(), "a changed shard must stop the run");
    assert!(f.stderr.contains("shard-000001.u8") && f.stderr.contains("sha256"), "{}", f.stderr);
    assert!(!tmp.path().join("run2/metrics.jsonl").exists(), "nothing trained");
}
