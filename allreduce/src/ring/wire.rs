//! The ring's wire format: the 32-byte header in front of every data frame and the payload's
//! little-endian floats. Kept apart from sockets and schedule so that the bytes on the wire are
//! defined (and tested) in one place; changing anything here means bumping
//! [`crate::PROTOCOL_VERSION`].

use std::io::{self, IoSlice, Read, Write};

/// Bytes of the header in front of every data frame.
pub const FRAME_HEADER_BYTES: usize = 32;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"RNGF");

/// The header of a data frame: which call, which step, which segment and how long, all checked by
/// the receiver against its own schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub(super) op_seq: u64,
    pub(super) total_len: u64,
    pub(super) step: u32,
    pub(super) segment: u32,
    pub(super) payload_bytes: u32,
}

impl FrameHeader {
    pub(super) fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut b = [0u8; FRAME_HEADER_BYTES];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.op_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.total_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.step.to_le_bytes());
        b[28..32].copy_from_slice(&self.segment.to_le_bytes());
        b
    }

    /// Parses a received header; fails only on a bad magic (every other field is a valid value).
    pub(super) fn decode(b: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, String> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        if u32_at(0) != FRAME_MAGIC {
            return Err("frame header has a bad magic (stream corrupted or desynchronised)".into());
        }
        Ok(FrameHeader {
            payload_bytes: u32_at(4),
            op_seq: u64_at(8),
            total_len: u64_at(16),
            step: u32_at(24),
            segment: u32_at(28),
        })
    }

    /// Compares a received header with the one we expect and describes the first difference.
    pub(super) fn check(&self, b: &[u8; FRAME_HEADER_BYTES]) -> Result<(), String> {
        let got = FrameHeader::decode(b)?;
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

/// Bytes one frame of `floats` floats takes on the wire, header included.
pub(super) fn frame_bytes(floats: usize) -> u64 {
    (FRAME_HEADER_BYTES + 4 * floats) as u64
}

/// One frame ready to be written: the encoded header and the payload already in wire order.
pub(super) struct Frame {
    header: [u8; FRAME_HEADER_BYTES],
    payload: Vec<f32>,
}

impl Frame {
    /// Puts `payload` (floats in host order) into wire order behind `header`.
    pub(super) fn new(header: &FrameHeader, mut payload: Vec<f32>) -> Frame {
        swap_to_from_wire(&mut payload);
        Frame { header: header.encode(), payload }
    }

    /// Bytes the frame takes on the wire, header included.
    pub(super) fn wire_bytes(&self) -> u64 {
        frame_bytes(self.payload.len())
    }

    /// The payload buffer, for reuse (its contents are then garbage).
    pub(super) fn into_buffer(self) -> Vec<f32> {
        self.payload
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

/// Writes header and payload with as few syscalls as possible (one `writev` when it fits).
pub(super) fn write_frame<W: Write>(mut w: W, frame: &Frame) -> io::Result<()> {
    let payload: &[u8] = bytemuck::cast_slice(&frame.payload);
    let mut bufs = [IoSlice::new(&frame.header), IoSlice::new(payload)];
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

/// Reads the raw header of the next frame (check it with [`FrameHeader::check`]).
pub(super) fn read_header<R: Read>(mut r: R) -> io::Result<[u8; FRAME_HEADER_BYTES]> {
    let mut hdr = [0u8; FRAME_HEADER_BYTES];
    r.read_exact(&mut hdr)?;
    Ok(hdr)
}

/// Reads a frame's payload into `v` (whose length the checked header fixed), in host order.
pub(super) fn read_payload<R: Read>(mut r: R, v: &mut [f32]) -> io::Result<()> {
    r.read_exact(bytemuck::cast_slice_mut(v))?;
    swap_to_from_wire(v);
    Ok(())
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

    #[test]
    fn header_bytes_are_fixed() {
        let h = FrameHeader { op_seq: 0x0102_0304_0506_0708, total_len: 9, step: 3, segment: 4, payload_bytes: 12 };
        let b = h.encode();
        assert_eq!(&b[0..4], b"RNGF");
        assert_eq!(&b[4..8], &12u32.to_le_bytes());
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..24], &9u64.to_le_bytes());
        assert_eq!(&b[24..28], &3u32.to_le_bytes());
        assert_eq!(&b[28..32], &4u32.to_le_bytes());
        assert_eq!(FrameHeader::decode(&b), Ok(h));
    }

    #[test]
    fn frame_round_trip_through_bytes() {
        let payload = vec![1.5f32, -0.0, f32::MAX, f32::from_bits(0x7fc0_0001), 3.25e-40];
        let h = FrameHeader { op_seq: 1, total_len: 5, step: 0, segment: 0, payload_bytes: 20 };
        let frame = Frame::new(&h, payload.clone());
        assert_eq!(frame.wire_bytes(), 52);
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &frame).unwrap();
        assert_eq!(bytes.len() as u64, frame_bytes(payload.len()));
        // Payload floats are little-endian on the wire.
        assert_eq!(&bytes[32..36], &1.5f32.to_le_bytes());

        let mut r = &bytes[..];
        let hdr = read_header(&mut r).unwrap();
        assert_eq!(FrameHeader::decode(&hdr), Ok(h));
        h.check(&hdr).unwrap();
        let mut got = vec![0.0f32; payload.len()];
        read_payload(&mut r, &mut got).unwrap();
        assert!(r.is_empty());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&payload));
    }

    #[test]
    fn malformed_frames_give_clear_errors() {
        let h = FrameHeader { op_seq: 1, total_len: 2, step: 0, segment: 0, payload_bytes: 8 };
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &Frame::new(&h, vec![1.0, 2.0])).unwrap();

        // Not a frame at all.
        let mut garbage = bytes.clone();
        garbage[..4].copy_from_slice(b"HTTP");
        let hdr = read_header(&garbage[..]).unwrap();
        let err = FrameHeader::decode(&hdr).unwrap_err();
        assert!(err.contains("bad magic"), "{err}");
        assert_eq!(h.check(&hdr).unwrap_err(), err);

        // A header for another step of the schedule.
        let other = FrameHeader { step: 1, segment: 3, ..h };
        let err = other.check(&read_header(&bytes[..]).unwrap()).unwrap_err();
        assert!(err.contains("expected step 1 segment 3 with 8 bytes, got step 0 segment 0 with 8 bytes"), "{err}");

        // Cut short, in the header and in the payload.
        let err = read_header(&bytes[..FRAME_HEADER_BYTES - 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut r = &bytes[..bytes.len() - 1];
        read_header(&mut r).unwrap();
        let err = read_payload(&mut r, &mut [0.0; 2]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
