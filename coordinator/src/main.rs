//! `coordinator`: trains a DCGAN with N worker processes. See `coordinator --help`.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use coordinator::flags::Cli;
use coordinator::launcher::WORKER_MODE_FLAG;
use coordinator::progress::Progress;

fn main() -> ExitCode {
    // `coordinator --worker-mode ARGS` is `worker ARGS`: the launcher's fallback when no
    // `worker` binary sits beside this one.
    if std::env::args_os().nth(1).is_some_and(|a| a == WORKER_MODE_FLAG) {
        let args = std::iter::once(OsString::from("worker")).chain(std::env::args_os().skip(2));
        return worker::main_with_args(args);
    }
    let (cli, explicit) = Cli::parse_with_sources();
    let progress = Progress::default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = worker::telemetry::LogSettings {
        format: cli.log_format,
        default_filter: if cli.quiet { "warn" } else { "info" },
        ansi: std::io::stderr().is_terminal(),
        otlp_endpoint: cli.otlp_endpoint.as_deref(),
        service_name: "dcgan-coordinator",
    };
    let telemetry = match runtime.block_on(async { worker::telemetry::init(&settings, progress.log_writer()) }) {
        Ok(t) => t,
        Err(e) => return dcgan_exit::report(&e),
    };
    let outcome = runtime.block_on(coordinator::app::run(cli, explicit, progress.clone()));
    runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await.ok() });
    match outcome {
        Ok(coordinator::app::Ended::Completed) => ExitCode::SUCCESS,
        Ok(coordinator::app::Ended::Stopped) => ExitCode::from(worker::signals::EXIT_STOPPED),
        Err(e) => {
            progress.finish();
            dcgan_exit::report(&e)
        }
    }
}
