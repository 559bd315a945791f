//! The worker's command line; every flag can also come from a `DCGAN_*` environment variable.

use clap::Parser;

/// A DCGAN training worker: joins a coordinator, gets its rank, the run's configuration and its
/// data shard, trains synchronously with its peers (gradients averaged over a TCP ring),
/// reports metrics and, as rank 0, uploads checkpoints.
#[derive(Parser, Debug, Clone)]
#[command(name = "worker", version, about, long_about, after_long_help = dcgan_process::exit::EXIT_CODES_HELP)]
pub struct Cli {
    /// The coordinator's gRPC address: host:port as it prints it (and writes to
    /// RUN_DIR/coordinator.addr), or http://host:port, or https://host:port. A bare host:port
    /// uses TLS when --tls-ca is given.
    #[arg(long, env = "DCGAN_COORDINATOR")]
    pub coordinator: crate::address::CoordinatorAddress,

    /// The run's shared token, sent on every call; it must match the coordinator's `--token`.
    /// Prefer the environment variable (from a Kubernetes Secret) to the flag, which `ps` shows.
    #[arg(long, env = "DCGAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// With an https:// coordinator: the CA certificate (or the coordinator's self-signed one) to
    /// trust, PEM.
    #[arg(long, env = "DCGAN_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// With an https:// coordinator: the name its certificate must be valid for, when it is not
    /// the address's host (e.g. the certificate says `coordinator.example`, the address is an IP).
    #[arg(long, env = "DCGAN_TLS_DOMAIN")]
    pub tls_domain: Option<String>,

    /// Read the shared token from this file (a mounted Kubernetes Secret). Instead of --token.
    #[arg(long, env = "DCGAN_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<std::path::PathBuf>,

    /// Compute threads [default: all CPU cores].
    #[arg(long, visible_alias = "worker-threads", env = "DCGAN_WORKER_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// Address the all-reduce ring listener binds (on a port the system picks).
    #[arg(long, env = "DCGAN_LISTEN_HOST", default_value = "127.0.0.1")]
    pub listen_host: String,

    /// Host the other workers use to reach this one's ring listener [default: --listen-host].
    #[arg(long, env = "DCGAN_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,

    /// Ask for this rank (e.g. a Kubernetes Indexed Job's completion index) instead of any free one.
    #[arg(long, env = "DCGAN_RANK")]
    pub rank: Option<u32>,

    /// Where the samples come from: `auto` (the coordinator's prepared directory if this worker
    /// sees it, else over gRPC), `disk` (that directory, or fail), `stream` (over gRPC),
    /// `memory` (decode the coordinator's source into memory), a prepared directory mounted
    /// elsewhere (`prepared:DIR`), or another copy of the source (`local:SPEC`, decoded into
    /// memory). A directory or copy must hold the coordinator's samples.
    #[arg(long, visible_alias = "worker-data", env = "DCGAN_WORKER_DATA", default_value = "auto")]
    pub data: crate::batches::DataChoice,

    /// Compute device. On GPUs the ranks average gradients over NCCL.
    #[arg(long, env = "DCGAN_DEVICE", default_value = "auto")]
    pub device: kernels::Device,

    /// Seconds to keep trying to reach the coordinator at start.
    #[arg(long, env = "DCGAN_CONNECT_TIMEOUT", default_value_t = 60)]
    pub connect_timeout: u64,

    /// Seconds to wait for the ring's neighbours to connect.
    #[arg(long, env = "DCGAN_RING_TIMEOUT", default_value_t = 120)]
    pub ring_timeout: u64,

    /// Seconds to keep asking to join when a generation ended without this worker (a peer died,
    /// the coordinator restarted, a network partition healed) or the run formed without it. The
    /// coordinator's answer decides: it takes the worker into its next generation, or says the
    /// run is over. 0: exit instead.
    #[arg(long, env = "DCGAN_REJOIN_TIMEOUT", default_value_t = 300)]
    pub rejoin_timeout: u64,

    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the bound
    /// address is logged). Off when not given.
    #[arg(long, env = "DCGAN_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// With --metrics-listen: keep serving /metrics this many seconds after the run ends, so a
    /// scrape sees the final values.
    #[arg(long, env = "DCGAN_METRICS_LINGER", default_value_t = 0)]
    pub metrics_linger: u64,

    /// Log lines as `pretty` text or `json` objects (`RUST_LOG` filters them).
    #[arg(long, env = "DCGAN_LOG_FORMAT", value_enum, default_value_t = dcgan_process::telemetry::LogFormat::Pretty)]
    pub log_format: dcgan_process::telemetry::LogFormat,

    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317). Off when
    /// neither this nor OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}
