//! The run token: with `--token`, only workers that present it take part; everyone else gets
//! UNAUTHENTICATED, while health checks and reflection stay open for probes and grpcurl.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use proto::v1::coordinator_client::CoordinatorClient;
use tonic::Code;
use tonic::metadata::MetadataValue;

const TOKEN: &str = "s3cret-run-token";

#[test]
fn launched_workers_get_the_token_and_the_run_completes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(2, &run_dir), &["--token", TOKEN]);
    run_coordinator(&args, Duration::from_secs(120)).assert_success();
    assert!(!metrics(&run_dir).is_empty(), "the workers trained");
    let logs = std::fs::read_to_string(run_dir.join("logs/worker-0.log")).unwrap_or_default();
    assert!(!logs.contains(TOKEN), "the token is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_token_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(2, &run_dir), &["--token", TOKEN, "--external-workers", "--data-limit", "100"]);
    let coordinator = Running::start(&args, &run_dir);
    let mut client = CoordinatorClient::connect(coordinator.url()).await.expect("connect");

    let refused = client.get_status(proto::v1::GetStatusRequest::default()).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("--token"), "{}", refused.message());

    let mut wrong = tonic::Request::new(proto::v1::GetStatusRequest::default());
    wrong.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer guess"));
    assert_eq!(client.get_status(wrong).await.expect_err("wrong token").code(), Code::Unauthenticated);

    let mut right = tonic::Request::new(proto::v1::GetStatusRequest::default());
    right.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().expect("ascii"));
    client.get_status(right).await.expect("the right token is admitted");

    // Probes need no token.
    let channel =
        tonic::transport::Endpoint::from_shared(coordinator.url()).expect("url").connect().await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h =
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health is open");
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // A worker with the wrong token is turned away with a message that says why.
    let out = Command::new(worker_bin())
        .args(["--coordinator", &coordinator.url(), "--connect-timeout", "10"])
        .env("DCGAN_TOKEN", "not-the-token")
        .stdin(Stdio::null())
        .output()
        .expect("run worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token"), "{err}");
}

/// `--token-file`: the secret comes from a file (a mounted Secret), reaches the launched workers,
/// and is written nowhere: not in run.json, not in the logs.
#[test]
fn a_token_file_works_and_the_secret_is_written_nowhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let file = tmp.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("write the token file");
    let args = with_flags(small_run(2, &run_dir), &["--token-file", &file.display().to_string(), "--max-steps", "2"]);
    let f = run_coordinator(&args, Duration::from_secs(120));
    f.assert_success();
    assert!(!f.stdout.contains(TOKEN) && !f.stderr.contains(TOKEN));
    for entry in ["run.json", "logs/worker-0.log", "logs/worker-1.log", "metrics.jsonl"] {
        let text = std::fs::read_to_string(run_dir.join(entry)).expect(entry);
        assert!(!text.contains(TOKEN), "the token is in {entry}");
    }
    // A missing or empty file is named before anything starts.
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for (path, says) in [(tmp.path().join("nope"), "cannot read it"), (empty, "empty")] {
        let args = with_flags(small_run(1, &tmp.path().join("other")), &["--token-file", &path.display().to_string()]);
        let f = run_coordinator(&args, Duration::from_secs(60));
        assert!(!f.status.success());
        assert!(f.stderr.contains("--token-file") && f.stderr.contains(says), "{}", f.stderr);
        assert!(!tmp.path().join("other").exists(), "nothing was written");
    }
}

/// `--open-status`: operators read the status without the token; joining still needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_status_lets_reads_through_and_nothing_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(2, &run_dir),
        &["--token", TOKEN, "--open-status", "--external-workers", "--data-limit", "100"],
    );
    let coordinator = Running::start(&args, &run_dir);
    let mut client = CoordinatorClient::connect(coordinator.url()).await.expect("connect");
    let status = client.get_status(proto::v1::GetStatusRequest::default()).await.expect("status is open");
    assert_eq!(status.into_inner().world_size, 2);
    client.watch_metrics(proto::v1::WatchMetricsRequest::default()).await.expect("the metrics stream is open");
    let join = proto::v1::JoinRequest {
        hostname: "intruder".into(),
        pid: 1,
        device: "cpu".into(),
        threads: 1,
        requested_rank: -1,
    };
    let refused = client.join(join).await.expect_err("joining needs the token");
    assert_eq!(refused.code(), Code::Unauthenticated);
}
