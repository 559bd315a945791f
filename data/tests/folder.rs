//! Folder-of-images loading: PNG and JPEG, resize of the shorter side, centre crop.

use data::{DataError, DatasetSpec};

fn unit(b: u8) -> f32 {
    b as f32 / 255.0 * 2.0 - 1.0
}

/// A landscape 40x20 PNG: red, except a green band in the 5 leftmost columns, which the
/// centre crop must remove entirely (resized to 32x16, crop starts at column 8).
fn write_png(path: &std::path::Path) {
    let img =
        image::RgbImage::from_fn(40, 20, |x, _| if x < 5 { image::Rgb([0, 255, 0]) } else { image::Rgb([255, 0, 0]) });
    img.save(path).unwrap();
}

#[test]
fn png_and_jpeg_of_any_shape_become_square_rgb() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"));
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    // A portrait gray JPEG (must become 3 equal channels).
    image::GrayImage::from_pixel(30, 50, image::Luma([128])).save(dir.path().join("sub/b.JPG")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();

    let spec: DatasetSpec = format!("folder:{}", dir.path().display()).parse().unwrap();
    let d = spec.load(16, None).unwrap();
    assert_eq!((d.name.as_str(), d.nc, d.image_size, d.len), ("folder", 3, 16, 2));
    assert_eq!(d.pixels.len(), 2 * 3 * 16 * 16);
    assert_eq!(d.labels, None);
    // Sorted by path: a.png first. All of it is pure red: the green band was cropped away.
    let a = d.sample(0);
    assert!(a[..256].iter().all(|v| *v == unit(255)), "R");
    assert!(a[256..].iter().all(|v| *v == unit(0)), "G and B");
    // The JPEG: gray 128 in every channel (JPEG may be off by a level or two).
    let b = d.sample(1);
    assert!(b.iter().all(|v| (v - unit(128)).abs() <= 3.0 / 255.0 * 2.0), "{:?}", &b[..4]);

    let one = spec.load(16, Some(1)).unwrap();
    assert_eq!(one.len, 1);
    assert_eq!(one.sample(0), a);
}

#[test]
fn crop_keeps_the_centre() {
    // A 20x60 portrait: top and bottom thirds blue, middle third white. Resized to 8x24,
    // centre-cropped to 8x8 = the middle third: white only.
    let dir = tempfile::tempdir().unwrap();
    image::RgbImage::from_fn(20, 60, |_, y| {
        if (20..40).contains(&y) { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 255]) }
    })
    .save(dir.path().join("p.png"))
    .unwrap();
    let d = DatasetSpec::Folder(dir.path().into()).load(8, None).unwrap();
    // The middle rows are exactly white; the crop edges may blend a little blue in.
    let s = d.sample(0);
    for ch in 0..3 {
        for y in 1..7 {
            for x in 0..8 {
                assert_eq!(s[ch * 64 + y * 8 + x], 1.0, "ch {ch} ({x},{y})");
            }
        }
    }
}

#[test]
fn undecodable_image_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("good.png"));
    std::fs::write(dir.path().join("broken.png"), b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let err = DatasetSpec::Folder(dir.path().into()).load(16, None).unwrap_err();
    assert!(matches!(err, DataError::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.png"), "{err}");
}

#[test]
fn empty_folder_names_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.md"), "no images").unwrap();
    let err = DatasetSpec::Folder(dir.path().into()).load(16, None).unwrap_err();
    assert!(matches!(err, DataError::NoImages { .. }), "{err:?}");
    assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    let gone = DatasetSpec::Folder(dir.path().join("missing")).load(16, None).unwrap_err();
    assert!(gone.to_string().contains("missing"), "{gone}");
}
