//! A folder of PNG/JPEG images (e.g. CelebA, LSUN exports), like torchvision's `ImageFolder`
//! with the PyTorch DCGAN example's `Resize(size)`, `CenterCrop(size)`.
//!
//! Files are found recursively and sorted by path so that every process that loads the same
//! folder gets the same sample order, which the epoch sharding relies on.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::resize::ResizeCrop;
use crate::{DataError, Dataset};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_image_name(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, "list directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, "list directory", e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| DataError::io(&path, "stat", e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if is_image_name(&path) && (kind.is_file() || path.is_file()) {
            // Symlinks to files count; symlinks to directories are not followed (no loops).
            out.push(path);
        }
    }
    Ok(())
}

/// Every PNG/JPEG file under `root`, sorted by path.
pub(crate) fn list_images(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    walk(root, &mut files)?;
    files.sort();
    Ok(files)
}

/// Decodes one image, converts it to RGB and writes its resized, cropped CHW pixels to `out`.
fn decode_into(path: &Path, size: usize, scratch: &mut Vec<f32>, out: &mut [f32]) -> Result<(), DataError> {
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, "open", e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, "read", e))?
        .decode()
        .map_err(|e| DataError::Decode { path: path.to_path_buf(), source: e })?;
    // Like PIL's convert("RGB"): gray is replicated, alpha dropped.
    let rgb = img.to_rgb8();
    let plan = ResizeCrop::new(rgb.width() as usize, rgb.height() as usize, size);
    let raw = rgb.as_raw();
    for (c, plane) in out.chunks_exact_mut(size * size).enumerate() {
        plan.run(&raw[c..], 3, scratch, plane);
    }
    Ok(())
}

/// Loads the first `limit` (default: all) images under `root` as a 3-channel dataset.
pub(crate) fn load(root: &Path, image_size: usize, limit: Option<usize>) -> Result<Dataset, DataError> {
    if !root.is_dir() {
        return Err(DataError::NotFound {
            path: root.to_path_buf(),
            msg: "not a directory (a folder dataset needs a directory of PNG/JPEG files)".into(),
        });
    }
    let mut files = list_images(root)?;
    if files.is_empty() {
        return Err(DataError::NoImages { path: root.to_path_buf() });
    }
    if let Some(limit) = limit {
        files.truncate(limit);
    }
    let sample = 3 * image_size * image_size;
    let mut pixels = vec![0.0f32; files.len() * sample];
    // Collect every result, then report the first failure in path order, so that the error
    // does not depend on thread timing.
    let results: Vec<Result<(), DataError>> = pixels
        .par_chunks_mut(sample)
        .zip(files.par_iter())
        .map_init(Vec::new, |scratch, (out, path)| decode_into(path, image_size, scratch, out))
        .collect();
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(Dataset { name: "folder".into(), nc: 3, image_size, len: files.len(), pixels, labels: None })
}
