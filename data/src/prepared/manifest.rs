//! `manifest.json`: what a prepared data set holds and how to check it.
//!
//! The manifest is written last, atomically, so its presence means the set is complete. It
//! names every shard with its sample count and sha256, so a reader can find sample `i` without
//! scanning and can prove the bytes are the ones `prepare` wrote.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::DataError;

/// The `format` field every manifest carries.
pub const FORMAT: &str = "dcgan-prepared";
/// The layout version this code reads and writes.
pub const VERSION: u32 = 1;
/// The manifest's file name inside a prepared directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Where the samples came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The dataset spec that was prepared (`cifar10:/data/cifar-10-batches-py`, `lsun:...`).
    pub spec: String,
    /// Its kind (`mnist`, `folder`, `lsun`, ...), also the set's name in logs.
    pub kind: String,
    /// A digest of the source's file names, sizes and modification times: a changed source
    /// is noticed when a cached preparation would otherwise be reused.
    pub fingerprint: String,
    /// Source images read (kept and skipped).
    pub items: u64,
    /// Images that could not be decoded and were left out (listed in `skipped.txt`).
    pub skipped: u64,
}

/// One shard: `count` samples of `channels * image_size * image_size` bytes, back to back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the prepared directory.
    pub file: String,
    pub count: u64,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// One label byte per sample, where the source has labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_sha256: Option<String>,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Samples in the set.
    pub count: u64,
    pub channels: u32,
    pub image_size: u32,
    /// Whether every shard has a labels file.
    pub labels: bool,
    pub source: SourceInfo,
    pub shards: Vec<ShardEntry>,
    /// The tool that wrote it (`dcgan 0.1.0`).
    pub tool: String,
}

impl Manifest {
    /// Bytes of one sample.
    pub fn sample_bytes(&self) -> u64 {
        u64::from(self.channels) * u64::from(self.image_size) * u64::from(self.image_size)
    }

    /// A digest of the samples themselves (shape, shard sizes and sha256s), not of when or from
    /// where they were prepared: two copies of the same set have the same id, so a worker can
    /// check that the directory it sees is the coordinator's.
    pub fn content_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{FORMAT} v{} {}x{}x{} n={}\n",
            self.version, self.channels, self.image_size, self.image_size, self.count
        ));
        for s in &self.shards {
            h.update(format!("{} {} {}\n", s.count, s.sha256, s.labels_sha256.as_deref().unwrap_or("-")));
        }
        hex(&h.finalize())
    }

    /// Reads and checks `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest, DataError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound {
                path: dir.to_path_buf(),
                msg: format!("no {MANIFEST_FILE}: not a prepared data set (make one with `dcgan prepare`), or its preparation has not finished"),
            },
            _ => DataError::io(&path, "read", e),
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Malformed {
            path: path.clone(),
            offset: 0,
            msg: format!("not a valid manifest: {e}"),
        })?;
        m.check(&path)?;
        Ok(m)
    }

    fn check(&self, path: &Path) -> Result<(), DataError> {
        let bad = |msg: String| DataError::Malformed { path: path.to_path_buf(), offset: 0, msg };
        if self.format != FORMAT {
            return Err(bad(format!("format is '{}', expected '{FORMAT}'", self.format)));
        }
        if self.version != VERSION {
            return Err(bad(format!("layout version {} is not the {VERSION} this build reads", self.version)));
        }
        if !matches!(self.channels, 1 | 3) || self.image_size == 0 {
            return Err(bad(format!("impossible shape {}x{}x{}", self.channels, self.image_size, self.image_size)));
        }
        let total = self.shards.iter().try_fold(0u64, |t, s| t.checked_add(s.count));
        if total != Some(self.count) {
            let total = total.map_or("more than 2^64".into(), |t| t.to_string());
            return Err(bad(format!("its shards hold {total} samples but it declares {}", self.count)));
        }
        // Every byte offset in the set, and sample_bytes even with no samples, fits in a file offset.
        let side = u64::from(self.image_size);
        let bytes = [side, u64::from(self.channels), self.count.max(1)].iter().try_fold(side, |b, &f| b.checked_mul(f));
        if bytes.is_none_or(|b| b > i64::MAX as u64) {
            return Err(bad(format!(
                "{} samples of {}x{side}x{side} bytes are more than a file holds",
                self.count, self.channels
            )));
        }
        for s in &self.shards {
            let names = std::iter::once(s.file.as_str()).chain(s.labels_file.as_deref());
            for name in names {
                // Shard names come from a file someone may have edited: never leave the directory.
                if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
                    return Err(bad(format!("shard file name '{name}' is not a plain file name")));
                }
            }
            if self.labels != s.labels_file.is_some() || s.labels_file.is_some() != s.labels_sha256.is_some() {
                return Err(bad(format!("shard {} disagrees with the manifest about labels", s.file)));
            }
        }
        Ok(())
    }

    /// Writes the manifest to `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, DataError> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::InvalidArgument {
            path: path.clone(),
            msg: format!("cannot encode the manifest: {e}"),
        })?;
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced, then
/// renamed over `path`: a reader sees the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| DataError::io(dir, "create a file in", e))?;
    tmp.write_all(bytes).map_err(|e| DataError::io(tmp.path(), "write", e))?;
    tmp.as_file().sync_all().map_err(|e| DataError::io(tmp.path(), "sync", e))?;
    tmp.persist(path).map_err(|e| DataError::io(path, "rename into place", e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            count: 5,
            channels: 3,
            image_size: 4,
            labels: false,
            source: SourceInfo {
                spec: "folder:/x".into(),
                kind: "folder".into(),
                fingerprint: "f".into(),
                items: 6,
                skipped: 1,
            },
            shards: vec![
                ShardEntry {
                    file: "shard-000000.u8".into(),
                    count: 3,
                    sha256: "a".into(),
                    labels_file: None,
                    labels_sha256: None,
                },
                ShardEntry {
                    file: "shard-000001.u8".into(),
                    count: 2,
                    sha256: "b".into(),
                    labels_file: None,
                    labels_sha256: None,
                },
            ],
            tool: "test".into(),
        }
    }

    #[test]
    fn round_trips_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        assert_eq!(m.sample_bytes(), 48);

        let mut other = m.clone();
        other.source.spec = "folder:/elsewhere".into();
        assert_eq!(other.content_id(), m.content_id(), "the id is about the samples, not where they came from");
        other.shards[1].sha256 = "c".into();
        assert_ne!(other.content_id(), m.content_id());

        for (edit, needle) in [
            (
                Box::new(|m: &mut Manifest| m.count = 6) as Box<dyn Fn(&mut Manifest)>,
                "hold 5 samples but it declares 6",
            ),
            (Box::new(|m: &mut Manifest| m.version = 9), "layout version 9"),
            (Box::new(|m: &mut Manifest| m.shards[0].file = "../etc/passwd".into()), "not a plain file name"),
            (Box::new(|m: &mut Manifest| m.channels = 2), "impossible shape"),
        ] {
            let mut bad = m.clone();
            edit(&mut bad);
            bad.write(dir.path()).unwrap();
            let e = Manifest::read(dir.path()).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("manifest.json"), "{e}");
        }
        let e = Manifest::read(&dir.path().join("nothing")).unwrap_err().to_string();
        assert!(e.contains("not a prepared data set"), "{e}");
    }
}
