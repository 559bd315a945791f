//! Opening dataset files whether they are plain, gzip or xz.
//!
//! Datasets are distributed compressed (MNIST as `.gz`, our CIFAR-10 copy as `.xz`) and people
//! also unpack them; sniffing the magic bytes instead of trusting the file name accepts all of
//! these without the user saying which.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::DataError;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];

/// Names a compressed copy of a file may have, in the order they are preferred.
pub(crate) const COMPRESSED_SUFFIXES: [&str; 3] = ["", ".gz", ".xz"];

/// A byte stream of the uncompressed contents of one file.
pub(crate) struct Source {
    path: PathBuf,
    reader: Box<dyn Read + Send>,
}

impl Source {
    /// Opens `path`, decompressing gzip or xz if its first bytes say so.
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, "open", e))?;
        let mut buf = BufReader::with_capacity(1 << 16, file);
        let head = buf.fill_buf().map_err(|e| DataError::io(path, "read", e))?;
        let reader: Box<dyn Read + Send> = if head.starts_with(XZ_MAGIC) {
            Box::new(xz2::read::XzDecoder::new_multi_decoder(buf))
        } else if head.starts_with(GZIP_MAGIC) {
            Box::new(flate2::read::MultiGzDecoder::new(buf))
        } else {
            Box::new(buf)
        };
        Ok(Source { path: path.to_path_buf(), reader })
    }

    /// Reads up to `max` more bytes (fewer only at the end of the data).
    pub(crate) fn read_up_to(&mut self, max: u64) -> Result<Vec<u8>, DataError> {
        // The header may promise absurd sizes; reserve only a sane amount up front.
        let mut out = Vec::with_capacity(max.min(64 << 20) as usize);
        (&mut self.reader)
            .take(max)
            .read_to_end(&mut out)
            .map_err(|e| DataError::io(&self.path, "read (or decompress)", e))?;
        Ok(out)
    }

    /// The uncompressed stream itself, for a reader that parses as it goes (a tar).
    pub(crate) fn into_reader(self) -> Box<dyn Read + Send> {
        self.reader
    }

    /// Reads everything that is left.
    pub(crate) fn read_all(&mut self) -> Result<Vec<u8>, DataError> {
        self.read_up_to(u64::MAX)
    }
}

/// The first of `dir/name{,.gz,.xz}` that is a file.
pub(crate) fn find_with_suffixes(dir: &Path, name: &str) -> Option<PathBuf> {
    COMPRESSED_SUFFIXES.iter().map(|s| dir.join(format!("{name}{s}"))).find(|p| p.is_file())
}

/// `name` without a trailing `.gz` / `.xz`.
pub(crate) fn strip_compressed_suffix(name: &str) -> &str {
    name.strip_suffix(".gz").or_else(|| name.strip_suffix(".xz")).unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn plain_gzip_and_xz_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let plain = dir.path().join("a");
        std::fs::write(&plain, &data).unwrap();
        let gz = dir.path().join("a.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let xz = dir.path().join("b");
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&data).unwrap();
        std::fs::write(&xz, e.finish().unwrap()).unwrap();
        for p in [&plain, &gz, &xz] {
            let mut s = Source::open(p).unwrap();
            assert_eq!(s.read_up_to(10).unwrap(), &data[..10]);
            assert_eq!(s.read_all().unwrap(), &data[10..]);
        }
        assert_eq!(find_with_suffixes(dir.path(), "a"), Some(plain.clone()));
        assert_eq!(strip_compressed_suffix("x.bin.xz"), "x.bin");
    }

    #[test]
    fn corrupt_gzip_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gz");
        std::fs::write(&p, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        let err = Source::open(&p).unwrap().read_all().unwrap_err();
        assert!(err.to_string().contains("bad.gz"), "{err}");
    }
}
