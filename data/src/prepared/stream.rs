//! A source's images in order, a batch at a time, decoded to bytes at the training size.
//!
//! `prepare` cuts a source into shards of a fixed number of *source* images, so shard `k`
//! always starts at image `k * per_shard`: an interrupted preparation skips what its finished
//! shards covered and goes on. Batches of encoded images are read in order (a tar is a
//! stream) and decoded on every core.

use std::path::PathBuf;

use rayon::prelude::*;

use crate::dataset::Decoded;
use crate::encoded::{self, Channels};
use crate::lmdb_source::LmdbImages;
use crate::tar_source::TarImages;
use crate::{DataError, DatasetSpec};

/// How encoded images choose their channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ChannelMode {
    /// RGB, as the PyTorch example's `ImageFolder` loads every image.
    #[default]
    Rgb,
    /// One luma channel.
    Gray,
    /// Whatever the first image has (gray or colour); an image with the other count fails.
    Auto,
}

impl std::str::FromStr for ChannelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(ChannelMode::Auto),
            other => other.parse::<Channels>().map(|c| match c {
                Channels::Rgb => ChannelMode::Rgb,
                Channels::Gray => ChannelMode::Gray,
            }),
        }
        .map_err(|_| format!("unknown channels '{s}': expected rgb, gray or auto"))
    }
}

impl std::fmt::Display for ChannelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelMode::Rgb => "rgb",
            ChannelMode::Gray => "gray",
            ChannelMode::Auto => "auto",
        })
    }
}

/// An image left out of a prepared set, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// The file, tar member or LMDB key.
    pub name: String,
    pub reason: String,
}

/// What one batch produced.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Kept samples, CHW bytes back to back.
    pub pixels: Vec<u8>,
    /// One per kept sample, where the source has labels.
    pub labels: Vec<u8>,
    pub kept: usize,
    pub skipped: Vec<Skipped>,
    /// Source images read (kept + skipped); fewer than asked only at the end.
    pub read: usize,
}

/// An encoded image waiting to be decoded.
struct Encoded {
    name: String,
    bytes: Vec<u8>,
    label: Option<u8>,
}

enum Kind {
    /// Small formats decoded whole (IDX, CIFAR): `next` is the next sample.
    Decoded {
        samples: Decoded<u8>,
        next: usize,
    },
    /// Image files, read and decoded in parallel.
    Files {
        files: Vec<PathBuf>,
        next: usize,
    },
    Tar {
        images: TarImages,
        read: usize,
    },
    Lmdb {
        db: LmdbImages,
        next: usize,
        total: usize,
    },
}

/// The images of one source, resized to one size.
pub(crate) struct ImageStream {
    kind: Kind,
    size: usize,
    /// Channels of every sample; `None` until the first image is seen in [`ChannelMode::Auto`].
    channels: Option<Channels>,
    auto: bool,
    /// Source images to read at most.
    limit: Option<usize>,
    consumed: usize,
    has_labels: bool,
}

impl ImageStream {
    /// Opens `spec`'s images for preparation at `size`, keeping at most the first `limit`
    /// source images.
    pub(crate) fn open(
        spec: &DatasetSpec,
        size: usize,
        mode: Option<ChannelMode>,
        limit: Option<usize>,
    ) -> Result<ImageStream, DataError> {
        let fixed = |samples: Decoded<u8>| -> Result<ImageStream, DataError> {
            let nc = samples.nc;
            if let Some(m) = mode {
                let wanted = match m {
                    ChannelMode::Rgb => 3,
                    ChannelMode::Gray => 1,
                    ChannelMode::Auto => nc,
                };
                if wanted != nc {
                    return Err(DataError::InvalidArgument {
                        path: spec.path().map(PathBuf::from).unwrap_or_default(),
                        msg: format!(
                            "{} has {nc} channel(s); --channels {m} applies only to encoded images",
                            spec.kind()
                        ),
                    });
                }
            }
            let has_labels = samples.labels.is_some();
            Ok(ImageStream {
                kind: Kind::Decoded { samples, next: 0 },
                size,
                channels: Channels::for_count(nc),
                auto: false,
                limit: None,
                consumed: 0,
                has_labels,
            })
        };
        let (channels, auto) = match mode.unwrap_or_default() {
            ChannelMode::Rgb => (Some(Channels::Rgb), false),
            ChannelMode::Gray => (Some(Channels::Gray), false),
            ChannelMode::Auto => (None, true),
        };
        let encoded =
            |kind: Kind, has_labels: bool| ImageStream { kind, size, channels, auto, limit, consumed: 0, has_labels };
        match spec {
            DatasetSpec::Mnist(p) => fixed(crate::idx::load("mnist", p, &["mnist", "MNIST/raw"], size, limit)?),
            DatasetSpec::FashionMnist(p) => {
                fixed(crate::idx::load("fashion-mnist", p, &["fashion-mnist", "FashionMNIST/raw"], size, limit)?)
            }
            DatasetSpec::Cifar10(p) => fixed(crate::cifar::load(p, size, limit)?),
            DatasetSpec::Folder(p) => {
                let files = crate::folder::images_in(p)?;
                Ok(encoded(Kind::Files { files, next: 0 }, false))
            }
            DatasetSpec::Tar(p) => Ok(encoded(Kind::Tar { images: TarImages::open(p)?, read: 0 }, true)),
            DatasetSpec::Lsun(p) => {
                let db = LmdbImages::open(p)?;
                let total = db.len()?;
                if total == 0 {
                    return Err(DataError::NoImages { path: p.clone() });
                }
                Ok(encoded(Kind::Lmdb { db, next: 0, total }, false))
            }
            DatasetSpec::Shapes | DatasetSpec::Fake | DatasetSpec::Prepared(_) => Err(DataError::InvalidArgument {
                path: spec.path().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(spec.kind())),
                msg: format!("'{}' is not a source to prepare", spec.kind()),
            }),
        }
    }

    /// Source images in all (after the limit), where known before reading them.
    pub(crate) fn total(&self) -> Option<usize> {
        let all = match &self.kind {
            Kind::Decoded { samples, .. } => Some(samples.len),
            Kind::Files { files, .. } => Some(files.len()),
            Kind::Tar { .. } => None,
            Kind::Lmdb { total, .. } => Some(*total),
        };
        match (all, self.limit) {
            (Some(a), Some(l)) => Some(a.min(l)),
            (Some(a), None) => Some(a),
            (None, _) => None,
        }
    }

    /// Whether samples carry labels. A tar has labels only where its `.cls` members say so; a
    /// set is labelled when every kept sample is.
    pub(crate) fn may_have_labels(&self) -> bool {
        self.has_labels
    }

    /// The channels of every sample, once known (always, except in auto mode before the first
    /// image).
    pub(crate) fn channels(&self) -> Option<Channels> {
        self.channels
    }

    /// Fixes the channels (a resumed preparation in auto mode, whose first shards decided).
    pub(crate) fn set_channels(&mut self, channels: Channels) {
        self.channels = Some(channels);
    }

    /// Source images not read yet, capped by the limit.
    fn room(&self, want: usize) -> usize {
        match self.limit {
            Some(l) => want.min(l.saturating_sub(self.consumed)),
            None => want,
        }
    }

    /// Passes over the next `n` source images without decoding them (a resumed preparation).
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), DataError> {
        let n = self.room(n);
        match &mut self.kind {
            Kind::Decoded { next, .. } | Kind::Files { next, .. } | Kind::Lmdb { next, .. } => *next += n,
            Kind::Tar { images, read } => {
                for _ in 0..n {
                    match images.next() {
                        Some(r) => {
                            r?;
                            *read += 1;
                        }
                        None => break,
                    }
                }
            }
        }
        self.consumed += n;
        Ok(())
    }

    /// Reads and decodes the next `want` source images (fewer at the end; none when done).
    pub(crate) fn next_batch(&mut self, want: usize) -> Result<Batch, DataError> {
        let want = self.room(want);
        let size = self.size;
        let mut batch = Batch::default();
        if want == 0 {
            return Ok(batch);
        }
        let encoded: Vec<Encoded> = match &mut self.kind {
            Kind::Decoded { samples, next } => {
                let n = want.min(samples.len - *next);
                let sample = samples.nc * size * size;
                batch.pixels.extend_from_slice(&samples.pixels[*next * sample..(*next + n) * sample]);
                if let Some(l) = &samples.labels {
                    batch.labels.extend_from_slice(&l[*next..*next + n]);
                }
                *next += n;
                batch.kept = n;
                batch.read = n;
                self.consumed += n;
                return Ok(batch);
            }
            Kind::Files { files, next } => {
                let part = &files[(*next).min(files.len())..(*next + want).min(files.len())];
                *next += part.len();
                // Files are read inside the parallel decode: reading is half the work on a
                // network volume.
                part.par_iter()
                    .map(|p| match std::fs::read(p) {
                        Ok(bytes) => Ok(Encoded { name: p.display().to_string(), bytes, label: None }),
                        Err(e) => Err(DataError::io(p, "read", e)),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            Kind::Tar { images, read } => {
                let mut out = Vec::with_capacity(want);
                for item in images.by_ref().take(want) {
                    let img = item?;
                    out.push(Encoded { name: img.name, bytes: img.bytes, label: img.label });
                }
                *read += out.len();
                out
            }
            Kind::Lmdb { db, next, total } => {
                let n = want.min(total.saturating_sub(*next));
                let mut out = Vec::with_capacity(n);
                for item in db.iter_from(*next)?.take(n) {
                    let (key, bytes) = item?;
                    out.push(Encoded { name: key, bytes, label: None });
                }
                *next += out.len();
                out
            }
        };
        self.consumed += encoded.len();
        batch.read = encoded.len();
        self.decode(encoded, &mut batch)?;
        Ok(batch)
    }

    /// Decodes `items` on every core into `batch`, keeping source order; undecodable images
    /// go to `batch.skipped`.
    fn decode(&mut self, items: Vec<Encoded>, batch: &mut Batch) -> Result<(), DataError> {
        let size = self.size;
        if self.channels.is_none() {
            // Auto: the first image that decodes sets the channel count.
            self.channels = items
                .iter()
                .find_map(|it| encoded::decode(&it.bytes).ok())
                .map(|img| if encoded::native_channels(&img) == 1 { Channels::Gray } else { Channels::Rgb });
        }
        let Some(channels) = self.channels else {
            batch.skipped.extend(items.into_iter().map(|it| Skipped { name: it.name, reason: "cannot decode".into() }));
            return Ok(());
        };
        let sample = channels.count() * size * size;
        let mut pixels = vec![0u8; items.len() * sample];
        let results: Vec<Result<usize, String>> = pixels
            .par_chunks_mut(sample)
            .zip(items.par_iter())
            .map_init(Vec::new, |scratch, (out, it)| {
                encoded::decode_into(&it.bytes, channels, size, scratch, out).map_err(|e| e.to_string())
            })
            .collect();
        let labelled = self.has_labels;
        for ((it, result), px) in items.into_iter().zip(results).zip(pixels.chunks_exact(sample)) {
            match result {
                Ok(native) => {
                    if self.auto && native != channels.count() {
                        return Err(DataError::MixedChannels {
                            name: it.name,
                            found: native,
                            expected: channels.count(),
                        });
                    }
                    if labelled {
                        match it.label {
                            Some(l) => batch.labels.push(l),
                            // One unlabelled image makes the whole set unlabelled.
                            None => self.has_labels = false,
                        }
                    }
                    batch.pixels.extend_from_slice(px);
                    batch.kept += 1;
                }
                Err(reason) => batch.skipped.push(Skipped { name: it.name, reason }),
            }
        }
        if !self.has_labels {
            batch.labels.clear();
        }
        Ok(())
    }
}
