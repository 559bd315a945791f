//! The one error type of the crate.
//!
//! Every variant names the file or directory it is about (and the byte offset or record where
//! that applies), because the person reading the message is usually looking at a dataset on
//! disk and needs to know which file to fix or re-download.

use std::path::PathBuf;

/// What went wrong while reading a dataset or writing an image grid.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be opened, listed, read, decompressed or written.
    #[error("{}: cannot {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "read", "open", "list directory".
        op: &'static str,
        source: std::io::Error,
    },

    /// The file does not start with the magic number of the expected format.
    #[error(
        "{}: bad magic number {found:#010x} at byte offset 0, expected {expected:#010x} ({what})",
        .path.display()
    )]
    BadMagic {
        path: PathBuf,
        expected: u32,
        found: u32,
        /// The kind of file that was expected, e.g. "IDX images".
        what: &'static str,
    },

    /// The data ends before a header or record that the format promises is complete.
    /// Offsets count bytes of the uncompressed data.
    #[error(
        "{}: truncated: {what} at byte offset {offset} needs {needed} bytes but only {available} are present",
        .path.display()
    )]
    Truncated {
        path: PathBuf,
        /// The header or record that is incomplete, e.g. "image record 1234 of 60000".
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    /// The data is complete but says something impossible (bad dimensions, a label out of
    /// range, counts that disagree).
    #[error("{}: byte offset {offset}: {msg}", .path.display())]
    Malformed { path: PathBuf, offset: u64, msg: String },

    /// The files a dataset needs are not where the spec points.
    #[error("{}: {msg}", .path.display())]
    NotFound { path: PathBuf, msg: String },

    /// An image file of a folder dataset could not be decoded.
    #[error("{}: cannot decode image: {source}", .path.display())]
    Decode { path: PathBuf, source: image::ImageError },

    /// A folder dataset holds no PNG, JPEG or WebP file.
    #[error("{}: no PNG, JPEG or WebP images found (searched recursively)", .path.display())]
    NoImages { path: PathBuf },

    /// An image could not be encoded.
    #[error("{}: cannot encode image: {source}", .path.display())]
    Encode { path: PathBuf, source: image::ImageError },

    /// The caller asked for something impossible for this path (an image size of 0, a grid
    /// whose buffer does not match its shape).
    #[error("{}: {msg}", .path.display())]
    InvalidArgument { path: PathBuf, msg: String },

    /// Encoded images of a set prepared with `--channels auto` disagree on their channel count.
    #[error(
        "{name}: has {found} channel(s) but the images before it have {expected}: mixed channel counts \
         (pass --channels rgb or --channels gray to convert every image)"
    )]
    MixedChannels { name: String, found: usize, expected: usize },

    /// An image could not be decoded and the preparation was asked to stop at such images.
    #[error("{name}: cannot decode image: {reason} (without --strict it would be skipped and listed)")]
    BadImage { name: String, reason: String },

    /// A prepared data set's file does not hold what its manifest says.
    #[error("{}: {msg}", .path.display())]
    Corrupt { path: PathBuf, msg: String },

    /// A dataset spec string could not be parsed.
    #[error("invalid dataset spec '{spec}': {msg}")]
    InvalidSpec { spec: String, msg: String },

    /// A file of a structured format (a pickled CIFAR batch) parses, but what it holds is not
    /// what the dataset needs (an array of the wrong type or shape, a label out of range).
    /// There is no single byte offset to point at, so the message says which value is wrong.
    #[error("{}: {msg}", .path.display())]
    BadContent { path: PathBuf, msg: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), op, source }
    }

    /// The error for a pickle that failed to parse in the file `path`: a truncation keeps its
    /// byte counts, anything else is malformed at the opcode's offset.
    pub(crate) fn from_pickle(e: pyformats::pickle::PickleError, path: &std::path::Path) -> Self {
        use pyformats::pickle::{ErrorKind, describe_opcode};
        let what = describe_opcode(e.opcode);
        match e.kind {
            ErrorKind::Truncated { needed, available } => DataError::Truncated {
                path: path.to_path_buf(),
                what: match e.opcode {
                    Some(_) => format!("pickle {what} with its argument"),
                    None => "the pickle (it ends before its STOP opcode)".into(),
                },
                offset: e.offset,
                needed,
                available,
            },
            ErrorKind::Malformed(msg) => DataError::Malformed {
                path: path.to_path_buf(),
                offset: e.offset,
                msg: format!("pickle {what}: {msg}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pickle error becomes a data error naming the file, the opcode and its offset.
    #[test]
    fn pickle_errors_name_the_file_opcode_and_offset() {
        let limits = pyformats::pickle::Limits::default();
        let e = pyformats::pickle::parse(b"\x80\x02h\x05.", &limits).unwrap_err();
        let msg = DataError::from_pickle(e, std::path::Path::new("/d/data_batch_1")).to_string();
        assert!(msg.contains("/d/data_batch_1") && msg.contains("BINGET") && msg.contains("byte offset 2"), "{msg}");
        let e = pyformats::pickle::parse(b"\x80\x02N", &limits).unwrap_err();
        let msg = DataError::from_pickle(e, std::path::Path::new("/d/b")).to_string();
        assert!(msg.contains("/d/b") && msg.contains("STOP"), "{msg}");
    }
}
