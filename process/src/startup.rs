//! How the coordinator and the worker start and end, the same way: the async runtime, the
//! process's telemetry, the run, and its outcome as the exit code ([`crate::exit`]). Each
//! binary's `main` parses its command line and hands the rest to [`run`].

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::fmt::MakeWriter;

use crate::exit;
use crate::telemetry::{self, LogSettings};

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Completed,
    /// Stopped cleanly on request (SIGTERM, or for a worker the coordinator stopping the run)
    /// with a checkpoint; `--resume` continues the run.
    Stopped,
}

impl Ended {
    /// 0, or [`exit::STOPPED`], so a supervisor restarts a stopped run rather than taking it
    /// for complete.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Ended::Completed => ExitCode::SUCCESS,
            Ended::Stopped => ExitCode::from(exit::STOPPED),
        }
    }
}

/// Builds the async runtime, installs the telemetry (`settings`, log lines to `log_writer`),
/// runs `app` to its end, exports the last spans, and returns the exit code: [`Ended`]'s, or
/// the error's after its one-line report ([`exit::report`]). `on_error` runs just before that
/// report (the coordinator clears its progress bar there).
pub fn run<W, F>(settings: &LogSettings, log_writer: W, app: F, on_error: impl FnOnce()) -> ExitCode
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<Ended>>,
{
    // Two async threads are plenty for the network side; compute has its own threads.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match runtime.block_on(async { telemetry::init(settings, log_writer) }) {
        Ok(t) => t,
        Err(e) => return exit::report(&e),
    };
    let outcome = runtime.block_on(app);
    runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await.ok() });
    match outcome {
        Ok(ended) => ended.exit_code(),
        Err(e) => {
            on_error();
            exit::report(&e)
        }
    }
}
