//! CIFAR-10 binary loading from files written by the test.

mod common;

use common::*;
use data::{DataError, DatasetSpec};

#[test]
fn batches_in_every_compression_load_in_order() {
    let dir = tempfile::tempdir().unwrap();
    write_bytes(&dir.path().join("data_batch_1.bin"), &cifar_records(0, 3), Compress::Plain);
    write_bytes(&dir.path().join("data_batch_2.bin.gz"), &cifar_records(3, 2), Compress::Gzip);
    write_bytes(&dir.path().join("data_batch_3.bin.xz"), &cifar_records(5, 4), Compress::Xz);
    // The test batch is not training data.
    write_bytes(&dir.path().join("test_batch.bin"), &cifar_records(100, 1), Compress::Plain);
    let spec: DatasetSpec = format!("cifar10:{}", dir.path().display()).parse().unwrap();
    let d = spec.load(32, None).unwrap();
    assert_eq!((d.name.as_str(), d.nc, d.image_size, d.len), ("cifar10", 3, 32, 9));
    assert_eq!(d.labels, Some((0..9).map(|k| (k % 10) as u8).collect()));
    for k in 0..9 {
        let s = d.sample(k);
        for (c, p) in [(0, 0), (1, 500), (2, 1023)] {
            assert_eq!(s[c * 1024 + p], unit(cifar_pixel(k, c, p)), "record {k} c{c} p{p}");
        }
    }
    // A limit reads across files and stops.
    let l = spec.load(32, Some(4)).unwrap();
    assert_eq!(l.len, 4);
    assert_eq!(l.pixels[..], d.pixels[..4 * 3072]);
    // Resized.
    let big = spec.load(64, Some(2)).unwrap();
    assert_eq!((big.len, big.sample_len()), (2, 3 * 64 * 64));
    assert!(big.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn archive_subdirectory_and_single_file() {
    let root = tempfile::tempdir().unwrap();
    let sub = root.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&sub).unwrap();
    for k in 1..=5 {
        write_bytes(&sub.join(format!("data_batch_{k}.bin")), &cifar_records(k * 10, 2), Compress::Plain);
    }
    let d = DatasetSpec::Cifar10(root.path().into()).load(32, None).unwrap();
    assert_eq!(d.len, 10);
    assert_eq!(d.label(2), Some(0)); // record 20
    let one = DatasetSpec::Cifar10(sub.join("data_batch_3.bin")).load(32, None).unwrap();
    assert_eq!(one.len, 2);
    assert_eq!(one.sample(0), d.sample(4));
}

#[test]
fn truncated_file_names_file_and_partial_record_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = cifar_records(0, 2);
    bytes.extend_from_slice(&[1; 100]);
    write_bytes(&dir.path().join("data_batch_1.bin.xz"), &bytes, Compress::Xz);
    let err = DatasetSpec::Cifar10(dir.path().into()).load(32, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("data_batch_1.bin.xz"), "{msg}");
    assert!(msg.contains("byte offset 6146") && msg.contains("record 2"), "{msg}");
    assert!(msg.contains("not a multiple of 3073"), "{msg}");
    assert!(matches!(err, DataError::Truncated { offset: 6146, available: 100, .. }));
}

#[test]
fn bad_label_and_missing_batches_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = cifar_records(0, 3);
    bytes[2 * 3073] = 42;
    write_bytes(&dir.path().join("data_batch_1.bin"), &bytes, Compress::Plain);
    let msg = DatasetSpec::Cifar10(dir.path().into()).load(32, None).unwrap_err().to_string();
    assert!(msg.contains("data_batch_1.bin") && msg.contains("byte offset 6146"), "{msg}");
    assert!(msg.contains("label byte 42"), "{msg}");

    write_bytes(&dir.path().join("data_batch_1.bin"), &cifar_records(0, 1), Compress::Plain);
    write_bytes(&dir.path().join("data_batch_3.bin"), &cifar_records(0, 1), Compress::Plain);
    let msg = DatasetSpec::Cifar10(dir.path().into()).load(32, None).unwrap_err().to_string();
    assert!(msg.contains("data_batch_2.bin") && msg.contains("missing"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let msg = DatasetSpec::Cifar10(empty.path().into()).load(32, None).unwrap_err().to_string();
    assert!(msg.contains("data_batch_1.bin") && msg.contains(&empty.path().display().to_string()), "{msg}");
}
