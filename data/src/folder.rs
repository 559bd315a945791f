//! A folder of PNG/JPEG/WebP images (e.g. CelebA, LSUN exports), like torchvision's `ImageFolder`
//! with the PyTorch DCGAN example's `Resize(size)`, `CenterCrop(size)`.
//!
//! Files are found recursively and sorted by path so that every process that loads the same
//! folder gets the same sample order, which the epoch sharding relies on.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::DataError;
use crate::dataset::Decoded;
use crate::encoded::{Channels, decode_into as decode_bytes_into, is_image_name};
use crate::resize::PixelOut;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, "list directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, "list directory", e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| DataError::io(&path, "stat", e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if is_image_name(&entry.file_name().to_string_lossy()) && (kind.is_file() || path.is_file()) {
            // Symlinks to files count; symlinks to directories are not followed (no loops).
            out.push(path);
        }
    }
    Ok(())
}

/// Every PNG/JPEG/WebP file under `root`, sorted by path.
pub(crate) fn list_images(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    walk(root, &mut files)?;
    files.sort();
    Ok(files)
}

/// Reads and decodes one image file, converts it to `channels` and writes its resized, cropped
/// CHW pixels to `out`; returns the image's own channel count.
pub(crate) fn decode_file_into<T: PixelOut>(
    path: &Path,
    channels: Channels,
    size: usize,
    scratch: &mut Vec<f32>,
    out: &mut [T],
) -> Result<usize, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "read", e))?;
    decode_bytes_into(&bytes, channels, size, scratch, out)
        .map_err(|e| DataError::Decode { path: path.to_path_buf(), source: e })
}

/// Checks that `root` is a directory with at least one image and lists them.
pub(crate) fn images_in(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    if !root.is_dir() {
        return Err(DataError::NotFound {
            path: root.to_path_buf(),
            msg: "not a directory (a folder dataset needs a directory of PNG/JPEG/WebP files)".into(),
        });
    }
    let files = list_images(root)?;
    if files.is_empty() {
        return Err(DataError::NoImages { path: root.to_path_buf() });
    }
    Ok(files)
}

/// Loads the first `limit` (default: all) images under `root` as a 3-channel dataset.
pub(crate) fn load<T: PixelOut>(root: &Path, image_size: usize, limit: Option<usize>) -> Result<Decoded<T>, DataError> {
    let mut files = images_in(root)?;
    if let Some(limit) = limit {
        files.truncate(limit);
    }
    let sample = 3 * image_size * image_size;
    let mut pixels = vec![T::default(); files.len() * sample];
    // Collect every result, then report the first failure in path order, so that the error
    // does not depend on thread timing.
    let results: Vec<Result<usize, DataError>> = pixels
        .par_chunks_mut(sample)
        .zip(files.par_iter())
        .map_init(Vec::new, |scratch, (out, path)| decode_file_into(path, Channels::Rgb, image_size, scratch, out))
        .collect();
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Decoded { name: "folder".into(), nc: 3, image_size, len: files.len(), pixels, labels: None })
}
