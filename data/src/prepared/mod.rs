//! Prepared data sets: a source decoded once, at the training size, into packed `u8` shards
//! that trainers read by index without holding the set in memory.
//!
//! A prepared directory holds `shard-NNNNNN.u8` files (samples of `channels x size x size`
//! bytes, CHW, back to back), `shard-NNNNNN.labels` where the source has labels, `skipped.txt`
//! (images that could not be decoded) and `manifest.json` (shape, counts and sha256 of every
//! file; written last). [`prepare`] writes one, resumably; [`PreparedSet`] reads one;
//! [`cache`] prepares a `--dataset` source on the fly.

pub mod cache;
mod manifest;
mod reader;
mod stream;
mod writer;

pub use manifest::{MANIFEST_FILE, Manifest, ShardEntry, SourceInfo};
pub use reader::PreparedSet;
pub use stream::{ChannelMode, Skipped};
pub use writer::{OnBadImage, PrepareOptions, Prepared, Progress, Quiet, SKIPPED_FILE, STATE_FILE, prepare};

/// Reads a streamed source (tar, LSUN) whole into memory, through the same decoding as
/// [`prepare`]; undecodable images are left out as there.
pub(crate) fn load_stream(
    spec: &crate::DatasetSpec,
    image_size: usize,
    limit: Option<usize>,
) -> Result<crate::Dataset, crate::DataError> {
    let mut images = stream::ImageStream::open(spec, image_size, None, limit)?;
    let (mut pixels, mut labels, mut len) = (Vec::new(), Vec::new(), 0);
    loop {
        let batch = images.next_batch(4096)?;
        if batch.read == 0 {
            break;
        }
        pixels.extend(batch.pixels.iter().map(|&b| crate::dataset::byte_to_unit(f32::from(b))));
        labels.extend_from_slice(&batch.labels);
        len += batch.kept;
    }
    let nc = images.channels().map_or(3, crate::encoded::Channels::count);
    if len == 0 {
        return Err(crate::DataError::NoImages { path: spec.path().map(std::path::PathBuf::from).unwrap_or_default() });
    }
    let labels = (images.may_have_labels() && labels.len() == len).then_some(labels);
    Ok(crate::Dataset { name: spec.kind().into(), nc, image_size, len, pixels, labels })
}
