//! im2col and col2im for channel-major (C, N, H, W) tensors.
//!
//! A convolution's "big" side (its input; a transposed convolution's output) is unrolled into a
//! matrix with one row per (channel, ky, kx) and one column per (image, oy, ox) of the "small"
//! side, so the convolution becomes one GEMM over the whole batch.

use rayon::prelude::*;

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
    let k = g.kernel;
    let (sh, sw) = (g.small_h, g.small_w);
    let plane = g.big_h * g.big_w;
    cols[..g.rows() * g.cols()].par_chunks_mut(g.cols()).enumerate().for_each(|(row, out)| {
        let c = row / (k * k);
        let ky = (row / k) % k;
        let kx = row % k;
        let (oy_lo, oy_hi) = g.valid_range(ky, sh, g.big_h);
        let (ox_lo, ox_hi) = g.valid_range(kx, sw, g.big_w);
        for n in 0..g.batch {
            let src = &big[(c * g.batch + n) * plane..][..plane];
            let dst = &mut out[n * sh * sw..][..sh * sw];
            dst.fill(0.0);
            for oy in oy_lo..oy_hi {
                let iy = oy * g.stride + ky - g.padding;
                let src_row = &src[iy * g.big_w..][..g.big_w];
                let dst_row = &mut dst[oy * sw..][..sw];
                if g.stride == 1 {
                    let ix0 = ox_lo + kx - g.padding;
                    dst_row[ox_lo..ox_hi].copy_from_slice(&src_row[ix0..ix0 + (ox_hi - ox_lo)]);
                } else {
                    for ox in ox_lo..ox_hi {
                        dst_row[ox] = src_row[ox * g.stride + kx - g.padding];
                    }
                }
            }
        }
    });
}

/// Folds `cols` (C*k*k, N*OH*OW) back into `big` (C, N, H, W), adding overlapping entries.
/// `big` is overwritten.
pub fn col2im(g: &Geometry, cols: &[f32], big: &mut [f32]) {
    assert_eq!(big.len(), g.big_len());
    assert!(cols.len() >= g.rows() * g.cols());
    let k = g.kernel;
    let (sh, sw) = (g.small_h, g.small_w);
    let plane = g.big_h * g.big_w;
    let ncols = g.cols();
    big.par_chunks_mut(plane).enumerate().for_each(|(cn, dst)| {
        let c = cn / g.batch;
        let n = cn % g.batch;
        dst.fill(0.0);
        for ky in 0..k {
            let (oy_lo, oy_hi) = g.valid_range(ky, sh, g.big_h);
            for kx in 0..k {
                let (ox_lo, ox_hi) = g.valid_range(kx, sw, g.big_w);
                let row = (c * k + ky) * k + kx;
                let src = &cols[row * ncols + n * sh * sw..][..sh * sw];
                for oy in oy_lo..oy_hi {
                    let iy = oy * g.stride + ky - g.padding;
                    let src_row = &src[oy * sw..][..sw];
                    let dst_row = &mut dst[iy * g.big_w..][..g.big_w];
                    for ox in ox_lo..ox_hi {
                        dst_row[ox * g.stride + kx - g.padding] += src_row[ox];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// <im2col(x), y> == <x, col2im(y)>: col2im is im2col's adjoint, which is what backward needs.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        for &(h, k, s, p) in &[(8, 4, 2, 1), (4, 4, 1, 0), (5, 3, 2, 1), (7, 3, 1, 1)] {
            let g = Geometry::for_conv(2, 3, h, h, k, s, p);
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
}
