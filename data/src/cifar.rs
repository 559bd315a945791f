//! CIFAR-10, binary version: files of 3073-byte records (1 label byte, then 1024 R, 1024 G,
//! 1024 B bytes of a 32x32 image).
//!
//! The format has no header, so the only integrity checks available are the length (a whole
//! number of records) and the label byte (0-9); both are made, because a truncated download or
//! the CIFAR-100 files (2 label bytes) would otherwise load as silently shifted garbage.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::DataError;
use crate::cifar_py;
use crate::dataset::Decoded;
use crate::read::{Source, find_with_suffixes};
use crate::resize::{PixelOut, PlanarRecords, resize_planar_into};

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// A record: the label byte, then the three 32x32 planes.
const CIFAR_RECORDS: PlanarRecords = PlanarRecords { record_len: RECORD, skip: 1, nc: 3, width: SIDE, height: SIDE };
const TRAIN_BATCHES: usize = 5;
/// Where the official archives (binary and python versions) and our shared copy put the
/// batches, relative to the spec path.
const SUBDIRS: [&str; 3] = ["cifar-10-batches-bin", "cifar-10", "cifar-10-batches-py"];

/// The training batch files for a spec path: the file itself, or `data_batch_1.bin` ..
/// `data_batch_5.bin` in `path` or one of [`SUBDIRS`], or else torchvision's pickled
/// `data_batch_1` .. `data_batch_5` (no extension), each plain, `.gz` or `.xz`. Batches must be
/// consecutive from 1 so that a missing file is noticed rather than silently skipped.
pub(crate) fn locate(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(DataError::NotFound { path: path.to_path_buf(), msg: "no such file or directory".into() });
    }
    let dirs = std::iter::once(path.to_path_buf()).chain(SUBDIRS.iter().map(|s| path.join(s)));
    // The binary version's names first, then the python version's (read_records tells them
    // apart by content).
    for (dir, ext) in dirs.flat_map(|d| [(d.clone(), ".bin"), (d, "")]) {
        let found: Vec<Option<PathBuf>> =
            (1..=TRAIN_BATCHES).map(|k| find_with_suffixes(&dir, &format!("data_batch_{k}{ext}"))).collect();
        if found[0].is_none() {
            continue;
        }
        let present = found.iter().take_while(|f| f.is_some()).count();
        if let Some(later) = found[present..].iter().flatten().next() {
            return Err(DataError::NotFound {
                path: dir.clone(),
                msg: format!(
                    "data_batch_{}{ext} (plain, .gz or .xz) is missing but {} is present",
                    present + 1,
                    later.display()
                ),
            });
        }
        return Ok(found.into_iter().flatten().collect());
    }
    Err(DataError::NotFound {
        path: path.to_path_buf(),
        msg: format!(
            "no data_batch_1.bin (plain, .gz or .xz), nor torchvision's pickled data_batch_1, found here or in {}",
            SUBDIRS.join(", ")
        ),
    })
}

/// Reads up to `max_records` (default: all) records of one file and validates them. A pickled
/// batch of the python version (recognised by its first bytes) is converted to the same records.
pub(crate) fn read_records(path: &Path, max_records: Option<usize>) -> Result<Vec<u8>, DataError> {
    if cifar_py::looks_like_pickle(&Source::open(path)?.read_up_to(2)?) {
        return cifar_py::read_batch(path, max_records);
    }
    let mut src = Source::open(path)?;
    let data = match max_records {
        Some(m) => src.read_up_to(m.saturating_mul(RECORD) as u64)?,
        None => src.read_all()?,
    };
    let partial = data.len() % RECORD;
    if partial != 0 {
        let k = data.len() / RECORD;
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!(
                "record {k} (1 label + 3072 pixel bytes; the data length {} is not a multiple of {RECORD})",
                data.len()
            ),
            offset: (k * RECORD) as u64,
            needed: RECORD as u64,
            available: partial as u64,
        });
    }
    if let Some((k, rec)) = data.chunks_exact(RECORD).enumerate().find(|(_, r)| r[0] > 9) {
        return Err(DataError::Malformed {
            path: path.to_path_buf(),
            offset: (k * RECORD) as u64,
            msg: format!(
                "record {k}: label byte {} is not a CIFAR-10 class 0-9 (is this the CIFAR-10 binary version?)",
                rec[0]
            ),
        });
    }
    Ok(data)
}

/// Loads the CIFAR-10 training set: 3 channels, resized and centre-cropped to `image_size`.
pub(crate) fn load<T: PixelOut>(path: &Path, image_size: usize, limit: Option<usize>) -> Result<Decoded<T>, DataError> {
    let files = locate(path)?;
    let chunks: Vec<Vec<u8>> = match limit {
        // Read only as far as needed: a quick run should not decompress 150 MB.
        Some(limit) => {
            let mut chunks = Vec::new();
            let mut left = limit;
            for f in &files {
                if left == 0 {
                    break;
                }
                let data = read_records(f, Some(left))?;
                left -= data.len() / RECORD;
                chunks.push(data);
            }
            chunks
        }
        // xz decompression dominates loading: one file per thread.
        None => {
            files.par_iter().map(|f| read_records(f, None)).collect::<Vec<_>>().into_iter().collect::<Result<_, _>>()?
        }
    };
    let len: usize = chunks.iter().map(|c| c.len() / RECORD).sum();
    if len == 0 && limit != Some(0) {
        return Err(DataError::NotFound {
            path: path.to_path_buf(),
            msg: "the CIFAR-10 batch files hold no records".into(),
        });
    }
    let sample = 3 * image_size * image_size;
    let mut pixels = vec![T::default(); len * sample];
    let mut labels = Vec::with_capacity(len);
    let mut rest = pixels.as_mut_slice();
    for chunk in &chunks {
        let (head, tail) = rest.split_at_mut(chunk.len() / RECORD * sample);
        resize_planar_into(chunk, CIFAR_RECORDS, image_size, head);
        labels.extend(chunk.chunks_exact(RECORD).map(|r| r[0]));
        rest = tail;
    }
    Ok(Decoded { name: "cifar10".into(), nc: 3, image_size, len, pixels, labels: Some(labels) })
}
