//! TLS on the coordinator's gRPC port, with a self-signed certificate made here (rcgen): launched
//! workers trust it and train; a plaintext client, or one that trusts another certificate, gets
//! nowhere; a client with the certificate reads the status. The HTTP port (`/metrics`, the live
//! page) is HTTPS with the same certificate.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
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

/// A run serving gRPC over TLS with `cert` and `key` that waits for 2 external workers on 100
/// samples, plus `extra` flags.
fn external_tls_run(run_dir: &Path, cert: &Path, key: &Path, extra: &[&str]) -> Vec<String> {
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--external-workers", "--data-limit", "100"];
    with_flags(with_flags(small_run(2, run_dir), &tls), extra)
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
    let args = external_tls_run(&run_dir, &cert, &key, &[]);
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

/// A TLS connection to `addr` for `localhost`, trusting only the certificate in `ca` (PEM).
fn https_stream(addr: &str, ca: &Path) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the certificate") {
        roots.add(cert.expect("a certificate")).expect("trust it");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = "localhost".try_into().expect("a server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Handshake now, so that a refused certificate is this call's error.
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// With --tls-cert the live page and /metrics are HTTPS with the gRPC port's certificate, the
/// address says so, and the run token is asked for there as on gRPC.
#[test]
fn the_live_page_is_https_with_the_same_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(tmp.path(), "coordinator");
    let (other, _) = self_signed(tmp.path(), "other");
    let run_dir = tmp.path().join("run");
    let args = external_tls_run(&run_dir, &cert, &key, &["--token", "s3cret", "--metrics-listen", "127.0.0.1:0"]);
    let mut coordinator = Running::start(&args, &run_dir);
    let url = std::fs::read_to_string(run_dir.join("metrics.addr")).expect("metrics.addr").trim().to_string();
    let addr = url.strip_prefix("https://").unwrap_or_else(|| panic!("metrics.addr is not an https URL: {url}"));

    let get = |target: &str, authorization: Option<&str>| {
        let stream = https_stream(addr, &cert).expect("a TLS connection trusting the run's certificate");
        http_exchange(stream, "localhost", target, authorization).expect("an HTTPS answer")
    };
    let (code, _, body) = get("/api/status", Some("Bearer s3cret"));
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"world_size\":2"), "{}", String::from_utf8_lossy(&body));
    let (code, head, _) = get("/", None);
    assert_eq!(code, 401, "the token is asked for over HTTPS too");
    assert!(head.to_ascii_lowercase().contains("www-authenticate: basic"), "{head}");
    let (code, _, body) = get("/metrics", None);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("dcgan_"));

    // Plain HTTP gets no page; a client trusting another certificate gets no connection.
    let plain = TcpStream::connect(addr).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        http_exchange(s, addr, "/metrics", None)
    });
    assert!(plain.map_or(true, |(code, _, _)| code != 200), "plain HTTP was served");
    assert!(https_stream(addr, &other).is_err(), "a client trusting another certificate got in");

    // The printed address is the https one.
    let pid = coordinator.child.as_ref().expect("child").id();
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
    assert!(status.success());
    let f = coordinator.child.take().map(|c| wait_output(c, Duration::from_secs(60))).expect("child");
    assert!(f.stdout.contains(&format!("live page at https://{addr}/")), "{}", f.stdout);
}
