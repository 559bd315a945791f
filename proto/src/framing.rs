//! How large payloads are cut into messages and put back together.
//!
//! A checkpoint travels as a header (every file's name, size and sha256) followed by the files'
//! bytes in order, in chunks of at most [`CHUNK_BYTES`]. The receiver checks every claim the
//! header makes — names, order, sizes, digests — so a truncated or corrupted transfer is refused
//! instead of being stored or loaded.

use sha2::{Digest, Sha256};

use crate::v1::{CheckpointChunk, CheckpointData, CheckpointFileInfo, CheckpointHeader, checkpoint_chunk};
use crate::{CHUNK_BYTES, MAX_CHECKPOINT_BYTES};

/// Why a chunked payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("the first checkpoint chunk must be a header")]
    MissingHeader,
    #[error("a second checkpoint header arrived")]
    DuplicateHeader,
    #[error("empty checkpoint chunk")]
    EmptyChunk,
    #[error("checkpoint file name {0:?} is not a plain file name")]
    BadFileName(String),
    #[error("checkpoint file {0:?} is listed twice")]
    DuplicateFile(String),
    #[error("checkpoint declares total size {declared} but its files add up to {sum}")]
    TotalSizeMismatch { declared: u64, sum: u64 },
    #[error("checkpoint of {0} bytes is larger than the limit of {MAX_CHECKPOINT_BYTES} bytes")]
    TooLarge(u64),
    #[error("checkpoint file {name:?}: sha256 {sha256:?} is not 64 lower-case hex digits")]
    BadDigest { name: String, sha256: String },
    #[error("chunk for file index {index} but the header lists {count} files")]
    FileIndexOutOfRange { index: u32, count: usize },
    #[error("chunk for file {name:?} at offset {offset}, expected offset {expected} (chunks out of order)")]
    OutOfOrder { name: String, offset: u64, expected: u64 },
    #[error("file {name:?} is larger than its declared {declared} bytes")]
    Overflow { name: String, declared: u64 },
    #[error("file {name:?} ended after {got} of {declared} bytes (transfer truncated)")]
    Truncated { name: String, got: u64, declared: u64 },
    #[error("file {name:?} has sha256 {got}, the header declared {declared}")]
    DigestMismatch { name: String, got: String, declared: String },
    #[error("pixel payload of {0} bytes is not a whole number of f32 values")]
    RaggedPixels(usize),
}

/// Named files, as a checkpoint is made of: `(file name, bytes)` in a fixed order.
pub type NamedFiles = Vec<(String, Vec<u8>)>;

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether `name` can be used as a file name inside a checkpoint directory: no separators, no
/// `..`, nothing hidden, nothing exotic. Both ends check it; the coordinator writes these names.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Builds the header for `files`; `step`, `epoch` and the flags are the caller's to fill in.
pub fn checkpoint_header(files: &[(String, Vec<u8>)]) -> CheckpointHeader {
    let infos: Vec<CheckpointFileInfo> = files
        .iter()
        .map(|(name, bytes)| CheckpointFileInfo {
            name: name.clone(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        })
        .collect();
    let total_size = infos.iter().map(|f| f.size).sum();
    CheckpointHeader { files: infos, total_size, ..Default::default() }
}

/// The chunks of one checkpoint: the header first, then each file's bytes in order.
///
/// An iterator over owned files, so a sender can turn it into a stream without copying the
/// whole checkpoint a second time; only one chunk at a time is copied out.
pub struct CheckpointChunks {
    header: Option<CheckpointHeader>,
    files: Vec<(String, Vec<u8>)>,
    file: usize,
    offset: usize,
    chunk_bytes: usize,
}

impl CheckpointChunks {
    /// `header` must have been made by [`checkpoint_header`] from the same `files`.
    pub fn new(header: CheckpointHeader, files: Vec<(String, Vec<u8>)>) -> Self {
        Self::with_chunk_bytes(header, files, CHUNK_BYTES)
    }

    /// As [`CheckpointChunks::new`] with a chosen chunk size (tests use small ones).
    pub fn with_chunk_bytes(header: CheckpointHeader, files: Vec<(String, Vec<u8>)>, chunk_bytes: usize) -> Self {
        Self { header: Some(header), files, file: 0, offset: 0, chunk_bytes: chunk_bytes.max(1) }
    }
}

impl Iterator for CheckpointChunks {
    type Item = CheckpointChunk;

    fn next(&mut self) -> Option<CheckpointChunk> {
        if let Some(h) = self.header.take() {
            return Some(CheckpointChunk { chunk: Some(checkpoint_chunk::Chunk::Header(h)) });
        }
        // Empty files send no data chunk: the receiver knows their size from the header.
        while self.file < self.files.len() && self.offset >= self.files[self.file].1.len() {
            self.file += 1;
            self.offset = 0;
        }
        let (_, bytes) = self.files.get(self.file)?;
        let end = (self.offset + self.chunk_bytes).min(bytes.len());
        let data = CheckpointData {
            file_index: self.file as u32,
            offset: self.offset as u64,
            data: bytes[self.offset..end].to_vec(),
        };
        self.offset = end;
        Some(CheckpointChunk { chunk: Some(checkpoint_chunk::Chunk::Data(data)) })
    }
}

/// Puts a checkpoint back together from its chunks, checking every claim of the header.
#[derive(Default)]
pub struct CheckpointAssembler {
    header: Option<CheckpointHeader>,
    files: Vec<Vec<u8>>,
}

impl CheckpointAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The header, once the first chunk has arrived.
    pub fn header(&self) -> Option<&CheckpointHeader> {
        self.header.as_ref()
    }

    /// Takes the next chunk, refusing anything out of order or beyond a declared size.
    pub fn push(&mut self, chunk: CheckpointChunk) -> Result<(), FramingError> {
        match chunk.chunk {
            None => Err(FramingError::EmptyChunk),
            Some(checkpoint_chunk::Chunk::Header(h)) => {
                if self.header.is_some() {
                    return Err(FramingError::DuplicateHeader);
                }
                validate_header(&h)?;
                // Reserve what was declared, up to a bound, so a lying header cannot make the
                // receiver allocate before any byte arrived.
                self.files = h.files.iter().map(|f| Vec::with_capacity(f.size.min(64 << 20) as usize)).collect();
                self.header = Some(h);
                Ok(())
            }
            Some(checkpoint_chunk::Chunk::Data(d)) => {
                let header = self.header.as_ref().ok_or(FramingError::MissingHeader)?;
                let count = header.files.len();
                let index = d.file_index as usize;
                let info =
                    header.files.get(index).ok_or(FramingError::FileIndexOutOfRange { index: d.file_index, count })?;
                // Files arrive in order, so every earlier file must be complete.
                if let Some((i, _)) =
                    header.files[..index].iter().enumerate().find(|(i, f)| self.files[*i].len() as u64 != f.size)
                {
                    let f = &header.files[i];
                    return Err(FramingError::Truncated {
                        name: f.name.clone(),
                        got: self.files[i].len() as u64,
                        declared: f.size,
                    });
                }
                let buf = &mut self.files[index];
                if d.offset != buf.len() as u64 {
                    return Err(FramingError::OutOfOrder {
                        name: info.name.clone(),
                        offset: d.offset,
                        expected: buf.len() as u64,
                    });
                }
                if buf.len() as u64 + d.data.len() as u64 > info.size {
                    return Err(FramingError::Overflow { name: info.name.clone(), declared: info.size });
                }
                buf.extend_from_slice(&d.data);
                Ok(())
            }
        }
    }

    /// Checks that every file is complete and matches its digest; returns the header and files.
    pub fn finish(self) -> Result<(CheckpointHeader, NamedFiles), FramingError> {
        let header = self.header.ok_or(FramingError::MissingHeader)?;
        let mut out = Vec::with_capacity(header.files.len());
        for (info, bytes) in header.files.iter().zip(self.files) {
            if bytes.len() as u64 != info.size {
                return Err(FramingError::Truncated {
                    name: info.name.clone(),
                    got: bytes.len() as u64,
                    declared: info.size,
                });
            }
            let got = sha256_hex(&bytes);
            if got != info.sha256 {
                return Err(FramingError::DigestMismatch {
                    name: info.name.clone(),
                    got,
                    declared: info.sha256.clone(),
                });
            }
            out.push((info.name.clone(), bytes));
        }
        Ok((header, out))
    }
}

fn validate_header(h: &CheckpointHeader) -> Result<(), FramingError> {
    let mut sum = 0u64;
    for (i, f) in h.files.iter().enumerate() {
        if !is_plain_file_name(&f.name) {
            return Err(FramingError::BadFileName(f.name.clone()));
        }
        if h.files[..i].iter().any(|g| g.name == f.name) {
            return Err(FramingError::DuplicateFile(f.name.clone()));
        }
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(FramingError::BadDigest { name: f.name.clone(), sha256: f.sha256.clone() });
        }
        sum = sum.saturating_add(f.size);
    }
    if sum != h.total_size {
        return Err(FramingError::TotalSizeMismatch { declared: h.total_size, sum });
    }
    if sum > MAX_CHECKPOINT_BYTES {
        return Err(FramingError::TooLarge(sum));
    }
    Ok(())
}

/// Pixels as they travel: little-endian f32, whatever the hosts' byte order.
pub fn encode_f32_le(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends the f32 values in `bytes` to `out`, refusing a length that is not a multiple of 4.
pub fn decode_f32_le(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), FramingError> {
    if bytes.len() % 4 != 0 {
        return Err(FramingError::RaggedPixels(bytes.len()));
    }
    out.reserve(bytes.len() / 4);
    out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<(String, Vec<u8>)> {
        vec![("a.bin".into(), (0..10u8).collect()), ("empty".into(), vec![]), ("b.json".into(), b"{\"x\":1}".to_vec())]
    }

    fn chunks(chunk_bytes: usize) -> Vec<CheckpointChunk> {
        let f = files();
        CheckpointChunks::with_chunk_bytes(checkpoint_header(&f), f, chunk_bytes).collect()
    }

    #[test]
    fn round_trip_with_small_chunks() {
        let c = chunks(3);
        assert_eq!(c.len(), 1 + 4 + 3);
        let mut a = CheckpointAssembler::new();
        for ch in c {
            a.push(ch).unwrap();
        }
        let (h, got) = a.finish().unwrap();
        assert_eq!(got, files());
        assert_eq!(h.total_size, 17);
    }

    #[test]
    fn refuses_data_before_header() {
        let mut c = chunks(4);
        let mut a = CheckpointAssembler::new();
        assert_eq!(a.push(c.remove(1)), Err(FramingError::MissingHeader));
    }

    #[test]
    fn refuses_truncated_transfer() {
        let mut c = chunks(4);
        c.pop();
        let mut a = CheckpointAssembler::new();
        for ch in c {
            a.push(ch).unwrap();
        }
        assert!(matches!(a.finish(), Err(FramingError::Truncated { .. })));
    }

    #[test]
    fn refuses_corrupted_bytes() {
        let mut c = chunks(100);
        if let Some(checkpoint_chunk::Chunk::Data(d)) = &mut c[1].chunk {
            d.data[0] ^= 1;
        }
        let mut a = CheckpointAssembler::new();
        for ch in c {
            a.push(ch).unwrap();
        }
        assert!(matches!(a.finish(), Err(FramingError::DigestMismatch { .. })));
    }

    #[test]
    fn refuses_reordered_chunks() {
        let mut c = chunks(4);
        c.swap(1, 2);
        let mut a = CheckpointAssembler::new();
        a.push(c.remove(0)).unwrap();
        assert!(matches!(a.push(c.remove(0)), Err(FramingError::OutOfOrder { .. })));
    }

    #[test]
    fn refuses_path_traversal_and_lying_totals() {
        let f = vec![("../etc/passwd".to_string(), vec![1u8])];
        let mut a = CheckpointAssembler::new();
        let h = checkpoint_header(&f);
        assert!(matches!(
            a.push(CheckpointChunk { chunk: Some(checkpoint_chunk::Chunk::Header(h)) }),
            Err(FramingError::BadFileName(_))
        ));
        let mut h = checkpoint_header(&files());
        h.total_size += 1;
        let mut a = CheckpointAssembler::new();
        assert!(matches!(
            a.push(CheckpointChunk { chunk: Some(checkpoint_chunk::Chunk::Header(h)) }),
            Err(FramingError::TotalSizeMismatch { .. })
        ));
    }

    #[test]
    fn pixels_round_trip_and_refuse_ragged() {
        let v = [0.5f32, -1.0, 1.0, 0.0];
        let mut b = Vec::new();
        encode_f32_le(&v, &mut b);
        let mut out = Vec::new();
        decode_f32_le(&b, &mut out).unwrap();
        assert_eq!(out, v);
        assert_eq!(decode_f32_le(&b[..3], &mut out), Err(FramingError::RaggedPixels(3)));
    }

    #[test]
    fn descriptor_set_names_the_service() {
        let s = String::from_utf8_lossy(crate::FILE_DESCRIPTOR_SET);
        assert!(s.contains("dcgan.v1") && s.contains("Coordinator"));
    }
}
