//! Helpers for tests that start the real `coordinator` and `worker` binaries on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The worker binary next to the coordinator's, built (a no-op when up to date) so that
/// `cargo test -p coordinator` alone works. `DCGAN_WORKER_BIN` overrides it.
///
/// The build asks for every target of the workspace, as `cargo test --workspace` does
/// (`deploy_checks::build_workspace`): `-p worker` alone resolves features differently and
/// rebuilt half the dependencies, minutes in CI.
pub fn worker_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("DCGAN_WORKER_BIN") {
            return PathBuf::from(p);
        }
        let coordinator = PathBuf::from(env!("CARGO_BIN_EXE_coordinator"));
        let worker = coordinator.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
        // Build it with the profile the coordinator was built with (its directory says which).
        let profile = match coordinator.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()) {
            Some("release") => "release",
            Some("debug") | None => "test",
            Some(other) => other,
        };
        deploy_checks::build_workspace(profile);
        assert!(worker.is_file(), "no worker binary at {}", worker.display());
        worker
    })
    .clone()
}

pub fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

/// Arguments for a small, fast run: tiny networks, few samples, one thread per worker.
pub fn small_run(workers: u32, run_dir: &Path) -> Vec<String> {
    [
        "--workers",
        &workers.to_string(),
        "--ngf",
        "8",
        "--ndf",
        "8",
        "--nz",
        "16",
        "--batch-size",
        "24",
        "--data-limit",
        "200",
        "--worker-threads",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--run-dir",
        &run_dir.display().to_string(),
        "--worker-bin",
        &worker_bin().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A small run whose steps last long enough to be watched, killed or stopped in the middle
/// (64x64 images, ngf = ndf = 16): `data_limit` samples (24 per step), `epochs` epochs, plus
/// `extra` flags.
pub fn watchable_run(workers: u32, run_dir: &Path, data_limit: u64, epochs: u32, extra: &[&str]) -> Vec<String> {
    let (limit, epochs) = (data_limit.to_string(), epochs.to_string());
    let base = ["--image-size", "64", "--ngf", "16", "--ndf", "16", "--data-limit", &limit, "--epochs", &epochs];
    with_flags(with_flags(small_run(workers, run_dir), &base), extra)
}

/// Arguments that resume the run in `run_dir` up to `max_steps` (settings not given again come
/// from its run.json), plus `extra` flags.
pub fn resume_args(run_dir: &Path, max_steps: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--resume",
        "--run-dir",
        &run_dir.display().to_string(),
        "--max-steps",
        &max_steps.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--worker-bin",
        &worker_bin().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Sets `flag` to `value` in `args`, replacing an earlier value (clap refuses repeated flags).
pub fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// Applies `flag value` pairs and bare switches (a flag followed by another flag or nothing).
pub fn with_flags(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < extra.len() {
        let takes_value = extra.get(i + 1).is_some_and(|v| !v.starts_with("--"));
        if takes_value {
            set_flag(&mut args, extra[i], extra[i + 1]);
            i += 2;
        } else {
            args.push(extra[i].to_string());
            i += 1;
        }
    }
    args
}

/// What a finished coordinator left.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "coordinator failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// The coordinator binary, with the data sets a test prepares kept in one cache under the
/// system's temporary directory instead of the user's `~/.cache`.
pub fn coordinator_command() -> Command {
    let mut cmd = Command::new(coordinator_bin());
    cmd.env("DCGAN_DATA_CACHE", std::env::temp_dir().join("dcgan-test-data-cache"));
    cmd
}

/// Runs the coordinator to its end (killing it after `timeout`).
pub fn run_coordinator(args: &[String], timeout: Duration) -> Finished {
    let child = coordinator_command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    wait_output(child, timeout)
}

/// Waits for a child with piped output, killing it after `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration) -> Finished {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for coordinator") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coordinator did not finish within {timeout:?}; stderr:\n{}", err_reader.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Finished { status, stdout: out_reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() }
}

/// A coordinator running in the background (killed on drop).
pub struct Running {
    pub child: Option<Child>,
    pub addr: String,
    pub run_dir: PathBuf,
}

impl Running {
    /// Starts the coordinator and waits until it has written its address.
    pub fn start(args: &[String], run_dir: &Path) -> Self {
        let child = coordinator_command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start coordinator");
        let mut running = Self { child: Some(child), addr: String::new(), run_dir: run_dir.to_path_buf() };
        let addr_file = run_dir.join("coordinator.addr");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if a.ends_with('\n') {
                    running.addr = a.trim().to_string();
                    return running;
                }
            }
            if let Some(c) = running.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    let f = wait_output(running.child.take().expect("child"), Duration::from_secs(5));
                    panic!("coordinator exited early ({s}): {}", f.stderr);
                }
            }
            assert!(Instant::now() < deadline, "coordinator wrote no address in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Panics with the coordinator's output if it has exited: a test waiting on a coordinator
    /// that is gone says why it went instead of waiting out its timeout.
    pub fn assert_running(&mut self) {
        let Some(c) = self.child.as_mut() else { return };
        if let Ok(Some(s)) = c.try_wait() {
            let f = wait_output(self.child.take().expect("child"), Duration::from_secs(5));
            panic!(
                "the coordinator exited ({s}) while the test waited on it\nstdout:\n{}\nstderr:\n{}",
                f.stdout, f.stderr
            );
        }
    }

    /// Waits for the coordinator to exit by itself.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        wait_output(self.child.take().expect("child"), timeout)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lines of `metrics.jsonl`.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("read metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// Steps of the checkpoints in the run directory.
pub fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .expect("list checkpoints")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("step_").and_then(|s| s.parse().ok()))
        .collect();
    steps.sort_unstable();
    steps
}

/// Writes an MNIST-style IDX image file of `n` 28x28 digits-ish images.
pub fn write_mnist(path: &Path, n: usize) {
    let mut bytes = Vec::with_capacity(16 + n * 784);
    bytes.extend_from_slice(&2051u32.to_be_bytes());
    bytes.extend_from_slice(&(n as u32).to_be_bytes());
    bytes.extend_from_slice(&28u32.to_be_bytes());
    bytes.extend_from_slice(&28u32.to_be_bytes());
    for i in 0..n {
        for y in 0..28usize {
            for x in 0..28usize {
                // A bar whose position depends on the sample: varied but deterministic.
                let on = (x + i) % 28 > 10 && (x + i) % 28 < 16 && y > 4 && y < 24;
                bytes.push(if on { 255 } else { (y * 3) as u8 });
            }
        }
    }
    std::fs::write(path, bytes).expect("write idx file");
}

/// A port free now on `host`, for a coordinator that must listen on the same address again
/// after a restart.
pub fn free_port(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0)).and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Starts an external worker (`--external-workers` runs) with `extra` flags, its output in `log`;
/// `prefix` runs it through another command first (e.g. `ip netns exec NS`).
pub fn spawn_worker(prefix: &[&str], url: &str, extra: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("worker log");
    let err = out.try_clone().expect("worker log");
    let bin = worker_bin();
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args(["--coordinator", url, "--threads", "1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start worker")
}

/// The highest step `metrics.jsonl` holds so far (0 before the first; a line being written is
/// skipped).
pub fn steps_done(run_dir: &Path) -> u64 {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|s| s.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max())
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// `GetStatus` from the coordinator at `url`, `None` while it does not answer.
pub fn status(url: &str) -> Option<proto::v1::RunStatus> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(async {
        let mut c = proto::v1::coordinator_client::CoordinatorClient::connect(url.to_string()).await.ok()?;
        c.get_status(proto::v1::GetStatusRequest {}).await.ok().map(|r| r.into_inner())
    })
}

/// Polls `check` every 20 ms until it gives a value; panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {} s for {what}", timeout.as_secs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a worker process to exit by itself; its status, or a panic with its log.
pub fn wait_worker(child: &mut Child, timeout: Duration, log: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "worker still running after {} s:\n{}",
                timeout.as_secs(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 GET over `stream` (plain TCP or TLS), the target sent exactly as given (curl
/// and browsers resolve `..` before sending): the status code, the head and the body.
pub fn http_exchange<S: std::io::Read + std::io::Write>(
    mut stream: S,
    host: &str,
    target: &str,
    authorization: Option<&str>,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    match stream.read_to_end(&mut buf) {
        Ok(_) => {}
        // A TLS peer that closed without close_notify, after the whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e),
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {:?}", String::from_utf8_lossy(&buf))))?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, head, buf[split + 4..].to_vec()))
}

/// [`http_exchange`] over a plain TCP connection to `addr` (`HOST:PORT`).
pub fn http_call(addr: &str, target: &str, authorization: Option<&str>) -> (u16, String, Vec<u8>) {
    let s = std::net::TcpStream::connect(addr).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    http_exchange(s, addr, target, authorization).unwrap_or_else(|e| panic!("GET {target}: {e}"))
}

/// `GetStatus` with this `authorization` metadata (if any): `Ok`, or the refusal's code.
pub fn get_status_as(url: &str, authorization: Option<&str>) -> Result<proto::v1::RunStatus, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut c = proto::v1::coordinator_client::CoordinatorClient::connect(url.to_string()).await.expect("connect");
        let mut req = tonic::Request::new(proto::v1::GetStatusRequest {});
        if let Some(a) = authorization {
            req.metadata_mut().insert("authorization", a.parse().expect("ascii"));
        }
        c.get_status(req).await.map(|r| r.into_inner())
    })
}
