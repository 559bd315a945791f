//! Loads the real data sets from `shared/data` (not part of the default test run).
//!
//! Run with: `cargo test -p data --test real_data -- --ignored --nocapture`

use std::path::PathBuf;
use std::time::Instant;

use data::DatasetSpec;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

fn load(spec: DatasetSpec, size: usize) -> data::Dataset {
    let t = Instant::now();
    let d = spec.load(size, None).unwrap();
    eprintln!("{spec} at {size}: {} samples in {:.2?}", d.len, t.elapsed());
    d
}

fn class_counts(d: &data::Dataset, classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for &l in d.labels.as_ref().unwrap() {
        counts[l as usize] += 1;
    }
    counts
}

#[test]
#[ignore = "needs /work/shared/data"]
fn real_mnist_fashion_cifar_and_orl() {
    let root = shared();
    let mnist = load(DatasetSpec::Mnist(root.join("mnist")), 28);
    assert_eq!((mnist.len, mnist.nc), (60_000, 1));
    assert_eq!(class_counts(&mnist, 10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    // Background is 0 -> -1; digits reach full ink.
    assert_eq!(mnist.sample(0)[0], -1.0);
    assert!(mnist.sample(0).contains(&1.0));
    let mnist64 = load(DatasetSpec::Mnist(root.join("mnist")), 64);
    assert_eq!((mnist64.len, mnist64.sample_len()), (60_000, 4096));

    let fashion = load(DatasetSpec::FashionMnist(root.join("fashion-mnist")), 32);
    assert_eq!(fashion.len, 60_000);
    assert_eq!(class_counts(&fashion, 10), vec![6000; 10]);

    let cifar = load(DatasetSpec::Cifar10(root.join("cifar-10")), 32);
    assert_eq!((cifar.len, cifar.nc), (50_000, 3));
    assert_eq!(class_counts(&cifar, 10), vec![5000; 10]);
    // The first training image of CIFAR-10 is a frog (class 6).
    assert_eq!(cifar.label(0), Some(6));

    let orl = load(DatasetSpec::Mnist(root.join("orl-faces")), 64);
    assert_eq!((orl.len, orl.sample_len()), (400, 4096));
    assert_eq!(class_counts(&orl, 40), vec![10; 40]);
}
