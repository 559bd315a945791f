//! Where checkpoints live on disk: `checkpoints/step_NNNNNNNN/`, each with a `SHA256SUMS`.
//!
//! A checkpoint directory appears whole or not at all: files are written into a hidden
//! temporary directory, each fsynced, then `SHA256SUMS`, then the directory itself, and only
//! then renamed into place (and the parent fsynced). A crash therefore leaves at worst a
//! `.tmp-*` directory, which the next start removes, and `--resume` only ever sees complete
//! checkpoints — whose digests it checks again before handing them out.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use proto::framing::{is_plain_file_name, sha256_hex};

use crate::run_dir::{RunDirError, sync_dir};

/// File listing each file's sha256, in the format `sha256sum -c` reads.
pub const SUMS_FILE: &str = "SHA256SUMS";
const PREFIX: &str = "step_";

/// Why a checkpoint could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] RunDirError),
    #[error("checkpoint {}: {reason}", .dir.display())]
    Corrupt { dir: PathBuf, reason: String },
    #[error("checkpoint file name {0:?} is not a plain file name")]
    BadName(String),
    #[error("no checkpoint for step {0}")]
    Missing(u64),
}

/// One stored checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub step: u64,
    pub dir: PathBuf,
    pub total_size: u64,
}

impl StoredCheckpoint {
    /// Its directory relative to the run directory (`checkpoints/step_NNNNNNNN`).
    pub fn relative_dir(&self) -> String {
        let mut parts: Vec<String> =
            self.dir.components().rev().take(2).map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        parts.reverse();
        parts.join("/")
    }

    /// The checkpoint as `GetStatus` lists it, in the epoch its step ends or falls in.
    pub fn info(&self, steps_per_epoch: u64) -> proto::v1::CheckpointInfo {
        proto::v1::CheckpointInfo {
            step: self.step,
            epoch: self.step.saturating_sub(1) / steps_per_epoch.max(1),
            path: self.relative_dir(),
            total_size: self.total_size,
        }
    }
}

/// The checkpoints of one run, newest last, keeping at most `keep` of them.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointStore {
    /// `keep` is at least 1: the newest checkpoint is never pruned.
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Self {
        Self { dir: dir.into(), keep: keep.max(1) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory name of the checkpoint taken after `step` steps.
    pub fn dir_name(step: u64) -> String {
        format!("{PREFIX}{step:08}")
    }

    /// Removes temporary directories left by a crash in the middle of a store.
    pub fn remove_partial(&self) -> Result<(), StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(RunDirError::new(&self.dir, "list", e).into()),
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let p = entry.path();
                fs::remove_dir_all(&p).map_err(|e| RunDirError::new(&p, "remove partial checkpoint", e))?;
            }
        }
        Ok(())
    }

    /// Writes one checkpoint atomically, then prunes old ones beyond `keep`.
    pub fn store(&self, step: u64, files: &[(String, Vec<u8>)]) -> Result<StoredCheckpoint, StoreError> {
        for (name, _) in files {
            if !is_plain_file_name(name) || name == SUMS_FILE {
                return Err(StoreError::BadName(name.clone()));
            }
        }
        fs::create_dir_all(&self.dir).map_err(|e| RunDirError::new(&self.dir, "create directory", e))?;
        let final_dir = self.dir.join(Self::dir_name(step));
        let tmp = self.dir.join(format!(".tmp-{}-{}-{}", Self::dir_name(step), std::process::id(), nanos()));
        let result = self.write_into(&tmp, files).and_then(|total_size| {
            // A checkpoint of the same step (a resumed run retaking it) is replaced whole.
            if final_dir.exists() {
                let old = self.dir.join(format!(".tmp-old-{}-{}", Self::dir_name(step), nanos()));
                fs::rename(&final_dir, &old).map_err(|e| RunDirError::new(&final_dir, "move aside", e))?;
                let _ = fs::remove_dir_all(&old);
            }
            fs::rename(&tmp, &final_dir).map_err(|e| RunDirError::new(&final_dir, "rename into place", e))?;
            sync_dir(&self.dir)?;
            Ok(total_size)
        });
        let total_size = match result {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        self.prune()?;
        Ok(StoredCheckpoint { step, dir: final_dir, total_size })
    }

    fn write_into(&self, tmp: &Path, files: &[(String, Vec<u8>)]) -> Result<u64, StoreError> {
        fs::create_dir(tmp).map_err(|e| RunDirError::new(tmp, "create directory", e))?;
        let mut sums = String::new();
        let mut total = 0u64;
        for (name, bytes) in files {
            let path = tmp.join(name);
            write_synced(&path, bytes)?;
            sums.push_str(&format!("{}  {name}\n", sha256_hex(bytes)));
            total += bytes.len() as u64;
        }
        write_synced(&tmp.join(SUMS_FILE), sums.as_bytes())?;
        sync_dir(tmp)?;
        Ok(total)
    }

    /// Every complete checkpoint, oldest first.
    pub fn list(&self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RunDirError::new(&self.dir, "list", e).into()),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            let dir = entry.path();
            if !dir.join(SUMS_FILE).is_file() {
                continue;
            }
            let total_size = fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name() != SUMS_FILE)
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            out.push(StoredCheckpoint { step, dir, total_size });
        }
        out.sort_by_key(|c| c.step);
        Ok(out)
    }

    /// The newest checkpoint, if any.
    pub fn latest(&self) -> Result<Option<StoredCheckpoint>, StoreError> {
        Ok(self.list()?.pop())
    }

    /// Reads the checkpoint of `step`, checking every file against `SHA256SUMS`; the files come
    /// back in the order the sums list them.
    pub fn read(&self, step: u64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let dir = self.dir.join(Self::dir_name(step));
        if !dir.is_dir() {
            return Err(StoreError::Missing(step));
        }
        let corrupt = |reason: String| StoreError::Corrupt { dir: dir.clone(), reason };
        let sums_path = dir.join(SUMS_FILE);
        let sums = fs::read_to_string(&sums_path).map_err(|e| RunDirError::new(&sums_path, "read", e))?;
        let mut files = Vec::new();
        for (n, line) in sums.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let (digest, name) = line
                .split_once("  ")
                .ok_or_else(|| corrupt(format!("{SUMS_FILE} line {}: expected `<sha256>  <name>`", n + 1)))?;
            if !is_plain_file_name(name) {
                return Err(corrupt(format!("{SUMS_FILE} line {}: bad file name {name:?}", n + 1)));
            }
            let path = dir.join(name);
            let bytes = fs::read(&path).map_err(|e| RunDirError::new(&path, "read", e))?;
            let got = sha256_hex(&bytes);
            if got != digest {
                return Err(corrupt(format!("{name} has sha256 {got}, {SUMS_FILE} says {digest}")));
            }
            files.push((name.to_string(), bytes));
        }
        if files.is_empty() {
            return Err(corrupt(format!("{SUMS_FILE} lists no file")));
        }
        Ok(files)
    }

    /// Removes the oldest checkpoints beyond `keep`.
    fn prune(&self) -> Result<(), StoreError> {
        let all = self.list()?;
        if all.len() > self.keep {
            for old in &all[..all.len() - self.keep] {
                fs::remove_dir_all(&old.dir).map_err(|e| RunDirError::new(&old.dir, "remove old checkpoint", e))?;
            }
        }
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    let mut f = File::create(path).map_err(|e| RunDirError::new(path, "create", e))?;
    f.write_all(bytes).map_err(|e| RunDirError::new(path, "write", e))?;
    f.sync_all().map_err(|e| RunDirError::new(path, "fsync", e))
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(tag: u8) -> Vec<(String, Vec<u8>)> {
        vec![("a.safetensors".into(), vec![tag; 10]), ("state.json".into(), b"{}".to_vec())]
    }

    #[test]
    fn stores_atomically_with_sums_and_keeps_the_last_k() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("checkpoints"), 2);
        for step in [5u64, 10, 15] {
            let c = store.store(step, &files(step as u8)).unwrap();
            assert_eq!(c.total_size, 12);
        }
        let steps: Vec<u64> = store.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![10, 15]);
        let sums = fs::read_to_string(dir.path().join("checkpoints/step_00000015/SHA256SUMS")).unwrap();
        assert!(sums.contains("  a.safetensors\n") && sums.contains("  state.json\n"));
        assert_eq!(store.read(15).unwrap(), files(15));
        assert_eq!(store.latest().unwrap().unwrap().step, 15);
        // Re-storing a step replaces it.
        store.store(15, &files(99)).unwrap();
        assert_eq!(store.read(15).unwrap(), files(99));
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path(), 3);
        let c = store.store(1, &files(1)).unwrap();
        let path = c.dir.join("a.safetensors");
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = store.read(1).unwrap_err().to_string();
        assert!(e.contains("a.safetensors has sha256"), "{e}");
    }

    #[test]
    fn detects_corruption_and_cleans_partial_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path(), 3);
        let c = store.store(1, &files(1)).unwrap();
        fs::write(c.dir.join("a.safetensors"), b"tampered").unwrap();
        let e = store.read(1).unwrap_err().to_string();
        assert!(e.contains("a.safetensors has sha256"), "{e}");
        fs::create_dir(dir.path().join(".tmp-step_00000002-1-1")).unwrap();
        store.remove_partial().unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(matches!(store.read(7), Err(StoreError::Missing(7))));
    }

    #[test]
    fn refuses_names_that_escape() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path(), 3);
        assert!(matches!(store.store(1, &[("../x".into(), vec![])]), Err(StoreError::BadName(_))));
    }
}
