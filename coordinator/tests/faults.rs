//! Faults a long run meets: workers killed (SIGKILL) at random moments, in a step or in the
//! all-reduce, and the coordinator killed too. The coordinator notices, ends the generation, and
//! starts the next from the latest checkpoint with the workers launched again (or rejoining, when
//! external); the run reaches its last step with every step in `metrics.jsonl` once, and its last
//! checkpoint verifies and loads. Also: a damaged checkpoint is set aside and the run resumes
//! from the one before; a full disk fails clearly; with `--min-workers` the run goes on with the
//! workers left.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(600);

/// Loads the checkpoint directory the way a resume does: digests, then the networks.
fn assert_checkpoint_loads(dir: &Path) {
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).expect("SHA256SUMS");
    let out = Command::new("sha256sum").arg("-c").arg("--quiet").arg("SHA256SUMS").current_dir(dir).output();
    if let Ok(out) = out {
        assert!(
            out.status.success(),
            "sha256sum -c failed in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let files = sums
        .lines()
        .map(|l| {
            let name = l.split_once("  ").expect("digest line").1;
            (name.to_string(), std::fs::read(dir.join(name)).expect("checkpoint file"))
        })
        .collect();
    kernels::Gan::load(&kernels::CheckpointFiles { files }).expect("the final checkpoint loads");
}

/// Kills a random worker (SIGKILL) once the run trained a few steps past the last restart.
/// Returns (seconds until training again, steps lost).
fn kill_a_worker(
    coordinator: &mut Running,
    run_dir: &Path,
    generation: &mut u64,
    random: &mut impl FnMut() -> u64,
) -> (f64, u64) {
    let url = coordinator.url();
    let url = url.as_str();
    let at = steps_done(run_dir) + 3 + random() % 5;
    let target = wait_for(TIMEOUT, "the run to progress before a kill", || {
        coordinator.assert_running();
        (steps_done(run_dir) >= at)
            .then(|| status(url).filter(|s| s.generation == *generation && s.workers.len() == 3))?
    });
    let rank = (random() % 3) as usize;
    let pid = target.workers.iter().find(|w| w.rank == Some(rank as u32)).expect("rank").pid;
    let step_at_kill = steps_done(run_dir);
    let killed = Instant::now();
    let ok = Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(ok.success());
    *generation += 1;
    let resumed_from = training_again(coordinator, run_dir, *generation, step_at_kill);
    let back = killed.elapsed().as_secs_f64();
    eprintln!(
        "worker kill: rank {rank} (pid {pid}) at step {step_at_kill}; training again after {back:.1} s from the checkpoint of step {resumed_from} ({} steps lost)",
        step_at_kill - resumed_from
    );
    (back, step_at_kill - resumed_from)
}

/// Waits until generation `generation` trained past `step_at_kill`; returns the checkpoint it
/// started from.
fn training_again(coordinator: &mut Running, run_dir: &Path, generation: u64, step_at_kill: u64) -> u64 {
    let url = coordinator.url();
    wait_for(TIMEOUT, "training again after a kill", || {
        coordinator.assert_running();
        let s = status(&url).filter(|s| s.generation == generation && s.step > step_at_kill)?;
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).ok()?).ok()?;
        assert_eq!(run["generation"], generation);
        Some(s.checkpoints.iter().map(|c| c.step).filter(|st| *st <= step_at_kill).max().unwrap_or(0))
    })
}

/// SIGKILLs the coordinator and starts it again on its run directory with `--resume` (as a
/// Deployment would), up to `total` steps with `flags`. Returns the moment of the kill and the
/// step done by then.
fn kill_and_resume(coordinator: &mut Running, run_dir: &Path, total: u64, flags: &[&str]) -> (Instant, u64) {
    let mut child = coordinator.child.take().expect("child");
    child.kill().expect("SIGKILL the coordinator");
    let _ = child.wait();
    let killed = Instant::now();
    let step_at_kill = steps_done(run_dir);
    std::fs::remove_file(run_dir.join("coordinator.addr")).expect("the old address file");
    *coordinator = Running::start(&with_flags(resume_args(run_dir, total, &[]), flags), run_dir);
    (killed, step_at_kill)
}

#[test]
fn a_run_survives_workers_and_its_coordinator_killed_at_random_moments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    // 240 samples, batch 24: 10 steps per epoch, 8 epochs; 64x64 images make a step last long
    // enough for a kill to land in the middle of the run. A checkpoint every 5 steps.
    let flags = ["--max-restarts", "5", "--heartbeat-timeout", "20"];
    let args = watchable_run(
        3,
        &run_dir,
        240,
        8,
        &[&flags[..], &["--checkpoint-every", "5", "--checksum-every", "1"]].concat(),
    );
    let total = 80u64;
    let mut coordinator = Running::start(&args, &run_dir);

    // The ranks and the moments come from a generator seeded by the clock (printed; set
    // DCGAN_CHAOS_SEED to replay a failure's choices).
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut seed = std::env::var("DCGAN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(clock.as_nanos() as u64 ^ u64::from(std::process::id()));
    eprintln!("chaos seed {seed}");
    let mut random = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut figures = Vec::new();
    let mut generation = 1u64;
    for _ in 0..2 {
        figures.push(kill_a_worker(&mut coordinator, &run_dir, &mut generation, &mut random));
    }

    // The coordinator killed (its launched workers die with it), then started again on the run
    // directory as a Deployment would: it reloads the run and launches the workers again.
    let at = steps_done(&run_dir) + 2 + random() % 5;
    wait_for(TIMEOUT, "progress before the coordinator's kill", || (steps_done(&run_dir) >= at).then_some(()));
    let (killed, step_at_kill) = kill_and_resume(&mut coordinator, &run_dir, total, &flags);
    generation += 1;
    let resumed_from = training_again(&mut coordinator, &run_dir, generation, step_at_kill);
    let back = killed.elapsed().as_secs_f64();
    eprintln!(
        "coordinator kill at step {step_at_kill}; training again after {back:.1} s (restart included) from the checkpoint of step {resumed_from} ({} steps lost)",
        step_at_kill - resumed_from
    );
    let coordinator_figure = (back, step_at_kill - resumed_from);

    figures.push(kill_a_worker(&mut coordinator, &run_dir, &mut generation, &mut random));
    assert!(steps_done(&run_dir) + 5 < total, "the kills came before the end");

    let f = coordinator.wait(TIMEOUT);
    f.assert_success();
    assert!(f.stdout.contains("restart 1 of 5"), "{}", f.stdout);
    let steps: Vec<u64> = metrics(&run_dir).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=total).collect::<Vec<_>>(), "every step once in metrics.jsonl");
    assert_eq!(checkpoint_steps(&run_dir).last(), Some(&total));
    assert_checkpoint_loads(&run_dir.join(format!("checkpoints/step_{total:08}")));
    for epoch in 0..8 {
        assert!(
            run_dir.join(format!("samples/fake_epoch_{epoch:03}.png")).is_file(),
            "grid of epoch {epoch}: {}",
            f.stderr
        );
    }
    let log = std::fs::read_to_string(run_dir.join("logs/worker-0.log")).expect("worker log");
    assert!(log.contains("--- generation 5, rank 0 ---"), "each generation's workers log in turn");
    let worst = figures.iter().map(|f| f.0).fold(0.0, f64::max);
    eprintln!(
        "3 worker kills and 1 coordinator kill survived; worst time from a worker kill to training again {worst:.1} s; steps lost per worker kill {:?}; coordinator kill: {:.1} s, {} steps lost",
        figures.iter().map(|f| f.1).collect::<Vec<_>>(),
        coordinator_figure.0,
        coordinator_figure.1
    );
}

#[test]
fn a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args =
        with_flags(small_run(2, &run_dir), &["--data-limit", "100", "--max-steps", "6", "--checkpoint-every", "2"]);
    run_coordinator(&args, TIMEOUT).assert_success();
    let kept = checkpoint_steps(&run_dir);
    assert!(kept.ends_with(&[4, 6]), "{kept:?}");
    // Flip bytes in the newest checkpoint's generator.
    let file = run_dir.join("checkpoints/step_00000006/generator.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let resume = resume_args(&run_dir, 8, &[]);
    let f = run_coordinator(&resume, TIMEOUT);
    f.assert_success();
    assert!(f.stderr.contains("step_00000006") && f.stderr.contains("falling back"), "{}", f.stderr);
    assert!(run_dir.join("checkpoints/damaged-step_00000006").is_dir(), "set aside, not deleted");
    let steps: Vec<u64> = metrics(&run_dir).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "steps 5 and 6 redone once each");
}

/// Unmounts the test's small filesystem however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A disk that fills up while a checkpoint is written (a real 512 KiB tmpfs, mounted here: the
/// test needs root, as CI has): the run fails naming the error, and every checkpoint stored
/// before is intact (its digests check and it loads); no half-written one is left.
#[test]
fn a_full_disk_fails_the_run_clearly_and_keeps_earlier_checkpoints() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"]).arg(&disk).status();
    assert!(
        mounted.is_ok_and(|s| s.success()),
        "cannot mount a tmpfs at {} (this test needs root, as CI has)",
        disk.display()
    );
    let _guard = Mounted(disk.clone());
    let run_dir = disk.join("run");
    // A checkpoint every step, all kept: the disk fills within a few dozen steps.
    let args = with_flags(
        small_run(2, &run_dir),
        &["--data-limit", "100", "--epochs", "100", "--checkpoint-every", "1", "--keep-checkpoints", "1000"],
    );
    let f = run_coordinator(&args, TIMEOUT);
    assert!(!f.status.success(), "the run cannot have completed on a full disk");
    assert!(f.stderr.contains("No space left on device"), "the error names the cause:\n{}", f.stderr);
    let stored = checkpoint_steps(&run_dir);
    assert!(!stored.is_empty(), "some checkpoints fitted before the disk filled");
    for step in &stored {
        assert_checkpoint_loads(&run_dir.join(format!("checkpoints/step_{step:08}")));
    }
    let leftovers: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("step_"))
        .collect();
    assert!(leftovers.is_empty(), "half-written checkpoints left: {leftovers:?}");
}

/// The coordinator killed (SIGKILL, no goodbye) mid-run: its workers notice and exit rather
/// than train on alone, and a coordinator started again on the run directory (`--resume`, as
/// the Kubernetes Deployment does) reloads it and finishes with every step once in
/// `metrics.jsonl`, whatever was half-written at the kill.
#[test]
fn a_killed_coordinator_is_restarted_on_its_run_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = watchable_run(2, &run_dir, 240, 5, &["--checkpoint-every", "5"]);
    let total = 50u64;
    let mut coordinator = Running::start(&args, &run_dir);
    let url = coordinator.url();
    let deadline = Instant::now() + TIMEOUT;
    let workers = loop {
        assert!(Instant::now() < deadline, "the run did not get going");
        if steps_done(&run_dir) >= 12 {
            if let Some(s) = status(&url).filter(|s| s.workers.len() == 2) {
                break s.workers;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut child = coordinator.child.take().expect("child");
    child.kill().expect("SIGKILL the coordinator");
    let _ = child.wait();
    let killed_at = steps_done(&run_dir);
    assert!(killed_at < total, "killed before the end");
    // Its workers leave by themselves (their next report fails).
    for w in &workers {
        let gone = Instant::now() + Duration::from_secs(60);
        while Command::new("kill").args(["-0", &w.pid.to_string()]).status().is_ok_and(|s| s.success()) {
            assert!(Instant::now() < gone, "rank {:?} (pid {}) outlived its coordinator by a minute", w.rank, w.pid);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let f = run_coordinator(&resume_args(&run_dir, total, &[]), TIMEOUT);
    f.assert_success();
    let steps: Vec<u64> = metrics(&run_dir).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=total).collect::<Vec<_>>(), "every step once after the restart");
    assert_checkpoint_loads(&run_dir.join(format!("checkpoints/step_{total:08}")));
    eprintln!("coordinator killed at step {killed_at}; restarted and completed {total} steps");
}

/// External workers (as on Kubernetes) outlive what happens to the run: one is killed for good,
/// and with `--min-workers 2` the next generation goes on with the two left, the shards
/// recomputed for them; then the coordinator is killed and started again on the same address,
/// and the two find it by themselves (backoff), rejoin and finish the run.
#[test]
fn external_workers_go_on_with_fewer_and_rejoin_a_restarted_coordinator() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let fewer = ["--min-workers", "2", "--rejoin-wait", "2", "--listen", &listen];
    let args = watchable_run(
        3,
        &run_dir,
        240,
        5,
        &[&fewer[..], &["--external-workers", "--checkpoint-every", "5", "--heartbeat-timeout", "10"]].concat(),
    );
    let total = 50u64;
    let mut coordinator = Running::start(&args, &run_dir);
    let url = coordinator.url();
    let logs: Vec<_> = (0..3).map(|r| tmp.path().join(format!("worker-{r}.log"))).collect();
    let mut workers: Vec<_> = (0..3)
        .map(|r| spawn_worker(&[], &url, &["--rank", &r.to_string(), "--rejoin-timeout", "120"], &logs[r]))
        .collect();

    wait_for(TIMEOUT, "three workers training", || {
        (steps_done(&run_dir) >= 8).then(|| status(&url).filter(|s| s.world_size == 3))?
    });
    workers[2].kill().expect("SIGKILL rank 2");
    let _ = workers[2].wait();
    let killed = Instant::now();
    let step_at_kill = steps_done(&run_dir);
    let s = wait_for(TIMEOUT, "training again with two workers", || {
        status(&url).filter(|s| s.world_size == 2 && s.step > step_at_kill)
    });
    eprintln!(
        "rank 2 killed at step {step_at_kill}: training again with 2 workers in generation {} after {:.1} s",
        s.generation,
        killed.elapsed().as_secs_f64()
    );

    let (killed, step_at_kill) = kill_and_resume(&mut coordinator, &run_dir, total, &fewer);
    assert_eq!(coordinator.url(), url, "the restarted coordinator listens where the workers look");
    let s = wait_for(TIMEOUT, "the workers back with the restarted coordinator", || {
        status(&url).filter(|s| s.world_size == 2 && s.step > step_at_kill)
    });
    eprintln!(
        "coordinator killed at step {step_at_kill}: the 2 workers rejoined and trained again in generation {} after {:.1} s",
        s.generation,
        killed.elapsed().as_secs_f64()
    );

    let f = coordinator.wait(TIMEOUT);
    f.assert_success();
    for r in 0..2 {
        let st = wait_worker(&mut workers[r], Duration::from_secs(60), &logs[r]);
        let log = std::fs::read_to_string(&logs[r]).unwrap();
        assert!(st.success(), "rank {r} exited {st}:\n{log}");
        assert!(log.contains("rejoining"), "rank {r} rejoined by itself:\n{log}");
    }
    let steps: Vec<u64> = metrics(&run_dir).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=total).collect::<Vec<_>>(), "every step once in metrics.jsonl");
    let last = metrics(&run_dir).pop().unwrap();
    assert_eq!(last["global_batch"], 24, "the global batch stays with fewer workers: {last}");
    assert_checkpoint_loads(&run_dir.join(format!("checkpoints/step_{total:08}")));
}
