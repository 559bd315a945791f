//! A DCGAN training worker. It joins the coordinator, gets its rank, the run's configuration and
//! its shard, builds the all-reduce ring with its peers, trains synchronously, reports metrics
//! and (rank 0) uploads checkpoints.
//!
//! [`app`] runs one worker; [`flags`] is its command line; [`address`] reads the coordinator's
//! address; [`client`] speaks the protocol; [`batches`] feeds the local batches;
//! [`trainer`] is the compute loop on its own thread; [`stop`] tells everything to stop (and
//! turns SIGTERM into a clean stop); [`metrics`] (this rank's series) lets it be watched.
//! Logs, traces, `/metrics`, the signals and the start-up are `dcgan-process`'s, shared with
//! the coordinator.

pub mod address;
pub mod app;
pub mod batches;
pub mod client;
pub mod engine;
pub mod flags;
pub mod metrics;
pub mod rejoin;
pub mod stop;
pub mod trainer;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use dcgan_process::startup;
use dcgan_process::telemetry::LogSettings;

/// The whole `worker` program: parses `args` (the first one is the program name), sets up
/// logging and the async runtime, runs, and turns the outcome into an exit code. Shared by the
/// `worker` binary and `coordinator --worker-mode`, so a coordinator can launch copies of itself
/// when no `worker` binary was built beside it.
pub fn main_with_args<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = flags::Cli::parse_from(args);
    let settings = LogSettings {
        format: cli.log_format,
        default_filter: "info",
        ansi: std::io::stderr().is_terminal(),
        otlp_endpoint: cli.otlp_endpoint.clone(),
        service_name: "dcgan-worker",
    };
    startup::run(&settings, std::io::stderr, app::run(cli), || {})
}
