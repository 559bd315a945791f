//! The run token: with `--token`, only workers that present it take part; everyone else gets
//! UNAUTHENTICATED, while health checks and reflection stay open for probes and grpcurl. The
//! HTTP port (`--metrics-listen`: `/metrics` and the live page) follows the same policy.

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

    // (GetStatus with and without the right token: `one_policy_on_both_ports`.) The refusal
    // tells a worker's operator and one at grpcurl how to pass the token.
    let refused = client.get_status(proto::v1::GetStatusRequest::default()).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    for says in ["--token", "--token-file", "grpcurl -H \"authorization: Bearer $DCGAN_TOKEN\""] {
        assert!(refused.message().contains(says), "{}", refused.message());
    }
    let mut wrong = tonic::Request::new(proto::v1::GetStatusRequest::default());
    wrong.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer guess"));
    assert_eq!(client.get_status(wrong).await.expect_err("wrong token").code(), Code::Unauthenticated);

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
        device: Some(proto::v1::ComputeDevice::cpu()),
        threads: 1,
        requested_rank: -1,
    };
    let refused = client.join(join).await.expect_err("joining needs the token");
    assert_eq!(refused.code(), Code::Unauthenticated);
}

/// The `Authorization` values a request may carry: none, wrong ones, and the run's token as
/// Bearer and as HTTP Basic (the password, with a user name or none: `curl -u :TOKEN`).
const CREDENTIALS: [(&str, Option<&str>); 6] = [
    ("none", None),
    ("wrong Bearer", Some("Bearer guess")),
    ("wrong Basic", Some("Basic Omd1ZXNz")), // ":guess"
    ("Bearer", Some("Bearer s3cret-run-token")),
    ("Basic user:token", Some("Basic b3BlcmF0b3I6czNjcmV0LXJ1bi10b2tlbg==")), // "operator:s3cret-run-token"
    ("Basic :token", Some("Basic OnMzY3JldC1ydW4tdG9rZW4=")),                 // ":s3cret-run-token"
];

/// What a route is, for the table.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Class {
    Metrics,
    View,
    Checkpoint,
    GetStatus,
}

/// Every HTTP route of the coordinator's port, and GetStatus on the gRPC port.
const ROUTES: [(&str, Class); 10] = [
    ("/metrics", Class::Metrics),
    ("/", Class::View),
    ("/index.html", Class::View),
    ("/assets/app.js", Class::View),
    ("/assets/style.css", Class::View),
    ("/api/status", Class::View),
    ("/api/steps?since=0", Class::View),
    ("/samples/real.png", Class::View),
    ("/checkpoints/step_00000001/state.json", Class::Checkpoint),
    ("GetStatus", Class::GetStatus),
];

/// The access table: (coordinator flags, route class) -> the answer to each of [`CREDENTIALS`]
/// (HTTP status codes; 200 / 401 stand for OK / UNAUTHENTICATED on gRPC).
const TABLE: [(&str, Class, [u16; 6]); 12] = [
    // Columns: none, wrong Bearer, wrong Basic, Bearer, Basic user:token, Basic :token.
    ("--token", Class::Metrics, [200, 200, 200, 200, 200, 200]),
    ("--token", Class::View, [401, 401, 401, 200, 200, 200]),
    ("--token", Class::Checkpoint, [401, 401, 401, 200, 200, 200]),
    ("--token", Class::GetStatus, [401, 401, 401, 200, 200, 200]),
    ("--open-status", Class::Metrics, [200, 200, 200, 200, 200, 200]),
    ("--open-status", Class::View, [200, 200, 200, 200, 200, 200]),
    ("--open-status", Class::Checkpoint, [401, 401, 401, 200, 200, 200]),
    ("--open-status", Class::GetStatus, [200, 200, 200, 200, 200, 200]),
    ("no token", Class::Metrics, [200, 200, 200, 200, 200, 200]),
    ("no token", Class::View, [200, 200, 200, 200, 200, 200]),
    ("no token", Class::Checkpoint, [200, 200, 200, 200, 200, 200]),
    ("no token", Class::GetStatus, [200, 200, 200, 200, 200, 200]),
];

/// A coordinator waiting for external workers, its live page served, with a checkpoint file
/// put in its run directory (what a stored checkpoint holds, without training for it).
fn waiting_coordinator(tmp: &std::path::Path, name: &str, flags: &[&str]) -> (Running, String) {
    let run_dir = tmp.join(name);
    let base = ["--external-workers", "--data-limit", "100", "--metrics-listen", "127.0.0.1:0"];
    let args = with_flags(with_flags(small_run(2, &run_dir), &base), flags);
    let coordinator = Running::start(&args, &run_dir);
    let step = run_dir.join("checkpoints/step_00000001");
    std::fs::create_dir_all(&step).expect("checkpoint dir");
    std::fs::write(step.join("state.json"), "{\"step\": 1}").expect("state.json");
    std::fs::write(run_dir.join("secret.txt"), "outside").expect("secret.txt");
    let addr = std::fs::read_to_string(run_dir.join("metrics.addr")).expect("metrics.addr").trim().to_string();
    (coordinator, addr)
}

/// One policy on both ports: every HTTP route and GetStatus, with every kind of credential,
/// with a token, with a token and `--open-status`, and with no token (a laptop run).
#[test]
fn one_policy_on_both_ports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let configs = [
        ("--token", waiting_coordinator(tmp.path(), "token", &["--token", TOKEN])),
        ("--open-status", waiting_coordinator(tmp.path(), "open", &["--token", TOKEN, "--open-status"])),
        ("no token", waiting_coordinator(tmp.path(), "none", &[])),
    ];
    let mut seen = 0;
    for (flags, (coordinator, addr)) in &configs {
        for (route, class) in ROUTES {
            let expected = TABLE.iter().find(|(f, c, _)| f == flags && *c == class).expect("a row").2;
            for ((who, authorization), want) in CREDENTIALS.iter().zip(expected) {
                let got = match class {
                    Class::GetStatus => match get_status_as(&coordinator.url(), *authorization) {
                        Ok(status) => {
                            assert_eq!(status.world_size, 2);
                            200
                        }
                        Err(e) if e.code() == Code::Unauthenticated => 401,
                        Err(e) => panic!("{flags}: GetStatus with {who}: {e}"),
                    },
                    _ => {
                        let (code, head, body) = http_call(addr, route, *authorization);
                        if code == 200 && class == Class::Checkpoint {
                            assert_eq!(body, b"{\"step\": 1}", "{flags}: {route} is the stored file");
                        }
                        if code == 200 && class == Class::Metrics {
                            assert!(String::from_utf8_lossy(&body).contains("dcgan_"), "{flags}: {route}");
                        }
                        if code == 401 {
                            assert_refusal_explains(&head, &body);
                        }
                        code
                    }
                };
                assert_eq!(got, want, "{flags}: {route} with {who}");
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 3 * ROUTES.len() * CREDENTIALS.len());
}

/// A 401 makes a browser prompt for the token, and says how to give it.
fn assert_refusal_explains(head: &str, body: &[u8]) {
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nwww-authenticate: basic realm=\"dcgan run\", charset=\"utf-8\""), "{head}");
    assert!(head.contains("\r\ncontent-type: text/plain"), "{head}");
    let body = String::from_utf8_lossy(body);
    for says in ["password", "curl -H \"Authorization: Bearer $DCGAN_TOKEN\"", "curl -u :TOKEN", "--token"] {
        assert!(body.contains(says), "the refusal does not say {says:?}:\n{body}");
    }
}

/// Nothing outside the samples and the checkpoints is served, whatever the path's tricks, even
/// to a request with the token.
#[test]
fn no_path_reaches_outside_the_run_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_coordinator, addr) = waiting_coordinator(tmp.path(), "run", &["--token", TOKEN]);
    let bearer = Some("Bearer s3cret-run-token");
    assert_eq!(http_call(&addr, "/checkpoints/step_00000001/state.json", bearer).0, 200, "the real one is served");
    for target in [
        "/checkpoints/step_00000001/../../run.json",
        "/checkpoints/step_00000001/../../secret.txt",
        "/checkpoints/../run.json",
        "/checkpoints/step_00000001/%2e%2e%2fstate.json",
        "/checkpoints/step_00000001/%2e%2e%2f%2e%2e%2frun.json",
        "/checkpoints/step_00000001/..%5c..%5crun.json",
        "/checkpoints/step_00000001//etc/passwd",
        "/checkpoints//etc/passwd",
        "/checkpoints/%2fetc%2fpasswd",
        "/samples/../run.json",
        "/samples/..%2frun.json",
        "/samples/%2e%2e/run.json",
        "/samples/%2e%2e%2frun.json",
        "/samples/..%2f..%2fsecret.txt",
        "/samples//etc/passwd",
        "/samples/%2fetc%2fpasswd",
        "/assets/../run.json",
        "/api/../run.json",
        "/run.json",
        "/secret.txt",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//etc/passwd",
        "/etc/passwd",
        "http://127.0.0.1/../run.json",
    ] {
        let (code, head, body) = http_call(&addr, target, bearer);
        assert_eq!(code, 404, "{target}: {head}\n{}", String::from_utf8_lossy(&body));
    }
}
