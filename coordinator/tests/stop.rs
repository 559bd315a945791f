//! SIGTERM, as Kubernetes stops pods: the workers finish their step, rank 0 checkpoints it, every
//! process exits cleanly with code 143, and `--resume` continues from that step. Real binaries,
//! real signals (`kill -TERM`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use proto::v1;
use proto::v1::coordinator_client::CoordinatorClient;

const TIMEOUT: Duration = Duration::from_secs(300);
const EXIT_STOPPED: i32 = 143;

/// A run long enough to be stopped in the middle: 100 samples, 4 steps per epoch, checkpoints
/// only at the ends of epochs.
fn long_run(workers: u32, run_dir: &Path) -> Vec<String> {
    with_flags(small_run(workers, run_dir), &["--data-limit", "100", "--epochs", "500", "--checksum-every", "1"])
}

fn sigterm(pid: u32) {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Waits until `metrics.jsonl` holds at least `steps` lines.
fn wait_for_steps(run_dir: &Path, steps: usize) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let n = std::fs::read_to_string(run_dir.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if n >= steps {
            return;
        }
        assert!(Instant::now() < deadline, "the run did not reach step {steps}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a cleanly stopped run directory holds: metrics for steps 1..=k with nothing missing or
/// doubled, the newest checkpoint at step k, no completion mark. Returns k.
fn assert_stopped_cleanly(run_dir: &Path, f: &Finished) -> u64 {
    assert_eq!(f.status.code(), Some(EXIT_STOPPED), "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    let steps: Vec<u64> = metrics(run_dir).iter().map(|l| l["step"].as_u64().expect("step")).collect();
    let k = *steps.last().expect("some steps were trained");
    assert_eq!(steps, (1..=k).collect::<Vec<_>>(), "metrics.jsonl has every step once");
    assert!(k < 2000, "the run was stopped before its end");
    assert_eq!(checkpoint_steps(run_dir).last(), Some(&k), "rank 0 checkpointed the step the ranks stopped after");
    assert!(f.stdout.contains(&format!("run stopped after step {k} of 2000")), "stdout:\n{}", f.stdout);
    assert!(f.stdout.contains("--resume"), "the way to continue is printed:\n{}", f.stdout);
    assert!(!run_dir.join("COMPLETE").exists(), "a stopped run is not marked complete");
    k
}

/// Resumes a stopped run for two more steps and checks it completes from where it stopped.
fn resume_two_more(run_dir: &Path, k: u64) {
    let resume = resume_args(run_dir, k + 2, &[]);
    run_coordinator(&resume, TIMEOUT).assert_success();
    let steps: Vec<u64> = metrics(run_dir).iter().map(|l| l["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, (1..=k + 2).collect::<Vec<_>>());
    assert!(run_dir.join("COMPLETE").is_file(), "a completed run is marked complete");
}

#[test]
fn sigterm_to_the_coordinator_stops_the_run_with_a_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let mut coordinator = Running::start(&long_run(2, &run_dir), &run_dir);
    wait_for_steps(&run_dir, 3);
    sigterm(coordinator.child.as_ref().expect("child").id());
    let f = coordinator.child.take().map(|c| wait_output(c, TIMEOUT)).expect("child");
    let k = assert_stopped_cleanly(&run_dir, &f);
    for rank in 0..2 {
        let log = std::fs::read_to_string(run_dir.join(format!("logs/worker-{rank}.log"))).expect("worker log");
        assert!(log.contains("stopped cleanly"), "rank {rank} did not stop cleanly:\n{log}");
    }
    resume_two_more(&run_dir, k);
}

/// One worker's SIGTERM (its pod being evicted) stops its peers after the same step.
#[test]
fn sigterm_to_one_worker_stops_every_rank_after_the_same_step() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let mut coordinator = Running::start(&long_run(3, &run_dir), &run_dir);
    wait_for_steps(&run_dir, 2);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let status = rt.block_on(async {
        let mut c = CoordinatorClient::connect(coordinator.url()).await.expect("connect");
        c.get_status(v1::GetStatusRequest {}).await.expect("status").into_inner()
    });
    let rank2 = status.workers.iter().find(|w| w.rank == Some(2)).expect("rank 2 joined");
    sigterm(rank2.pid);
    let f = coordinator.child.take().map(|c| wait_output(c, TIMEOUT)).expect("child");
    let k = assert_stopped_cleanly(&run_dir, &f);
    let named = f.stdout.contains("rank 2: SIGTERM received") || f.stdout.contains("rank 2 asked to stop");
    assert!(named, "the reason names the rank:\n{}", f.stdout);
    resume_two_more(&run_dir, k);
}

/// Stopped while waiting for external workers: nothing was trained, nothing to save.
#[test]
fn sigterm_before_any_worker_joined_exits_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(long_run(2, &run_dir), &["--external-workers"]);
    let mut coordinator = Running::start(&args, &run_dir);
    sigterm(coordinator.child.as_ref().expect("child").id());
    let f = coordinator.child.take().map(|c| wait_output(c, TIMEOUT)).expect("child");
    assert_eq!(f.status.code(), Some(EXIT_STOPPED), "stderr:\n{}", f.stderr);
    assert!(f.stdout.contains("run stopped after step 0") && f.stdout.contains("no checkpoint"), "{}", f.stdout);
}

/// `--metrics-linger`: the summary comes when the run completes, not after the lingering, and
/// SIGTERM while lingering ends the coordinator and its lingering workers at once.
#[test]
fn a_signal_while_lingering_exits_at_once_after_the_summary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(1, &run_dir),
        &["--max-steps", "2", "--metrics-listen", "127.0.0.1:0", "--metrics-linger", "300"],
    );
    let mut coordinator = Running::start(&args, &run_dir);
    wait_for(TIMEOUT, "the run to complete", || run_dir.join("COMPLETE").exists().then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    sigterm(coordinator.child.as_ref().expect("child").id());
    let f = coordinator.child.take().map(|c| wait_output(c, Duration::from_secs(60))).expect("child");
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?} to exit", t0.elapsed());
    assert_eq!(f.status.code(), Some(0), "a completed run exits 0:\nstdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    let summary = f.stdout.find("run completed: 2 steps").expect("the summary");
    let lingering = f.stdout.find("--metrics-linger; Ctrl-C to exit now").expect("the lingering line");
    assert!(summary < lingering, "the summary comes first:\n{}", f.stdout);
    assert!(f.stdout.contains("SIGTERM: not lingering any longer"), "{}", f.stdout);
}

/// A worker lingering after its run (`--metrics-linger`) exits at once on SIGTERM.
#[test]
fn a_lingering_worker_exits_on_sigterm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(1, &run_dir), &["--external-workers", "--max-steps", "2"]);
    let coordinator = Running::start(&args, &run_dir);
    let log = tmp.path().join("worker.log");
    let flags = ["--metrics-listen", "127.0.0.1:0", "--metrics-linger", "300"];
    let mut worker = spawn_worker(&[], &coordinator.url(), &flags, &log);
    coordinator.wait(TIMEOUT).assert_success();
    wait_for(TIMEOUT, "the worker to linger", || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("serving metrics for 300 s more")).map(|_| ())
    });
    let t0 = Instant::now();
    sigterm(worker.id());
    let status = wait_worker(&mut worker, Duration::from_secs(60), &log);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?} to exit", t0.elapsed());
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}

/// `--metrics-linger N` is N seconds in all after the run completes: the workers linger while the
/// coordinator does, not before it (which made 2N).
#[test]
fn metrics_linger_is_the_time_in_all_after_the_run() {
    const LINGER: u64 = 12;
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let linger = LINGER.to_string();
    let args = with_flags(
        small_run(2, &run_dir),
        &["--max-steps", "2", "--metrics-listen", "127.0.0.1:0", "--metrics-linger", &linger],
    );
    let mut coordinator = Running::start(&args, &run_dir);
    wait_for(TIMEOUT, "the run to complete", || run_dir.join("COMPLETE").exists().then_some(()));
    let completed = Instant::now();
    let f = coordinator.child.take().map(|c| wait_output(c, Duration::from_secs(120))).expect("child");
    let lingered = completed.elapsed();
    assert_eq!(f.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
    assert!(f.stdout.contains("--metrics-linger; Ctrl-C to exit now"), "it lingered:\n{}", f.stdout);
    // Lower bound: it served the page for about N s; upper: far below the 2N of lingering twice.
    assert!(lingered >= Duration::from_secs(LINGER - 4), "exited {lingered:?} after completing");
    assert!(lingered < Duration::from_secs(LINGER + 8), "exited {lingered:?} after completing");
}
