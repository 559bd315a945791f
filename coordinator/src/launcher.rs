//! Starting the worker processes on this machine and noticing when they exit.
//!
//! Each worker's stdout and stderr go to `RUN_DIR/logs/worker-<rank>.log` (not the terminal,
//! where the progress bar lives); when a worker fails, the tail of its log goes into the run's
//! error message so the cause is on screen without digging.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Why the workers could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("worker binary not found at {} (--worker-bin)", .0.display())]
    NotFound(PathBuf),
    #[error("{}: cannot {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A launched worker process that ended.
#[derive(Debug)]
pub struct WorkerExit {
    pub rank: usize,
    pub status: std::io::Result<ExitStatus>,
    pub log: PathBuf,
    /// Whether the coordinator killed it.
    pub killed: bool,
}

/// What each launched worker is started with.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub worker: WorkerCommand,
    /// The generation the workers join (it heads their section of the log).
    pub generation: u64,
    pub coordinator_url: String,
    /// With TLS: the certificate the workers trust, and the name they check it for.
    pub tls_ca: Option<PathBuf>,
    pub tls_domain: String,
    pub world: usize,
    pub threads: u32,
    /// Launched workers train on GPU `rank` (`--device cuda:RANK`) rather than the CPU.
    pub gpus: bool,
    /// The workers' `--data` (`auto`, `disk`, `stream`, `memory`).
    pub data: crate::config::WorkerData,
    pub logs: PathBuf,
    /// `--metrics-listen` for each worker (a port-0 address), when the coordinator serves metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub metrics_linger: u64,
    pub log_format: dcgan_process::telemetry::LogFormat,
    pub otlp_endpoint: Option<String>,
    /// The run token, passed in the environment (not the command line, which `ps` shows).
    pub token: Option<String>,
}

/// The worker processes of this run.
pub struct Launcher {
    kill: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The first argument that turns the coordinator binary into a worker (see [`WorkerCommand`]).
pub const WORKER_MODE_FLAG: &str = "--worker-mode";

/// How to start a worker process: a program and the arguments that come before the worker's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub prefix_args: Vec<String>,
}

/// How workers are started: `--worker-bin` if given (it must exist); else the `worker` binary
/// next to this executable; else this executable itself in worker mode
/// (`coordinator --worker-mode ...`), so that `cargo run --bin coordinator` works on a fresh
/// checkout where only the coordinator was built.
pub fn resolve_worker_bin(explicit: Option<&Path>) -> Result<WorkerCommand, LaunchError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(WorkerCommand { program: p.to_path_buf(), prefix_args: Vec::new() })
        } else {
            Err(LaunchError::NotFound(p.to_path_buf()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| LaunchError::Io {
        path: PathBuf::from("coordinator"),
        op: "locate executable",
        source: e,
    })?;
    let beside = exe.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        return Ok(WorkerCommand { program: beside, prefix_args: Vec::new() });
    }
    tracing::info!("no worker binary at {}: workers run as `coordinator {WORKER_MODE_FLAG}`", beside.display());
    Ok(WorkerCommand { program: exe, prefix_args: vec![WORKER_MODE_FLAG.to_string()] })
}

impl Launcher {
    /// Starts `spec.world` workers; each one's exit is sent on `exits`.
    pub fn launch(spec: &LaunchSpec, exits: mpsc::UnboundedSender<WorkerExit>) -> Result<Self, LaunchError> {
        let (kill, _) = watch::channel(false);
        let mut launcher = Self { kill, tasks: Vec::new() };
        for rank in 0..spec.world {
            let log = spec.logs.join(format!("worker-{rank}.log"));
            // Appended: a restarted generation's workers log after the failed one's.
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| LaunchError::Io { path: log.clone(), op: "open", source: e })?;
            writeln!(out, "--- generation {}, rank {rank} ---", spec.generation).map_err(|e| LaunchError::Io {
                path: log.clone(),
                op: "write",
                source: e,
            })?;
            let err = out.try_clone().map_err(|e| LaunchError::Io { path: log.clone(), op: "open", source: e })?;
            let mut cmd = Command::new(&spec.worker.program);
            cmd.args(&spec.worker.prefix_args)
                .arg("--coordinator")
                .arg(&spec.coordinator_url)
                .arg("--rank")
                .arg(rank.to_string())
                .arg("--threads")
                .arg(spec.threads.to_string())
                .arg("--device")
                .arg(if spec.gpus { format!("cuda:{rank}") } else { "cpu".to_string() });
            if let Some(ca) = &spec.tls_ca {
                cmd.arg("--tls-ca").arg(ca).arg("--tls-domain").arg(&spec.tls_domain);
            }
            cmd.arg("--data").arg(spec.data.to_string());
            // The coordinator's own DCGAN_METRICS_LISTEN (a fixed port) must not reach the
            // workers, who would all try to bind it.
            cmd.env_remove("DCGAN_METRICS_LISTEN");
            if let Some(m) = spec.metrics_listen {
                cmd.arg("--metrics-listen").arg(m.to_string());
                cmd.arg("--metrics-linger").arg(spec.metrics_linger.to_string());
            }
            let format = match spec.log_format {
                dcgan_process::telemetry::LogFormat::Pretty => "pretty",
                dcgan_process::telemetry::LogFormat::Json => "json",
            };
            cmd.arg("--log-format").arg(format);
            if let Some(e) = &spec.otlp_endpoint {
                cmd.arg("--otlp-endpoint").arg(e);
            }
            match &spec.token {
                Some(t) => cmd.env("DCGAN_TOKEN", t),
                None => cmd.env_remove("DCGAN_TOKEN"),
            };
            // This launcher replaces its workers itself in each new generation, so they do not
            // try to rejoin one by themselves.
            cmd.arg("--rejoin-timeout").arg("0");
            cmd.stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true);
            // Launched workers die with the coordinator (even SIGKILLed), so a restarted one does
            // not meet last life's workers. The signal follows the thread that spawned the child:
            // the launcher runs on the coordinator's main thread, which lives as long as it does.
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            let parent = std::process::id() as libc::pid_t;
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The coordinator may have died before the prctl took effect.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::other("the coordinator exited while starting a worker"));
                    }
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    launcher.kill_all();
                    return Err(LaunchError::Io { path: spec.worker.program.clone(), op: "start", source: e });
                }
            };
            tracing::debug!(rank, pid = child.id(), log = %log.display(), "worker started");
            let mut kill_rx = launcher.kill.subscribe();
            let exits = exits.clone();
            launcher.tasks.push(tokio::spawn(async move {
                let killed = tokio::select! {
                    _ = child.wait() => false,
                    _ = async { kill_rx.wait_for(|k| *k).await.map(|_| ()) } => true,
                };
                if killed {
                    let _ = child.start_kill();
                }
                // Reaps the child (or returns its already-known status).
                let status = child.wait().await;
                let _ = exits.send(WorkerExit { rank, status, log, killed });
            }));
        }
        Ok(launcher)
    }

    /// Kills every worker still running.
    pub fn kill_all(&self) {
        let _ = self.kill.send(true);
    }

    /// Waits for every worker to exit; kills those still running after `grace`, or as soon as
    /// `cut_short` completes (a signal to the coordinator while the workers linger).
    pub async fn wait_all(self, grace: Duration, cut_short: impl std::future::Future<Output = ()>) {
        let Self { kill, tasks } = self;
        let all = futures_join(tasks);
        tokio::pin!(all);
        tokio::select! {
            _ = &mut all => return,
            _ = tokio::time::sleep(grace) => {
                tracing::warn!("workers still running {} s after the run ended: killing them", grace.as_secs());
            }
            _ = cut_short => {}
        }
        let _ = kill.send(true);
        all.await;
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// How a worker's exit reads in an error message.
pub fn describe_exit(exit: &WorkerExit) -> String {
    let how = match &exit.status {
        Ok(s) => match s.code() {
            Some(c) => format!("exited with status {c}"),
            None => format!("was killed ({s})"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    };
    let tail = log_tail(&exit.log, 15);
    format!("worker rank {} {how}; last lines of {}:\n{tail}", exit.rank, exit.log.display())
}
