//! Where `--dataset mnist:PATH` (and every other source kind) is prepared on the fly: one
//! directory per source, size and limit under a cache root, reused by later runs while the
//! source is unchanged.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{Manifest, hex};
use super::writer::{PrepareOptions, Prepared, Progress, fingerprint, prepare_with_fingerprint};
use crate::{DataError, DatasetSpec};

/// The default cache root: `$XDG_CACHE_HOME/dcgan/prepared`, else `$HOME/.cache/dcgan/prepared`,
/// else `.dcgan-cache/prepared` in the working directory.
pub fn default_cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(b) => b.join("dcgan").join("prepared"),
        None => PathBuf::from(".dcgan-cache").join("prepared"),
    }
}

/// The cache directory for `spec` at `image_size` with `limit`: named after the kind and
/// size, keyed by the source's absolute path (so two copies of MNIST in two places do not
/// share an entry, and one copy always finds its own).
pub fn cache_dir(root: &Path, spec: &DatasetSpec, image_size: usize, limit: Option<usize>) -> PathBuf {
    let source = spec.path().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    let key = format!(
        "{}|{}|{image_size}|{}",
        spec.kind(),
        source.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
        limit.map_or_else(|| "all".to_string(), |l| l.to_string())
    );
    let digest = hex(&Sha256::digest(key.as_bytes()));
    let limit = limit.map_or_else(String::new, |l| format!("-first{l}"));
    root.join(format!("{}-{image_size}px{limit}-{}", spec.kind(), &digest[..12]))
}

/// Prepares `spec` into its cache directory unless an up-to-date preparation is there, and
/// returns the directory. A preparation whose source has changed since is replaced.
pub fn prepare_cached(
    root: &Path,
    spec: &DatasetSpec,
    image_size: usize,
    limit: Option<usize>,
    progress: &dyn Progress,
) -> Result<Prepared, DataError> {
    let dir = cache_dir(root, spec, image_size, limit);
    let source = fingerprint(spec)?;
    if let Ok(m) = Manifest::read(&dir)
        && (m.source.fingerprint != source || m.image_size as usize != image_size)
    {
        progress.note(&format!("{spec} changed since it was prepared into {}: preparing it again", dir.display()));
        std::fs::remove_dir_all(&dir).map_err(|e| DataError::io(&dir, "remove", e))?;
    }
    let opts = PrepareOptions { image_size, limit, ..PrepareOptions::default() };
    let result = prepare_with_fingerprint(spec, &source, &dir, &opts, progress);
    if result.is_err() && !dir.join(super::writer::STATE_FILE).exists() && !dir.join(super::MANIFEST_FILE).exists() {
        // Nothing was prepared (the source could not be read): leave no empty entry behind.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
