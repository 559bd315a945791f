//! im2col and col2im for channel-major (C, N, H, W) tensors.
//!
//! A convolution's "big" side (its input; a transposed convolution's output) is unrolled into a
//! matrix with one row per (channel, ky, kx) and one column per (image, oy, ox) of the "small"
//! side, so the convolution becomes one GEMM over the whole batch.

use rayon::prelude::*;

mod polyphase;

/// The index arithmetic shared by a convolution and its transpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Channels of the big side.
    pub channels: usize,
    pub batch: usize,
    /// Spatial size of the big side.
    pub big_h: usize,
    pub big_w: usize,
    /// Spatial size of the small side.
    pub small_h: usize,
    pub small_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// The geometry of a convolution reading a `big_h` x `big_w` input.
    pub fn for_conv(
        channels: usize,
        batch: usize,
        big_h: usize,
        big_w: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        let small_h = (big_h + 2 * padding - kernel) / stride + 1;
        let small_w = (big_w + 2 * padding - kernel) / stride + 1;
        Self { channels, batch, big_h, big_w, small_h, small_w, kernel, stride, padding }
    }

    /// The geometry of a transposed convolution writing from a `small_h` x `small_w` input.
    pub fn for_conv_transpose(
        channels: usize,
        batch: usize,
        small_h: usize,
        small_w: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        let big_h = (small_h - 1) * stride + kernel - 2 * padding;
        let big_w = (small_w - 1) * stride + kernel - 2 * padding;
        Self { channels, batch, big_h, big_w, small_h, small_w, kernel, stride, padding }
    }

    /// The kernel covers the whole unpadded image once (D's last layer: 4x4 to 1x1).
    fn covers_whole_image(&self) -> bool {
        self.padding == 0 && self.kernel == self.big_h && self.kernel == self.big_w
    }

    pub fn rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    pub fn cols(&self) -> usize {
        self.batch * self.small_h * self.small_w
    }

    pub fn big_len(&self) -> usize {
        self.channels * self.batch * self.big_h * self.big_w
    }

    /// For one kernel offset, the range of small-side indices whose big-side index is inside
    /// the image, and the big-side index of the first one.
    fn valid_range(&self, offset: usize, small: usize, big: usize) -> (usize, usize) {
        // big = o * stride + offset - padding must be in [0, big).
        let s = self.stride as isize;
        let shift = offset as isize - self.padding as isize;
        let lo = if shift >= 0 { 0 } else { ((-shift) + s - 1) / s };
        let hi = ((big as isize - shift) + s - 1) / s; // first o with big index >= big
        let lo = lo.clamp(0, small as isize) as usize;
        let hi = hi.clamp(0, small as isize) as usize;
        (lo, hi.max(lo))
    }
}

/// Unrolls `big` (C, N, H, W) into `cols` (C*k*k, N*OH*OW).
pub fn im2col(g: &Geometry, big: &[f32], cols: &mut [f32]) {
    assert_eq!(big.len(), g.big_len());
    assert!(cols.len() >= g.rows() * g.cols());
    if g.covers_whole_image() {
        // Each image's channel plane becomes one column: per channel, an (N x plane) to
        // (plane x N) transpose instead of N x plane one-element copies.
        let (n, plane) = (g.batch, g.big_h * g.big_w);
        cols[..g.rows() * n].par_chunks_mut(plane * n).zip(big.par_chunks(plane * n)).for_each(|(dst, src)| {
            for (i, image) in src.chunks_exact(plane).enumerate() {
                for (p, &v) in image.iter().enumerate() {
                    dst[p * n + i] = v;
                }
            }
        });
        return;
    }
    if polyphase::applies(g) {
        polyphase::im2col(g, big, cols);
        return;
    }
    let k = g.kernel;
    let (sh, sw) = (g.small_h, g.small_w);
    let plane = g.big_h * g.big_w;
    let ncols = g.cols();
    // One task per (channel, ky): its k rows read the same source rows, which a stride-2
    // convolution splits once into even and odd columns so every kx becomes a contiguous copy.
    cols[..g.rows() * ncols].par_chunks_mut(k * ncols).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(even, odd), (group, out)| {
            let c = group / k;
            let ky = group % k;
            let (oy_lo, oy_hi) = g.valid_range(ky, sh, g.big_h);
            out.fill(0.0);
            for n in 0..g.batch {
                let src = &big[(c * g.batch + n) * plane..][..plane];
                for oy in oy_lo..oy_hi {
                    let iy = oy * g.stride + ky - g.padding;
                    let src_row = &src[iy * g.big_w..][..g.big_w];
                    if g.stride == 2 {
                        split_even_odd(src_row, even, odd);
                    }
                    for kx in 0..k {
                        let (ox_lo, ox_hi) = g.valid_range(kx, sw, g.big_w);
                        if ox_lo >= ox_hi {
                            continue;
                        }
                        let dst_row = &mut out[kx * ncols + n * sh * sw + oy * sw..][..sw];
                        let q = kx as isize - g.padding as isize;
                        let len = ox_hi - ox_lo;
                        match g.stride {
                            1 => {
                                let ix0 = (ox_lo as isize + q) as usize;
                                dst_row[ox_lo..ox_hi].copy_from_slice(&src_row[ix0..ix0 + len]);
                            }
                            2 => {
                                let half = if q.rem_euclid(2) == 0 { &even[..] } else { &odd[..] };
                                let j0 = (ox_lo as isize + q.div_euclid(2)) as usize;
                                dst_row[ox_lo..ox_hi].copy_from_slice(&half[j0..j0 + len]);
                            }
                            s => {
                                for ox in ox_lo..ox_hi {
                                    dst_row[ox] = src_row[(ox as isize * s as isize + q) as usize];
                                }
                            }
                        }
                    }
                }
            }
        },
    );
}

/// Splits a row into its even- and odd-indexed elements.
fn split_even_odd(row: &[f32], even: &mut Vec<f32>, odd: &mut Vec<f32>) {
    let pairs = row.len() / 2;
    even.resize(row.len().div_ceil(2), 0.0);
    odd.resize(pairs, 0.0);
    for (j, p) in row.chunks_exact(2).enumerate() {
        even[j] = p[0];
        odd[j] = p[1];
    }
    if row.len() % 2 == 1 {
        even[pairs] = row[row.len() - 1];
    }
}

/// Folds `cols` (C*k*k, N*OH*OW) back into `big` (C, N, H, W), adding overlapping entries.
/// `big` is overwritten.
pub fn col2im(g: &Geometry, cols: &[f32], big: &mut [f32]) {
    assert_eq!(big.len(), g.big_len());
    assert!(cols.len() >= g.rows() * g.cols());
    if g.covers_whole_image() {
        // No two columns overlap: the transpose back of `im2col`'s.
        let (n, plane) = (g.batch, g.big_h * g.big_w);
        big.par_chunks_mut(plane * n).zip(cols[..g.rows() * n].par_chunks(plane * n)).for_each(|(dst, src)| {
            for (i, image) in dst.chunks_exact_mut(plane).enumerate() {
                for (p, v) in image.iter_mut().enumerate() {
                    *v = src[p * n + i];
                }
            }
        });
        return;
    }
    if polyphase::applies(g) {
        polyphase::col2im(g, cols, big);
        return;
    }
    let k = g.kernel;
    let (sh, sw) = (g.small_h, g.small_w);
    let plane = g.big_h * g.big_w;
    let ncols = g.cols();
    // With stride 2, even and odd output columns are accumulated in two separate planes, where
    // every kernel tap adds a contiguous run; they are interleaved into the output at the end.
    let half_w = g.big_w.div_ceil(2);
    big.par_chunks_mut(plane).enumerate().for_each_init(
        || vec![0.0f32; 2 * g.big_h * half_w],
        |split, (cn, dst)| {
            let c = cn / g.batch;
            let n = cn % g.batch;
            if g.stride == 2 {
                split.fill(0.0);
            } else {
                dst.fill(0.0);
            }
            for ky in 0..k {
                let (oy_lo, oy_hi) = g.valid_range(ky, sh, g.big_h);
                for kx in 0..k {
                    let (ox_lo, ox_hi) = g.valid_range(kx, sw, g.big_w);
                    if ox_lo >= ox_hi {
                        continue;
                    }
                    let row = (c * k + ky) * k + kx;
                    let src = &cols[row * ncols + n * sh * sw..][..sh * sw];
                    let q = kx as isize - g.padding as isize;
                    let len = ox_hi - ox_lo;
                    for oy in oy_lo..oy_hi {
                        let iy = oy * g.stride + ky - g.padding;
                        let src_run = &src[oy * sw + ox_lo..][..len];
                        match g.stride {
                            1 => {
                                let ix0 = (ox_lo as isize + q) as usize;
                                let dst_run = &mut dst[iy * g.big_w + ix0..][..len];
                                dst_run.iter_mut().zip(src_run).for_each(|(d, s)| *d += s);
                            }
                            2 => {
                                let parity = q.rem_euclid(2) as usize;
                                let j0 = (ox_lo as isize + q.div_euclid(2)) as usize;
                                let base = (parity * g.big_h + iy) * half_w + j0;
                                let dst_run = &mut split[base..][..len];
                                dst_run.iter_mut().zip(src_run).for_each(|(d, s)| *d += s);
                            }
                            s => {
                                for (i, v) in src_run.iter().enumerate() {
                                    let ix = ((ox_lo + i) as isize * s as isize + q) as usize;
                                    dst[iy * g.big_w + ix] += v;
                                }
                            }
                        }
                    }
                }
            }
            if g.stride == 2 {
                for iy in 0..g.big_h {
                    let even = &split[iy * half_w..][..half_w];
                    let odd = &split[(g.big_h + iy) * half_w..][..half_w];
                    let row = &mut dst[iy * g.big_w..][..g.big_w];
                    for (j, pair) in row.chunks_mut(2).enumerate() {
                        pair[0] = even[j];
                        if let Some(o) = pair.get_mut(1) {
                            *o = odd[j];
                        }
                    }
                }
            }
        },
    );
}

/// Whether [`col2im_images`] can fold a column block of this geometry (stride-2 layers with
/// enough channels: the polyphase path).
pub fn folds_by_images(g: &Geometry) -> bool {
    polyphase::applies(g)
}

/// [`col2im`] for images `first..first + count` only, from their block of columns (C*k*k rows
/// of `count * OH * OW` values, `row_stride` apart), on the calling thread: the fold of a
/// product computed one block of images at a time. [`folds_by_images`] must hold; `split` is
/// scratch.
///
/// # Safety
/// `big` must point to a (C, N, H, W) tensor of `g`'s shape, and no other thread may access
/// the planes of images `first..first + count` meanwhile.
pub unsafe fn col2im_images(
    g: &Geometry,
    cols: &[f32],
    row_stride: usize,
    first: usize,
    count: usize,
    big: *mut f32,
    split: &mut Vec<f32>,
) {
    assert!(folds_by_images(g), "col2im_images needs the polyphase path: {g:?}");
    assert!(first + count <= g.batch, "images {first}..{} of {}", first + count, g.batch);
    let segment = g.small_h * g.small_w;
    assert!(g.rows() == 0 || cols.len() >= (g.rows() - 1) * row_stride + count * segment, "column block too short");
    // SAFETY: forwarded from the caller.
    unsafe { polyphase::col2im_images(g, cols, row_stride, first, count, big, split) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// <im2col(x), y> == <x, col2im(y)>: col2im is im2col's adjoint, which is what backward needs.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // Two channels take the general path, eight the polyphase one at stride 2.
        let layers =
            [(8, 4, 2, 1), (4, 4, 1, 0), (5, 3, 2, 1), (7, 3, 1, 1), (9, 3, 3, 1), (7, 4, 2, 2), (16, 4, 2, 1)];
        for (&(h, k, s, p), channels) in layers.iter().flat_map(|l| [(l, 2), (l, 8)]) {
            let g = Geometry::for_conv(channels, 3, h, h, k, s, p);
            let x: Vec<f32> = (0..g.big_len()).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
            let y: Vec<f32> = (0..g.rows() * g.cols()).map(|i| ((i * 104729) % 11) as f32 - 5.0).collect();
            let mut cols = vec![0.0; y.len()];
            im2col(&g, &x, &mut cols);
            let mut back = vec![0.0; x.len()];
            col2im(&g, &y, &mut back);
            let lhs: f64 = cols.iter().zip(&y).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            assert_eq!(lhs, rhs, "geometry {g:?}");
        }
    }

    /// The fast paths (stride 1, stride 2 split into even/odd columns, stride 2 through polyphase
    /// planes from eight channels on) against the definition.
    #[test]
    fn im2col_matches_the_definition() {
        let layers =
            [(8, 8, 4, 2, 1), (7, 5, 4, 2, 1), (4, 4, 4, 1, 0), (6, 7, 3, 1, 1), (9, 9, 3, 3, 1), (6, 9, 3, 2, 0)];
        for (&(h, w, k, s, p), channels) in layers.iter().flat_map(|l| [(l, 3), (l, 8)]) {
            let mut g = Geometry::for_conv(channels, 2, h, w, k, s, p);
            g.small_w = (w + 2 * p - k) / s + 1;
            let x: Vec<f32> = (0..g.big_len()).map(|i| i as f32).collect();
            let mut cols = vec![-1.0; g.rows() * g.cols()];
            im2col(&g, &x, &mut cols);
            for row in 0..g.rows() {
                let (c, ky, kx) = (row / (k * k), (row / k) % k, row % k);
                for col in 0..g.cols() {
                    let (n, oy, ox) = (col / (g.small_h * g.small_w), (col / g.small_w) % g.small_h, col % g.small_w);
                    let iy = (oy * s + ky) as isize - p as isize;
                    let ix = (ox * s + kx) as isize - p as isize;
                    let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                    let want = if inside { x[((c * 2 + n) * h + iy as usize) * w + ix as usize] } else { 0.0 };
                    assert_eq!(cols[row * g.cols() + col], want, "{g:?} row {row} col {col}");
                }
            }
        }
    }
}
