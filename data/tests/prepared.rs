//! Prepared data sets: every source prepares, reads back bit-identical to the in-memory path,
//! resumes after an interruption, reports bad images, and is checked by sha256.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use data::prepared::{self, ChannelMode, Manifest, OnBadImage, PrepareOptions, Quiet};
use data::{DataError, DatasetSpec, PreparedSet, SampleStore};

fn opts(size: usize, shard_images: usize) -> PrepareOptions {
    PrepareOptions { image_size: size, shard_images: Some(shard_images), ..PrepareOptions::default() }
}

/// Every sample of `spec` read from its prepared copy equals the in-memory loader's, in a
/// shuffled order that crosses shard boundaries.
fn assert_same_as_in_memory(spec: &DatasetSpec, dir: &Path, size: usize) {
    let memory = spec.load(size, None).unwrap();
    let set = PreparedSet::open(dir).unwrap();
    assert_eq!((set.len(), set.nc(), set.image_size()), (memory.len, memory.nc, size));
    let order = data::epoch_order(3, 0, memory.len);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    memory.gather(&order, &mut a);
    set.gather(&order, &mut b).unwrap();
    assert!(a == b, "{spec}: prepared samples differ from the in-memory ones");
    assert_eq!(set.labels().unwrap(), memory.labels, "{spec}: labels");
    set.verify(&|_| ()).unwrap();
}

fn write_png_folder(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(20 + i as u32 % 3, 16, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 13) as u8, (i * 40) as u8])
        });
        let sub = if i % 2 == 0 { "a" } else { "b" };
        let ext = ["png", "jpg", "webp"][i % 3];
        let path = dir.join(sub).join(format!("img{i:03}.{ext}"));
        match ext {
            "webp" => {
                let mut bytes = Vec::new();
                image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
                    .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
                    .unwrap();
                std::fs::write(path, bytes).unwrap();
            }
            _ => img.save(path).unwrap(),
        }
    }
}

#[test]
fn idx_cifar_and_folders_read_back_exactly_as_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = tmp.path().join("train-images-idx3-ubyte");
    write_bytes(&idx, &idx_images(23, 28, 28, 23), Compress::Gzip);
    write_bytes(&tmp.path().join("train-labels-idx1-ubyte"), &idx_labels(&[3; 23]), Compress::Plain);
    let cifar = tmp.path().join("cifar");
    std::fs::create_dir(&cifar).unwrap();
    write_bytes(&cifar.join("data_batch_1.bin"), &cifar_records(0, 11), Compress::Xz);
    let folder = tmp.path().join("folder");
    write_png_folder(&folder, 9);

    for (spec, size) in [
        (DatasetSpec::Mnist(idx.clone()), 32),
        (DatasetSpec::Cifar10(cifar.clone()), 16),
        (DatasetSpec::Folder(folder.clone()), 12),
    ] {
        let out = tmp.path().join(format!("prepared-{}", spec.kind()));
        let done = prepared::prepare(&spec, &out, &opts(size, 4), &Quiet).unwrap();
        assert!(done.manifest.shards.len() >= 3, "{spec}: several shards");
        assert_eq!(done.manifest.source.spec, spec.to_string());
        assert_same_as_in_memory(&spec, &out, size);
        // Again: already complete, nothing rewritten.
        let again = prepared::prepare(&spec, &out, &opts(size, 4), &Quiet).unwrap();
        assert!(again.already_complete);
        // The store a trainer uses, prepared on the fly into the cache, gives the same samples.
        let store = SampleStore::open(&spec, size, None, &tmp.path().join("cache"), &Quiet).unwrap();
        let all: Vec<u32> = (0..store.len() as u32).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        store.gather(&all, &mut a).unwrap();
        PreparedSet::open(&out).unwrap().gather(&all, &mut b).unwrap();
        assert!(a == b, "{spec}: the cached preparation differs");
    }
}

/// Progress that interrupts a preparation (as a kill would) after some shards.
struct InterruptAfter(usize, AtomicUsize);

impl prepared::Progress for InterruptAfter {
    fn begin(&self, _: Option<u64>, _: u64) {}
    fn advance(&self, _: u64) {
        if self.1.fetch_add(1, Ordering::SeqCst) + 1 == self.0 {
            panic!("interrupted");
        }
    }
}

#[test]
fn an_interrupted_preparation_continues_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    write_png_folder(&folder, 10);
    let spec = DatasetSpec::Folder(folder);
    let clean = prepared::prepare(&spec, &tmp.path().join("clean"), &opts(8, 3), &Quiet).unwrap();

    let out = tmp.path().join("resumed");
    let stop = InterruptAfter(2, AtomicUsize::new(0));
    let r =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepared::prepare(&spec, &out, &opts(8, 3), &stop)));
    assert!(r.is_err());
    assert!(out.join(prepared::STATE_FILE).exists() && !out.join(prepared::MANIFEST_FILE).exists());
    let resumed = prepared::prepare(&spec, &out, &opts(8, 3), &Quiet).unwrap();
    assert_eq!(resumed.resumed_shards, 2);
    assert_eq!(resumed.manifest.content_id(), clean.manifest.content_id());
    assert!(!out.join(prepared::STATE_FILE).exists());

    // Other options are refused rather than mixed into the same shards.
    let other = tmp.path().join("other");
    let stop = InterruptAfter(1, AtomicUsize::new(0));
    let _ =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepared::prepare(&spec, &other, &opts(8, 3), &stop)));
    let e = prepared::prepare(&spec, &other, &opts(16, 3), &Quiet).unwrap_err().to_string();
    assert!(e.contains("unfinished preparation") && e.contains("other options"), "{e}");
}

#[test]
fn a_flipped_byte_is_caught_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    write_png_folder(&folder, 6);
    let out = tmp.path().join("p");
    prepared::prepare(&DatasetSpec::Folder(folder), &out, &opts(8, 4), &Quiet).unwrap();
    let shard = out.join("shard-000001.u8");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let set = PreparedSet::open(&out).unwrap();
    let e = set.verify(&|_| ()).unwrap_err().to_string();
    assert!(e.contains("shard-000001.u8") && e.contains("sha256"), "{e}");

    // A truncated shard is refused at open, with the sizes.
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let e = PreparedSet::open(&out).unwrap_err().to_string();
    assert!(e.contains("shard-000001.u8") && e.contains("bytes"), "{e}");
}

#[test]
fn bad_images_are_skipped_and_named_or_fail_when_strict() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    write_png_folder(&folder, 5);
    std::fs::write(folder.join("a/broken.png"), b"\x89PNG but not really").unwrap();
    let spec = DatasetSpec::Folder(folder.clone());
    let done = prepared::prepare(&spec, &tmp.path().join("p"), &opts(8, 4), &Quiet).unwrap();
    assert_eq!(done.manifest.count, 5);
    assert_eq!(done.manifest.source.skipped, 1);
    let report = std::fs::read_to_string(tmp.path().join("p").join(prepared::SKIPPED_FILE)).unwrap();
    assert!(report.contains("broken.png"), "{report}");

    let strict = PrepareOptions { on_bad_image: OnBadImage::Fail, ..opts(8, 4) };
    let e = prepared::prepare(&spec, &tmp.path().join("q"), &strict, &Quiet).unwrap_err();
    assert!(matches!(e, DataError::BadImage { .. }), "{e}");
    assert!(e.to_string().contains("broken.png"), "{e}");
}

#[test]
fn clear_errors_for_empty_mixed_and_missing_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = prepared::prepare(&DatasetSpec::Folder(empty.clone()), &tmp.path().join("p"), &opts(8, 4), &Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no PNG, JPEG or WebP images") && e.contains("empty"), "{e}");

    let missing = tmp.path().join("nowhere");
    let e = prepared::prepare(&DatasetSpec::Folder(missing), &tmp.path().join("p2"), &opts(8, 4), &Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nowhere") && e.contains("no such file"), "{e}");

    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    image::GrayImage::from_pixel(8, 8, image::Luma([9])).save(mixed.join("a.png")).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 200, 3])).save(mixed.join("b.png")).unwrap();
    let auto = PrepareOptions { channels: Some(ChannelMode::Auto), ..opts(8, 4) };
    let e = prepared::prepare(&DatasetSpec::Folder(mixed.clone()), &tmp.path().join("p3"), &auto, &Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.png") && e.contains("mixed channel counts"), "{e}");
    // Converting every image is the way out.
    let gray = PrepareOptions { channels: Some(ChannelMode::Gray), ..opts(8, 4) };
    let done = prepared::prepare(&DatasetSpec::Folder(mixed), &tmp.path().join("p4"), &gray, &Quiet).unwrap();
    assert_eq!((done.manifest.count, done.manifest.channels), (2, 1));

    // An output path that is a file.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = prepared::prepare(&DatasetSpec::Folder(empty), &file, &opts(8, 4), &Quiet).unwrap_err().to_string();
    assert!(e.contains("is not a directory"), "{e}");

    // A prepared set at another size is refused for training with both ways out.
    let idx = tmp.path().join("train-images-idx3-ubyte");
    write_bytes(&idx, &idx_images(4, 28, 28, 4), Compress::Plain);
    prepared::prepare(&DatasetSpec::Mnist(idx), &tmp.path().join("m"), &opts(32, 4), &Quiet).unwrap();
    let e = SampleStore::open(&DatasetSpec::Prepared(tmp.path().join("m")), 64, None, tmp.path(), &Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prepared at 32x32") && e.contains("--image-size 32"), "{e}");
    assert!(Manifest::read(&tmp.path().join("m")).unwrap().count == 4);
}

#[test]
fn tar_and_lsun_sources_prepare_with_their_labels() {
    let tmp = tempfile::tempdir().unwrap();
    // A WebDataset tar: key.webp + key.cls.
    let tar_path = tmp.path().join("faces.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        for i in 0..7u32 {
            let img =
                image::RgbImage::from_fn(10, 12, |x, y| image::Rgb([(x * 20) as u8, (y * 20) as u8, (i * 30) as u8]));
            let mut bytes = Vec::new();
            image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
                .encode(img.as_raw(), 10, 12, image::ExtendedColorType::Rgb8)
                .unwrap();
            for (name, data) in
                [(format!("{i:05}.webp"), bytes), (format!("{i:05}.cls"), format!("{}", i % 3).into_bytes())]
            {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, name, data.as_slice()).unwrap();
            }
        }
        b.finish().unwrap();
    }
    let spec = DatasetSpec::Tar(tar_path);
    let done = prepared::prepare(&spec, &tmp.path().join("tar"), &opts(8, 3), &Quiet).unwrap();
    assert_eq!((done.manifest.count, done.manifest.labels), (7, true));
    assert_same_as_in_memory(&spec, &tmp.path().join("tar"), 8);
    let labels = PreparedSet::open(&tmp.path().join("tar")).unwrap().labels().unwrap().unwrap();
    assert_eq!(labels, vec![0, 1, 2, 0, 1, 2, 0]);

    // LSUN: an LMDB whose values are WebP images.
    let lmdb = tmp.path().join("bedroom_train_lmdb");
    std::fs::create_dir(&lmdb).unwrap();
    {
        let env = unsafe { heed::EnvOpenOptions::new().map_size(1 << 22).open(&lmdb) }.unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let db: heed::Database<heed::types::Bytes, heed::types::Bytes> = env.create_database(&mut wtxn, None).unwrap();
        for i in 0..5u32 {
            let img =
                image::RgbImage::from_fn(14, 10, |x, y| image::Rgb([(x * 15) as u8, (i * 40) as u8, (y * 25) as u8]));
            let mut bytes = Vec::new();
            image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
                .encode(img.as_raw(), 14, 10, image::ExtendedColorType::Rgb8)
                .unwrap();
            db.put(&mut wtxn, format!("{:040x}", i * 7919).as_bytes(), &bytes).unwrap();
        }
        wtxn.commit().unwrap();
    }
    let spec = DatasetSpec::Lsun(lmdb);
    let done = prepared::prepare(&spec, &tmp.path().join("lsun"), &opts(8, 2), &Quiet).unwrap();
    assert_eq!((done.manifest.count, done.manifest.shards.len(), done.manifest.labels), (5, 3, false));
    assert_same_as_in_memory(&spec, &tmp.path().join("lsun"), 8);
}
