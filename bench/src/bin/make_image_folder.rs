//! Writes a synthetic image folder for the data-preparation benchmarks: `--count` JPEG files in
//! `OUT/class_XX/img_NNNNNNN.jpg` (the layout torchvision's `ImageFolder` wants), each a smooth
//! colour gradient with a few soft-edged shapes, a faint wave texture and mild noise, so that the
//! files have the size and entropy of small natural photos rather than flat colour. Every image is
//! a function of `--seed` and its index only, so a folder can be made again bit for bit, and files
//! that already exist are skipped (an interrupted run continues where it stopped).
//!
//! `cargo run --release -p dcgan-bench --bin make_image_folder -- --out /tmp/imgs --count 1000`

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;
use rayon::prelude::*;

#[derive(Parser, Debug)]
#[command(about = "Writes a folder of synthetic JPEG images (class_XX/img_NNNNNNN.jpg) for the prepare benchmarks")]
struct Args {
    /// Output folder (created if missing); images go to OUT/class_XX/.
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long)]
    count: usize,
    /// Shorter side of every image, in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Longer side over shorter side. The default 1.25 makes sources a little wider than tall
    /// (`--size 64` writes 80x64), so that Resize(size) + CenterCrop(size) has a crop to make;
    /// 1 writes squares, below 1 writes portrait images (size wide, size / aspect tall).
    #[arg(long, default_value_t = 1.25)]
    aspect: f64,
    /// Number of class folders; image i goes to class i mod K.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// JPEG quality, 1-100.
    #[arg(long, default_value_t = 90)]
    quality: u8,
    /// Seed of the content; with the index it fixes every image.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// SplitMix64: small, fast, and well mixed from any starting state.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, index: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    fn colour(&mut self) -> [f32; 3] {
        [self.range(0.0, 255.0), self.range(0.0, 255.0), self.range(0.0, 255.0)]
    }
}

enum Form {
    Ellipse,
    Rectangle,
}

/// One soft-edged, rotated, shaded shape.
struct Shape {
    form: Form,
    cx: f32,
    cy: f32,
    /// Half-extents along the shape's own axes.
    rx: f32,
    ry: f32,
    cos: f32,
    sin: f32,
    colour: [f32; 3],
    opacity: f32,
    /// Brightness change across the shape (a hint of lighting).
    shade: f32,
}

impl Shape {
    fn random(rng: &mut Rng, w: f32, h: f32) -> Self {
        let side = w.min(h);
        let angle = rng.range(0.0, std::f32::consts::PI);
        Shape {
            form: if rng.unit() < 0.6 { Form::Ellipse } else { Form::Rectangle },
            cx: rng.range(0.0, w),
            cy: rng.range(0.0, h),
            rx: rng.range(0.06, 0.35) * side,
            ry: rng.range(0.06, 0.35) * side,
            cos: angle.cos(),
            sin: angle.sin(),
            colour: rng.colour(),
            opacity: rng.range(0.5, 1.0),
            shade: rng.range(-0.35, 0.35),
        }
    }

    /// Coverage in [0, 1] of the pixel centred at (x, y) (about one pixel of soft edge), and the
    /// shading factor there.
    fn cover(&self, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let u = dx * self.cos + dy * self.sin;
        let v = -dx * self.sin + dy * self.cos;
        let distance = match self.form {
            Form::Ellipse => (((u / self.rx).powi(2) + (v / self.ry).powi(2)).sqrt() - 1.0) * self.rx.min(self.ry),
            Form::Rectangle => (u.abs() - self.rx).max(v.abs() - self.ry),
        };
        let coverage = (0.5 - distance).clamp(0.0, 1.0);
        (coverage, 1.0 + self.shade * (u / self.rx).clamp(-1.0, 1.0))
    }
}

/// The pixels (RGB, row-major) of image `index`.
fn render(seed: u64, index: u64, class: usize, w: u32, h: u32) -> Vec<u8> {
    let mut rng = Rng::new(seed, index);
    let (wf, hf) = (w as f32, h as f32);
    // A per-class tint blended into the background, so the classes differ a little on average.
    let mut class_rng = Rng::new(seed ^ 0x5EED, class as u64);
    let tint = class_rng.colour();
    let mut corners = [rng.colour(), rng.colour(), rng.colour(), rng.colour()];
    for corner in &mut corners {
        for (value, tint) in corner.iter_mut().zip(tint) {
            *value = 0.7 * *value + 0.3 * tint;
        }
    }
    let shapes: Vec<Shape> = (0..2 + rng.next_u64() % 5).map(|_| Shape::random(&mut rng, wf, hf)).collect();
    let wave_amp = rng.range(0.0, 12.0);
    let wave_period = rng.range(4.0, 16.0);
    let wave_angle = rng.range(0.0, std::f32::consts::PI);
    let (wave_fx, wave_fy) = (
        wave_angle.cos() * std::f32::consts::TAU / wave_period,
        wave_angle.sin() * std::f32::consts::TAU / wave_period,
    );
    let wave_phase = rng.range(0.0, std::f32::consts::TAU);
    let noise = rng.range(2.0, 6.0);

    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        let fy = (y as f32 + 0.5) / hf;
        for x in 0..w {
            let fx = (x as f32 + 0.5) / wf;
            let mut rgb = [0.0f32; 3];
            for (c, value) in rgb.iter_mut().enumerate() {
                let top = corners[0][c] + (corners[1][c] - corners[0][c]) * fx;
                let bottom = corners[2][c] + (corners[3][c] - corners[2][c]) * fx;
                *value = top + (bottom - top) * fy;
            }
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            for shape in &shapes {
                let (coverage, light) = shape.cover(px, py);
                if coverage > 0.0 {
                    let alpha = coverage * shape.opacity;
                    for (value, colour) in rgb.iter_mut().zip(shape.colour) {
                        *value += alpha * (colour * light - *value);
                    }
                }
            }
            let wave = wave_amp * (wave_fx * px + wave_fy * py + wave_phase).sin();
            for value in &mut rgb {
                // Sum of two uniforms: a triangular, roughly Gaussian noise of about `noise` levels.
                let grain = (rng.unit() + rng.unit() - 1.0) * noise * 1.7;
                pixels.push((*value + wave + grain).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    pixels
}

fn image_path(out: &Path, classes: usize, index: usize) -> PathBuf {
    let digits = classes.saturating_sub(1).to_string().len().max(2);
    out.join(format!("class_{:0digits$}", index % classes)).join(format!("img_{index:07}.jpg"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.size > 0, "--size must be positive");
    ensure!(args.classes > 0, "--classes must be positive");
    ensure!((1..=100).contains(&args.quality), "--quality must be within 1-100");
    ensure!(args.aspect.is_finite() && args.aspect > 0.0, "--aspect must be positive");
    let (w, h) = if args.aspect >= 1.0 {
        ((f64::from(args.size) * args.aspect).round() as u32, args.size)
    } else {
        (args.size, (f64::from(args.size) / args.aspect).round() as u32)
    };
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    for class in 0..args.classes.min(args.count) {
        let dir = image_path(&args.out, args.classes, class);
        let dir = dir.parent().expect("an image path has a class folder");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let start = Instant::now();
    let written = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    (0..args.count).into_par_iter().try_for_each(|index| -> Result<()> {
        let path = image_path(&args.out, args.classes, index);
        if path.exists() {
            return Ok(());
        }
        let pixels = render(args.seed, index as u64, index % args.classes, w, h);
        let mut jpeg = Vec::with_capacity(8 << 10);
        JpegEncoder::new_with_quality(&mut jpeg, args.quality).encode(&pixels, w, h, ExtendedColorType::Rgb8)?;
        // Written under a temporary name and renamed, so that an interrupted run never leaves a
        // truncated file that the next run would skip.
        let partial = path.with_extension("jpg.partial");
        fs::write(&partial, &jpeg).with_context(|| format!("writing {}", partial.display()))?;
        fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
        bytes.fetch_add(jpeg.len() as u64, Ordering::Relaxed);
        let done = written.fetch_add(1, Ordering::Relaxed) + 1;
        // A line each time another tenth of --count has been written.
        if done * 10 / args.count != (done - 1) * 10 / args.count {
            eprintln!("  {done} written ({:.0} s)", start.elapsed().as_secs_f64());
        }
        Ok(())
    })?;

    let seconds = start.elapsed().as_secs_f64();
    let written = written.into_inner();
    let bytes = bytes.into_inner();
    println!(
        "{written} images of {w}x{h} written to {} ({} already there) in {seconds:.1} s: {:.0} images/s, {:.1} KiB per image",
        args.out.display(),
        args.count - written,
        written as f64 / seconds.max(1e-9),
        bytes as f64 / 1024.0 / written.max(1) as f64,
    );
    Ok(())
}
