//! Sample grids: a batch of images tiled into one PNG, as torchvision's
//! `save_image(tensor, path, normalize=True)` writes the PyTorch example's `fake_samples_*.png`.
//!
//! The range is fixed at [-1, 1] (the generator's `tanh` range) rather than each batch's
//! min/max, so that grids from different steps are comparable. Files are written to a temporary
//! name and renamed, so a dashboard or a person watching `samples/` never sees half a PNG.

use std::io::{BufWriter, Write};
use std::path::Path;

use image::{ImageEncoder, RgbImage};

use crate::DataError;

/// Pixels between tiles and around the border (torchvision's default).
pub const PADDING: usize = 2;

/// Shape checks shared by [`grid_image`] and [`save_grid`].
fn check(images: &[f32], n: usize, nc: usize, size: usize, nrow: usize) -> Result<(), String> {
    if n == 0 || size == 0 || nrow == 0 {
        return Err(format!(
            "a grid needs at least one image, a non-zero size and a non-zero nrow (n={n}, size={size}, nrow={nrow})"
        ));
    }
    if nc != 1 && nc != 3 {
        return Err(format!("a grid needs 1 or 3 channels, not {nc}"));
    }
    let expected = n * nc * size * size;
    if images.len() != expected {
        return Err(format!(
            "image buffer holds {} values, but {n} images of {nc}x{size}x{size} need {expected}",
            images.len()
        ));
    }
    Ok(())
}

/// `[-1, 1]` to a byte as `save_image` does: to `[0, 1]`, clamp, `* 255 + 0.5`, truncate.
fn to_byte(v: f32) -> u8 {
    (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Width and height in pixels of the grid of `n` images of `size` pixels, `nrow` per row.
pub fn grid_size(n: usize, size: usize, nrow: usize) -> (u32, u32) {
    let cols = nrow.min(n).max(1);
    let rows = n.div_ceil(cols);
    let cell = size + PADDING;
    ((cols * cell + PADDING) as u32, (rows * cell + PADDING) as u32)
}

/// Tiles `n` NCHW images (`nc` 1 or 3, `size x size`, values in [-1, 1]) into an RGB image
/// with `nrow` images per row and [`PADDING`] black pixels between and around tiles
/// (torchvision's `make_grid`); 1-channel images are shown as gray.
///
/// # Panics
/// If `images.len() != n * nc * size * size`, `nc` is not 1 or 3, or `n`, `size` or `nrow`
/// is 0 ([`save_grid`] checks these and returns an error instead).
pub fn grid_image(images: &[f32], n: usize, nc: usize, size: usize, nrow: usize) -> RgbImage {
    if let Err(msg) = check(images, n, nc, size, nrow) {
        panic!("grid_image: {msg}");
    }
    let cols = nrow.min(n);
    let cell = size + PADDING;
    let (width, height) = grid_size(n, size, nrow);
    let mut img = RgbImage::new(width, height);
    let plane = size * size;
    for (k, sample) in images.chunks_exact(nc * plane).enumerate() {
        let (x0, y0) = ((k % cols) * cell + PADDING, (k / cols) * cell + PADDING);
        for y in 0..size {
            for x in 0..size {
                let at = y * size + x;
                let px = if nc == 1 {
                    let v = to_byte(sample[at]);
                    [v, v, v]
                } else {
                    [to_byte(sample[at]), to_byte(sample[plane + at]), to_byte(sample[2 * plane + at])]
                };
                img.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(px));
            }
        }
    }
    img
}

/// Writes [`grid_image`] as a PNG at `path`, atomically (temporary file in the same
/// directory, then rename). The directory must exist.
pub fn save_grid(path: &Path, images: &[f32], n: usize, nc: usize, size: usize, nrow: usize) -> Result<(), DataError> {
    check(images, n, nc, size, nrow).map_err(|msg| DataError::InvalidArgument { path: path.to_path_buf(), msg })?;
    let img = grid_image(images, n, nc, size, nrow);
    write_png(path, img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
}

/// Writes one CHW image (`nc` 1 or 3, values in [-1, 1]) as a `size x size` PNG with no border:
/// gray for one channel, RGB for three, the bytes [`grid_image`] would put in its tile.
pub fn save_image(path: &Path, image: &[f32], nc: usize, size: usize) -> Result<(), DataError> {
    check(image, 1, nc, size, 1).map_err(|msg| DataError::InvalidArgument { path: path.to_path_buf(), msg })?;
    let plane = size * size;
    let (bytes, color): (Vec<u8>, _) = if nc == 1 {
        (image.iter().map(|v| to_byte(*v)).collect(), image::ExtendedColorType::L8)
    } else {
        let interleaved = (0..plane).flat_map(|at| (0..3).map(move |c| to_byte(image[c * plane + at]))).collect();
        (interleaved, image::ExtendedColorType::Rgb8)
    };
    write_png(path, &bytes, size as u32, size as u32, color)
}

/// Encodes `raw` as a PNG at `path`, atomically: a temporary file in the same directory,
/// synced, then renamed, so nobody watching the directory sees half a file.
fn write_png(
    path: &Path,
    raw: &[u8],
    width: u32,
    height: u32,
    color: image::ExtendedColorType,
) -> Result<(), DataError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates 0600 files; a sample grid is for everyone who can read the run directory.
    #[cfg(unix)]
    let permissions = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o644)
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".grid-").suffix(".png.tmp");
    #[cfg(unix)]
    builder.permissions(permissions);
    let tmp = builder.tempfile_in(dir).map_err(|e| DataError::io(dir, "create a temporary file in", e))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        image::codecs::png::PngEncoder::new(&mut w)
            .write_image(raw, width, height, color)
            .map_err(|e| DataError::Encode { path: path.to_path_buf(), source: e })?;
        w.flush().map_err(|e| DataError::io(path, "write", e))?;
    }
    tmp.as_file().sync_all().map_err(|e| DataError::io(path, "sync", e))?;
    tmp.persist(path).map_err(|e| DataError::io(path, "rename a temporary file to", e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_image_has_its_own_size_and_the_grid_tiles_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4;
        let rgb: Vec<f32> = (0..3 * size * size).map(|i| (i as f32 / 24.0) - 1.0).collect();
        let path = dir.path().join("one.png");
        save_image(&path, &rgb, 3, size).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (size as u32, size as u32));
        let grid = grid_image(&rgb, 1, 3, size, 1);
        for (x, y, px) in img.enumerate_pixels() {
            assert_eq!(px, grid.get_pixel(x + PADDING as u32, y + PADDING as u32));
        }

        let gray: Vec<f32> = (0..size * size).map(|i| (i as f32 / 8.0) - 1.0).collect();
        save_image(&path, &gray, 1, size).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!(img.color(), image::ColorType::L8, "one channel stays gray");
        assert_eq!(img.to_luma8().get_pixel(3, 3).0[0], to_byte(gray[15]));
        assert!(save_image(&path, &gray, 3, size).is_err(), "a wrong buffer length is an error");
    }

    #[test]
    fn bytes_follow_save_image() {
        assert_eq!(to_byte(-1.0), 0);
        assert_eq!(to_byte(1.0), 255);
        assert_eq!(to_byte(0.0), 128);
        assert_eq!(to_byte(-5.0), 0);
        assert_eq!(to_byte(7.0), 255);
        assert_eq!(to_byte(f32::NAN), 0);
    }

    #[test]
    fn layout_matches_make_grid() {
        // 5 gray images of 3x3 with value = index, 2 per row -> 3 rows.
        let n = 5;
        let images: Vec<f32> = (0..n).flat_map(|k| std::iter::repeat_n(k as f32 / 4.0 * 2.0 - 1.0, 9)).collect();
        let img = grid_image(&images, n, 1, 3, 2);
        assert_eq!((img.width(), img.height()), (2 * 5 + 2, 3 * 5 + 2));
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]); // padding
        assert_eq!(img.get_pixel(2, 2).0, [0, 0, 0]); // image 0 = -1
        assert_eq!(img.get_pixel(7, 2).0, [64, 64, 64]); // image 1 = -0.5
        assert_eq!(img.get_pixel(9, 9).0, [191, 191, 191]); // image 3 = 0.5, row 1 col 1
        assert_eq!(img.get_pixel(2, 12).0, [255, 255, 255]); // image 4, row 2 col 0
        assert_eq!(img.get_pixel(7, 12).0, [0, 0, 0]); // empty cell stays padding colour
    }
}
