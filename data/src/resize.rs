//! `Resize(size)` then `CenterCrop(size)`, as the PyTorch DCGAN example prepares every image.
//!
//! The resize is a separable triangle (bilinear, antialiased when shrinking) filter with the
//! taps of `image::imageops::resize(.., FilterType::Triangle)` (and PIL's bilinear), applied
//! horizontally then vertically like PIL, with one rounding to a byte at the end; the crop
//! offsets round like torchvision's `CenterCrop`. Only the output pixels that survive the crop
//! are computed, and the taps are computed once per source shape and stored flat with a fixed
//! width per axis, so the inner loops have no branches: 60k MNIST digits resize in well under
//! a second.

use rayon::prelude::*;

use crate::dataset::byte_to_unit;

/// What a resized pixel is stored as: its byte (prepared shards) or the byte's normalised value
/// (in-memory sets). Both paths run the same filter and rounding, so a prepared set read back
/// through [`byte_to_unit`] is bit-identical to the in-memory one.
pub(crate) trait PixelOut: Copy + Default + Send + Sync {
    /// `byte` is a whole number in [0, 255] (already rounded).
    fn from_rounded(byte: f32) -> Self;
}

impl PixelOut for f32 {
    #[inline]
    fn from_rounded(byte: f32) -> f32 {
        byte_to_unit(byte)
    }
}

impl PixelOut for u8 {
    #[inline]
    fn from_rounded(byte: f32) -> u8 {
        byte as u8
    }
}

/// The taps of one axis: output `o` reads `k` source samples from `starts[o]` with weights
/// `weights[o * k..(o + 1) * k]` (zero-padded to the common width `k`).
#[derive(Debug, Clone)]
struct Axis {
    starts: Vec<usize>,
    k: usize,
    weights: Vec<f32>,
}

impl Axis {
    /// First and one-past-last source index that any output reads.
    fn span(&self) -> (usize, usize) {
        let lo = self.starts.iter().copied().min().unwrap_or(0);
        let hi = self.starts.iter().map(|s| s + self.k).max().unwrap_or(0);
        (lo, hi)
    }
}

/// A precomputed `Resize(size)` + `CenterCrop(size)` for sources of one shape.
#[derive(Debug, Clone)]
pub(crate) struct ResizeCrop {
    src_w: usize,
    size: usize,
    rows: Axis,
    cols: Axis,
    /// Source rows / columns that any output reads: the passes skip the rest.
    row_lo: usize,
    row_hi: usize,
    col_lo: usize,
    col_hi: usize,
}

/// The size torchvision's `Resize(size)` gives an image of `w x h`: the shorter side becomes
/// `size`, the longer keeps the aspect ratio, truncated.
pub(crate) fn resized_dims(w: usize, h: usize, size: usize) -> (usize, usize) {
    if w <= h { (size, size * h / w) } else { (size * w / h, size) }
}

/// torchvision `CenterCrop` offset: `int(round((len - size) / 2))`, Python rounding half to even.
pub(crate) fn crop_offset(len: usize, size: usize) -> usize {
    let d = len.saturating_sub(size);
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 { half + 1 } else { half }
}

fn triangle(x: f32) -> f32 {
    let a = x.abs();
    if a < 1.0 { 1.0 - a } else { 0.0 }
}

/// Filter taps for output coordinates `first..first + count` of an axis resized from `src` to
/// `dst` samples (the same arithmetic as the `image` crate's `horizontal_sample`).
fn axis_taps(src: usize, dst: usize, first: usize, count: usize) -> Axis {
    let ratio = src as f32 / dst as f32;
    let sratio = ratio.max(1.0);
    let support = sratio; // the triangle filter's support is 1
    let taps: Vec<(usize, Vec<f32>)> = (first..first + count)
        .map(|o| {
            let center = (o as f32 + 0.5) * ratio;
            let left = ((center - support).floor() as i64).clamp(0, src as i64 - 1) as usize;
            let right = ((center + support).ceil() as i64).clamp(left as i64 + 1, src as i64) as usize;
            let c = center - 0.5;
            let mut w: Vec<f32> = (left..right).map(|i| triangle((i as f32 - c) / sratio)).collect();
            let sum: f32 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|x| *x /= sum);
            } else {
                // Cannot happen for the triangle filter; nearest neighbour is a safe answer.
                w.iter_mut().for_each(|x| *x = 0.0);
                let nearest = (c.round().max(0.0) as usize).clamp(left, right - 1);
                w[nearest - left] = 1.0;
            }
            // Drop zero taps at both ends (an identity resize keeps one tap).
            let lead = w.iter().take_while(|x| **x == 0.0).count();
            let trail = w.iter().rev().take_while(|x| **x == 0.0).count();
            (left + lead, w[lead..w.len() - trail].to_vec())
        })
        .collect();
    let k = taps.iter().map(|(_, w)| w.len()).max().unwrap_or(1).max(1);
    let mut starts = Vec::with_capacity(count);
    let mut weights = vec![0.0f32; count * k];
    for (o, (start, w)) in taps.into_iter().enumerate() {
        // Keep `start + k <= src` by moving the window left and padding zeros in front.
        let shift = (start + k).saturating_sub(src);
        starts.push(start - shift);
        weights[o * k + shift..o * k + shift + w.len()].copy_from_slice(&w);
    }
    Axis { starts, k, weights }
}

impl ResizeCrop {
    /// Plan for sources `src_w x src_h` (both non-zero) and output `size x size`.
    pub(crate) fn new(src_w: usize, src_h: usize, size: usize) -> Self {
        let (rw, rh) = resized_dims(src_w, src_h, size);
        let rows = axis_taps(src_h, rh, crop_offset(rh, size), size);
        let cols = axis_taps(src_w, rw, crop_offset(rw, size), size);
        let (row_lo, row_hi) = rows.span();
        let (col_lo, col_hi) = cols.span();
        ResizeCrop { src_w, size, rows, cols, row_lo, row_hi, col_lo, col_hi }
    }

    /// Resizes and crops one channel. `src` holds the channel's first pixel at index 0 and the
    /// pixel `(x, y)` at `(y * src_w + x) * stride` (stride 1 for planar data, 3 for RGB).
    /// Writes `size * size` values, rounded to bytes like an 8-bit image (and, for `f32`,
    /// normalised to [-1, 1]), into `out`. `scratch` is reused between calls.
    pub(crate) fn run<T: PixelOut>(&self, src: &[u8], stride: usize, scratch: &mut Vec<f32>, out: &mut [T]) {
        let size = self.size;
        let cw = self.col_hi - self.col_lo;
        let nrows = self.row_hi - self.row_lo;
        scratch.clear();
        scratch.resize(cw + nrows * size + size, 0.0);
        let (line, rest) = scratch.split_at_mut(cw);
        let (tmp, acc) = rest.split_at_mut(nrows * size);
        let (kc, kr) = (self.cols.k, self.rows.k);
        // Horizontal pass over the source rows that the vertical pass needs.
        for (y, tmp_row) in (self.row_lo..self.row_hi).zip(tmp.chunks_exact_mut(size)) {
            let base = (y * self.src_w + self.col_lo) * stride;
            if stride == 1 {
                for (l, s) in line.iter_mut().zip(&src[base..base + cw]) {
                    *l = f32::from(*s);
                }
            } else {
                for (x, l) in line.iter_mut().enumerate() {
                    *l = f32::from(src[base + x * stride]);
                }
            }
            let (starts, weights, lo) = (&self.cols.starts, &self.cols.weights, self.col_lo);
            // A fixed tap count lets the compiler unroll the common (upscaling) cases.
            match kc {
                1 => horizontal::<1>(line, starts, weights, lo, tmp_row),
                2 => horizontal::<2>(line, starts, weights, lo, tmp_row),
                3 => horizontal::<3>(line, starts, weights, lo, tmp_row),
                4 => horizontal::<4>(line, starts, weights, lo, tmp_row),
                _ => horizontal_any(line, starts, weights, kc, lo, tmp_row),
            }
        }
        // Vertical pass: each output row is a weighted sum of whole rows of `tmp`.
        for ((out_row, &start), w) in
            out.chunks_exact_mut(size).zip(&self.rows.starts).zip(self.rows.weights.chunks_exact(kr))
        {
            acc.fill(0.0);
            for (j, &wj) in w.iter().enumerate() {
                let r = (start - self.row_lo + j) * size;
                for (a, v) in acc.iter_mut().zip(&tmp[r..r + size]) {
                    *a += wj * v;
                }
            }
            for (o, a) in out_row.iter_mut().zip(acc.iter()) {
                // Computed, not looked up in a table, so that this loop vectorises.
                *o = T::from_rounded(round_byte(*a));
            }
        }
    }
}

/// `x` clamped to [0, 255] and rounded half up to a whole number, as the `image` crate rounds
/// to a byte; written with the `2^23` trick instead of `as i32` / `floor` so that it
/// vectorises on baseline x86-64 (no SSE4.1 `roundps`, and a saturating cast is scalar).
#[inline]
fn round_byte(x: f32) -> f32 {
    const MAGIC: f32 = 8_388_608.0; // 2^23: adding it leaves no fraction bits
    let y = x.clamp(0.0, 255.0) + 0.5;
    let r = (y + MAGIC) - MAGIC; // nearest whole number
    if r > y { r - 1.0 } else { r } // floor(x + 0.5)
}

/// One row of the horizontal pass with `K` taps per output.
fn horizontal<const K: usize>(line: &[f32], starts: &[usize], weights: &[f32], lo: usize, out: &mut [f32]) {
    for ((t, &start), w) in out.iter_mut().zip(starts).zip(weights.chunks_exact(K)) {
        let src = &line[start - lo..start - lo + K];
        let mut acc = 0.0;
        for j in 0..K {
            acc += src[j] * w[j];
        }
        *t = acc;
    }
}

/// [`horizontal`] for any tap count (downscaling by large factors).
fn horizontal_any(line: &[f32], starts: &[usize], weights: &[f32], k: usize, lo: usize, out: &mut [f32]) {
    for ((t, &start), w) in out.iter_mut().zip(starts).zip(weights.chunks_exact(k)) {
        let from = start - lo;
        *t = line[from..from + k].iter().zip(w).map(|(a, b)| a * b).sum();
    }
}

/// How samples of planar (CHW) bytes lie in a file's records: sample `i` is at
/// `raw[i * record_len + skip..]`, its channel `c` `c * width * height` bytes further
/// (IDX: `record_len = width * height`, `skip = 0`; CIFAR: `record_len = 3073`, `skip = 1` for
/// the label).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanarRecords {
    pub record_len: usize,
    pub skip: usize,
    pub nc: usize,
    pub width: usize,
    pub height: usize,
}

/// Resizes and crops `out.len() / (nc * size * size)` samples of `raw` to `size` in parallel.
pub(crate) fn resize_planar_into<T: PixelOut>(raw: &[u8], records: PlanarRecords, size: usize, out: &mut [T]) {
    let PlanarRecords { record_len, skip, nc, width: w, height: h } = records;
    let plan = ResizeCrop::new(w, h, size);
    let plane = size * size;
    out.par_chunks_mut(nc * plane).zip(raw.par_chunks_exact(record_len)).for_each_init(
        Vec::new,
        |scratch, (sample, rec)| {
            for (c, o) in sample.chunks_exact_mut(plane).enumerate() {
                plan.run(&rec[skip + c * w * h..], 1, scratch, o);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_plain(rc: &ResizeCrop, src: &[u8], stride: usize) -> Vec<u8> {
        let mut out = vec![0.0f32; rc.size * rc.size];
        rc.run(src, stride, &mut Vec::new(), &mut out);
        out.iter().map(|v| ((v + 1.0) / 2.0 * 255.0).round() as u8).collect()
    }

    #[test]
    fn dims_and_offsets_follow_torchvision() {
        assert_eq!(resized_dims(178, 218, 64), (64, 78));
        assert_eq!(resized_dims(218, 178, 64), (78, 64));
        assert_eq!(resized_dims(28, 28, 64), (64, 64));
        assert_eq!(crop_offset(78, 64), 7);
        assert_eq!(crop_offset(65, 64), 0); // round(0.5) = 0
        assert_eq!(crop_offset(67, 64), 2); // round(1.5) = 2
        assert_eq!(crop_offset(69, 64), 2); // round(2.5) = 2
        assert_eq!(crop_offset(64, 64), 0);
    }

    #[test]
    fn round_byte_rounds_half_up_and_clamps() {
        for (x, want) in [
            (-3.0, 0.0),
            (0.49, 0.0),
            (0.5, 1.0),
            (1.5, 2.0),
            (2.5, 3.0),
            (254.4, 254.0),
            (254.5, 255.0),
            (300.0, 255.0),
        ] {
            assert_eq!(round_byte(x), want, "{x}");
        }
        for i in 0..=2550 {
            let x = i as f32 / 10.0;
            assert_eq!(round_byte(x), (x + 0.5).floor(), "{x}");
        }
    }

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..28 * 28).map(|i| (i * 13 % 256) as u8).collect();
        let rc = ResizeCrop::new(28, 28, 28);
        assert_eq!(run_plain(&rc, &src, 1), src);
    }

    #[test]
    fn matches_image_crate_triangle_resize() {
        for (w, h, size) in
            [(28, 28, 64), (28, 28, 16), (40, 30, 24), (30, 45, 32), (7, 5, 3), (200, 150, 64), (61, 97, 20), (1, 9, 4)]
        {
            let src: Vec<u8> = (0..w * h).map(|i| ((i * 37 + i / 3) % 256) as u8).collect();
            let img = image::GrayImage::from_raw(w as u32, h as u32, src.clone()).unwrap();
            let (rw, rh) = resized_dims(w, h, size);
            let big = image::imageops::resize(&img, rw as u32, rh as u32, image::imageops::FilterType::Triangle);
            let (ox, oy) = (crop_offset(rw, size), crop_offset(rh, size));
            let rc = ResizeCrop::new(w, h, size);
            let ours = run_plain(&rc, &src, 1);
            for y in 0..size {
                for x in 0..size {
                    let theirs = big.get_pixel((ox + x) as u32, (oy + y) as u32).0[0];
                    let d = (i32::from(theirs) - i32::from(ours[y * size + x])).abs();
                    assert!(d <= 1, "{w}x{h}->{size} at ({x},{y}): {theirs} vs {}", ours[y * size + x]);
                }
            }
        }
    }

    #[test]
    fn strided_channel_and_table() {
        // A 2x2 RGB image: take the green channel.
        let src = [10, 20, 30, 11, 21, 31, 12, 22, 32, 13, 23, 33];
        let rc = ResizeCrop::new(2, 2, 2);
        let mut out = vec![0.0f32; 4];
        rc.run(&src[1..], 3, &mut Vec::new(), &mut out);
        let want: Vec<f32> = [20.0, 21.0, 22.0, 23.0].map(byte_to_unit).to_vec();
        assert_eq!(out, want);
    }
}
