//! `coordinator`: trains a DCGAN with N worker processes. See `coordinator --help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use coordinator::cli::Cli;
use coordinator::progress::Progress;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let (cli, explicit) = Cli::parse_with_sources();
    let progress = Progress::default();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if cli.quiet { "warn" } else { "info" }));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(progress.log_writer())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(coordinator::app::run(cli, explicit, progress.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            progress.finish();
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
