//! CIFAR-10, python version (torchvision's `cifar-10-batches-py`), from batches real Python and
//! numpy wrote (tests/fixtures/make_cifar_py.py: protocols 2, 4 and 5).

mod common;

use std::path::PathBuf;

use common::*;
use data::{DataError, DatasetSpec};

fn fixture(protocol: u8) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/cifar-10-batches-py-p{protocol}"))
}

#[test]
fn python_written_batches_load_like_the_binary_version() {
    let bin = tempfile::tempdir().unwrap();
    write_bytes(&bin.path().join("data_batch_1.bin"), &cifar_records(0, 4), Compress::Plain);
    let expected = DatasetSpec::Cifar10(bin.path().into()).load(32, None).unwrap();
    assert_eq!(expected.labels, Some(vec![0, 1, 2, 3]));
    for protocol in [2, 4, 5] {
        let d = DatasetSpec::Cifar10(fixture(protocol)).load(32, None).unwrap();
        assert_eq!(d, expected, "protocol {protocol}");
        let two = DatasetSpec::Cifar10(fixture(protocol).join("data_batch_1")).load(32, Some(2)).unwrap();
        assert_eq!((two.len, &two.pixels[..]), (2, &expected.pixels[..2 * 3072]), "protocol {protocol}");
    }
}

#[test]
fn torchvision_layout_under_a_parent_directory() {
    let root = tempfile::tempdir().unwrap();
    let py = root.path().join("cifar-10-batches-py");
    std::fs::create_dir(&py).unwrap();
    let p2 = std::fs::read(fixture(2).join("data_batch_1")).unwrap();
    let p4 = std::fs::read(fixture(4).join("data_batch_1")).unwrap();
    write_bytes(&py.join("data_batch_1"), &p4, Compress::Plain);
    write_bytes(&py.join("data_batch_2.xz"), &p2, Compress::Xz);
    write_bytes(&py.join("data_batch_4"), &p2, Compress::Plain);
    write_bytes(&py.join("test_batch"), &p2, Compress::Plain);
    let msg = DatasetSpec::Cifar10(root.path().into()).load(32, None).unwrap_err().to_string();
    assert!(msg.contains("data_batch_3 (plain, .gz or .xz) is missing") && msg.contains("data_batch_4"), "{msg}");

    std::fs::remove_file(py.join("data_batch_4")).unwrap();
    let d = DatasetSpec::Cifar10(root.path().into()).load(32, None).unwrap();
    assert_eq!(d.len, 8);
    assert_eq!(d.sample(5), d.sample(1));
    assert_eq!(DatasetSpec::Cifar10(root.path().into()).load(32, Some(6)).unwrap().len, 6);

    // A download cut short.
    write_bytes(&py.join("data_batch_2.xz"), &p2[..p2.len() - 5000], Compress::Xz);
    let err = DatasetSpec::Cifar10(py.clone()).load(32, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("data_batch_2.xz") && msg.contains("truncated") && msg.contains("BINUNICODE"), "{msg}");
    assert!(matches!(err, DataError::Truncated { .. }), "{err:?}");
}
