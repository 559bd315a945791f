//! [`TcpRing`]: building the ring (connect right, accept left, handshake) and running the ring
//! all-reduce over it.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::error::{Op, Peer, RingError, Side};
use crate::handshake::{HandshakeError, Hello, handshake};
use crate::plan::{chunk_range, recv_chunk, segments, send_chunk};

/// Bytes of the header in front of every data frame.
pub const FRAME_HEADER_BYTES: usize = 32;
/// Largest ring supported; far beyond where a single TCP ring's latency (2 (world - 1) steps)
/// stops making sense, and it keeps every header field comfortably in range.
pub const MAX_WORLD: usize = 1 << 16;
/// Frame buffers kept between calls (see the end of `run_ring`).
const MAX_POOLED_FRAMES: usize = 64;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"RNGF");

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

/// The two links of a ring with at least two ranks.
#[derive(Debug)]
struct Links {
    /// We read from it; it connected to us.
    left: TcpStream,
    /// We write to it; we connected to it.
    right: TcpStream,
    left_peer: Peer,
    right_peer: Peer,
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

/// Breaks a [`TcpRing`] from outside: see [`TcpRing::abort_handle`].
#[derive(Debug)]
pub struct RingAbort {
    left: TcpStream,
    right: TcpStream,
}

impl RingAbort {
    /// Shuts both links down: a pending or later `all_reduce_sum` fails promptly, on this rank
    /// and, through the closed sockets, on its neighbours.
    pub fn abort(&self) {
        let _ = self.left.shutdown(Shutdown::Both);
        let _ = self.right.shutdown(Shutdown::Both);
    }
}

/// Who failed first inside one all-reduce (so the root cause is reported, not its echo).
const NO_FAILURE: u8 = 0;
const MAIN_FAILED: u8 = 1;
const WRITER_FAILED: u8 = 2;

/// One frame on its way to the writer thread.
struct Frame {
    header: [u8; FRAME_HEADER_BYTES],
    payload: Vec<f32>,
}

/// The header of a data frame: which call, which step, which segment and how long, all checked by
/// the receiver against its own schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    op_seq: u64,
    total_len: u64,
    step: u32,
    segment: u32,
    payload_bytes: u32,
}

impl FrameHeader {
    fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut b = [0u8; FRAME_HEADER_BYTES];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.op_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.total_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.step.to_le_bytes());
        b[28..32].copy_from_slice(&self.segment.to_le_bytes());
        b
    }

    /// Compares a received header with the one we expect and describes the first difference.
    fn check(&self, b: &[u8; FRAME_HEADER_BYTES]) -> Result<(), String> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        if u32_at(0) != FRAME_MAGIC {
            return Err("frame header has a bad magic (stream corrupted or desynchronised)".into());
        }
        let got = FrameHeader {
            payload_bytes: u32_at(4),
            op_seq: u64_at(8),
            total_len: u64_at(16),
            step: u32_at(24),
            segment: u32_at(28),
        };
        if got.op_seq != self.op_seq {
            return Err(format!(
                "peer is at all-reduce call #{}, we are at #{} (a rank skipped or added a call)",
                got.op_seq, self.op_seq
            ));
        }
        if got.total_len != self.total_len {
            return Err(format!(
                "peer reduces a buffer of {} floats, ours has {} (every rank must pass the same length)",
                got.total_len, self.total_len
            ));
        }
        if (got.step, got.segment, got.payload_bytes) != (self.step, self.segment, self.payload_bytes) {
            return Err(format!(
                "expected step {} segment {} with {} bytes, got step {} segment {} with {} bytes",
                self.step, self.segment, self.payload_bytes, got.step, got.segment, got.payload_bytes
            ));
        }
        Ok(())
    }
}

/// Wire order is little-endian; this is a no-op on little-endian machines.
fn swap_to_from_wire(v: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for x in v {
            *x = f32::from_bits(x.to_bits().swap_bytes());
        }
    }
}

/// Takes a frame buffer of exactly `len` floats, reusing one when possible. The contents are
/// garbage: every caller overwrites them.
fn take_buf(pool: &mut Vec<Vec<f32>>, returned: &mpsc::Receiver<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut v = returned.try_recv().ok().or_else(|| pool.pop()).unwrap_or_default();
    // Only a length change touches memory; frames are mostly the same size.
    v.resize(len, 0.0);
    v
}

/// Writes header and payload with as few syscalls as possible (one `writev` when it fits).
fn write_frame(mut w: &TcpStream, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Accept errors that concern one incoming connection, not the listener.
fn transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted)
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
        let left_peer =
            Peer { rank: (rank + world - 1) % world, addr: peers[(rank + world - 1) % world], side: Side::Left };
        let right_peer = Peer { rank: (rank + 1) % world, addr: peers[(rank + 1) % world], side: Side::Right };
        let hello = Hello { rank, world, session, segment_elems };
        let deadline = Instant::now() + timeout;
        let abort = AtomicBool::new(false);
        let opts = &ring.options;
        let (left, right) = thread::scope(|s| {
            let accepting = s.spawn(|| {
                let r = accept_left(&listener, &hello, left_peer, deadline, timeout, opts, &abort);
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                r
            });
            let right = connect_right(&hello, right_peer, deadline, timeout, opts, &abort);
            if right.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            let left = accepting
                .join()
                .unwrap_or_else(|_| Err(Some(RingError::InvalidSetup("the accepting thread panicked".into()))));
            match (left, right) {
                (Ok(l), Ok(r)) => Ok((l, r)),
                // Prefer the side that failed by itself over the one we aborted.
                (Err(Some(e)), _) => Err(e),
                (_, Err(Some(e))) => Err(e),
                (Err(None), _) | (_, Err(None)) => {
                    Err(RingError::InvalidSetup("ring setup aborted without a reason".into()))
                }
            }
        })?;
        ring.links = Some(Links { left, right, left_peer, right_peer });
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
        let Some(links) = &self.links else { return Ok(None) };
        Ok(Some(RingAbort { left: links.left.try_clone()?, right: links.right.try_clone()? }))
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
        let result = run_ring(
            links,
            self.rank,
            self.world,
            self.op_seq,
            self.segment_elems,
            self.options.io_timeout,
            &mut self.pool,
            buf,
        );
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

/// Sets `TCP_NODELAY` (frames are written whole; Nagle would only add latency to the small ones),
/// the optional buffer sizes, and the per-call timeouts.
fn configure(stream: &TcpStream, io_timeout: Duration, opts: &RingOptions) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    if let Some(bytes) = opts.socket_buffer_bytes {
        let sock = SockRef::from(stream);
        sock.set_send_buffer_size(bytes)?;
        sock.set_recv_buffer_size(bytes)?;
    }
    Ok(())
}

/// Connects to the right neighbour, retrying with exponential backoff until `deadline`.
/// `Err(None)` means the other half of the setup failed and asked us to stop.
fn connect_right(
    hello: &Hello,
    peer: Peer,
    deadline: Instant,
    timeout: Duration,
    opts: &RingOptions,
    abort: &AtomicBool,
) -> Result<TcpStream, Option<RingError>> {
    let rank = hello.rank;
    let mut backoff = Duration::from_millis(10);
    let mut last_err: Option<io::Error> = None;
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(None);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Some(RingError::Connect {
                rank,
                peer,
                timeout,
                source: last_err.unwrap_or_else(|| io::ErrorKind::TimedOut.into()),
            }));
        }
        match try_connect(peer.addr, remaining, opts) {
            Ok(stream) => {
                let io_to = opts.io_timeout.min(remaining);
                if let Err(e) = configure(&stream, io_to, opts) {
                    return Err(Some(RingError::io(rank, Op::Configure, peer, e, io_to)));
                }
                match handshake(&stream, hello, peer.rank) {
                    Ok(()) => {
                        return match configure(&stream, opts.io_timeout, opts) {
                            Ok(()) => Ok(stream),
                            Err(e) => Err(Some(RingError::io(rank, Op::Configure, peer, e, opts.io_timeout))),
                        };
                    }
                    Err(HandshakeError::Mismatch(mismatch)) => {
                        return Err(Some(RingError::Handshake { rank, peer, mismatch }));
                    }
                    // The listener may belong to a process that is going away; try again.
                    Err(HandshakeError::Io(e)) => last_err = Some(e),
                }
            }
            Err(e) => last_err = Some(e),
        }
        let nap = backoff.min(deadline.saturating_duration_since(Instant::now()));
        thread::sleep(nap);
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One TCP connect attempt, with the buffer sizes set *before* connecting so that the window
/// scale negotiated in the SYN can use them.
fn try_connect(addr: SocketAddr, remaining: Duration, opts: &RingOptions) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(bytes) = opts.socket_buffer_bytes {
        sock.set_send_buffer_size(bytes)?;
        sock.set_recv_buffer_size(bytes)?;
    }
    sock.connect_timeout(&addr.into(), remaining.min(Duration::from_secs(5)))?;
    Ok(sock.into())
}

/// Accepts the left neighbour, turning away (and remembering) connections that fail the
/// handshake, until `deadline`. `Err(None)` means we were asked to stop.
fn accept_left(
    listener: &TcpListener,
    hello: &Hello,
    peer: Peer,
    deadline: Instant,
    timeout: Duration,
    opts: &RingOptions,
    abort: &AtomicBool,
) -> Result<TcpStream, Option<RingError>> {
    let rank = hello.rank;
    let listener_err = |source: io::Error| Some(RingError::Listener { rank, addr: listener.local_addr().ok(), source });
    if let Some(bytes) = opts.socket_buffer_bytes {
        // Accepted sockets inherit these, in time for the SYN-ACK's window scale.
        let sock = SockRef::from(listener);
        sock.set_recv_buffer_size(bytes).map_err(listener_err)?;
        sock.set_send_buffer_size(bytes).map_err(listener_err)?;
    }
    // std has no accept timeout: poll a non-blocking listener instead.
    listener.set_nonblocking(true).map_err(listener_err)?;
    let mut last_refusal: Option<String> = None;
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(None);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Some(RingError::AcceptTimeout { rank, peer, timeout, last_refusal }));
        }
        match listener.accept() {
            Ok((stream, from)) => {
                let io_to = opts.io_timeout.min(remaining).max(Duration::from_millis(1));
                // Some platforms hand out accepted sockets in the listener's non-blocking mode.
                if let Err(e) = stream.set_nonblocking(false).and_then(|()| configure(&stream, io_to, opts)) {
                    last_refusal = Some(format!("{from}: could not configure the socket: {e}"));
                    continue;
                }
                match handshake(&stream, hello, peer.rank) {
                    Ok(()) => {
                        return match configure(&stream, opts.io_timeout, opts) {
                            Ok(()) => Ok(stream),
                            Err(e) => Err(Some(RingError::io(rank, Op::Configure, peer, e, opts.io_timeout))),
                        };
                    }
                    Err(HandshakeError::Mismatch(m)) => {
                        last_refusal = Some(format!("connection from {from}: {m}"));
                    }
                    Err(HandshakeError::Io(e)) => {
                        last_refusal = Some(format!("connection from {from} broke during the handshake: {e}"));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || transient_accept_error(&e) => {
                thread::sleep(remaining.min(Duration::from_millis(5)));
            }
            Err(e) => return Err(listener_err(e)),
        }
    }
}

/// One all-reduce over the links. Returns the bytes sent and received.
///
/// The calling thread receives and reduces; a scoped writer thread sends, fed through an
/// unbounded channel. Sending and receiving must run concurrently or every rank could block in
/// `write` with nobody reading. The channel is unbounded for the same reason: a bounded one could
/// block the reader, which is what drains the left neighbour. Its depth is at most one chunk.
#[allow(clippy::too_many_arguments)]
fn run_ring(
    links: &Links,
    rank: usize,
    world: usize,
    op_seq: u64,
    seg: usize,
    io_timeout: Duration,
    pool: &mut Vec<Vec<f32>>,
    buf: &mut [f32],
) -> Result<(u64, u64), RingError> {
    let len = buf.len();
    let steps = 2 * (world - 1);
    let failed = AtomicU8::new(NO_FAILURE);
    let (to_writer, frames) = mpsc::channel::<Frame>();
    let (give_back, returned) = mpsc::channel::<Vec<f32>>();
    let header = |step: usize, segment: usize, floats: usize| FrameHeader {
        op_seq,
        total_len: len as u64,
        // world <= MAX_WORLD and frames <= 4 GiB are checked at setup, so step and payload fit;
        // a segment index past u32 (a buffer of 2^32 frames) would wrap identically on both ends.
        step: step as u32,
        segment: segment as u32,
        payload_bytes: (floats * 4) as u32,
    };
    // Shutting both sockets down makes the other thread and both neighbours fail at once.
    let bail = |who: u8| {
        let first = failed.compare_exchange(NO_FAILURE, who, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        let _ = links.left.shutdown(Shutdown::Both);
        let _ = links.right.shutdown(Shutdown::Both);
        first
    };

    let (main_result, writer_result) = thread::scope(|s| {
        let writer = s.spawn(|| -> Result<u64, RingError> {
            let mut sent = 0u64;
            for frame in frames {
                let payload: &[u8] = bytemuck::cast_slice(&frame.payload);
                if let Err(e) = write_frame(&links.right, &frame.header, payload) {
                    bail(WRITER_FAILED);
                    return Err(RingError::io(rank, Op::Send, links.right_peer, e, io_timeout));
                }
                sent += (FRAME_HEADER_BYTES + payload.len()) as u64;
                // The reader may be gone already; the buffer is then simply dropped.
                let _ = give_back.send(frame.payload);
            }
            Ok(sent)
        });

        let mut main = || -> Result<u64, RingError> {
            let send = |frame: Frame| {
                // Only after the writer failed; its own error is the one reported.
                to_writer
                    .send(frame)
                    .map_err(|_| RingError::Internal { rank, detail: "the sending thread stopped early".into() })
            };
            // Step 0: our own chunk goes out as it is.
            for (k, r) in segments(chunk_range(len, world, send_chunk(rank, world, 0)), seg).enumerate() {
                let mut v = take_buf(pool, &returned, r.len());
                v.copy_from_slice(&buf[r]);
                swap_to_from_wire(&mut v);
                send(Frame { header: header(0, k, v.len()).encode(), payload: v })?;
            }
            let mut received = 0u64;
            let mut hdr = [0u8; FRAME_HEADER_BYTES];
            let mut left = &links.left;
            let recv_err = |e| RingError::io(rank, Op::Receive, links.left_peer, e, io_timeout);
            for step in 0..steps {
                let reduce = step < world - 1;
                let chunk = chunk_range(len, world, recv_chunk(rank, world, step));
                for (k, r) in segments(chunk, seg).enumerate() {
                    left.read_exact(&mut hdr).map_err(recv_err)?;
                    header(step, k, r.len()).check(&hdr).map_err(|detail| RingError::Desync {
                        rank,
                        peer: links.left_peer,
                        detail,
                    })?;
                    let mut v = take_buf(pool, &returned, r.len());
                    left.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(recv_err)?;
                    received += (FRAME_HEADER_BYTES + 4 * v.len()) as u64;
                    swap_to_from_wire(&mut v);
                    let dst = &mut buf[r];
                    if reduce {
                        // Partial sum from the left plus ours: the order is fixed by the ring.
                        for (d, x) in dst.iter_mut().zip(v.iter_mut()) {
                            *x += *d;
                            *d = *x;
                        }
                    } else {
                        // All-gather: adopt the finished bits verbatim.
                        dst.copy_from_slice(&v);
                    }
                    if step + 1 < steps {
                        // What we just received is what we forward next step, so the frame
                        // buffer goes straight to the writer without another copy.
                        swap_to_from_wire(&mut v);
                        send(Frame { header: header(step + 1, k, v.len()).encode(), payload: v })?;
                    } else {
                        pool.push(v);
                    }
                }
            }
            Ok(received)
        };
        let main_result = main();
        if main_result.is_err() {
            bail(MAIN_FAILED);
        }
        drop(to_writer);
        let writer_result = writer
            .join()
            .unwrap_or_else(|_| Err(RingError::Internal { rank, detail: "the sending thread panicked".into() }));
        (main_result, writer_result)
    });
    pool.extend(returned.try_iter());
    // Enough buffers for the frames in flight of a large call (16 MiB with the default segment
    // size), so that steady-state training neither allocates nor zero-fills them again.
    pool.truncate(MAX_POOLED_FRAMES);
    match (main_result, writer_result) {
        (Ok(received), Ok(sent)) => Ok((sent, received)),
        (Err(m), Err(w)) => Err(if failed.load(Ordering::SeqCst) == WRITER_FAILED { w } else { m }),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_round_trip_and_mismatch() {
        let h = FrameHeader { op_seq: 5, total_len: 1_000_003, step: 2, segment: 7, payload_bytes: 4096 };
        assert_eq!(h.check(&h.encode()), Ok(()));
        let other = FrameHeader { total_len: 1000, ..h };
        let err = h.check(&other.encode()).unwrap_err();
        assert!(err.contains("1000 floats"), "{err}");
        let other = FrameHeader { op_seq: 6, ..h };
        assert!(h.check(&other.encode()).unwrap_err().contains("call #6"));
        let mut garbage = h.encode();
        garbage[1] ^= 1;
        assert!(h.check(&garbage).unwrap_err().contains("bad magic"));
    }
}
