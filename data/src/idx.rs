//! MNIST and Fashion-MNIST: IDX files (big-endian header, then raw bytes).
//!
//! Both data sets ship as `train-images-idx3-ubyte` (+ `train-labels-idx1-ubyte`), usually
//! gzip'ed. The header is checked field by field because a wrong or half-downloaded file is the
//! common failure, and training on garbage would only show up hours later as bad samples.
//! Any other IDX image file (e.g. `orl-faces-images-idx3-ubyte.gz`) loads the same way.

use std::path::{Path, PathBuf};

use crate::DataError;
use crate::dataset::Decoded;
use crate::read::{Source, find_with_suffixes, strip_compressed_suffix};
use crate::resize::{PixelOut, PlanarRecords, resize_planar_into};

/// `0x00000803`: unsigned bytes, 3 dimensions.
pub(crate) const IMAGES_MAGIC: u32 = 2051;
/// `0x00000801`: unsigned bytes, 1 dimension.
pub(crate) const LABELS_MAGIC: u32 = 2049;

/// File names of the training images, preferred first (the second is how some mirrors
/// spell it); each may also end in `.gz` or `.xz`.
const TRAIN_IMAGES: [&str; 2] = ["train-images-idx3-ubyte", "train-images.idx3-ubyte"];

/// The images of an IDX file, as far as they were read.
#[derive(Debug)]
pub(crate) struct IdxImages {
    /// How many images the header declares.
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// The first `min(count, limit)` images, `rows * cols` bytes each.
    pub data: Vec<u8>,
}

/// The labels of an IDX file, as far as they were read.
#[derive(Debug)]
pub(crate) struct IdxLabels {
    pub count: usize,
    pub data: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a `len`-byte header whose first word must be `magic`.
fn read_header(
    src: &mut Source,
    path: &Path,
    len: usize,
    magic: u32,
    what: &'static str,
) -> Result<Vec<u8>, DataError> {
    let header = src.read_up_to(len as u64)?;
    if header.len() >= 4 && be32(&header, 0) != magic {
        return Err(DataError::BadMagic { path: path.to_path_buf(), expected: magic, found: be32(&header, 0), what });
    }
    if header.len() < len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("{what} header"),
            offset: 0,
            needed: len as u64,
            available: header.len() as u64,
        });
    }
    Ok(header)
}

/// Reads `keep` records of `record` bytes after a header of `header` bytes, or says which
/// record is cut short.
fn read_records(
    src: &mut Source,
    path: &Path,
    header: u64,
    record: u64,
    keep: usize,
    count: usize,
    what: &str,
) -> Result<Vec<u8>, DataError> {
    let need = keep as u64 * record;
    let data = src.read_up_to(need)?;
    let got = data.len() as u64;
    if got < need {
        let k = got / record;
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("{what} record {k} of {count}"),
            offset: header + k * record,
            needed: record,
            available: got - k * record,
        });
    }
    Ok(data)
}

/// Reads the header and the first `limit` (default: all) images of an IDX images file.
pub(crate) fn read_images(path: &Path, limit: Option<usize>) -> Result<IdxImages, DataError> {
    let mut src = Source::open(path)?;
    let h = read_header(&mut src, path, 16, IMAGES_MAGIC, "IDX images (idx3-ubyte)")?;
    let (count, rows, cols) = (be32(&h, 4) as usize, be32(&h, 8) as usize, be32(&h, 12) as usize);
    // Bounding the sides keeps every size computed below far from overflow.
    if rows == 0 || cols == 0 || rows > 65_535 || cols > 65_535 {
        return Err(DataError::Malformed {
            path: path.to_path_buf(),
            offset: 8,
            msg: format!("implausible image dimensions {rows}x{cols} (each must be 1..=65535)"),
        });
    }
    let keep = limit.map_or(count, |l| l.min(count));
    let data = read_records(&mut src, path, 16, (rows * cols) as u64, keep, count, "image")?;
    Ok(IdxImages { count, rows, cols, data })
}

/// Reads the header and the first `limit` (default: all) labels of an IDX labels file.
pub(crate) fn read_labels(path: &Path, limit: Option<usize>) -> Result<IdxLabels, DataError> {
    let mut src = Source::open(path)?;
    let h = read_header(&mut src, path, 8, LABELS_MAGIC, "IDX labels (idx1-ubyte)")?;
    let count = be32(&h, 4) as usize;
    let keep = limit.map_or(count, |l| l.min(count));
    let data = read_records(&mut src, path, 8, 1, keep, count, "label")?;
    Ok(IdxLabels { count, data })
}

/// The labels file that belongs to an images file: same directory, `images-idx3` replaced by
/// `labels-idx1`, plain or compressed.
fn labels_for(images: &Path) -> Option<PathBuf> {
    let name = strip_compressed_suffix(images.file_name()?.to_str()?);
    let labels = [("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")]
        .iter()
        .find(|(from, _)| name.contains(from))
        .map(|(from, to)| name.replacen(from, to, 1))?;
    find_with_suffixes(images.parent().unwrap_or(Path::new("")), &labels)
}

/// Finds the training images (and labels, if present) for a spec path: the file itself, or
/// in `path` or one of `subdirs` a `train-images-idx3-ubyte[.gz|.xz]`, or failing that the one
/// `*images-idx3-ubyte*` file that is not a `t10k` test file.
pub(crate) fn locate(path: &Path, subdirs: &[&str]) -> Result<(PathBuf, Option<PathBuf>), DataError> {
    if path.is_file() {
        return Ok((path.to_path_buf(), labels_for(path)));
    }
    if !path.is_dir() {
        return Err(DataError::NotFound { path: path.to_path_buf(), msg: "no such file or directory".into() });
    }
    for dir in std::iter::once(path.to_path_buf()).chain(subdirs.iter().map(|s| path.join(s))) {
        if !dir.is_dir() {
            continue;
        }
        if let Some(p) = TRAIN_IMAGES.iter().find_map(|n| find_with_suffixes(&dir, n)) {
            let labels = labels_for(&p);
            return Ok((p, labels));
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, "list directory", e))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(&dir, "list directory", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_images = name.contains("images-idx3-ubyte") || name.contains("images.idx3-ubyte");
            if is_images && !name.starts_with("t10k") && entry.path().is_file() {
                found.push(entry.path());
            }
        }
        found.sort();
        match found.len() {
            0 => {}
            1 => {
                let p = found.remove(0);
                let labels = labels_for(&p);
                return Ok((p, labels));
            }
            _ => {
                let names: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
                return Err(DataError::NotFound {
                    path: dir,
                    msg: format!("several IDX image files ({}); point the spec at one of them", names.join(", ")),
                });
            }
        }
    }
    let also =
        if subdirs.is_empty() { String::new() } else { format!(" or in its subdirectories {}", subdirs.join(", ")) };
    Err(DataError::NotFound {
        path: path.to_path_buf(),
        msg: format!("no train-images-idx3-ubyte (plain, .gz or .xz) found here{also}"),
    })
}

/// Loads an MNIST-like IDX data set as `name`: 1 channel, resized and centre-cropped to
/// `image_size`, labels if a labels file sits beside the images.
pub(crate) fn load<T: PixelOut>(
    name: &str,
    path: &Path,
    subdirs: &[&str],
    image_size: usize,
    limit: Option<usize>,
) -> Result<Decoded<T>, DataError> {
    let (images_path, labels_path) = locate(path, subdirs)?;
    let images = read_images(&images_path, limit)?;
    let len = images.data.len() / (images.rows * images.cols);
    let labels = match labels_path {
        Some(p) => {
            let labels = read_labels(&p, limit)?;
            if labels.count != images.count {
                return Err(DataError::Malformed {
                    path: p,
                    offset: 4,
                    msg: format!(
                        "declares {} labels but {} declares {} images",
                        labels.count,
                        images_path.display(),
                        images.count
                    ),
                });
            }
            Some(labels.data)
        }
        None => None,
    };
    let mut pixels = vec![T::default(); len * image_size * image_size];
    let records = PlanarRecords {
        record_len: images.rows * images.cols,
        skip: 0,
        nc: 1,
        width: images.cols,
        height: images.rows,
    };
    resize_planar_into(&images.data, records, image_size, &mut pixels);
    Ok(Decoded { name: name.to_string(), nc: 1, image_size, len, pixels, labels })
}
