//! Encoded images (PNG, JPEG, WebP) from any container (a file, a tar member, an LMDB value)
//! to resized, centre-cropped CHW pixels.
//!
//! Every source of encoded images goes through [`decode_into`], so an image gives the same
//! pixels whether it sits in a folder, a tar or a database, and whether it is prepared into
//! shards or loaded into memory.

use std::fmt;
use std::str::FromStr;

use crate::resize::{PixelOut, ResizeCrop};

/// The channels encoded images are converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Channels {
    /// Like PIL's `convert("RGB")`, what the PyTorch example's `ImageFolder` does: gray is
    /// replicated, alpha dropped.
    #[default]
    Rgb,
    /// One luma channel.
    Gray,
}

impl Channels {
    /// Channels per sample.
    pub fn count(self) -> usize {
        match self {
            Channels::Rgb => 3,
            Channels::Gray => 1,
        }
    }

    /// The conversion that keeps `nc` channels (1 or 3).
    pub fn for_count(nc: usize) -> Option<Channels> {
        match nc {
            1 => Some(Channels::Gray),
            3 => Some(Channels::Rgb),
            _ => None,
        }
    }
}

impl FromStr for Channels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "rgb" | "3" => Ok(Channels::Rgb),
            "gray" | "grey" | "1" => Ok(Channels::Gray),
            _ => Err(format!("unknown channels '{s}': expected rgb or gray")),
        }
    }
}

impl fmt::Display for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channels::Rgb => "rgb",
            Channels::Gray => "gray",
        })
    }
}

/// The file name endings of the encoded images every source accepts.
pub(crate) const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Whether `name` ends in one of [`EXTENSIONS`] (any case).
pub(crate) fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, e)| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Channels the image itself has: 1 for gray (with or without alpha), 3 otherwise.
pub(crate) fn native_channels(img: &image::DynamicImage) -> usize {
    if img.color().has_color() { 3 } else { 1 }
}

/// Decodes `bytes` (format guessed from the content) without resizing.
pub(crate) fn decode(bytes: &[u8]) -> Result<image::DynamicImage, image::ImageError> {
    image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?.decode()
}

/// Converts a decoded image to `channels`, resizes and crops it to `size x size` and writes its
/// CHW pixels (`channels.count() * size * size`) into `out`.
pub(crate) fn resize_into<T: PixelOut>(
    img: &image::DynamicImage,
    channels: Channels,
    size: usize,
    scratch: &mut Vec<f32>,
    out: &mut [T],
) {
    match channels {
        Channels::Rgb => {
            let rgb = img.to_rgb8();
            let plan = ResizeCrop::new(rgb.width() as usize, rgb.height() as usize, size);
            let raw = rgb.as_raw();
            for (c, plane) in out.chunks_exact_mut(size * size).enumerate() {
                plan.run(&raw[c..], 3, scratch, plane);
            }
        }
        Channels::Gray => {
            let luma = img.to_luma8();
            let plan = ResizeCrop::new(luma.width() as usize, luma.height() as usize, size);
            plan.run(luma.as_raw(), 1, scratch, out);
        }
    }
}

/// [`decode`] then [`resize_into`]; returns the image's own channel count.
pub(crate) fn decode_into<T: PixelOut>(
    bytes: &[u8],
    channels: Channels,
    size: usize,
    scratch: &mut Vec<f32>,
    out: &mut [T],
) -> Result<usize, image::ImageError> {
    let img = decode(bytes)?;
    resize_into(&img, channels, size, scratch, out);
    Ok(native_channels(&img))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_channels() {
        assert!(is_image_name("a/b.JPG") && is_image_name("x.webp") && is_image_name("y.png"));
        assert!(!is_image_name("x.cls") && !is_image_name("png"));
        assert_eq!("gray".parse::<Channels>(), Ok(Channels::Gray));
        assert_eq!(Channels::Rgb.to_string().parse::<Channels>(), Ok(Channels::Rgb));
        assert!("cmyk".parse::<Channels>().is_err());
        assert_eq!(Channels::for_count(1), Some(Channels::Gray));
    }

    #[test]
    fn gray_png_decodes_to_both_layouts() {
        let img = image::GrayImage::from_fn(8, 6, |x, y| image::Luma([(x * 30 + y) as u8]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let mut rgb = vec![0u8; 3 * 16];
        assert_eq!(decode_into(&png, Channels::Rgb, 4, &mut Vec::new(), &mut rgb).unwrap(), 1);
        let mut gray = vec![0u8; 16];
        decode_into(&png, Channels::Gray, 4, &mut Vec::new(), &mut gray).unwrap();
        assert_eq!(&rgb[..16], &gray[..]);
        assert_eq!(&rgb[16..32], &gray[..]);
        assert!(decode_into(b"not an image", Channels::Rgb, 4, &mut Vec::new(), &mut rgb).is_err());
    }
}
