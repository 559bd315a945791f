//! A DCGAN training worker. It joins the coordinator, gets its rank, the run's configuration and
//! its shard, builds the all-reduce ring with its peers, trains synchronously, reports metrics
//! and (rank 0) uploads checkpoints.
//!
//! [`app`] runs one worker; [`client`] speaks the protocol; [`batches`] feeds the local batches;
//! [`trainer`] is the compute loop on its own thread; [`stop`] tells everything to stop.

pub mod app;
pub mod batches;
pub mod cli;
pub mod client;
pub mod stop;
pub mod trainer;
