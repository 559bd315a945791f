//! `prepare`: a source's images to packed `u8` shards and a manifest, resumably.
//!
//! Shard `k` holds what source images `k * per_shard ..` decode to, so the work is cut the
//! same way every time. Each finished shard is written atomically and recorded in
//! `prepare-state.json`; a killed preparation started again with the same options skips the
//! recorded shards and goes on. `manifest.json` is written last: its presence means complete.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::{FORMAT, MANIFEST_FILE, Manifest, ShardEntry, SourceInfo, VERSION, hex, write_atomic};
use super::stream::{ChannelMode, ImageStream, Skipped};
use crate::encoded::Channels;
use crate::{DataError, DatasetSpec};

/// The journal of an unfinished preparation.
pub const STATE_FILE: &str = "prepare-state.json";
/// The list of images that were left out, one `name<TAB>reason` per line.
pub const SKIPPED_FILE: &str = "skipped.txt";
/// Bytes a shard holds at most (the last one of a set fewer).
const DEFAULT_SHARD_BYTES: usize = 128 << 20;

/// What to do with an image that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadImage {
    /// Leave it out and name it in `skipped.txt` (a web-scraped set always has a few).
    #[default]
    Skip,
    /// Stop with an error naming it.
    Fail,
}

/// How to prepare a source.
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Height and width of every sample (`Resize` + `CenterCrop`).
    pub image_size: usize,
    /// Channels of encoded images; `None`: the source's own (RGB for encoded images).
    pub channels: Option<ChannelMode>,
    /// Read only the first N source images.
    pub limit: Option<usize>,
    /// Source images per shard; `None`: as many as fill about 128 MiB.
    pub shard_images: Option<usize>,
    pub on_bad_image: OnBadImage,
}

/// Where `prepare` reports how far it is.
pub trait Progress: Sync {
    /// The number of source images, when known, and how many a resumed run already did.
    fn begin(&self, total: Option<u64>, done: u64);
    /// `images` more source images were read.
    fn advance(&self, images: u64);
    /// A line for the person waiting.
    fn note(&self, _msg: &str) {}
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&self, _: Option<u64>, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Images left out (also in `skipped.txt`).
    pub skipped: Vec<Skipped>,
    /// Shards a previous, interrupted run had finished.
    pub resumed_shards: usize,
    /// The directory already held this preparation, complete: nothing was done.
    pub already_complete: bool,
}

/// The options a preparation is continued with only if they are the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Params {
    spec: String,
    image_size: u64,
    channels: String,
    limit: Option<u64>,
    shard_images: u64,
    fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    params: Params,
    /// Channels of the samples once known (auto mode decides at the first image).
    channels: Option<u32>,
    shards: Vec<ShardEntry>,
    /// Source images the finished shards cover.
    items: u64,
    skipped: Vec<Skipped>,
    /// False once an image without a label was kept.
    labelled: bool,
}

/// Prepares `spec` into the directory `out` (created if needed).
pub fn prepare(
    spec: &DatasetSpec,
    out: &Path,
    opts: &PrepareOptions,
    progress: &dyn Progress,
) -> Result<Prepared, DataError> {
    prepare_with_fingerprint(spec, &fingerprint(spec)?, out, opts, progress)
}

/// [`prepare`] with the source's [`fingerprint`] already taken (the cache takes it to decide
/// whether its entry is stale; walking a large folder twice would double the start-up).
pub(crate) fn prepare_with_fingerprint(
    spec: &DatasetSpec,
    fingerprint: &str,
    out: &Path,
    opts: &PrepareOptions,
    progress: &dyn Progress,
) -> Result<Prepared, DataError> {
    if opts.image_size == 0 {
        return Err(DataError::InvalidArgument {
            path: out.to_path_buf(),
            msg: "image size must be at least 1".into(),
        });
    }
    if out.exists() && !out.is_dir() {
        return Err(DataError::InvalidArgument {
            path: out.to_path_buf(),
            msg: "exists and is not a directory: choose another output directory".into(),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, "create directory", e))?;
    let _lock = DirLock::acquire(out, progress)?;

    if out.join(MANIFEST_FILE).exists() {
        let manifest = Manifest::read(out)?;
        let same = manifest.source.spec == spec.to_string()
            && manifest.image_size as usize == opts.image_size
            && manifest.source.fingerprint == fingerprint;
        if !same {
            return Err(DataError::InvalidArgument {
                path: out.to_path_buf(),
                msg: format!(
                    "already holds a prepared set of {} at {}x{}: choose another output directory",
                    manifest.source.spec, manifest.image_size, manifest.image_size
                ),
            });
        }
        let skipped = read_skipped(out)?;
        return Ok(Prepared { dir: out.to_path_buf(), manifest, skipped, resumed_shards: 0, already_complete: true });
    }

    let mut stream = ImageStream::open(spec, opts.image_size, opts.channels, opts.limit)?;
    let shard_images = opts.shard_images.unwrap_or_else(|| {
        let nc = stream.channels().map_or(3, Channels::count);
        (DEFAULT_SHARD_BYTES / (nc * opts.image_size * opts.image_size)).max(1)
    });
    let params = Params {
        spec: spec.to_string(),
        image_size: opts.image_size as u64,
        channels: opts.channels.map_or_else(|| "source".to_string(), |c| c.to_string()),
        limit: opts.limit.map(|l| l as u64),
        shard_images: shard_images as u64,
        fingerprint: fingerprint.to_string(),
    };
    let state_path = out.join(STATE_FILE);
    let mut state = match read_state(&state_path)? {
        Some(s) if s.params == params => s,
        Some(s) => {
            return Err(DataError::InvalidArgument {
                path: out.to_path_buf(),
                msg: format!(
                    "holds an unfinished preparation of {} at {}x{} with other options (or its source changed): \
                     run the same command again to continue it, or remove the directory to start over",
                    s.params.spec, s.params.image_size, s.params.image_size
                ),
            });
        }
        None => State { params, channels: None, shards: Vec::new(), items: 0, skipped: Vec::new(), labelled: true },
    };
    let resumed_shards = state.shards.len();
    if resumed_shards > 0 {
        progress.note(&format!("continuing an interrupted preparation after {resumed_shards} finished shard(s)"));
        stream.skip(state.items as usize)?;
        if let Some(nc) = state.channels.and_then(|c| Channels::for_count(c as usize)) {
            stream.set_channels(nc);
        }
    }
    progress.begin(stream.total().map(|t| t as u64), state.items);

    loop {
        let batch = stream.next_batch(shard_images)?;
        if batch.read == 0 {
            break;
        }
        if let Some(s) = batch.skipped.first().filter(|_| opts.on_bad_image == OnBadImage::Fail) {
            return Err(DataError::BadImage { name: s.name.clone(), reason: s.reason.clone() });
        }
        let index = state.shards.len();
        let file = format!("shard-{index:06}.u8");
        let sha256 = write_file(&out.join(&file), &batch.pixels)?;
        let labelled = state.labelled && stream.may_have_labels() && batch.labels.len() == batch.kept;
        let (labels_file, labels_sha256) = if labelled {
            let name = format!("shard-{index:06}.labels");
            let sha = write_file(&out.join(&name), &batch.labels)?;
            (Some(name), Some(sha))
        } else {
            (None, None)
        };
        state.labelled = labelled;
        state.channels = stream.channels().map(|c| c.count() as u32);
        state.shards.push(ShardEntry { file, count: batch.kept as u64, sha256, labels_file, labels_sha256 });
        state.items += batch.read as u64;
        state.skipped.extend(batch.skipped);
        write_state(&state_path, &state)?;
        progress.advance(batch.read as u64);
    }

    let count: u64 = state.shards.iter().map(|s| s.count).sum();
    let Some(channels) = state.channels.filter(|_| count > 0) else {
        return Err(DataError::NoImages { path: spec.path().map(PathBuf::from).unwrap_or_else(|| out.to_path_buf()) });
    };
    if !state.labelled {
        // A later shard had an unlabelled image: the set as a whole has no labels.
        for s in &mut state.shards {
            if let Some(name) = s.labels_file.take() {
                let _ = std::fs::remove_file(out.join(name));
            }
            s.labels_sha256 = None;
        }
    }
    let skipped_text: String = state.skipped.iter().map(|s| format!("{}\t{}\n", s.name, s.reason)).collect();
    write_atomic(&out.join(SKIPPED_FILE), skipped_text.as_bytes())?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        count,
        channels,
        image_size: opts.image_size as u32,
        labels: state.labelled,
        source: SourceInfo {
            spec: spec.to_string(),
            kind: spec.kind().into(),
            fingerprint: fingerprint.to_string(),
            items: state.items,
            skipped: state.skipped.len() as u64,
        },
        shards: state.shards,
        tool: format!("dcgan {}", env!("CARGO_PKG_VERSION")),
    };
    manifest.write(out)?;
    let _ = std::fs::remove_file(&state_path);
    Ok(Prepared { dir: out.to_path_buf(), manifest, skipped: state.skipped, resumed_shards, already_complete: false })
}

/// Writes `bytes` atomically and returns their sha256.
fn write_file(path: &Path, bytes: &[u8]) -> Result<String, DataError> {
    let sha = hex(&Sha256::digest(bytes));
    write_atomic(path, bytes)?;
    Ok(sha)
}

fn read_state(path: &Path) -> Result<Option<State>, DataError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| DataError::Malformed {
            path: path.to_path_buf(),
            offset: 0,
            msg: format!("not a preparation journal ({e}); remove the directory to start over"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataError::io(path, "read", e)),
    }
}

fn write_state(path: &Path, state: &State) -> Result<(), DataError> {
    let text = serde_json::to_string(state)
        .map_err(|e| DataError::InvalidArgument { path: path.to_path_buf(), msg: format!("cannot encode: {e}") })?;
    write_atomic(path, text.as_bytes())
}

fn read_skipped(dir: &Path) -> Result<Vec<Skipped>, DataError> {
    let path = dir.join(SKIPPED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DataError::io(&path, "read", e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, r)| Skipped { name: n.to_string(), reason: r.to_string() })
        .collect())
}

/// A digest of the names, sizes and modification times of every file under the source path
/// (LMDB's `lock.mdb` aside, which readers touch): cheap next to decoding, and it changes
/// when the source does.
pub(crate) fn fingerprint(spec: &DatasetSpec) -> Result<String, DataError> {
    let Some(root) = spec.path() else {
        return Ok(String::new());
    };
    let mut files = Vec::new();
    collect_files(root, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for path in &files {
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, "stat", e))?;
        let mtime =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let rel = path.strip_prefix(root).unwrap_or(path);
        h.update(format!("{}\t{}\t{mtime}\n", rel.display(), meta.len()));
    }
    Ok(hex(&h.finalize()))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            DataError::NotFound { path: path.to_path_buf(), msg: "no such file or directory".into() }
        }
        _ => DataError::io(path, "stat", e),
    })?;
    if meta.is_file() {
        if path.file_name().is_none_or(|n| n != "lock.mdb") {
            out.push(path.to_path_buf());
        }
        return Ok(());
    }
    let entries = std::fs::read_dir(path).map_err(|e| DataError::io(path, "list directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(path, "list directory", e))?;
        let kind = entry.file_type().map_err(|e| DataError::io(entry.path(), "stat", e))?;
        if kind.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if entry.file_name() != "lock.mdb" {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// An exclusive lock on a directory being prepared, so that two processes (two coordinators
/// sharing a cache) never write the same shards; the second waits for the first.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path, progress: &dyn Progress) -> Result<DirLock, DataError> {
        use std::os::fd::AsRawFd;
        let path = dir.join(".lock");
        let file = File::create(&path).map_err(|e| DataError::io(&path, "create", e))?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            progress.note(&format!("waiting for another process preparing {}", dir.display()));
            // SAFETY: as above.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(DataError::io(&path, "lock", std::io::Error::last_os_error()));
            }
        }
        Ok(DirLock { _file: file })
    }
}
