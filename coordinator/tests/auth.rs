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
