//! LSUN as the PyTorch DCGAN example reads it (`torchvision.datasets.LSUN`): a directory such
//! as `bedroom_train_lmdb` holding an LMDB environment (`data.mdb`, maybe `lock.mdb`) whose one
//! unnamed database maps ASCII keys to encoded images (WebP, sometimes JPEG).
//!
//! The environment is opened read-only and without LMDB's lock file, so that it works on a
//! read-only mount, from a copy that lost `lock.mdb`, and without ever writing next to the
//! data. Entries are read in key order in batches, each under a short read transaction: a
//! cursor borrows its transaction, which an iterator could not hold alongside it, and a
//! preparation interrupted at entry N resumes with [`LmdbImages::iter_from`]`(N)`.
//!
//! heed's LMDB is the 0.9 `mdb.master` branch, whose files are the same as those of the
//! Python `lmdb` package LSUN was written with.

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, WithoutTls};

use crate::DataError;

/// Entries copied out of the database per read transaction.
const BATCH_ENTRIES: usize = 256;
/// Bytes of values copied out per read transaction (a batch ends after the entry crossing it).
const BATCH_BYTES: usize = 64 << 20;

/// A read-only LMDB environment of encoded images.
pub(crate) struct LmdbImages {
    dir: PathBuf,
    env: Env<WithoutTls>,
    db: Database<Bytes, Bytes>,
    /// Index of the first entry of the last batch fetched, and the batch's keys: an `iter_from`
    /// inside or after that batch continues from a key instead of walking from the first entry,
    /// so reading a database in consecutive `iter_from(n).take(k)` chunks stays linear.
    last: Mutex<Option<(usize, Vec<Vec<u8>>)>>,
}

impl LmdbImages {
    /// Opens the environment in `dir` read-only, without a lock file. One process can have a
    /// directory open once at a time (an LMDB rule that heed enforces).
    pub(crate) fn open(dir: &Path) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::NotFound {
                path: dir.to_path_buf(),
                msg: "not a directory (an LSUN set is a directory such as bedroom_train_lmdb holding data.mdb)".into(),
            });
        }
        let data = dir.join("data.mdb");
        if !data.is_file() {
            return Err(DataError::NotFound {
                path: dir.to_path_buf(),
                msg: "no data.mdb here: not an LMDB directory (such as LSUN's bedroom_train_lmdb)".into(),
            });
        }
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        // SAFETY: LMDB maps data.mdb into memory; reading it is sound as long as no one
        // modifies the file meanwhile. NO_LOCK gives up LMDB's own protection against a
        // concurrent writer, which a dataset being read for training does not have: it is input
        // that nothing writes, and often on a read-only mount where a lock file cannot exist.
        let env = unsafe {
            options.flags(EnvFlags::READ_ONLY | EnvFlags::NO_LOCK);
            options.open(dir)
        }
        .map_err(|e| lmdb_error(&data, "open", e))?;
        let rtxn = env.read_txn().map_err(|e| lmdb_error(&data, "start a read transaction in", e))?;
        let db = env
            .open_database::<Bytes, Bytes>(&rtxn, None)
            .map_err(|e| lmdb_error(&data, "open the main database of", e))?
            .ok_or_else(|| DataError::BadContent { path: data.clone(), msg: "the LMDB has no main database".into() })?;
        rtxn.commit().map_err(|e| lmdb_error(&data, "end a read transaction in", e))?;
        Ok(LmdbImages { dir: dir.to_path_buf(), env, db, last: Mutex::new(None) })
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> Result<usize, DataError> {
        let rtxn = self.env.read_txn().map_err(|e| self.error("start a read transaction in", e))?;
        let len = self.db.len(&rtxn).map_err(|e| self.error("count the entries of", e))?;
        Ok(len as usize)
    }

    /// `(key, value)` of every entry in key order, from the `start`-th (0-based) on.
    pub(crate) fn iter_from(
        &self,
        start: usize,
    ) -> Result<impl Iterator<Item = Result<(String, Vec<u8>), DataError>> + '_, DataError> {
        // Continue after the key of entry start - 1 if known, else after the last key known.
        let (after, skip) = match &*self.last.lock().unwrap_or_else(PoisonError::into_inner) {
            Some((first, keys)) if start > *first => match keys.get(start - 1 - first) {
                Some(key) => (Some(key.clone()), 0),
                None => (keys.last().cloned(), start - first - keys.len()),
            },
            _ => (None, start),
        };
        let mut it = LmdbIter { images: self, skip, after, next_index: start, batch: VecDeque::new(), done: false };
        // Fetched now so that a database that cannot be read fails here, not at the first item.
        it.refill()?;
        Ok(it)
    }

    fn error(&self, what: &'static str, e: heed::Error) -> DataError {
        lmdb_error(&self.dir.join("data.mdb"), what, e)
    }
}

fn lmdb_error(data: &Path, what: &'static str, e: heed::Error) -> DataError {
    match e {
        heed::Error::Io(source) => DataError::Io { path: data.to_path_buf(), op: what, source },
        heed::Error::EnvAlreadyOpened => DataError::BadContent {
            path: data.to_path_buf(),
            msg: format!("cannot {what} the LMDB: this process already has it open"),
        },
        other => DataError::BadContent {
            path: data.to_path_buf(),
            msg: format!("cannot {what} the LMDB (not an LMDB database, or damaged): {other}"),
        },
    }
}

/// Entries in key order, fetched a batch per read transaction.
struct LmdbIter<'a> {
    images: &'a LmdbImages,
    /// Entries still to pass over before the first one returned.
    skip: usize,
    /// Key of the last entry fetched (or passed over): the next batch starts after it.
    after: Option<Vec<u8>>,
    /// Index of the next entry to fetch.
    next_index: usize,
    batch: VecDeque<(String, Vec<u8>)>,
    done: bool,
}

impl LmdbIter<'_> {
    /// Fetches the next batch; sets `done` when the database has no more entries.
    fn refill(&mut self) -> Result<(), DataError> {
        let images = self.images;
        let rtxn = images.env.read_txn().map_err(|e| images.error("start a read transaction in", e))?;
        let bounds: (Bound<&[u8]>, Bound<&[u8]>) = match &self.after {
            Some(key) => (Bound::Excluded(key.as_slice()), Bound::Unbounded),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let mut entries = images.db.range(&rtxn, &bounds).map_err(|e| images.error("read", e))?;
        // LMDB has no positional access: walk over the entries before `start` (no copies).
        while self.skip > 0 {
            match entries.next().transpose().map_err(|e| images.error("read", e))? {
                Some(_) => self.skip -= 1,
                None => {
                    self.done = true;
                    return Ok(());
                }
            }
        }
        let first = self.next_index;
        let mut keys = Vec::new();
        let mut bytes = 0;
        while self.batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
            let Some((key, value)) = entries.next().transpose().map_err(|e| images.error("read", e))? else {
                self.done = true;
                break;
            };
            bytes += value.len();
            self.after = Some(key.to_vec());
            self.next_index += 1;
            keys.push(key.to_vec());
            self.batch.push_back((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
        }
        if !keys.is_empty() {
            *images.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((first, keys));
        }
        Ok(())
    }
}

impl Iterator for LmdbIter<'_> {
    type Item = Result<(String, Vec<u8>), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let refilled = if self.batch.is_empty() && !self.done { self.refill() } else { Ok(()) };
        if let Err(e) = refilled {
            self.done = true;
            return Some(Err(e));
        }
        self.batch.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn image(k: u32) -> image::RgbImage {
        image::RgbImage::from_fn(8, 4 + k, |x, y| image::Rgb([(x * 30) as u8, (y * 20 + k) as u8, (k * 50) as u8]))
    }

    fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
        out
    }

    /// LSUN-like keys: 40 hex digits (a SHA-1), not in insertion order.
    fn key(k: u32) -> String {
        format!("{:040x}", (u128::from(k) * 0x9e37_79b9_7f4a_7c15) % (1 << 100))
    }

    /// Writes `n` entries (the last one a JPEG, the others lossless WebP), closes the
    /// environment, and returns the keys in key order with their image numbers.
    fn write_lmdb(dir: &Path, n: u32) -> Vec<(String, u32)> {
        let env = unsafe { EnvOpenOptions::new().map_size(16 << 20).open(dir) }.unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut wtxn, None).unwrap();
        for k in 0..n {
            let format = if k == n - 1 { image::ImageFormat::Jpeg } else { image::ImageFormat::WebP };
            db.put(&mut wtxn, key(k).as_bytes(), &encode(&image(k), format)).unwrap();
        }
        wtxn.commit().unwrap();
        env.prepare_for_closing().wait();
        let mut keys: Vec<(String, u32)> = (0..n).map(|k| (key(k), k)).collect();
        keys.sort();
        keys
    }

    #[test]
    fn read_only_directory_without_lock_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("bedroom_train_lmdb");
        std::fs::create_dir(&dir).unwrap();
        let keys = write_lmdb(&dir, 5);
        std::fs::remove_file(dir.join("lock.mdb")).unwrap();
        std::fs::set_permissions(dir.join("data.mdb"), std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();

        let lmdb = LmdbImages::open(&dir).unwrap();
        assert_eq!(lmdb.len().unwrap(), 5);
        let all: Vec<(String, Vec<u8>)> = lmdb.iter_from(0).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            all.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            keys.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()
        );
        for ((_, bytes), (_, k)) in all.iter().zip(&keys) {
            let decoded = image::load_from_memory(bytes).unwrap().to_rgb8();
            if *k == 4 {
                assert_eq!(decoded.dimensions(), (8, 8), "the JPEG");
            } else {
                assert_eq!(decoded, image(*k), "WebP {k} is lossless");
            }
        }
        let tail: Vec<_> = lmdb.iter_from(3).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(tail, all[3..]);
        assert_eq!(lmdb.iter_from(5).unwrap().count(), 0);
        assert_eq!(lmdb.iter_from(99).unwrap().count(), 0);
        // Nothing was written next to the data.
        assert!(!dir.join("lock.mdb").exists());
        drop(lmdb);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn batches_resume_after_the_last_key() {
        let dir = tempfile::tempdir().unwrap();
        let n = BATCH_ENTRIES as u32 * 2 + 3;
        let env = unsafe { EnvOpenOptions::new().map_size(16 << 20).open(dir.path()) }.unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut wtxn, None).unwrap();
        for k in 0..n {
            db.put(&mut wtxn, key(k).as_bytes(), &k.to_le_bytes()).unwrap();
        }
        wtxn.commit().unwrap();
        env.prepare_for_closing().wait();
        let lmdb = LmdbImages::open(dir.path()).unwrap();
        let mut keys: Vec<String> = (0..n).map(key).collect();
        keys.sort();
        // Forwards (continuing from the last key fetched) and backwards (from the first key).
        for start in [0, 1, BATCH_ENTRIES, n as usize - 1, 2, n as usize, 0] {
            let got: Vec<String> = lmdb.iter_from(start).unwrap().map(|e| e.unwrap().0).collect();
            assert_eq!(got, keys[start..], "from {start}");
        }
        // In chunks, as a resumable preparation reads it.
        let mut chunks = Vec::new();
        while chunks.len() < n as usize {
            let before = chunks.len();
            chunks.extend(lmdb.iter_from(chunks.len()).unwrap().take(100).map(|e| e.unwrap().0));
            assert!(chunks.len() > before);
        }
        assert_eq!(chunks, keys);
    }

    #[test]
    fn not_an_lmdb_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = LmdbImages::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("no data.mdb"), "{err}");
        std::fs::write(dir.path().join("data.mdb"), vec![0x5a; 64 << 10]).unwrap();
        let err = LmdbImages::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("data.mdb") && err.contains("LMDB"), "{err}");
        let missing = dir.path().join("missing_lmdb");
        let err = LmdbImages::open(&missing).err().unwrap().to_string();
        assert!(err.contains("missing_lmdb") && err.contains("not a directory"), "{err}");
    }
}
