//! How the workspace's binaries (`coordinator`, `worker`, `dcgan`) end: one set of exit codes,
//! one error class for usage errors, and one way to print an error.
//!
//! The codes are part of the interface: `deploy/` relies on 2 meaning "the command is wrong, do
//! not retry" (a Kubernetes Job's `podFailurePolicy` stops on it), while 1 is a failure a retry
//! may get past, and 143 a clean stop that `--resume` continues.

use std::fmt;
use std::process::ExitCode;

/// The run failed: data, I/O, workers, the network. A retry may get past it.
pub const FAILURE: u8 = 1;
/// The command line is wrong (a flag's value, a combination of flags, a run directory that
/// holds another run): fix the command; retrying it fails the same way.
pub const USAGE: u8 = 2;
/// Stopped cleanly on SIGTERM or SIGINT after checkpointing (128 + SIGTERM, as a shell reports a
/// process killed by it); `--resume` continues the run.
pub const STOPPED: u8 = 143;

/// The exit codes as `--help` footers print them.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0    completed
  1    failed while running (data, I/O, workers, network); a retry may get past it
  2    usage error (a flag, a value, a combination): fix the command, do not retry
  143  stopped by SIGTERM or Ctrl-C after a checkpoint; --resume continues";

/// An error in what the user asked for rather than in what happened while doing it: exits
/// with [`USAGE`]. Wrap a message with [`usage`]; callers may add context around it.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A usage error with this message.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Returns early with a usage error, as `anyhow::bail!` does with a failure.
#[macro_export]
macro_rules! bail_usage {
    ($($arg:tt)*) => {
        return Err($crate::exit::usage(format!($($arg)*)).into())
    };
}

/// Whether `e`, or any error in its chain, is a usage error.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<UsageError>())
}

/// The exit code for `e`: [`USAGE`] for usage errors, [`FAILURE`] otherwise.
pub fn code_for(e: &anyhow::Error) -> u8 {
    if is_usage(e) { USAGE } else { FAILURE }
}

/// `e` and its causes on one line, each cause once. Many errors print their source in their
/// own message as well as returning it as `source()`; a cause whose text the line already holds
/// is left out, so "cannot read x: No such file" is not followed by the same words again.
pub fn message(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Prints `error: ...` for `e` on stderr and returns its exit code. Never a backtrace: these
/// are the user's errors, whatever `RUST_BACKTRACE` says (anyhow prints one only for `{:?}`).
pub fn report(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", message(e));
    ExitCode::from(code_for(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn io_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)")
    }

    /// An error that repeats its source in its own message, as many thiserror types do.
    #[derive(Debug)]
    struct Repeats(std::io::Error);
    impl fmt::Display for Repeats {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "run.json: cannot read: {}", self.0)
        }
    }
    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::new(Repeats(io_error())).context("--resume: runs/a does not hold a run");
        assert_eq!(
            message(&e),
            "--resume: runs/a does not hold a run: run.json: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn causes_that_add_something_are_kept() {
        let e = anyhow::Error::new(io_error()).context("cannot open data/x");
        assert_eq!(message(&e), "cannot open data/x: No such file or directory (os error 2)");
    }

    #[test]
    fn usage_errors_exit_2_even_under_context_and_others_exit_1() {
        let e = usage("--min-workers 3 is more than --workers 2");
        assert_eq!(code_for(&e), USAGE);
        let wrapped: anyhow::Result<()> = Err(e).context("checking the command line");
        assert_eq!(code_for(&wrapped.unwrap_err()), USAGE);
        assert_eq!(code_for(&anyhow::Error::new(io_error())), FAILURE);
    }

    #[test]
    fn bail_usage_returns_a_usage_error() {
        fn check(n: u32) -> anyhow::Result<()> {
            if n > 2 {
                bail_usage!("--workers {n} is too many");
            }
            Ok(())
        }
        let e = check(3).unwrap_err();
        assert!(is_usage(&e));
        assert_eq!(message(&e), "--workers 3 is too many");
        assert!(check(1).is_ok());
    }
}
