//! Reading a prepared data set: samples by index, straight from the shard files.
//!
//! Samples are read with positioned reads (`pread`) into a buffer the caller reuses, not
//! memory-mapped: the page cache keeps hot shards fast, but none of it counts as the
//! process's own memory, so a trainer's resident size does not grow with the data set.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::manifest::{Manifest, hex};
use crate::dataset::byte_to_unit;
use crate::{DataError, Dataset};

/// An opened prepared data set.
#[derive(Debug)]
pub struct PreparedSet {
    dir: PathBuf,
    manifest: Manifest,
    files: Vec<File>,
    /// `starts[k]`: index of shard `k`'s first sample; one more entry holds the total.
    starts: Vec<u64>,
    /// Samples visible (all, or the first N of `with_limit`).
    len: usize,
}

impl PreparedSet {
    /// Opens `dir`: reads its manifest and checks that every shard file is there with the size
    /// the manifest gives (cheap; [`PreparedSet::verify`] checks the contents).
    pub fn open(dir: &Path) -> Result<PreparedSet, DataError> {
        let manifest = Manifest::read(dir)?;
        let sample = manifest.sample_bytes();
        let mut files = Vec::with_capacity(manifest.shards.len());
        let mut starts = Vec::with_capacity(manifest.shards.len() + 1);
        let mut at = 0u64;
        for s in &manifest.shards {
            let path = dir.join(&s.file);
            let file = File::open(&path).map_err(|e| DataError::io(&path, "open", e))?;
            let len = file.metadata().map_err(|e| DataError::io(&path, "stat", e))?.len();
            if len != s.count * sample {
                return Err(DataError::Corrupt {
                    path,
                    msg: format!(
                        "is {len} bytes, but the manifest says {} samples of {sample} bytes ({} bytes)",
                        s.count,
                        s.count * sample
                    ),
                });
            }
            files.push(file);
            starts.push(at);
            at += s.count;
        }
        starts.push(at);
        let len = usize::try_from(manifest.count).unwrap_or(usize::MAX);
        Ok(PreparedSet { dir: dir.to_path_buf(), manifest, files, starts, len })
    }

    /// Only the first `limit` samples are visible (`--data-limit`).
    pub fn with_limit(mut self, limit: Option<usize>) -> PreparedSet {
        if let Some(l) = limit {
            self.len = self.len.min(l);
        }
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Samples visible.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn nc(&self) -> usize {
        self.manifest.channels as usize
    }

    pub fn image_size(&self) -> usize {
        self.manifest.image_size as usize
    }

    /// Values in one sample.
    pub fn sample_len(&self) -> usize {
        self.manifest.sample_bytes() as usize
    }

    /// Checks every shard (and labels file) against the sha256 in the manifest, on every
    /// core; `progress` gets the bytes hashed as they go. A flipped byte fails here, naming
    /// the file, before anything trains on it.
    pub fn verify(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<(), DataError> {
        let jobs: Vec<(String, &str)> = self
            .manifest
            .shards
            .iter()
            .flat_map(|s| {
                std::iter::once((s.file.clone(), s.sha256.as_str()))
                    .chain(s.labels_file.clone().zip(s.labels_sha256.as_deref()))
            })
            .collect();
        let results: Vec<Result<(), DataError>> = jobs
            .par_iter()
            .map(|(name, expected)| {
                let path = self.dir.join(name);
                let actual = sha256_file(&path, progress)?;
                if actual != *expected {
                    return Err(DataError::Corrupt {
                        path,
                        msg: format!(
                            "sha256 is {actual}, the manifest says {expected}: the file changed since it was prepared \
                             (prepare the data set again)"
                        ),
                    });
                }
                Ok(())
            })
            .collect();
        results.into_iter().collect()
    }

    /// Shard and position of sample `i`.
    fn locate(&self, i: usize) -> (usize, u64) {
        let i = i as u64;
        // The first shard starting after i, minus one (empty shards share a start and are
        // passed over this way).
        let k = self.starts.partition_point(|&s| s <= i) - 1;
        (k, i - self.starts[k])
    }

    /// Reads sample `i`'s bytes into `buf` (`sample_len` bytes).
    pub fn read_bytes(&self, i: usize, buf: &mut [u8]) -> Result<(), DataError> {
        if i >= self.len {
            return Err(DataError::InvalidArgument {
                path: self.dir.clone(),
                msg: format!("sample {i} is past the {} samples of this set", self.len),
            });
        }
        let (k, at) = self.locate(i);
        let sample = self.manifest.sample_bytes();
        self.files[k]
            .read_exact_at(buf, at * sample)
            .map_err(|e| DataError::io(self.dir.join(&self.manifest.shards[k].file), "read", e))
    }

    /// Tells the kernel that the samples `indices` will be read soon (`posix_fadvise` WILLNEED),
    /// so it reads them from the disk in the background, many at once, while the current step
    /// trains. Without it a cold epoch reads one 12 KiB sample at a time (queue depth one). A
    /// hint only: errors are ignored.
    pub fn will_need(&self, indices: &[u32]) {
        use std::os::fd::AsRawFd;
        let sample = self.manifest.sample_bytes() as i64;
        for &i in indices {
            if (i as usize) < self.len {
                let (k, at) = self.locate(i as usize);
                // SAFETY: posix_fadvise on a descriptor this set owns; no memory is passed.
                unsafe {
                    libc::posix_fadvise(
                        self.files[k].as_raw_fd(),
                        at as i64 * sample,
                        sample,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
        }
    }

    /// Copies the samples `indices` (in that order) into `out` as an NCHW batch in [-1, 1],
    /// exactly as [`Dataset::gather`] gives them for the same images.
    pub fn gather(&self, indices: &[u32], out: &mut Vec<f32>) -> Result<(), DataError> {
        let n = self.sample_len();
        out.clear();
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= self.len) {
            // Refused before anything is reserved for the batch.
            let mut probe = [0u8; 0];
            return self.read_bytes(bad as usize, &mut probe);
        }
        out.reserve(indices.len() * n);
        let mut buf = vec![0u8; n];
        for &i in indices {
            self.read_bytes(i as usize, &mut buf)?;
            out.extend(buf.iter().map(|&b| byte_to_unit(f32::from(b))));
        }
        Ok(())
    }

    /// The labels of the visible samples, where the set has them (one byte each).
    pub fn labels(&self) -> Result<Option<Vec<u8>>, DataError> {
        if !self.manifest.labels {
            return Ok(None);
        }
        let mut labels = Vec::with_capacity(self.len);
        for s in &self.manifest.shards {
            if labels.len() >= self.len {
                break;
            }
            let Some(name) = &s.labels_file else { return Ok(None) };
            let path = self.dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, "read", e))?;
            if bytes.len() as u64 != s.count {
                return Err(DataError::Corrupt {
                    path,
                    msg: format!("holds {} labels for a shard of {} samples", bytes.len(), s.count),
                });
            }
            labels.extend_from_slice(&bytes);
        }
        labels.truncate(self.len);
        Ok(Some(labels))
    }

    /// The first `n` samples (all, if `None`) in memory: for what needs a whole set at once
    /// (an FID classifier, nearest neighbours), never for training.
    pub fn head(&self, n: Option<usize>) -> Result<Dataset, DataError> {
        let n = n.unwrap_or(self.len).min(self.len);
        let indices: Vec<u32> = (0..n as u32).collect();
        let mut pixels = Vec::new();
        self.gather(&indices, &mut pixels)?;
        let labels = self.labels()?.map(|mut l| {
            l.truncate(n);
            l
        });
        Ok(Dataset {
            name: self.manifest.source.kind.clone(),
            nc: self.nc(),
            image_size: self.image_size(),
            len: n,
            pixels,
            labels,
        })
    }
}

/// Hex sha256 of a file, read in 1 MiB blocks.
fn sha256_file(path: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<String, DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, "open", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress(n as u64);
    }
    Ok(hex(&h.finalize()))
}
