//! The built-in dataset and sample grids.

use data::{DataError, DatasetSpec, save_grid, shapes};

#[test]
fn shapes_are_deterministic_in_range_and_varied() {
    let a = DatasetSpec::Shapes.load(32, Some(300)).unwrap();
    let b = "builtin:shapes".parse::<DatasetSpec>().unwrap().load(32, Some(300)).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.name.as_str(), a.nc, a.image_size, a.len), ("shapes", 3, 32, 300));
    assert!(a.pixels.iter().all(|v| (-1.0..=1.0).contains(v) && v.is_finite()));
    // A prefix of a longer dataset: the limit keeps the first N samples.
    let short = DatasetSpec::Shapes.load(32, Some(10)).unwrap();
    assert_eq!(short.pixels[..], a.pixels[..10 * a.sample_len()]);
    // Every kind appears, every image has a visible shape, samples differ.
    let labels = a.labels.as_ref().unwrap();
    for kind in [shapes::DISC, shapes::SQUARE, shapes::TRIANGLE] {
        assert!(labels.iter().filter(|l| **l == kind).count() > 50, "kind {kind}");
    }
    for i in 0..a.len {
        let s = a.sample(i);
        let (lo, hi) = s.iter().fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        assert!(hi - lo > 0.2, "sample {i} is nearly flat");
    }
    assert_ne!(a.sample(0), a.sample(1));
    // Anti-aliasing leaves intermediate values at edges, not only a few flat colours.
    let distinct: std::collections::BTreeSet<u32> = a.sample(0).iter().map(|v| v.to_bits()).collect();
    assert!(distinct.len() > 6, "{}", distinct.len());
}

#[test]
fn shapes_default_length() {
    let d = DatasetSpec::Shapes.load(8, None).unwrap();
    assert_eq!(d.len, shapes::DEFAULT_LEN);
    assert_eq!(d.pixels.len(), shapes::DEFAULT_LEN * 3 * 64);
    assert_eq!(DatasetSpec::Shapes.load(8, Some(1 << 20)).unwrap().len, shapes::DEFAULT_LEN);
}

#[test]
fn grid_png_has_make_grid_dimensions_and_is_written_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let d = DatasetSpec::Shapes.load(16, Some(10)).unwrap();
    let path = dir.path().join("fake_samples_epoch_000.png");
    save_grid(&path, &d.pixels, 10, 3, 16, 8).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (8 * 18 + 2, 2 * 18 + 2));
    assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "no temporary file left behind");
    // Overwriting works (rename over an existing file).
    save_grid(&path, &d.pixels, 10, 3, 16, 8).unwrap();

    // Gray images.
    let g = dir.path().join("gray.png");
    save_grid(&g, &vec![0.0; 4 * 28 * 28], 4, 1, 28, 8).unwrap();
    let img = image::open(&g).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (4 * 30 + 2, 32));
    assert_eq!(img.get_pixel(2, 2).0, [128, 128, 128]);
}

#[test]
fn grid_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.png");
    let err = save_grid(&path, &[0.0; 10], 2, 3, 4, 8).unwrap_err();
    assert!(matches!(err, DataError::InvalidArgument { .. }), "{err:?}");
    assert!(err.to_string().contains("g.png") && err.to_string().contains("96"), "{err}");
    let nowhere = dir.path().join("no/such/dir/g.png");
    let err = save_grid(&nowhere, &[0.0; 16], 1, 1, 4, 8).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}
