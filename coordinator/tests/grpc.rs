//! The coordinator's gRPC API through real clients: a tonic client playing the workers' part
//! (ranks, rendezvous, shards, identity checks, checksum mismatch), `grpcurl` or Python's
//! `grpcio-reflection` listing the services through reflection, and a metrics watcher.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{self, WorkerId};
use tonic::Code;
use tonic::transport::Channel;

async fn client(url: &str) -> CoordinatorClient<Channel> {
    CoordinatorClient::connect(url.to_string()).await.expect("connect to the coordinator")
}

fn external_args(workers: u32, run_dir: &Path) -> Vec<String> {
    with_flags(small_run(workers, run_dir), &["--data-limit", "100", "--external-workers", "--epochs", "2"])
}

fn join_request() -> v1::JoinRequest {
    v1::JoinRequest {
        hostname: "test".into(),
        pid: 1,
        device: Some(v1::ComputeDevice::cpu()),
        threads: 1,
        requested_rank: -1,
    }
}

/// Three fake workers join, meet, and read two epochs of shards: every sample exactly once per
/// epoch, disjoint across ranks, with the dataset's own pixels. Then they report different
/// checksums and the run fails with an error naming the step and the ranks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_are_disjoint_and_complete_and_mismatches_fail_the_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let coordinator = Running::start(&external_args(3, &run_dir), &run_dir);
    let mut c = client(&coordinator.url()).await;

    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = c.join(join_request()).await.expect("join").into_inner();
        assert_eq!(r.world_size, 3);
        assert!(!r.load_checkpoint);
        let cfg = r.config.expect("config");
        assert_eq!((cfg.batch_size, cfg.dataset_len, cfg.steps_per_epoch, cfg.nc), (24, 100, 4, 3));
        ids.push(r.id.expect("id"));
    }
    assert_eq!(ids.iter().map(|i| i.rank).collect::<Vec<_>>(), vec![0, 1, 2]);
    let e = c.join(join_request()).await.expect_err("a fourth worker");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");

    // Identity checks.
    let mut wrong = ids[0].clone();
    wrong.run_id = "someone-else".into();
    let e = c.heartbeat(v1::HeartbeatRequest { id: Some(wrong), step: 0 }).await.expect_err("wrong run");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let mut stale = ids[0].clone();
    stale.generation += 1;
    let e = c.heartbeat(v1::HeartbeatRequest { id: Some(stale), step: 0 }).await.expect_err("stale");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let mut far = ids[0].clone();
    far.rank = 7;
    let e = c.heartbeat(v1::HeartbeatRequest { id: Some(far), step: 0 }).await.expect_err("rank 7");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c.heartbeat(v1::HeartbeatRequest { id: None, step: 0 }).await.expect_err("anonymous");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    let status = c.get_status(v1::GetStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.state, v1::RunState::WaitingForWorkers as i32);
    assert_eq!(status.world_size, 3);
    assert_eq!(status.workers.len(), 3);
    assert!(status.workers.iter().all(|w| w.state == v1::WorkerState::Joined as i32));

    // Rendezvous blocks until all three have reported an address.
    let mut waits = Vec::new();
    for id in ids.clone() {
        let mut c = c.clone();
        waits.push(tokio::spawn(async move {
            let addr = format!("127.0.0.1:{}", 40000 + id.rank);
            c.rendezvous(v1::RendezvousRequest { id: Some(id), ring_address: addr, nccl_id: Vec::new() }).await
        }));
    }
    let mut sessions = BTreeSet::new();
    for w in waits {
        let r = w.await.expect("task").expect("rendezvous").into_inner();
        assert_eq!(r.ring_addresses, vec!["127.0.0.1:40000", "127.0.0.1:40001", "127.0.0.1:40002"]);
        sessions.insert(r.session);
    }
    assert_eq!(sessions.len(), 1, "every rank gets the same session");
    let status = c.get_status(v1::GetStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.state, v1::RunState::Running as i32);

    let dataset = data::DatasetSpec::Shapes.load(32, Some(100)).expect("built-in data");
    for epoch in 0..2u64 {
        let mut seen = Vec::new();
        for id in &ids {
            let mut stream = c
                .get_shard(v1::GetShardRequest { id: Some(id.clone()), epoch, from_step_in_epoch: 0 })
                .await
                .expect("shard")
                .into_inner();
            let mut steps = Vec::new();
            while let Some(chunk) = stream.message().await.expect("chunk") {
                assert_eq!(chunk.epoch, epoch);
                let mut px = Vec::new();
                proto::framing::decode_f32_le(&chunk.pixels, &mut px).expect("pixels");
                assert_eq!(px.len(), chunk.indices.len() * dataset.sample_len());
                for (k, &i) in chunk.indices.iter().enumerate() {
                    let n = dataset.sample_len();
                    assert_eq!(&px[k * n..(k + 1) * n], dataset.sample(i as usize), "pixels of sample {i}");
                }
                steps.push(chunk.step_in_epoch);
                seen.extend(chunk.indices);
            }
            assert_eq!(steps, vec![0, 1, 2, 3], "rank {} gets every step in order", id.rank);
        }
        assert_eq!(seen.len(), 100, "epoch {epoch}: no sample twice");
        let set: BTreeSet<u32> = seen.iter().copied().collect();
        assert_eq!(set, (0..100).collect(), "epoch {epoch}: every sample once");
    }
    let e = c
        .get_shard(v1::GetShardRequest { id: Some(ids[0].clone()), epoch: 2, from_step_in_epoch: 0 })
        .await
        .expect_err("an epoch past the run");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");

    // Rank 2's parameters disagree at step 1: the run fails and says so.
    let report = |id: &WorkerId, checksum: u64| v1::ReportStepRequest {
        id: Some(id.clone()),
        step: 1,
        local_batch: 8,
        has_checksum: true,
        parameter_checksum: checksum,
        step_seconds: 0.1,
        ..Default::default()
    };
    let mut answers = Vec::new();
    for (id, sum) in ids.iter().zip([1u64, 1, 2]) {
        answers.push(c.report_step(report(id, sum)).await.expect("report").into_inner());
    }
    assert!(answers[0].continue_training && answers[1].continue_training);
    assert!(!answers[2].continue_training, "the report that completes the step learns the run failed");
    assert!(answers[2].reason.contains("parameter checksums differ"), "{:?}", answers[2]);
    let f = coordinator.wait(Duration::from_secs(60));
    assert!(!f.status.success());
    assert!(
        f.stderr.contains("parameter checksums differ at step 1") && f.stderr.contains("rank 2 = 0x0000000000000002"),
        "{}",
        f.stderr
    );
}

/// An operator's view while a real run trains: GetStatus and the metrics stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_stream_follow_a_real_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(2, &run_dir), &["--epochs", "5", "--max-steps", "40", "--checkpoint-every", "10"]);
    let coordinator = Running::start(&args, &run_dir);
    let mut c = client(&coordinator.url()).await;
    let mut watch = c.watch_metrics(v1::WatchMetricsRequest {}).await.expect("watch").into_inner();
    let mut steps = Vec::new();
    let mut saw_running = false;
    while let Some(m) = watch.message().await.expect("metrics") {
        if steps.is_empty() {
            let s = c.get_status(v1::GetStatusRequest {}).await.expect("status").into_inner();
            saw_running = s.state == v1::RunState::Running as i32
                && s.workers.len() == 2
                && s.workers.iter().all(|w| w.last_heartbeat_unix_ms > 0 && !w.ring_address.is_empty());
            // The GAN health signals ride along: measured against the real samples, all well.
            let h = s.health.expect("GetStatus carries the GAN health");
            assert!(h.real_pairwise_distance > 0.0 && h.d_won_min_steps == 100, "{h:?}");
            assert!(!h.d_won && !h.nonfinite_loss && h.warnings.is_empty(), "{h:?}");
        }
        assert!(m.loss_d.is_finite() && m.images_per_sec > 0.0);
        steps.push(m.step);
    }
    assert!(saw_running, "GetStatus showed the run training with both workers");
    assert!(!steps.is_empty(), "the watch saw steps");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&40), "the stream ends with the last step");
    let f = coordinator.wait(Duration::from_secs(120));
    f.assert_success();
}

/// `grpcurl -plaintext HOST:PORT list` and `.../GetStatus`, as an operator would type them, or
/// the same through Python's grpcio-reflection. Skipped, saying why, only when neither exists
/// (`.ci/install-tools.sh` installs both).
#[test]
fn reflection_lists_the_services_to_real_clients() {
    let has_grpcurl = Command::new("grpcurl").arg("-version").output().is_ok_and(|o| o.status.success());
    let has_python =
        Command::new("python3").args(["-c", "import grpc, grpc_reflection"]).output().is_ok_and(|o| o.status.success());
    if !has_grpcurl && !has_python {
        println!("SKIPPED: neither grpcurl nor python3 with grpcio-reflection is installed (run .ci/install-tools.sh)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let coordinator = Running::start(&external_args(2, &run_dir), &run_dir);
    let addr = coordinator.addr.clone();

    // One worker joins, as rank 0, so that GetStatus has a rank 0 to show.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut c = CoordinatorClient::connect(coordinator.url()).await.expect("connect");
        c.join(join_request()).await.expect("join");
    });

    if has_grpcurl {
        let out = Command::new("grpcurl").args(["-plaintext", &addr, "list"]).output().expect("grpcurl list");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for s in ["dcgan.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
            assert!(text.lines().any(|l| l.trim() == s), "grpcurl list lacks {s}: {text}");
        }
        let out = Command::new("grpcurl")
            .args(["-plaintext", &addr, "dcgan.v1.Coordinator/GetStatus"])
            .output()
            .expect("grpcurl GetStatus");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status: serde_json::Value = serde_json::from_str(&text).expect("GetStatus as JSON");
        assert_eq!(status["state"], "RUN_STATE_WAITING_FOR_WORKERS", "{text}");
        assert_eq!(status["worldSize"], 2, "{text}");
        assert_eq!(status["dataset"], "shapes", "{text}");
        assert_eq!(status["workers"][0]["rank"], 0, "rank 0 shows as rank 0: {text}");
        let out = Command::new("grpcurl")
            .args(["-plaintext", "-d", r#"{"service":"dcgan.v1.Coordinator"}"#, &addr, "grpc.health.v1.Health/Check"])
            .output()
            .expect("grpcurl health");
        assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"), "{out:?}");
    }
    if has_python {
        let script = r#"
import sys, grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
channel = grpc.insecure_channel(sys.argv[1])
db = ProtoReflectionDescriptorDatabase(channel)
services = db.get_services()
print("\n".join(services))
desc = db.FindFileContainingSymbol("dcgan.v1.Coordinator")
print("file", desc.name)
"#;
        let out = Command::new("python3").args(["-c", script, &addr]).output().expect("python reflection");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("dcgan.v1.Coordinator") && text.contains("grpc.health.v1.Health"), "{text}");
        assert!(text.contains("file dcgan/v1/coordinator.proto"), "{text}");
    }
}

/// With `--max-restarts 0`, a worker that dies mid-run (SIGKILL: no goodbye) fails the run; the
/// coordinator stops the other workers and exits non-zero with a message naming a rank.
/// (With restarts, `tests/faults.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_fails_the_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args =
        with_flags(small_run(2, &run_dir), &["--epochs", "10000", "--heartbeat-timeout", "30", "--max-restarts", "0"]);
    let coordinator = Running::start(&args, &run_dir);
    let mut c = client(&coordinator.url()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = c.get_status(v1::GetStatusRequest {}).await.expect("status").into_inner();
        if s.step >= 2 && s.workers.len() == 2 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the run did not start: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pids: Vec<u32> = status.workers.iter().map(|w| w.pid).collect();
    let killed = Command::new("kill").args(["-9", &pids[1].to_string()]).status().expect("kill");
    assert!(killed.success());
    let f = coordinator.wait(Duration::from_secs(120));
    assert!(!f.status.success());
    assert!(f.stderr.contains("run failed") && f.stderr.contains("rank"), "{}", f.stderr);
    // Rank 0 does not outlive the run.
    let alive = Command::new("kill").args(["-0", &pids[0].to_string()]).status().expect("kill -0");
    assert!(!alive.success(), "rank 0 (pid {}) still runs", pids[0]);
}

/// The address the coordinator writes is the address a worker takes: `--coordinator` given the
/// exact text of `coordinator.addr` (`host:port` and its newline) joins and trains.
#[test]
fn a_worker_takes_the_exact_text_of_coordinator_addr() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(1, &run_dir), &["--external-workers", "--max-steps", "2"]);
    let coordinator = Running::start(&args, &run_dir);
    let text = std::fs::read_to_string(run_dir.join("coordinator.addr")).expect("coordinator.addr");
    assert!(!text.contains("://"), "the file holds host:port: {text:?}");
    let log = tmp.path().join("worker.log");
    let mut worker = spawn_worker(&[], &text, &[], &log);
    let status = wait_worker(&mut worker, Duration::from_secs(120), &log);
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    coordinator.wait(Duration::from_secs(60)).assert_success();
    assert_eq!(steps_done(&run_dir), 2);
}
