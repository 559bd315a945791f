//! TLS on the coordinator's gRPC port, with a self-signed certificate made here (rcgen): launched
//! workers trust it and train; a plaintext client, or one that trusts another certificate, gets
//! nowhere; a client with the certificate reads the status.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// A self-signed certificate for `localhost`, written as PEM files; returns (cert, key) paths.
fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("make a certificate");
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, made.cert.pem()).expect("write cert");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}

#[test]
fn launched_workers_train_over_tls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(tmp.path(), "coordinator");
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(2, &run_dir),
        &["--tls-cert", &cert.display().to_string(), "--tls-key", &key.display().to_string(), "--max-steps", "3"],
    );
    run_coordinator(&args, Duration::from_secs(120)).assert_success();
    assert_eq!(metrics(&run_dir).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_that_trust_the_certificate_get_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(tmp.path(), "coordinator");
    let (other, _) = self_signed(tmp.path(), "other");
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(2, &run_dir),
        &[
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
            "--external-workers",
            "--data-limit",
            "100",
        ],
    );
    let coordinator = Running::start(&args, &run_dir);
    let port = coordinator.addr.rsplit(':').next().expect("port").to_string();

    // Plaintext: the connection or the call fails.
    let plain = async {
        let mut c = CoordinatorClient::connect(format!("http://127.0.0.1:{port}")).await.ok()?;
        c.get_status(proto::v1::GetStatusRequest::default()).await.ok()
    };
    assert!(plain.await.is_none(), "a plaintext client was served");

    // Trusting the right certificate: served.
    let tls = |pem: Vec<u8>| ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name("localhost");
    let url = format!("https://127.0.0.1:{port}");
    let channel = Endpoint::from_shared(url.clone())
        .expect("url")
        .tls_config(tls(std::fs::read(&cert).unwrap()))
        .expect("tls")
        .connect()
        .await
        .expect("a TLS connection with the right certificate");
    let status = CoordinatorClient::new(channel).get_status(proto::v1::GetStatusRequest::default()).await;
    assert_eq!(status.expect("status over TLS").into_inner().world_size, 2);

    // Trusting another certificate: refused at the handshake.
    let wrong =
        Endpoint::from_shared(url.clone()).expect("url").tls_config(tls(std::fs::read(&other).unwrap())).expect("tls");
    assert!(wrong.connect().await.is_err(), "a client trusting another certificate got in");

    // A worker given the wrong certificate says so and exits.
    let out = Command::new(worker_bin())
        .args(["--coordinator", &url, "--tls-ca", &other.display().to_string(), "--tls-domain", "localhost"])
        .args(["--connect-timeout", "3"])
        .stdin(Stdio::null())
        .output()
        .expect("run worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator") && err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn a_key_that_is_not_pem_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, _) = self_signed(tmp.path(), "coordinator");
    let bad = tmp.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(1, &run_dir),
        &["--tls-cert", &cert.display().to_string(), "--tls-key", &bad.display().to_string()],
    );
    let f = run_coordinator(&args, Duration::from_secs(60));
    assert!(!f.status.success());
    assert!(f.stderr.contains("--tls-key") && f.stderr.contains("bad.key"), "{}", f.stderr);
    assert!(!run_dir.exists(), "nothing was written");
}
