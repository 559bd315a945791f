//! A DCGAN training worker. It joins the coordinator, gets its rank, the run's configuration and
//! its shard, builds the all-reduce ring with its peers, trains synchronously, reports metrics
//! and (rank 0) uploads checkpoints.
//!
//! [`app`] runs one worker; [`address`] reads the coordinator's address; [`client`] speaks the protocol; [`batches`] feeds the local batches;
//! [`trainer`] is the compute loop on its own thread; [`stop`] tells everything to stop, and
//! [`signals`] turns SIGTERM into a clean stop;
//! [`telemetry`] (logs, the `/metrics` endpoint) and [`metrics`] (this rank's series) let it be watched.

pub mod address;
pub mod app;
pub mod batches;
pub mod cli;
pub mod client;
pub mod engine;
pub mod metrics;
pub mod rejoin;
pub mod signals;
pub mod stop;
pub mod telemetry;
pub mod trainer;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

/// The whole `worker` program: parses `args` (the first one is the program name), sets up
/// logging and the async runtime, runs, and turns the outcome into an exit code. Shared by the
/// `worker` binary and `coordinator --worker-mode`, so a coordinator can launch copies of itself
/// when no `worker` binary was built beside it.
pub fn main_with_args<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = cli::Cli::parse_from(args);
    // Two async threads are plenty for the network side; compute has its own pool.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = telemetry::LogSettings {
        format: cli.log_format,
        default_filter: "info",
        ansi: std::io::stderr().is_terminal(),
        otlp_endpoint: cli.otlp_endpoint.as_deref(),
        service_name: "dcgan-worker",
    };
    let telemetry = match runtime.block_on(async { telemetry::init(&settings, std::io::stderr) }) {
        Ok(t) => t,
        Err(e) => return dcgan_exit::report(&e),
    };
    let outcome = runtime.block_on(app::run(cli));
    runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await.ok() });
    match outcome {
        Ok(app::Ended::Completed) => ExitCode::SUCCESS,
        Ok(app::Ended::Stopped) => ExitCode::from(signals::EXIT_STOPPED),
        Err(e) => dcgan_exit::report(&e),
    }
}
