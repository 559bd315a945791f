//! The ring's two TCP links: connecting to the right neighbour and accepting the left one at the
//! same time (so start order does not matter), the handshake on each, socket options and
//! timeouts, and breaking the links from outside ([`RingAbort`]). Everything about sockets lives
//! here, so the all-reduce only reads and writes two ready streams.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::RingOptions;
use crate::error::{Op, Peer, RingError, Side};
use crate::handshake::{HandshakeError, Hello, handshake};

/// The two links of a ring with at least two ranks.
#[derive(Debug)]
pub(super) struct Links {
    /// We read from it; it connected to us.
    pub(super) left: TcpStream,
    /// We write to it; we connected to it.
    pub(super) right: TcpStream,
    pub(super) left_peer: Peer,
    pub(super) right_peer: Peer,
}

impl Links {
    /// Connects to the right neighbour `peers[rank + 1 mod world]` and accepts the left one on
    /// `listener` at the same time, each followed by the handshake with `hello`, all within
    /// `timeout` (see [`super::TcpRing::connect_with`]). Needs a world of at least two.
    pub(super) fn establish(
        hello: &Hello,
        peers: &[SocketAddr],
        listener: &TcpListener,
        timeout: Duration,
        opts: &RingOptions,
    ) -> Result<Links, RingError> {
        let (rank, world) = (hello.rank, hello.world);
        let left_peer =
            Peer { rank: (rank + world - 1) % world, addr: peers[(rank + world - 1) % world], side: Side::Left };
        let right_peer = Peer { rank: (rank + 1) % world, addr: peers[(rank + 1) % world], side: Side::Right };
        let abort = AtomicBool::new(false);
        let setup = Setup { hello, deadline: Instant::now() + timeout, timeout, opts, abort: &abort };
        let (left, right) = thread::scope(|s| {
            let accepting = s.spawn(|| {
                let r = accept_left(listener, &setup, left_peer);
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                r
            });
            let right = connect_right(&setup, right_peer);
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
        Ok(Links { left, right, left_peer, right_peer })
    }

    /// Shuts both links down, so that whoever is blocked on them (this rank's threads, and the
    /// neighbours through the closed sockets) fails at once.
    pub(super) fn shut_down(&self) {
        shut_down(&self.left, &self.right);
    }

    /// A second handle on both sockets, see [`super::TcpRing::abort_handle`].
    pub(super) fn abort_handle(&self) -> io::Result<RingAbort> {
        Ok(RingAbort { left: self.left.try_clone()?, right: self.right.try_clone()? })
    }
}

fn shut_down(left: &TcpStream, right: &TcpStream) {
    let _ = left.shutdown(Shutdown::Both);
    let _ = right.shutdown(Shutdown::Both);
}

/// Breaks a [`super::TcpRing`] from outside: see [`super::TcpRing::abort_handle`].
#[derive(Debug)]
pub struct RingAbort {
    left: TcpStream,
    right: TcpStream,
}

impl RingAbort {
    /// Shuts both links down: a pending or later `all_reduce_sum` fails promptly, on this rank
    /// and, through the closed sockets, on its neighbours.
    pub fn abort(&self) {
        shut_down(&self.left, &self.right);
    }
}

/// What the connecting and the accepting half of the setup share.
struct Setup<'a> {
    hello: &'a Hello,
    deadline: Instant,
    /// The whole setup's allowance, for the error messages.
    timeout: Duration,
    opts: &'a RingOptions,
    /// Set by the half that failed, so the other stops waiting.
    abort: &'a AtomicBool,
}

/// Accept errors that concern one incoming connection, not the listener.
fn transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted)
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

/// Connects to the right neighbour, retrying with exponential backoff until the deadline.
/// `Err(None)` means the other half of the setup failed and asked us to stop.
fn connect_right(setup: &Setup<'_>, peer: Peer) -> Result<TcpStream, Option<RingError>> {
    let Setup { hello, deadline, timeout, opts, abort } = *setup;
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
/// handshake, until the deadline. `Err(None)` means we were asked to stop.
fn accept_left(listener: &TcpListener, setup: &Setup<'_>, peer: Peer) -> Result<TcpStream, Option<RingError>> {
    let Setup { hello, deadline, timeout, opts, abort } = *setup;
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
