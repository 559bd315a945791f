//! The run directory's layout, and the one way files are written into it: atomically.
//!
//! Everything a user keeps from a run lives under one directory: `run.json`, `metrics.jsonl`,
//! `samples/`, `checkpoints/`, `logs/` (one log per launched worker) and `coordinator.addr`
//! (the address the server bound, for scripts and tests that start it on port 0).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a file of the run directory could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {op}: {source}", .path.display())]
pub struct RunDirError {
    pub path: PathBuf,
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl RunDirError {
    pub fn new(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Self { path: path.into(), op, source }
    }
}

/// Paths inside one run directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn run_json(&self) -> PathBuf {
        self.root.join("run.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// One line per FID evaluation (`--eval-every`).
    pub fn evals(&self) -> PathBuf {
        self.root.join("evals.jsonl")
    }
    /// The FID classifier's default cache.
    pub fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn address_file(&self) -> PathBuf {
        self.root.join("coordinator.addr")
    }
    pub fn worker_log(&self, rank: usize) -> PathBuf {
        self.logs().join(format!("worker-{rank}.log"))
    }

    /// Creates the directory and its sub-directories.
    /// Whether the directory exists or can be made, checked without writing anything, so that
    /// a run directory that is a file (or sits under one) is refused before the data loads.
    pub fn check_can_create(&self) -> Result<(), RunDirError> {
        let not_a_dir = |path: &Path, what: &str| {
            let e = std::io::Error::new(std::io::ErrorKind::NotADirectory, what.to_string());
            RunDirError::new(path, "use it as the run directory", e)
        };
        for (i, path) in self.root.ancestors().filter(|p| !p.as_os_str().is_empty()).enumerate() {
            match fs::metadata(path) {
                Ok(m) if m.is_dir() => return Ok(()),
                Ok(_) if i == 0 => return Err(not_a_dir(path, "it is a file, not a directory")),
                Ok(_) => {
                    let why = format!("it is a file, so {} cannot be created in it", self.root.display());
                    return Err(not_a_dir(path, &why));
                }
                // Not there, or under a file (ENOTDIR): the ancestors say which.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                    continue;
                }
                Err(e) => return Err(RunDirError::new(path, "read it", e)),
            }
        }
        Ok(())
    }

    pub fn create(&self) -> Result<(), RunDirError> {
        for d in [self.root.clone(), self.samples(), self.checkpoints(), self.logs()] {
            fs::create_dir_all(&d).map_err(|e| RunDirError::new(&d, "create directory", e))?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a part:
/// a temporary file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    write_atomic_via(path, bytes, &format!(".{name}.tmp-{}", std::process::id()))
}

/// [`write_atomic`] through a temporary file named `tmp_name` (in `path`'s directory), for
/// readers that must never see the temporary file (TensorBoard reads any `*tfevents*`).
pub fn write_atomic_via(path: &Path, bytes: &[u8], tmp_name: &str) -> Result<(), RunDirError> {
    let dir = parent_dir(path);
    let tmp = dir.join(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(RunDirError::new(&tmp, "write", e));
    }
    fs::rename(&tmp, path).map_err(|e| RunDirError::new(path, "rename into place", e))?;
    sync_dir(dir)
}

/// fsyncs a directory so that a rename inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), RunDirError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| RunDirError::new(dir, "fsync directory", e))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Now as UTC `YYYYMMDD-HHMMSS`, for default run directory names and run ids.
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_directory_that_is_a_file_is_refused_without_writing() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(RunDir::new(tmp.path().join("new/deeper")).check_can_create().is_ok());
        assert!(RunDir::new(tmp.path()).check_can_create().is_ok());
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = RunDir::new(&file).check_can_create().unwrap_err().to_string();
        assert!(e.ends_with("file: cannot use it as the run directory: it is a file, not a directory"), "{e}");
        let e = RunDir::new(file.join("run")).check_can_create().unwrap_err().to_string();
        assert!(e.contains("it is a file, so ") && e.contains("file/run cannot be created in it"), "{e}");
        assert!(!tmp.path().join("new").exists(), "nothing was written");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
