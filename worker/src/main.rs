//! `worker`: one rank of a DCGAN training run. See `worker --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    worker::main_with_args(std::env::args_os())
}
