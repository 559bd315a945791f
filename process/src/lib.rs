//! What every process of the workspace shares.
//!
//! [`exit`]: how the three binaries (`coordinator`, `worker`, `dcgan`) end: exit codes, usage
//! errors, the one-line error report. With the `service` feature (on by default; the
//! coordinator and the worker use it, the `dcgan` tool does not), what the two long-running
//! processes share besides: [`telemetry`] (logs, OTLP traces and their context over gRPC, the
//! `/metrics` listener), [`signals`] (SIGTERM and Ctrl-C as a stop request) and [`startup`]
//! (the async runtime, telemetry, the run, its outcome as an exit code).

pub mod exit;
#[cfg(feature = "service")]
pub mod signals;
#[cfg(feature = "service")]
pub mod startup;
#[cfg(feature = "service")]
pub mod telemetry;
