//! What can go wrong in a ring, named by peer and operation so that a log line says which
//! neighbour to look at.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Which of our two ring neighbours an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The rank we receive from (`rank - 1 mod world`); it connects to us.
    Left,
    /// The rank we send to (`rank + 1 mod world`); we connect to it.
    Right,
}

/// A neighbour in the ring: its rank, its advertised address and which side of us it sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    /// The address the peer advertised (for the left neighbour, not the ephemeral port it
    /// connected from), so that it matches what the coordinator handed out.
    pub addr: SocketAddr,
    pub side: Side,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Left => "left",
            Side::Right => "right",
        };
        write!(f, "{side} neighbour rank {} ({})", self.rank, self.addr)
    }
}

/// The operation that was under way when an I/O error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Setting socket options (buffers, timeouts, `TCP_NODELAY`).
    Configure,
    /// Exchanging hellos after the TCP connection was made.
    Handshake,
    /// Sending an all-reduce frame.
    Send,
    /// Receiving an all-reduce frame.
    Receive,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Configure => "configuring the socket to",
            Op::Handshake => "handshaking with",
            Op::Send => "sending to",
            Op::Receive => "receiving from",
        })
    }
}

/// Why a peer's hello was refused (by us, or by the peer, which tells us with a one-byte code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMismatch {
    /// The first bytes were not our magic: something else connected (or we connected to it).
    BadMagic,
    Version {
        ours: u32,
        theirs: u32,
    },
    /// The peer claims a rank that is not the neighbour we expect on that side.
    Rank {
        expected: usize,
        got: usize,
    },
    World {
        ours: usize,
        theirs: usize,
    },
    /// The peer belongs to another run or another generation of this run.
    Session {
        ours: u64,
        theirs: u64,
    },
    /// Frames are cut into segments of this many `f32`s; both ends must agree.
    SegmentElems {
        ours: usize,
        theirs: usize,
    },
    /// The peer found something wrong with our hello; the code says what (see [`Refusal`]).
    RefusedByPeer(Refusal),
}

/// The reason code a peer sends back when it refuses our hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadMagic,
    Version,
    Rank,
    World,
    Session,
    SegmentElems,
    /// A code this build does not know (a newer peer).
    Unknown(u8),
}

impl fmt::Display for HandshakeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => write!(f, "the peer does not speak the ring protocol (bad magic)"),
            Self::Version { ours, theirs } => {
                write!(f, "protocol version {theirs}, we speak {ours}")
            }
            Self::Rank { expected, got } => {
                write!(f, "the peer says it is rank {got}, expected rank {expected}")
            }
            Self::World { ours, theirs } => {
                write!(f, "the peer has world size {theirs}, ours is {ours}")
            }
            Self::Session { ours, theirs } => {
                write!(f, "the peer is in session {theirs:#018x}, ours is {ours:#018x} (another run or generation)")
            }
            Self::SegmentElems { ours, theirs } => {
                write!(f, "the peer cuts frames into {theirs} floats, we cut into {ours} (different segment_bytes)")
            }
            Self::RefusedByPeer(why) => write!(f, "the peer refused our hello: {why}"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("bad magic"),
            Self::Version => f.write_str("wrong protocol version"),
            Self::Rank => f.write_str("wrong rank"),
            Self::World => f.write_str("wrong world size"),
            Self::Session => f.write_str("wrong session"),
            Self::SegmentElems => f.write_str("wrong segment size"),
            Self::Unknown(code) => write!(f, "unknown reason code {code}"),
        }
    }
}

/// Everything that can fail while building or using a [`crate::TcpRing`].
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("invalid ring setup: {0}")]
    InvalidSetup(String),

    #[error("rank {rank}: could not use the listener ({addr:?}): {source}")]
    Listener {
        rank: usize,
        addr: Option<SocketAddr>,
        #[source]
        source: io::Error,
    },

    #[error("rank {rank}: could not connect to {peer} within {timeout:?}: {source}")]
    Connect {
        rank: usize,
        peer: Peer,
        timeout: Duration,
        #[source]
        source: io::Error,
    },

    #[error(
        "rank {rank}: {peer} did not connect within {timeout:?}{}",
        match last_refusal { Some(r) => format!(" (refused meanwhile: {r})"), None => String::new() }
    )]
    AcceptTimeout {
        rank: usize,
        peer: Peer,
        timeout: Duration,
        /// A connection we turned away while waiting (e.g. a stale worker of an old generation).
        last_refusal: Option<String>,
    },

    #[error("rank {rank}: refused {peer}: {mismatch}")]
    Handshake { rank: usize, peer: Peer, mismatch: HandshakeMismatch },

    #[error("rank {rank}: {op} {peer} failed: {source}")]
    Io {
        rank: usize,
        op: Op,
        peer: Peer,
        #[source]
        source: io::Error,
    },

    #[error("rank {rank}: {op} {peer} timed out after {after:?} (peer dead or stuck?)")]
    Timeout { rank: usize, op: Op, peer: Peer, after: Duration },

    #[error("rank {rank}: {peer} closed the connection while we were {op} it")]
    PeerClosed { rank: usize, op: Op, peer: Peer },

    #[error("rank {rank}: out of step with {peer}: {detail}")]
    Desync { rank: usize, peer: Peer, detail: String },

    #[error("rank {rank}: internal error: {detail}")]
    Internal { rank: usize, detail: String },

    #[error("rank {rank}: the ring is unusable after an earlier error: {first}")]
    Poisoned { rank: usize, first: String },
}

impl RingError {
    /// Classifies an I/O error: timeouts and EOF get their own variants because they are the
    /// usual signatures of a dead or stuck peer.
    pub(crate) fn io(rank: usize, op: Op, peer: Peer, source: io::Error, timeout: Duration) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                RingError::Timeout { rank, op, peer, after: timeout }
            }
            io::ErrorKind::UnexpectedEof => RingError::PeerClosed { rank, op, peer },
            _ => RingError::Io { rank, op, peer, source },
        }
    }
}
