//! Bandwidth-optimal ring all-reduce over TCP for CPU workers.
//!
//! [`TcpRing`] links every rank to its two neighbours (it connects to `rank + 1` and accepts
//! `rank - 1`), then sums buffers in `2 (world - 1)` steps: a reduce-scatter that leaves each rank
//! with one finished chunk, and an all-gather that passes the finished chunks around. Each rank
//! sends and receives `2 (world - 1) / world` of the buffer whatever the world size, which is the
//! optimum for an all-reduce. The result is bit-identical on all ranks (see [`TcpRing`]).
//!
//! It implements [`kernels::Collective`], so the training step does not know it is there.
//! `ring_bench` (in `src/bin`) measures it on loopback next to a plain memcpy.

mod error;
mod handshake;
mod plan;
mod ring;

pub use error::{HandshakeMismatch, Op, Peer, Refusal, RingError, Side};
pub use handshake::PROTOCOL_VERSION;
pub use plan::{bus_bandwidth_factor, bytes_sent_per_all_reduce, chunk_range};
pub use ring::{FRAME_HEADER_BYTES, MAX_WORLD, RingAbort, RingOptions, RingStats, TcpRing};
