//! `coordinator`: trains a DCGAN with N worker processes. See `coordinator --help`.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use coordinator::flags::Cli;
use coordinator::launcher::WORKER_MODE_FLAG;
use coordinator::progress::Progress;
use dcgan_process::startup;
use dcgan_process::telemetry::LogSettings;

fn main() -> ExitCode {
    // `coordinator --worker-mode ARGS` is `worker ARGS`: the launcher's fallback when no
    // `worker` binary sits beside this one.
    if std::env::args_os().nth(1).is_some_and(|a| a == WORKER_MODE_FLAG) {
        let args = std::iter::once(OsString::from("worker")).chain(std::env::args_os().skip(2));
        return worker::main_with_args(args);
    }
    let (cli, explicit) = Cli::parse_with_sources();
    let progress = Progress::default();
    let settings = LogSettings {
        format: cli.log_format,
        default_filter: if cli.quiet { "warn" } else { "info" },
        ansi: std::io::stderr().is_terminal(),
        otlp_endpoint: cli.otlp_endpoint.clone(),
        service_name: "dcgan-coordinator",
    };
    let run = coordinator::app::run(cli, explicit, progress.clone());
    startup::run(&settings, progress.log_writer(), run, || progress.finish())
}
