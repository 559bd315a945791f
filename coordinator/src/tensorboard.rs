//! TensorBoard event files (`events.out.tfevents.*`), so that `tensorboard --logdir` reads a run
//! without TensorFlow or Python anywhere in training.
//!
//! A file is a sequence of records: the data's length as a little-endian `u64`, the masked
//! CRC-32C of those 8 bytes, the data (an encoded [`Event`]), the masked CRC-32C of the data.
//! The first record names the format version. TensorBoard reads a directory's files in name
//! order and keeps following the last one as it grows.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use proto::tensorboard::{Event, Summary, event, summary};

use crate::run_dir::RunDirError;

/// What every event file's name starts with (TensorBoard picks files by the `tfevents` in it).
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// The first record's `file_version`; version 2 tells TensorBoard not to guess restarts from
/// steps going backwards.
const FILE_VERSION: &str = "brain.Event:2";

/// Length (8 bytes) and its CRC (4) before the data; the data's CRC (4) after it.
const HEADER_BYTES: usize = 12;
const FOOTER_BYTES: usize = 4;

/// Makes the names of files created by one process within one second distinct.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An event file or directory that cannot be written or rewritten, or an image that cannot be
/// described to TensorBoard.
#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    #[error(transparent)]
    Io(#[from] RunDirError),
    #[error("{}: cannot add image {tag:?}: {msg}", .path.display())]
    Image { path: PathBuf, tag: String, msg: String },
}

fn io_error(path: &Path, op: &'static str, source: std::io::Error) -> TensorBoardError {
    TensorBoardError::Io(RunDirError::new(path, op, source))
}

/// Appends events to a new event file in a directory.
pub struct TensorBoardWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Starts a new event file in `dir` (created if missing). `resume_from: Some(k)` is a
    /// coordinator resuming from the checkpoint of step `k`: the steps after `k` that the earlier
    /// process had written are about to be trained again, so every existing event file is first
    /// rewritten without them (and without a record cut short by a crash); otherwise
    /// TensorBoard would show those steps twice. With `None` existing files are left alone.
    pub fn create(dir: &Path, resume_from: Option<u64>) -> Result<Self, TensorBoardError> {
        fs::create_dir_all(dir).map_err(|e| io_error(dir, "create directory", e))?;
        let existing = event_files(dir)?;
        if let Some(last_step) = resume_from {
            for path in &existing {
                keep_steps_up_to(path, last_step)?;
            }
        }
        // TensorBoard reads files in name order and the steps of a new file follow the old
        // files' steps, so its name must sort last even within the second an old one was made.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let newest = existing.iter().filter_map(|p| file_seconds(p)).max();
        let secs = newest.map_or(now, |s| now.max(s.saturating_add(1)));
        let name = format!(
            "{FILE_PREFIX}{secs:010}.{}.{}.{}",
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file =
            OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| io_error(&path, "create", e))?;
        let mut writer = Self { path, out: BufWriter::new(file) };
        let version =
            Event { wall_time: unix_now(), step: 0, what: Some(event::What::FileVersion(FILE_VERSION.into())) };
        writer.write_event(&version)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding a scalar per `(tag, value)`; nothing when `values` is empty.
    pub fn add_scalars(&mut self, step: u64, wall_time: f64, values: &[(&str, f32)]) -> Result<(), TensorBoardError> {
        if values.is_empty() {
            return Ok(());
        }
        let value = values
            .iter()
            .map(|&(tag, v)| summary::Value {
                tag: tag.to_string(),
                value: Some(summary::value::Value::SimpleValue(v)),
                ..Default::default()
            })
            .collect();
        self.write_summary(step, wall_time, Summary { value })
    }

    /// One event at `step` holding an encoded image (PNG) of `width x height` pixels with
    /// `channels` channels (1 grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA).
    #[allow(clippy::too_many_arguments)]
    pub fn add_image(
        &mut self,
        step: u64,
        wall_time: f64,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
        channels: u32,
    ) -> Result<(), TensorBoardError> {
        let bad = |msg: String| TensorBoardError::Image { path: self.path.clone(), tag: tag.to_string(), msg };
        if !(1..=4).contains(&channels) {
            return Err(bad(format!("{channels} channels (1 to 4 expected)")));
        }
        let (Ok(w), Ok(h)) = (i32::try_from(width), i32::try_from(height)) else {
            return Err(bad(format!("size {width}x{height} does not fit in an int32")));
        };
        let image =
            summary::Image { height: h, width: w, colorspace: channels as i32, encoded_image_string: png.to_vec() };
        let value = summary::Value {
            tag: tag.to_string(),
            value: Some(summary::value::Value::Image(image)),
            ..Default::default()
        };
        self.write_summary(step, wall_time, Summary { value: vec![value] })
    }

    /// Hands the buffered records to the system, so that TensorBoard sees them (cheap: called
    /// every few seconds, under the run's lock).
    pub fn flush(&mut self) -> Result<(), TensorBoardError> {
        self.out.flush().map_err(|e| io_error(&self.path, "write", e))
    }

    /// [`TensorBoardWriter::flush`], then an fsync, so that a machine crash loses nothing
    /// written before (at the end of a run, and on drop).
    pub fn sync(&mut self) -> Result<(), TensorBoardError> {
        self.flush()?;
        self.out.get_ref().sync_data().map_err(|e| io_error(&self.path, "fsync", e))
    }

    fn write_summary(&mut self, step: u64, wall_time: f64, summary: Summary) -> Result<(), TensorBoardError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.write_event(&Event { wall_time, step, what: Some(event::What::Summary(summary)) })
    }

    fn write_event(&mut self, event: &Event) -> Result<(), TensorBoardError> {
        write_record(&mut self.out, &event.encode_to_vec()).map_err(|e| io_error(&self.path, "write", e))
    }
}

impl Drop for TensorBoardWriter {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!("{e}");
        }
    }
}

/// The run's TensorBoard files (`--tensorboard`), or nothing: shared by the step feed (whose
/// sink it is), the sample renderer (grids), the evaluator (FIDs) and the watch loop's flushes.
/// A write that fails is a warning: TensorBoard is a view of the run, not its record.
#[derive(Clone, Default)]
pub struct TensorBoard(std::sync::Arc<std::sync::Mutex<Option<TensorBoardWriter>>>);

impl TensorBoard {
    pub fn new(writer: Option<TensorBoardWriter>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(writer)))
    }

    /// Whether the run writes TensorBoard files.
    pub fn is_on(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Runs `write` on the writer, if there is one, and logs its error.
    fn with(&self, write: impl FnOnce(&mut TensorBoardWriter) -> Result<(), TensorBoardError>) {
        if let Some(tb) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            if let Err(e) = write(tb) {
                tracing::warn!("TensorBoard: {e}");
            }
        }
    }

    /// An epoch's fixed-noise grid (a PNG), flushed at once.
    pub fn grid(&self, step: u64, png: &[u8], size: (u32, u32), channels: u32) {
        self.with(|tb| {
            tb.add_image(step, unix_now(), "samples/fixed_noise", png, size.0, size.1, channels)?;
            tb.flush()
        });
    }

    /// A finished FID evaluation, flushed at once.
    pub fn fid(&self, step: u64, fid: f64) {
        self.with(|tb| {
            tb.add_scalars(step, unix_now(), &[("FID", fid as f32)])?;
            tb.flush()
        });
    }

    /// Hands buffered events to the system (every few seconds).
    pub fn flush(&self) {
        self.with(TensorBoardWriter::flush);
    }

    /// Writes the events to disk for good (at the end of a generation).
    pub fn sync(&self) {
        self.with(TensorBoardWriter::sync);
    }
}

impl crate::step_feed::StepSink for TensorBoard {
    fn take(&mut self, r: &crate::metrics_log::StepRecord) -> anyhow::Result<()> {
        // Tags as the PyTorch example's log line names them.
        let scalars = [
            ("loss_D", r.loss_d),
            ("loss_G", r.loss_g),
            ("D(x)", r.d_x),
            ("D(G(z))/before_D_update", r.d_g_z1),
            ("D(G(z))/after_D_update", r.d_g_z2),
            ("images_per_sec", r.images_per_sec as f32),
            ("all_reduce_seconds", r.all_reduce_seconds as f32),
        ];
        self.with(|tb| tb.add_scalars(r.step, unix_now(), &scalars));
        Ok(())
    }
}

/// TensorFlow's masked CRC-32C, `((crc >> 15) | (crc << 17)) + 0xa282ead8`: a CRC of data that
/// contains CRCs is itself a poor checksum, so the stored value is rotated and offset.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn write_record(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc32c(data).to_le_bytes())
}

/// The first record of `bytes`: its data and its whole length; `None` when it is cut short or
/// either CRC does not match (nothing after a bad length can be trusted).
fn next_record(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let header = bytes.get(..HEADER_BYTES)?;
    let (len, len_crc) = header.split_at(8);
    if masked_crc32c(len) != u32::from_le_bytes(len_crc.try_into().ok()?) {
        return None;
    }
    let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
    let total = HEADER_BYTES.checked_add(len)?.checked_add(FOOTER_BYTES)?;
    let record = bytes.get(..total)?;
    let (data, crc) = record[HEADER_BYTES..].split_at(len);
    (masked_crc32c(data) == u32::from_le_bytes(crc.try_into().ok()?)).then_some((data, total))
}

/// Rewrites `path` (atomically) with only its valid records of steps <= `last_step`, the version
/// record included; a file that has nothing else is left as it is.
fn keep_steps_up_to(path: &Path, last_step: u64) -> Result<(), TensorBoardError> {
    let bytes = fs::read(path).map_err(|e| io_error(path, "read", e))?;
    let last_step = i64::try_from(last_step).unwrap_or(i64::MAX);
    let mut kept = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some((data, len)) = next_record(&bytes[at..]) {
        let Ok(event) = Event::decode(data) else { break };
        if event.step <= last_step {
            kept.extend_from_slice(&bytes[at..at + len]);
        }
        at += len;
    }
    if kept.len() == bytes.len() {
        return Ok(());
    }
    replace_atomic(path, &kept)
}

/// Atomically, through a temporary file without `tfevents` in its name, so that TensorBoard
/// never reads it.
fn replace_atomic(path: &Path, bytes: &[u8]) -> Result<(), TensorBoardError> {
    let tmp = format!(".tensorboard-rewrite.{}.tmp", std::process::id());
    Ok(crate::run_dir::write_atomic_via(path, bytes, &tmp)?)
}

/// The event files directly in `dir`, in name order.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>, TensorBoardError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, "list directory", e))? {
        let entry = entry.map_err(|e| io_error(dir, "list directory", e))?;
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && entry.file_name().to_string_lossy().starts_with(FILE_PREFIX) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The Unix seconds in an event file's name.
fn file_seconds(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix(FILE_PREFIX)?.split('.').next()?.parse().ok()
}

/// This machine's name, reduced to characters that are safe in a file name.
fn hostname() -> String {
    let name = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into());
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a whole event file, checking both CRCs of every record (with the masking spelled out
    /// again, apart from the writer's code) and that no byte is left over.
    fn read_events(path: &Path) -> Vec<Event> {
        let bytes = fs::read(path).unwrap();
        let mut events = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            assert!(rest.len() >= 12, "{}: {} stray bytes at the end", path.display(), rest.len());
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
            let c = crc32c::crc32c(&rest[..8]);
            assert_eq!(len_crc, c.rotate_right(15).wrapping_add(0xa282ead8), "length CRC");
            let data = &rest[12..12 + len];
            let data_crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap());
            let c = crc32c::crc32c(data);
            assert_eq!(data_crc, c.rotate_right(15).wrapping_add(0xa282ead8), "data CRC");
            events.push(Event::decode(data).expect("an Event"));
            rest = &rest[16 + len..];
        }
        events
    }

    fn steps(events: &[Event]) -> Vec<i64> {
        events.iter().map(|e| e.step).collect()
    }

    fn scalars(event: &Event) -> Vec<(String, f32)> {
        let Some(event::What::Summary(s)) = &event.what else { panic!("not a summary: {event:?}") };
        s.value
            .iter()
            .map(|v| match v.value {
                Some(summary::value::Value::SimpleValue(x)) => (v.tag.clone(), x),
                ref other => panic!("not a scalar: {other:?}"),
            })
            .collect()
    }

    fn is_version(event: &Event) -> bool {
        event.what == Some(event::What::FileVersion(FILE_VERSION.into()))
    }

    #[test]
    fn masked_crc_of_a_known_input() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tb");
        let mut w = TensorBoardWriter::create(&dir, None).unwrap();
        let path = w.path().to_path_buf();
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with(FILE_PREFIX));
        w.add_scalars(1, 100.5, &[("loss_D", 0.75), ("loss_G", 2.5)]).unwrap();
        w.add_scalars(2, 101.5, &[]).unwrap();
        w.add_image(2, 102.0, "samples", b"\x89PNG not really", 34, 18, 3).unwrap();
        assert!(w.add_image(2, 102.0, "samples", b"", 1, 1, 5).is_err());
        w.flush().unwrap();

        let events = read_events(&path);
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(is_version(&events[0]), "{:?}", events[0]);
        assert_eq!((events[1].step, events[1].wall_time), (1, 100.5));
        assert_eq!(scalars(&events[1]), vec![("loss_D".to_string(), 0.75), ("loss_G".to_string(), 2.5)]);
        assert_eq!((events[2].step, events[2].wall_time), (2, 102.0));
        let Some(event::What::Summary(s)) = &events[2].what else { panic!("{:?}", events[2]) };
        assert_eq!(s.value[0].tag, "samples");
        let Some(summary::value::Value::Image(img)) = &s.value[0].value else { panic!("{s:?}") };
        assert_eq!((img.width, img.height, img.colorspace), (34, 18, 3));
        assert_eq!(img.encoded_image_string, b"\x89PNG not really");

        // Records not yet flushed reach the file when the writer is dropped.
        w.add_scalars(3, 103.0, &[("loss_D", 1.0)]).unwrap();
        drop(w);
        assert_eq!(steps(&read_events(&path)), vec![0, 1, 2, 3]);
    }

    #[test]
    fn resume_drops_later_steps_and_a_truncated_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut w = TensorBoardWriter::create(dir, None).unwrap();
        let first = w.path().to_path_buf();
        for step in 1..=10 {
            w.add_scalars(step, step as f64, &[("loss_D", step as f32)]).unwrap();
        }
        drop(w);
        // A crash in the middle of the record of step 11.
        let mut record = Vec::new();
        let event = Event { step: 11, ..Default::default() };
        write_record(&mut record, &event.encode_to_vec()).unwrap();
        let mut f = OpenOptions::new().append(true).open(&first).unwrap();
        f.write_all(&record[..record.len() - 3]).unwrap();
        drop(f);

        // A fresh start leaves the old file alone.
        let before = fs::read(&first).unwrap();
        drop(TensorBoardWriter::create(dir, None).unwrap());
        assert_eq!(fs::read(&first).unwrap(), before);

        let w = TensorBoardWriter::create(dir, Some(6)).unwrap();
        let events = read_events(&first);
        assert!(is_version(&events[0]));
        assert_eq!(steps(&events), vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(scalars(&events[6]), vec![("loss_D".to_string(), 6.0)]);

        // The new file sorts after the old ones (TensorBoard's reading order), and no temporary
        // file is left.
        let files = event_files(dir).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(files[0], first);
        assert_eq!(files.last().unwrap(), w.path());
        assert_eq!(fs::read_dir(dir).unwrap().count(), 3);

        // Resuming again from a later step changes nothing.
        drop(w);
        let before = fs::read(&first).unwrap();
        drop(TensorBoardWriter::create(dir, Some(8)).unwrap());
        assert_eq!(fs::read(&first).unwrap(), before);
    }
}
