//! The built-in `shapes` dataset: one coloured disc, square or triangle per image, on a dark
//! plain background.
//!
//! It exists so that training runs anywhere with no download (a laptop, CI, a fresh cluster)
//! and still has structure a GAN visibly learns within minutes. Every sample is drawn from its
//! own RNG seeded by a fixed seed and its index, so the dataset is identical on every machine
//! and for every thread count, even though samples are drawn in parallel. The geometry uses
//! only `+ - * /` and `sqrt` (no `sin`/`cos`, whose last bits vary between math libraries).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

use crate::Dataset;

/// Number of samples when no limit is given: 512 steps per epoch at batch 64, so that the
/// default two epochs (1024 steps, about three minutes on two cores) end with recognisable
/// shapes. Samples are drawn on demand, so the length costs no memory.
pub const DEFAULT_LEN: usize = 32768;

/// Fixed seed: changing it changes the dataset.
const SEED: u64 = 0x5348_4150_4553_0001;

/// Label of a sample: the kind of its shape.
pub const DISC: u8 = 0;
/// See [`DISC`].
pub const SQUARE: u8 = 1;
/// See [`DISC`].
pub const TRIANGLE: u8 = 2;

/// Sub-samples per axis for anti-aliasing pixels on an edge.
const SUPER: usize = 4;

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A filled shape in pixel coordinates (pixel `(x, y)` covers `[x, x+1) x [y, y+1)`).
enum Shape {
    Disc {
        cx: f32,
        cy: f32,
        r: f32,
    },
    /// Convex polygon as half-planes `nx * x + ny * y <= c` with unit normals.
    Convex {
        edges: Vec<[f32; 3]>,
    },
}

impl Shape {
    fn convex(vertices: &[[f32; 2]]) -> Shape {
        let n = vertices.len() as f32;
        let (mx, my) = vertices.iter().fold((0.0, 0.0), |(x, y), v| (x + v[0] / n, y + v[1] / n));
        let edges = (0..vertices.len())
            .map(|i| {
                let [ax, ay] = vertices[i];
                let [bx, by] = vertices[(i + 1) % vertices.len()];
                let (dx, dy) = (bx - ax, by - ay);
                let len = (dx * dx + dy * dy).sqrt();
                let (mut nx, mut ny) = (dy / len, -dx / len);
                let mut c = nx * ax + ny * ay;
                if nx * mx + ny * my > c {
                    (nx, ny, c) = (-nx, -ny, -c);
                }
                [nx, ny, c]
            })
            .collect();
        Shape::Convex { edges }
    }

    /// Signed distance bound: negative inside, and `|d|` never exceeds the true distance to
    /// the boundary, so `|d| > 0.71` (half a pixel diagonal) means the pixel is all in or out.
    fn sd(&self, x: f32, y: f32) -> f32 {
        match self {
            Shape::Disc { cx, cy, r } => ((x - cx) * (x - cx) + (y - cy) * (y - cy)).sqrt() - r,
            Shape::Convex { edges } => {
                edges.iter().map(|[nx, ny, c]| nx * x + ny * y - c).fold(f32::NEG_INFINITY, f32::max)
            }
        }
    }

    /// Fraction of pixel `(px, py)` covered.
    fn coverage(&self, px: usize, py: usize) -> f32 {
        let (x, y) = (px as f32 + 0.5, py as f32 + 0.5);
        let d = self.sd(x, y);
        if d <= -0.71 {
            return 1.0;
        }
        if d >= 0.71 {
            return 0.0;
        }
        let step = 1.0 / SUPER as f32;
        let mut inside = 0;
        for j in 0..SUPER {
            for i in 0..SUPER {
                let sx = px as f32 + (i as f32 + 0.5) * step;
                let sy = py as f32 + (j as f32 + 0.5) * step;
                if self.sd(sx, sy) <= 0.0 {
                    inside += 1;
                }
            }
        }
        inside as f32 / (SUPER * SUPER) as f32
    }
}

/// Shape colours: six saturated hues, each jittered a little per sample. A small palette on
/// dark backgrounds is what lets a DCGAN draw recognisable shapes within the first few hundred
/// steps (random colours everywhere made the default run end in colour fields).
const PALETTE: [[f32; 3]; 6] =
    [[0.95, 0.25, 0.2], [0.3, 0.85, 0.3], [0.25, 0.45, 0.95], [0.95, 0.85, 0.25], [0.25, 0.85, 0.9], [0.9, 0.35, 0.85]];

/// A dark background: every channel in `[0, 0.25)`.
fn background(rng: &mut StdRng) -> [f32; 3] {
    [rng.random_range(0.0..0.25f32), rng.random_range(0.0..0.25f32), rng.random_range(0.0..0.25f32)]
}

/// A palette colour with every channel moved by at most 0.08.
fn shape_colour(rng: &mut StdRng) -> [f32; 3] {
    let base = PALETTE[rng.random_range(0..PALETTE.len())];
    base.map(|c| (c + rng.random_range(-0.08f32..0.08)).clamp(0.0, 1.0))
}

/// Draws sample `index` into `out` (CHW, `3 * size * size`, values in [-1, 1]); returns its label.
pub(crate) fn render(index: usize, size: usize, out: &mut [f32]) -> u8 {
    let mut rng = StdRng::seed_from_u64(splitmix64(SEED ^ splitmix64(index as u64)));
    let s = size as f32;
    let bg = background(&mut rng);
    let mut rgb: Vec<[f32; 3]> = vec![bg; size * size];
    // One large shape, whole in the frame (its corners reach at most 1.2 r from the centre).
    let label = rng.random_range(0..3u8);
    {
        let kind = label;
        let col = shape_colour(&mut rng);
        let r = rng.random_range(0.24f32..0.36) * s;
        let cx = rng.random_range(1.2 * r..s - 1.2 * r);
        let cy = rng.random_range(1.2 * r..s - 1.2 * r);
        // Upright: squares axis-aligned, triangles pointing up (rotations would multiply the
        // modes a short run has to learn).
        let rot = |x: f32, y: f32| [cx + y, cy - x];
        let shape = match kind {
            DISC => Shape::Disc { cx, cy, r },
            SQUARE => {
                let h = 0.85 * r;
                Shape::convex(&[rot(-h, -h), rot(h, -h), rot(h, h), rot(-h, h)])
            }
            _ => {
                // Equilateral: the same vector turned by 120 and 240 degrees.
                let (c, sn) = (-0.5f32, 0.866_025_4f32);
                let rr = 1.15 * r;
                Shape::convex(&[rot(rr, 0.0), rot(rr * c, rr * sn), rot(rr * c, -rr * sn)])
            }
        };
        let reach = 1.2 * r + 1.0;
        let lo = |c: f32| (c - reach).floor().max(0.0) as usize;
        let hi = |c: f32| ((c + reach).ceil().max(0.0) as usize).min(size);
        for py in lo(cy)..hi(cy) {
            for px in lo(cx)..hi(cx) {
                let a = shape.coverage(px, py);
                if a > 0.0 {
                    let p = &mut rgb[py * size + px];
                    for ch in 0..3 {
                        p[ch] += (col[ch] - p[ch]) * a;
                    }
                }
            }
        }
    }
    let plane = size * size;
    for (i, p) in rgb.iter().enumerate() {
        for ch in 0..3 {
            out[ch * plane + i] = (p[ch] * 2.0 - 1.0).clamp(-1.0, 1.0);
        }
    }
    label
}

/// Generates the first `len` samples of the shapes dataset at `image_size` (any `len`: the
/// sequence is endless; [`crate::DatasetSpec::load`] uses [`DEFAULT_LEN`]).
pub fn generate(len: usize, image_size: usize) -> Dataset {
    let sample = 3 * image_size * image_size;
    let mut pixels = vec![0.0f32; len * sample];
    let mut labels = vec![0u8; len];
    if sample > 0 {
        pixels
            .par_chunks_mut(sample)
            .zip(labels.par_iter_mut())
            .enumerate()
            .for_each(|(i, (out, label))| *label = render(i, image_size, out));
    }
    Dataset { name: "shapes".into(), nc: 3, image_size, len, pixels, labels: Some(labels) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_is_exact_far_from_edges() {
        let d = Shape::Disc { cx: 10.0, cy: 10.0, r: 5.0 };
        assert_eq!(d.coverage(9, 9), 1.0);
        assert_eq!(d.coverage(0, 0), 0.0);
        let edge = d.coverage(13, 13);
        assert!(edge > 0.0 && edge < 1.0, "{edge}");
        let sq = Shape::convex(&[[2.0, 2.0], [6.0, 2.0], [6.0, 6.0], [2.0, 6.0]]);
        assert_eq!(sq.coverage(3, 3), 1.0);
        assert_eq!(sq.coverage(7, 3), 0.0);
        assert_eq!(sq.coverage(2, 2), 1.0);
    }
}
