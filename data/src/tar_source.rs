//! Images in a tar file (`.tar`, or gzip/xz-compressed: `.tar.gz`, `.tgz`, `.tar.xz`), read as
//! a stream in archive order, with the WebDataset convention for labels.
//!
//! WebDataset shards are plain tars whose members are grouped into samples by key: the member
//! path up to the first `.` of its file name (`train/000123.jpg` and `train/000123.cls` are one
//! sample). The members of a sample are adjacent, in any order, so an image's `.cls` label may
//! come before or after it; a sample is therefore held until the next key starts. Other
//! members (`.json`, `.txt`, directories) are skipped, as are hidden files (`._x.jpg` from
//! macOS), which have no key in WebDataset either.
//!
//! Shards are tens of gigabytes, so the archive is never held in memory: a reader thread owns
//! the `tar` crate's archive (whose entry iterator borrows it, which an iterator struct could
//! not hold) and hands images over through a small bounded queue, which also overlaps
//! decompression with the caller's decoding.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::DataError;
use crate::encoded::is_image_name;

/// Largest image member read; anything bigger is a corrupt size field or not a training image.
const MAX_IMAGE: u64 = 256 << 20;
/// Largest `.cls` member read (a label is a few digits).
const MAX_LABEL: u64 = 1024;
/// Bytes of images one sample may hold while waiting for a label that comes after them.
const MAX_SAMPLE: usize = 1 << 30;
/// Images read ahead of the consumer.
const QUEUE: usize = 8;

/// One image member of the archive.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TarImage {
    /// The member's path in the archive.
    pub name: String,
    /// The encoded image, as stored.
    pub bytes: Vec<u8>,
    /// The sample's `.cls` label, if it has one.
    pub label: Option<u8>,
}

enum Msg {
    Item(Result<TarImage, DataError>),
    End,
}

/// The image members of a tar file, in archive order. After an error the iteration ends.
pub(crate) struct TarImages {
    path: PathBuf,
    rx: Receiver<Msg>,
    done: bool,
}

impl TarImages {
    /// Opens the tar file at `path` (compression recognised by its first bytes) and starts
    /// reading it in the background.
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        let reader = crate::read::Source::open(path)?.into_reader();
        let (tx, rx) = sync_channel(QUEUE);
        let owned = path.to_path_buf();
        std::thread::Builder::new()
            .name("tar-images".into())
            .spawn(move || {
                // Send errors mean the consumer dropped the iterator: just stop.
                match read_archive(&owned, reader, &tx) {
                    Ok(true) => drop(tx.send(Msg::End)),
                    Ok(false) => {}
                    Err(e) => drop(tx.send(Msg::Item(Err(e)))),
                }
            })
            .map_err(|e| DataError::io(path, "start a reader thread for", e))?;
        Ok(TarImages { path: path.to_path_buf(), rx, done: false })
    }
}

impl Iterator for TarImages {
    type Item = Result<TarImage, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match self.rx.recv() {
            Ok(Msg::Item(item)) => item,
            Ok(Msg::End) => {
                self.done = true;
                return None;
            }
            // Without End the archive was not read to its end: never pass that off as complete.
            Err(_) => Err(DataError::io(
                &self.path,
                "read",
                std::io::Error::other("the tar reader thread stopped before the end of the archive"),
            )),
        };
        self.done = item.is_err();
        Some(item)
    }
}

/// The WebDataset key of a member path (the path up to the first `.` of its file name) and
/// the rest of the name, its extension; `None` for names without one or hidden files.
fn split_key(name: &str) -> Option<(&str, &str)> {
    let base_at = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_at..].find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&name[..base_at + dot], &name[base_at + dot + 1..]))
}

/// The images of one sample, held until its key ends.
#[derive(Default)]
struct Sample {
    key: String,
    images: Vec<(String, Vec<u8>)>,
    bytes: usize,
    label: Option<u8>,
}

impl Sample {
    /// Sends the images; false when the consumer is gone.
    fn flush(&mut self, tx: &SyncSender<Msg>) -> bool {
        let label = self.label.take();
        self.bytes = 0;
        self.images.drain(..).all(|(name, bytes)| tx.send(Msg::Item(Ok(TarImage { name, bytes, label }))).is_ok())
    }
}

/// Reads the archive and sends its images; `Ok(false)` when the consumer went away first.
fn read_archive(path: &Path, reader: Box<dyn Read + Send>, tx: &SyncSender<Msg>) -> Result<bool, DataError> {
    let mut archive = tar::Archive::new(reader);
    // Where the next member header is expected, and the member before it, for errors.
    let mut next_header = 0u64;
    let mut previous: Option<String> = None;
    let header_error = |previous: &Option<String>, offset: u64, e: std::io::Error| DataError::Malformed {
        path: path.to_path_buf(),
        offset,
        msg: match previous {
            Some(p) => format!("cannot read the member header after member {p}: {e}"),
            None => format!("cannot read the first member header: {e}"),
        },
    };
    let entries = archive.entries().map_err(|e| header_error(&None, 0, e))?;
    let mut sample = Sample::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| header_error(&previous, next_header, e))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let size = entry.size();
        let data_at = entry.raw_file_position();
        next_header = data_at.saturating_add(size.div_ceil(512) * 512);
        let kind = entry.header().entry_type();
        let keyed = split_key(&name).filter(|_| kind.is_file() || kind == tar::EntryType::Continuous);
        let Some((key, ext)) = keyed else {
            previous = Some(name);
            continue;
        };
        if key != sample.key {
            if !sample.flush(tx) {
                return Ok(false);
            }
            sample.key = key.to_owned();
        }
        let is_label = ext.eq_ignore_ascii_case("cls");
        let is_image = is_image_name(&name);
        if is_label || is_image {
            let limit = if is_label { MAX_LABEL } else { MAX_IMAGE };
            if size > limit {
                return Err(DataError::Malformed {
                    path: path.to_path_buf(),
                    offset: data_at,
                    msg: format!("member {name} is {size} bytes, more than the {limit} bytes allowed for its kind"),
                });
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(|e| DataError::Malformed {
                path: path.to_path_buf(),
                offset: data_at,
                msg: format!("cannot read member {name}: {e}"),
            })?;
            if (bytes.len() as u64) < size {
                return Err(DataError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("member {name}"),
                    offset: data_at,
                    needed: size,
                    available: bytes.len() as u64,
                });
            }
            if is_label {
                let text = String::from_utf8_lossy(&bytes);
                let label = text.trim().parse::<u8>().map_err(|_| DataError::Malformed {
                    path: path.to_path_buf(),
                    offset: data_at,
                    msg: format!("member {name}: label '{}' is not an integer 0-255", text.trim().escape_debug()),
                })?;
                sample.label = Some(label);
            } else {
                sample.bytes += bytes.len();
                if sample.bytes > MAX_SAMPLE {
                    return Err(DataError::Malformed {
                        path: path.to_path_buf(),
                        offset: data_at,
                        msg: format!(
                            "member {name}: the images of sample '{key}' exceed {MAX_SAMPLE} bytes \
                             (a WebDataset sample is an image and its label)"
                        ),
                    });
                }
                sample.images.push((name.clone(), bytes));
            }
        }
        previous = Some(name);
    }
    Ok(sample.flush(tx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
        out
    }

    fn image(k: u32) -> image::RgbImage {
        image::RgbImage::from_fn(6 + k, 5, |x, y| image::Rgb([(x * 40 + k) as u8, (y * 50) as u8, (k * 60) as u8]))
    }

    fn add(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    }

    /// A shard with labels before and after images, a directory, skipped members and every
    /// image format; returns it and the (name, label) of its images in order.
    fn shard() -> (Vec<u8>, Vec<(&'static str, Option<u8>)>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_size(0);
        dir.set_mode(0o755);
        b.append_data(&mut dir, "train/", std::io::empty()).unwrap();
        add(&mut b, "train/000.png", &encode(&image(0), image::ImageFormat::Png));
        add(&mut b, "train/000.cls", b"3\n");
        add(&mut b, "train/001.cls", b" 7 ");
        add(&mut b, "train/001.json", b"{}");
        add(&mut b, "train/001.jpg", &encode(&image(1), image::ImageFormat::Jpeg));
        add(&mut b, "train/002.webp", &encode(&image(2), image::ImageFormat::WebP));
        add(&mut b, "train/003.txt", b"no image");
        add(&mut b, "train/._004.png", b"macOS metadata");
        add(&mut b, "train/004.seg.PNG", &encode(&image(4), image::ImageFormat::Png));
        add(&mut b, "train/004.cls", b"255");
        add(&mut b, "005.JPEG", &encode(&image(5), image::ImageFormat::Jpeg));
        let order = vec![
            ("train/000.png", Some(3)),
            ("train/001.jpg", Some(7)),
            ("train/002.webp", None),
            ("train/004.seg.PNG", Some(255)),
            ("005.JPEG", None),
        ];
        (b.into_inner().unwrap(), order)
    }

    fn read(path: &Path) -> Result<Vec<TarImage>, DataError> {
        TarImages::open(path)?.collect()
    }

    #[test]
    fn webdataset_shard_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let (tar, order) = shard();
        let plain = dir.path().join("shard-000.tar");
        std::fs::write(&plain, &tar).unwrap();
        let gz = dir.path().join("shard-000.tgz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let images = read(&plain).unwrap();
        let got: Vec<(&str, Option<u8>)> = images.iter().map(|i| (i.name.as_str(), i.label)).collect();
        assert_eq!(got, order);
        for (img, k) in images.iter().zip([0, 1, 2, 4, 5]) {
            let decoded = image::load_from_memory(&img.bytes).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (6 + k, 5), "{}", img.name);
            if !img.name.to_ascii_lowercase().ends_with("jpg") && !img.name.ends_with("JPEG") {
                assert_eq!(decoded, image(k), "{} is lossless", img.name);
            }
        }
        assert_eq!(read(&gz).unwrap(), images);
        // Stopping early is fine (the reader thread notices and ends).
        assert_eq!(TarImages::open(&plain).unwrap().next().unwrap().unwrap(), images[0]);
    }

    #[test]
    fn damaged_archives_name_the_file_and_member() {
        let dir = tempfile::tempdir().unwrap();
        let (tar, _) = shard();
        // Cut inside the data of train/001.jpg.
        let cut = tar.windows(13).position(|w| w == b"train/001.jpg").unwrap() + 512 + 100;
        let truncated = dir.path().join("cut.tar");
        std::fs::write(&truncated, &tar[..cut]).unwrap();
        let mut it = TarImages::open(&truncated).unwrap();
        assert_eq!(it.next().unwrap().unwrap().name, "train/000.png");
        let msg = it.next().unwrap().unwrap_err().to_string();
        assert!(msg.contains("cut.tar") && msg.contains("member train/001.jpg") && msg.contains("truncated"), "{msg}");
        assert!(it.next().is_none());

        // A truncated gzip stream.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        let gz = e.finish().unwrap();
        let path = dir.path().join("cut.tar.gz");
        std::fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        let msg = read(&path).unwrap_err().to_string();
        assert!(msg.contains("cut.tar.gz") && msg.contains("member"), "{msg}");

        // A damaged header: its checksum no longer matches.
        let mut bad = tar.clone();
        let header = bad.windows(14).position(|w| w == b"train/002.webp").unwrap();
        bad[header] = b'X';
        let path = dir.path().join("bad.tar");
        std::fs::write(&path, &bad).unwrap();
        let msg = read(&path).unwrap_err().to_string();
        assert!(msg.contains("bad.tar") && msg.contains("after member train/001.jpg"), "{msg}");

        // A label that is not a number.
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, "a.cls", b"cat");
        let path = dir.path().join("label.tar");
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let msg = read(&path).unwrap_err().to_string();
        assert!(msg.contains("label.tar") && msg.contains("member a.cls") && msg.contains("'cat'"), "{msg}");

        let missing = read(&dir.path().join("none.tar")).unwrap_err().to_string();
        assert!(missing.contains("none.tar"), "{missing}");
    }

    #[test]
    fn keys() {
        assert_eq!(split_key("a/b/x.seg.png"), Some(("a/b/x", "seg.png")));
        assert_eq!(split_key("x.cls"), Some(("x", "cls")));
        assert_eq!(split_key("a.b/x"), None);
        assert_eq!(split_key("a/.x.png"), None);
    }
}
