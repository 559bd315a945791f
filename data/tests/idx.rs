//! MNIST / Fashion-MNIST IDX loading from files written by the test.

mod common;

use common::*;
use data::{DataError, DatasetSpec};

fn mnist_dir(how: Compress, n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let suffix = match how {
        Compress::Plain => "",
        Compress::Gzip => ".gz",
        Compress::Xz => ".xz",
    };
    write_bytes(&dir.path().join(format!("train-images-idx3-ubyte{suffix}")), &idx_images(n as u32, 28, 28, n), how);
    let labels: Vec<u8> = (0..n).map(|k| (k % 10) as u8).collect();
    write_bytes(&dir.path().join(format!("train-labels-idx1-ubyte{suffix}")), &idx_labels(&labels), how);
    // Test-split files beside them must not confuse the lookup.
    write_bytes(&dir.path().join("t10k-images-idx3-ubyte"), &idx_images(1, 28, 28, 1), Compress::Plain);
    dir
}

#[test]
fn plain_idx_loads_exact_pixels_and_labels() {
    let dir = mnist_dir(Compress::Plain, 5);
    let spec: DatasetSpec = format!("mnist:{}", dir.path().display()).parse().unwrap();
    let d = spec.load(28, None).unwrap();
    assert_eq!((d.name.as_str(), d.nc, d.image_size, d.len), ("mnist", 1, 28, 5));
    assert_eq!(d.pixels.len(), 5 * 784);
    for k in 0..5 {
        let s = d.sample(k);
        for p in [0, 1, 300, 783] {
            assert_eq!(s[p], unit(idx_pixel(k, p)), "image {k} pixel {p}");
        }
    }
    assert_eq!(d.labels, Some(vec![0, 1, 2, 3, 4]));
}

#[test]
fn gzip_idx_and_direct_file_path_and_resize() {
    let dir = mnist_dir(Compress::Gzip, 6);
    let file = dir.path().join("train-images-idx3-ubyte.gz");
    let spec = DatasetSpec::FashionMnist(file);
    let d = spec.load(64, Some(4)).unwrap();
    assert_eq!((d.name.as_str(), d.nc, d.image_size, d.len), ("fashion-mnist", 1, 64, 4));
    assert_eq!(d.sample_len(), 64 * 64);
    assert_eq!(d.pixels.len(), 4 * 64 * 64);
    assert!(d.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(d.labels, Some(vec![0, 1, 2, 3]));
    // Same data as the plain files.
    let plain = mnist_dir(Compress::Plain, 6);
    let p = DatasetSpec::Mnist(plain.path().into()).load(64, Some(4)).unwrap();
    assert_eq!(p.pixels, d.pixels);
    // xz works too.
    let xz = mnist_dir(Compress::Xz, 6);
    let x = DatasetSpec::Mnist(xz.path().into()).load(64, Some(4)).unwrap();
    assert_eq!(x.pixels, d.pixels);
}

#[test]
fn constant_image_stays_constant_when_resized() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = idx_images(1, 28, 28, 0);
    bytes.extend(std::iter::repeat_n(200u8, 784));
    write_bytes(&dir.path().join("train-images-idx3-ubyte"), &bytes, Compress::Plain);
    let d = DatasetSpec::Mnist(dir.path().into()).load(64, None).unwrap();
    assert!(d.pixels.iter().all(|v| *v == unit(200)));
    assert_eq!(d.labels, None, "no labels file, no labels");
}

#[test]
fn subdirectory_and_other_idx_names_are_found() {
    // The shared copy's layout: <root>/mnist/train-images-idx3-ubyte.gz
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("mnist")).unwrap();
    write_bytes(&root.path().join("mnist/train-images-idx3-ubyte.gz"), &idx_images(3, 28, 28, 3), Compress::Gzip);
    let d = DatasetSpec::Mnist(root.path().into()).load(28, None).unwrap();
    assert_eq!(d.len, 3);

    // ORL-faces style: non-square 92x112, a name that is not train-images.
    let orl = tempfile::tempdir().unwrap();
    write_bytes(&orl.path().join("orl-faces-images-idx3-ubyte.gz"), &idx_images(2, 112, 92, 2), Compress::Gzip);
    write_bytes(&orl.path().join("orl-faces-labels-idx1-ubyte.gz"), &idx_labels(&[7, 9]), Compress::Gzip);
    let d = DatasetSpec::Mnist(orl.path().into()).load(64, None).unwrap();
    assert_eq!((d.len, d.image_size, d.sample_len()), (2, 64, 4096));
    assert_eq!(d.labels, Some(vec![7, 9]));
}

#[test]
fn wrong_magic_is_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A labels file where the images should be.
    write_bytes(&dir.path().join("train-images-idx3-ubyte"), &idx_labels(&[1, 2, 3]), Compress::Plain);
    let err = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err();
    assert!(matches!(err, DataError::BadMagic { found: 2049, expected: 2051, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    assert!(msg.contains("0x00000801") && msg.contains("0x00000803"), "{msg}");
    assert!(msg.contains("byte offset 0"), "{msg}");

    // And images where the labels should be.
    let dir = mnist_dir(Compress::Plain, 2);
    write_bytes(&dir.path().join("train-labels-idx1-ubyte"), &idx_images(2, 28, 28, 2), Compress::Plain);
    let msg = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err().to_string();
    assert!(msg.contains("train-labels-idx1-ubyte") && msg.contains("bad magic"), "{msg}");
}

#[test]
fn truncated_images_name_file_record_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = idx_images(10, 28, 28, 4);
    bytes.extend_from_slice(&[0; 100]); // half of record 4
    write_bytes(&dir.path().join("train-images-idx3-ubyte.gz"), &bytes, Compress::Gzip);
    let err = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
    assert!(msg.contains("image record 4 of 10"), "{msg}");
    assert!(msg.contains(&format!("byte offset {}", 16 + 4 * 784)), "{msg}");
    assert!(matches!(err, DataError::Truncated { offset: 3152, available: 100, .. }));
    // The first 4 images are complete, so a limit of 4 loads.
    assert_eq!(DatasetSpec::Mnist(dir.path().into()).load(28, Some(4)).unwrap().len, 4);

    // A header cut short.
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), b"").unwrap();
    write_bytes(&dir.path().join("train-images-idx3-ubyte.gz"), &bytes[..10], Compress::Gzip);
    let msg = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err().to_string();
    assert!(msg.contains("header") && msg.contains("needs 16 bytes"), "{msg}");
}

#[test]
fn label_count_must_match_and_bad_dims_are_rejected() {
    let dir = mnist_dir(Compress::Plain, 3);
    write_bytes(&dir.path().join("train-labels-idx1-ubyte"), &idx_labels(&[1, 2]), Compress::Plain);
    let msg = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err().to_string();
    assert!(msg.contains("train-labels-idx1-ubyte") && msg.contains("2 labels"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    write_bytes(&dir.path().join("train-images-idx3-ubyte"), &idx_images(1, 0, 28, 0), Compress::Plain);
    let msg = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err().to_string();
    assert!(msg.contains("dimensions 0x28") && msg.contains("byte offset 8"), "{msg}");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let msg = DatasetSpec::Mnist(dir.path().into()).load(28, None).unwrap_err().to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    let gone = dir.path().join("nope");
    let msg = DatasetSpec::Mnist(gone.clone()).load(28, None).unwrap_err().to_string();
    assert!(msg.contains("nope") && msg.contains("no such file"), "{msg}");
    let msg = DatasetSpec::Mnist(dir.path().into()).load(0, None).unwrap_err().to_string();
    assert!(msg.contains("image size"), "{msg}");
}
