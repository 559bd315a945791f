//! The DCGAN run's coordinator: it checks the run's configuration and data, serves the
//! `dcgan.v1.Coordinator` gRPC API, launches (or waits for) the workers, hands out ranks, ring
//! addresses and shards, aggregates their metrics, stores their checkpoints, and draws samples.
//!
//! One job per module: [`flags`] and [`config`] decide what the run is; [`preflight`] checks
//! and opens everything before it starts; [`app`] wires the run from [`generation`]s, each of
//! which owns its server, workers and outputs; [`run`] is the state machine behind [`server`]'s
//! handlers, and [`step_feed`] hands its aggregated steps to their outputs; [`shard_server`],
//! [`checkpoint_store`], [`metrics_log`] and [`samples`] each own one kind of output or data;
//! [`launcher`] owns the worker processes and [`progress`] the terminal; [`observability`]
//! exports the run to Prometheus, [`health`] watches the GAN for quiet failures and
//! [`evaluation`] scores it with FID (`--eval-every`); [`live_page`] shows the run in a browser.

pub mod app;
pub mod checkpoint_store;
pub mod config;
pub mod dataset;
pub mod evaluation;
pub mod flags;
pub mod generation;
pub mod health;
pub mod initial;
pub mod launcher;
pub mod live_page;
pub mod metrics_log;
pub mod observability;
pub mod preflight;
pub mod progress;
pub mod renderer;
pub mod resume;
pub mod run;
pub mod run_dir;
pub mod run_view;
pub mod samples;
pub mod server;
pub mod shard_server;
pub mod step_feed;
pub mod step_history;
pub mod tensorboard;
