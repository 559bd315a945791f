//! Bad input: the coordinator says what is wrong, where, and exits non-zero, without panicking
//! and (for what can be checked up front) before any worker starts.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(120);

fn run(run_dir: &Path, extra: &[&str]) -> Finished {
    run_coordinator(&with_flags(small_run(2, run_dir), extra), TIMEOUT)
}

/// A runtime failure (data, I/O, workers): a retry may get past it.
const FAILED: i32 = 1;
/// A usage error (a flag's value or a combination): fix the command.
const USAGE: i32 = 2;

fn assert_fails_with(f: &Finished, code: i32, needles: &[&str]) {
    assert!(!f.status.success(), "expected failure; stdout:\n{}", f.stdout);
    assert_eq!(f.status.code(), Some(code), "exit status; stderr:\n{}", f.stderr);
    assert_eq!(f.stderr.matches("error: ").count(), 1, "one error line:\n{}", f.stderr);
    assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
    for n in needles {
        assert!(f.stderr.contains(n), "stderr lacks {n:?}:\n{}", f.stderr);
    }
}

#[test]
fn missing_dataset_path_is_named_and_nothing_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let f = run(&run_dir, &["--dataset", "mnist:/nonexistent/mnist"]);
    assert_fails_with(&f, FAILED, &["cannot load dataset", "/nonexistent/mnist"]);
    assert!(!run_dir.join("logs").exists(), "no worker was launched");
}

#[test]
fn corrupt_mnist_file_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let idx = tmp.path().join("train-images-idx3-ubyte");
    std::fs::write(&idx, [0u8, 0, 8, 1, 0, 0, 0, 1]).expect("write");
    let f = run(&tmp.path().join("run"), &["--dataset", &format!("mnist:{}", idx.display())]);
    assert_fails_with(&f, FAILED, &[&idx.display().to_string(), "magic"]);
}

#[test]
fn unknown_dataset_kind_lists_the_known_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = run(&tmp.path().join("run"), &["--dataset", "imagenet:/x"]);
    assert_fails_with(&f, USAGE, &["unknown dataset kind", "mnist:PATH"]);
}

#[test]
fn batch_smaller_than_the_world_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = with_flags(small_run(3, &tmp.path().join("run")), &["--batch-size", "2"]);
    let f = run_coordinator(&a, TIMEOUT);
    assert_fails_with(&f, USAGE, &["--batch-size 2 is smaller than --workers 3"]);
}

#[test]
fn unsupported_image_size_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = run(&tmp.path().join("run"), &["--image-size", "48"]);
    assert_fails_with(&f, USAGE, &["--image-size must be 32, 64 or 128, got 48"]);
}

#[test]
fn a_failing_worker_fails_the_run_and_resume_needs_a_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let a = with_flags(small_run(2, &run_dir), &["--worker-bin", "/bin/false"]);
    let f = run_coordinator(&a, TIMEOUT);
    assert_fails_with(&f, FAILED, &["run failed", "exited with status 1", "worker-"]);
    // Each generation failed the same way, until --max-restarts (3) was spent.
    assert!(f.stdout.contains("restart 3 of 3") && !f.stdout.contains("restart 4"), "{}", f.stdout);

    // The run directory now holds a run: starting another there is refused...
    let f = run(&run_dir, &[]);
    assert_fails_with(&f, USAGE, &["already holds a run", "--resume"]);
    // ...and it has no checkpoint to resume from.
    let f = run(&run_dir, &["--resume"]);
    assert_fails_with(&f, FAILED, &["no usable checkpoint"]);
}

#[test]
fn resume_refuses_settings_that_would_change_the_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    run(&run_dir, &["--max-steps", "2"]).assert_success();
    let f = run(&run_dir, &["--resume", "--max-steps", "4", "--ngf", "16"]);
    assert_fails_with(&f, USAGE, &["cannot change", "--ngf 16"]);
    let f = run(&run_dir, &["--resume"]);
    assert_fails_with(&f, USAGE, &["already at step 2 of 2"]);
}

#[test]
fn a_busy_listen_address_is_reported() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = with_flags(small_run(1, &tmp.path().join("run")), &["--listen", &addr]);
    let f = run_coordinator(&a, TIMEOUT);
    assert_fails_with(&f, FAILED, &[&format!("cannot listen on {addr}")]);
    assert!(!tmp.path().join("run").exists(), "nothing was written");
}

#[test]
fn a_missing_worker_binary_is_named_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let f = run(&run_dir, &["--worker-bin", "/nonexistent/worker"]);
    assert_fails_with(&f, USAGE, &["worker binary not found at /nonexistent/worker", "--worker-bin"]);
    assert!(!run_dir.exists(), "nothing was written");
}

#[test]
fn a_gpu_run_without_the_gpus_says_what_is_missing_and_the_way_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    match kernels::cuda::gpu_count() {
        // No driver here (CI): the missing library is named, with `--device cpu`.
        Err(_) => {
            let f = run(&run_dir, &["--device", "cuda"]);
            assert_fails_with(&f, FAILED, &["--device cuda", "libcuda", "--device cpu"]);
        }
        // A GPU machine: more workers than GPUs.
        Ok(n) => {
            let workers = (n + 1).to_string();
            let f = run(&run_dir, &["--device", "cuda", "--workers", &workers, "--batch-size", "64"]);
            assert_fails_with(&f, FAILED, &[&format!("need {workers} GPUs"), "--device cpu"]);
        }
    }
    assert!(!run_dir.join("logs").exists(), "no worker was launched");
}

#[test]
fn more_min_workers_than_workers_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = run(&tmp.path().join("run"), &["--min-workers", "3"]);
    assert_fails_with(&f, USAGE, &["--min-workers 3 is more than --workers 2"]);
}

#[test]
fn bf16_on_gpus_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let f = run(&run_dir, &["--precision", "bf16", "--device", "cuda"]);
    assert_fails_with(&f, USAGE, &["--precision bf16 is a CPU mode", "--device cpu"]);
    assert!(!run_dir.join("logs").exists(), "no worker was launched");
}

#[test]
fn sync_bn_over_several_gpus_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let f = run(&run_dir, &["--sync-bn", "--device", "cuda"]);
    assert_fails_with(&f, USAGE, &["--sync-bn is not implemented on GPUs and this run has 2 ranks", "--device cpu"]);
    assert!(!run_dir.join("logs").exists(), "no worker was launched");
}

/// The checks that need no data come before the data set is read: a run directory that is a
/// file, and a port in use, are said before a raw source is even prepared into the cache.
#[test]
fn a_run_directory_that_is_a_file_or_a_busy_port_fails_before_the_data_is_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let idx = tmp.path().join("train-images-idx3-ubyte");
    write_mnist(&idx, 64);
    let cache = tmp.path().join("cache");
    let with_data = |mut args: Vec<String>| {
        set_flag(&mut args, "--dataset", &format!("mnist:{}", idx.display()));
        set_flag(&mut args, "--data-cache", &cache.display().to_string());
        args
    };

    let file = tmp.path().join("not-a-directory");
    std::fs::write(&file, b"x").expect("write");
    let f = run_coordinator(&with_data(small_run(2, &file)), TIMEOUT);
    assert_fails_with(
        &f,
        FAILED,
        &["not-a-directory: cannot use it as the run directory: it is a file, not a directory"],
    );
    assert!(!cache.exists(), "the data was not read");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").to_string();
    let mut args = with_data(small_run(2, &tmp.path().join("run")));
    set_flag(&mut args, "--listen", &port);
    let f = run_coordinator(&args, TIMEOUT);
    assert_fails_with(&f, FAILED, &[&format!("cannot listen on {port} (--listen)")]);
    assert!(!cache.exists(), "the data was not read");
    assert!(!tmp.path().join("run").exists(), "nothing was written");
}

/// Each cause is said once: an error that repeats its source in its own message is not
/// followed by the same words again.
#[test]
fn causes_are_said_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let f = run_coordinator(&resume_args(&empty, 4, &[]), TIMEOUT);
    assert_fails_with(&f, FAILED, &["does not hold a run", "run.json"]);
    assert_eq!(f.stderr.matches("No such file or directory").count(), 1, "{}", f.stderr);

    // A gzip file cut short.
    let gz = tmp.path().join("train-images-idx3-ubyte.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &vec![7u8; 64 * 1024]).expect("gzip");
    let bytes = enc.finish().expect("gzip");
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).expect("write");
    let f = run(&tmp.path().join("run"), &["--dataset", &format!("mnist:{}", gz.display())]);
    assert!(!f.status.success(), "{}", f.stderr);
    let line = f.stderr.lines().find(|l| l.starts_with("error: ")).expect("an error line");
    let words: Vec<&str> = line.split(": ").collect();
    let mut seen = std::collections::BTreeSet::new();
    assert!(words.iter().all(|w| seen.insert(*w)), "a cause said twice: {line}");
}
