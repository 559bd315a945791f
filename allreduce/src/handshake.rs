//! The hello both ends of a ring connection exchange before any data.
//!
//! Each side sends its hello, reads the other's, checks it, and sends back a one-byte verdict, so
//! that *both* ends learn whether the link is accepted. That is what turns "a worker of an old
//! generation connected to my port" into a clear error instead of silently mixed gradients.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use crate::error::{HandshakeMismatch, Refusal};

const MAGIC: [u8; 8] = *b"DCGRING\0";
/// Bumped whenever the hello or the frame layout changes.
pub const PROTOCOL_VERSION: u32 = 1;
const HELLO_BYTES: usize = 32;

/// What one end says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub rank: usize,
    pub world: usize,
    pub session: u64,
    pub segment_elems: usize,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        // Sizes were checked to fit in u32 when the ring was set up.
        b[12..16].copy_from_slice(&(self.rank as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(self.world as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(self.segment_elems as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.session.to_le_bytes());
        b
    }

    /// Checks the peer's raw hello against ours, expecting it to be rank `expected_rank`.
    fn check(&self, b: &[u8; HELLO_BYTES], expected_rank: usize) -> Result<(), HandshakeMismatch> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b[0..8] != MAGIC {
            return Err(HandshakeMismatch::BadMagic);
        }
        let version = u32_at(8);
        if version != PROTOCOL_VERSION {
            return Err(HandshakeMismatch::Version { ours: PROTOCOL_VERSION, theirs: version });
        }
        let (rank, world, seg) = (u32_at(12) as usize, u32_at(16) as usize, u32_at(20) as usize);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[24..32]);
        let session = u64::from_le_bytes(s);
        // Session first: a peer from another run usually differs in everything, and "wrong
        // session" is the message that explains it.
        if session != self.session {
            return Err(HandshakeMismatch::Session { ours: self.session, theirs: session });
        }
        if world != self.world {
            return Err(HandshakeMismatch::World { ours: self.world, theirs: world });
        }
        if rank != expected_rank {
            return Err(HandshakeMismatch::Rank { expected: expected_rank, got: rank });
        }
        if seg != self.segment_elems {
            return Err(HandshakeMismatch::SegmentElems { ours: self.segment_elems, theirs: seg });
        }
        Ok(())
    }
}

fn refusal_code(m: &HandshakeMismatch) -> u8 {
    match m {
        HandshakeMismatch::BadMagic => 1,
        HandshakeMismatch::Version { .. } => 2,
        HandshakeMismatch::Rank { .. } => 3,
        HandshakeMismatch::World { .. } => 4,
        HandshakeMismatch::Session { .. } => 5,
        HandshakeMismatch::SegmentElems { .. } => 6,
        HandshakeMismatch::RefusedByPeer(_) => 255,
    }
}

fn refusal_from_code(code: u8) -> Refusal {
    match code {
        1 => Refusal::BadMagic,
        2 => Refusal::Version,
        3 => Refusal::Rank,
        4 => Refusal::World,
        5 => Refusal::Session,
        6 => Refusal::SegmentElems,
        other => Refusal::Unknown(other),
    }
}

/// Why a handshake did not produce a usable link.
#[derive(Debug)]
pub enum HandshakeError {
    /// The bytes arrived and were wrong: retrying will not help.
    Mismatch(HandshakeMismatch),
    /// The connection broke or timed out (the caller sets the socket timeouts).
    Io(io::Error),
}

/// Runs the symmetric handshake on `stream`; the peer must be rank `expected_rank`.
///
/// Both hellos are 32 bytes and the verdicts one byte, so writing before reading cannot deadlock.
pub fn handshake(mut stream: &TcpStream, me: &Hello, expected_rank: usize) -> Result<(), HandshakeError> {
    stream.write_all(&me.encode()).map_err(HandshakeError::Io)?;
    let mut theirs = [0u8; HELLO_BYTES];
    stream.read_exact(&mut theirs).map_err(HandshakeError::Io)?;
    let ours = me.check(&theirs, expected_rank);
    let verdict = match &ours {
        Ok(()) => 0,
        Err(m) => refusal_code(m),
    };
    stream.write_all(&[verdict]).map_err(HandshakeError::Io)?;
    ours.map_err(HandshakeError::Mismatch)?;
    let mut their_verdict = [0u8; 1];
    stream.read_exact(&mut their_verdict).map_err(HandshakeError::Io)?;
    match their_verdict[0] {
        0 => Ok(()),
        code => Err(HandshakeError::Mismatch(HandshakeMismatch::RefusedByPeer(refusal_from_code(code)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: usize) -> Hello {
        Hello { rank, world: 4, session: 0xfeed, segment_elems: 65536 }
    }

    #[test]
    fn accepts_expected_neighbour() {
        assert_eq!(hello(0).check(&hello(3).encode(), 3), Ok(()));
    }

    #[test]
    fn names_each_mismatch() {
        let me = hello(0);
        assert_eq!(me.check(&hello(2).encode(), 3), Err(HandshakeMismatch::Rank { expected: 3, got: 2 }));
        let other = Hello { session: 7, ..hello(3) };
        assert!(matches!(me.check(&other.encode(), 3), Err(HandshakeMismatch::Session { theirs: 7, .. })));
        let other = Hello { world: 5, ..hello(3) };
        assert!(matches!(me.check(&other.encode(), 3), Err(HandshakeMismatch::World { theirs: 5, .. })));
        let mut garbage = hello(3).encode();
        garbage[0] = b'G';
        assert_eq!(me.check(&garbage, 3), Err(HandshakeMismatch::BadMagic));
    }
}
