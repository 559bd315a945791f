//! [`TcpRing`], the ring's public face: checking the setup, building the ring over its
//! [`links`], and running each all-reduce through [`algorithm`], with the counters and the
//! poisoning after a failure. The bytes on the wire are defined in [`wire`].

mod algorithm;
mod links;
mod wire;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use crate::error::RingError;
use crate::handshake::Hello;
use algorithm::{CallParams, run_ring};
use links::Links;

pub use links::RingAbort;
pub use wire::FRAME_HEADER_BYTES;

/// Largest ring supported; far beyond where a single TCP ring's latency (2 (world - 1) steps)
/// stops making sense, and it keeps every header field comfortably in range.
pub const MAX_WORLD: usize = 1 << 16;

/// Tuning knobs of a ring. Every rank must use the same `segment_bytes` (checked at handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingOptions {
    /// Longest a single send or receive may block. It must cover the compute skew between ranks
    /// (a fast rank waits inside `all_reduce_sum` for the slowest one), hence a generous default;
    /// it is what turns a dead or frozen peer into an error instead of a hang.
    pub io_timeout: Duration,
    /// Frame size. Chunks travel in frames of this many bytes so that reducing one frame overlaps
    /// receiving the next; 256 KiB stays in L2 and amortises the per-frame syscalls.
    pub segment_bytes: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF` for the ring sockets; `None` leaves them to the kernel.
    ///
    /// Linux auto-tunes TCP buffers (up to `net.ipv4.tcp_{r,w}mem`) unless they are set
    /// explicitly, and clamps explicit sizes to `net.core.{r,w}mem_max` (often only 208 KiB), so
    /// an explicit size can be *smaller* than what auto-tuning would reach. Set it only where the
    /// maximums are known to be large.
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions { io_timeout: Duration::from_secs(60), segment_bytes: 256 * 1024, socket_buffer_bytes: None }
    }
}

/// Cumulative counters of one ring, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingStats {
    /// Completed `all_reduce_sum` calls (failed ones are not counted).
    pub all_reduces: u64,
    /// Floats reduced, summed over those calls.
    pub elements: u64,
    /// Wall-clock seconds spent inside those calls, waiting for peers included.
    pub seconds: f64,
    /// Bytes written to the right neighbour, frame headers included.
    pub bytes_sent: u64,
    /// Bytes read from the left neighbour, frame headers included.
    pub bytes_received: u64,
}

/// A bandwidth-optimal ring all-reduce over TCP (reduce-scatter then all-gather, each rank sending
/// `2 (world - 1) / world` of the buffer), implementing [`kernels::Collective`].
///
/// # Determinism
///
/// The result is bit-identical on every rank: each chunk is summed once, in the fixed order in
/// which it travels around the ring (starting at the rank that owns it), and the all-gather then
/// copies those exact bits to everyone. Parameters updated from the result therefore stay
/// identical across ranks without a broadcast. The result may differ in the last bits from a
/// serial left-to-right sum, and from a ring with another world size.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    links: Option<Links>,
    options: RingOptions,
    segment_elems: usize,
    /// Numbers the all-reduce calls; every frame carries it so that ranks out of step are caught.
    op_seq: u64,
    /// Frame buffers kept between calls so that steady-state training does not allocate.
    pool: Vec<Vec<f32>>,
    stats: RingStats,
    /// Set after a failure: the byte streams are then in an unknown state.
    poisoned: Option<String>,
}

impl TcpRing {
    /// Builds the ring with [`RingOptions::default`]. See [`TcpRing::connect_with`].
    pub fn connect(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        session: u64,
        timeout: Duration,
    ) -> Result<TcpRing, RingError> {
        Self::connect_with(rank, peers, listener, session, timeout, RingOptions::default())
    }

    /// Builds the ring: connects to the right neighbour `peers[rank + 1 mod world]` and accepts
    /// one connection from the left neighbour on `listener` (the already-bound socket whose
    /// address this rank advertised as `peers[rank]`), at the same time, so start order does not
    /// matter.
    ///
    /// Connects are retried with backoff until `timeout`, since peers start at different times.
    /// Each link starts with a handshake carrying rank, world size, segment size and `session`
    /// (the run's token or generation): a peer that disagrees is refused with
    /// [`RingError::Handshake`]. On the accepting side a refused connection is dropped and we
    /// keep waiting for the right peer until `timeout`, so a stale worker knocking on our port
    /// cannot break a new generation.
    ///
    /// With a single rank no socket is touched and the listener is dropped.
    pub fn connect_with(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        session: u64,
        timeout: Duration,
        options: RingOptions,
    ) -> Result<TcpRing, RingError> {
        let world = peers.len();
        if world == 0 {
            return Err(RingError::InvalidSetup("the peer list is empty".into()));
        }
        if rank >= world {
            return Err(RingError::InvalidSetup(format!("rank {rank} is outside a world of {world}")));
        }
        if world > MAX_WORLD {
            return Err(RingError::InvalidSetup(format!(
                "world size {world} is larger than the supported {MAX_WORLD}"
            )));
        }
        let segment_elems = (options.segment_bytes / 4).max(1);
        if u32::try_from(segment_elems.saturating_mul(4)).is_err() {
            return Err(RingError::InvalidSetup(format!(
                "segment_bytes {} is too large (at most 4 GiB)",
                options.segment_bytes
            )));
        }
        if options.io_timeout.is_zero() {
            return Err(RingError::InvalidSetup("io_timeout must be positive".into()));
        }
        let mut ring = TcpRing {
            rank,
            world,
            links: None,
            options,
            segment_elems,
            op_seq: 0,
            pool: Vec::new(),
            stats: RingStats::default(),
            poisoned: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let hello = Hello { rank, world, session, segment_elems };
        ring.links = Some(Links::establish(&hello, peers, &listener, timeout, &ring.options)?);
        Ok(ring)
    }

    /// This rank's position in the ring.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the ring.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Cumulative time and traffic of the successful all-reduces so far.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// The options the ring was built with.
    pub fn options(&self) -> &RingOptions {
        &self.options
    }

    /// A handle that can break this ring from another thread, so a rank blocked waiting for a
    /// peer that will never answer (partitioned, frozen) is freed at once rather than after
    /// `io_timeout`. `None` for a world of one.
    pub fn abort_handle(&self) -> io::Result<Option<RingAbort>> {
        self.links.as_ref().map(Links::abort_handle).transpose()
    }

    /// Replaces `buf` on every rank with the element-wise sum over ranks, bit-identical on all
    /// of them (see the type's documentation). Every rank must call it with the same length.
    ///
    /// After an error the ring is poisoned (the streams may be mid-frame) and every later call
    /// fails; build a new ring. On error both sockets are shut down, so the failure reaches every
    /// rank promptly instead of each waiting out its own timeout.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), RingError> {
        if let Some(first) = &self.poisoned {
            return Err(RingError::Poisoned { rank: self.rank, first: first.clone() });
        }
        let start = Instant::now();
        let Some(links) = &self.links else {
            // A world of one: the sum over one rank is the buffer itself.
            self.stats.all_reduces += 1;
            self.stats.elements += buf.len() as u64;
            self.stats.seconds += start.elapsed().as_secs_f64();
            return Ok(());
        };
        let params = CallParams {
            rank: self.rank,
            world: self.world,
            op_seq: self.op_seq,
            segment_elems: self.segment_elems,
            io_timeout: self.options.io_timeout,
        };
        let result = run_ring(links, params, &mut self.pool, buf);
        self.op_seq += 1;
        match result {
            Ok((sent, received)) => {
                self.stats.all_reduces += 1;
                self.stats.elements += buf.len() as u64;
                self.stats.seconds += start.elapsed().as_secs_f64();
                self.stats.bytes_sent += sent;
                self.stats.bytes_received += received;
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }
}

impl kernels::Collective for TcpRing {
    fn world_size(&self) -> usize {
        self.world
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), kernels::CollectiveError> {
        TcpRing::all_reduce_sum(self, buf).map_err(Into::into)
    }
}
