//! im2col and col2im for stride-2 layers (all of DCGAN's but D's last) through polyphase planes.
//!
//! Each zero-padded image plane is split once into its four (row parity, column parity) planes.
//! In those, every kernel tap of a stride-2 convolution reads a dense window: output row `oy`
//! of tap `(ky, kx)` is `phase[ky % 2][kx % 2]` row `oy + ky / 2`, columns `kx / 2 ..`. A tap's
//! whole segment of the unrolled matrix is then `OH` copies of `OW` contiguous values, with no
//! bounds to work out per row: the general path spent most of its time on that bookkeeping for
//! rows of 4 or 8 values (1.2-2.4 GB/s on D's middle layers, 40% of their GEMM's time). The
//! padding cells take the writes that fall outside the image and are dropped, which is exactly
//! what im2col's zeros mean for col2im, its adjoint.
//!
//! Work is split by channel (im2col) or by image plane (col2im), so a layer needs enough
//! channels to keep a pool busy: [`applies`] leaves the one- and three-channel layers (D's
//! input, G's output) to the general path.

use super::Geometry;
use rayon::prelude::*;

/// Fewest channels worth this path: below it, splitting by channel starves the threads.
const MIN_CHANNELS: usize = 8;

/// Whether a layer takes this path.
pub(super) fn applies(g: &Geometry) -> bool {
    g.stride == 2 && g.channels >= MIN_CHANNELS && g.small_h > 0 && g.small_w > 0
}

/// The four phase planes of one zero-padded image: `rows` x `cols` each, phase `2 * py + px`.
struct Phases {
    rows: usize,
    cols: usize,
}

impl Phases {
    fn of(g: &Geometry) -> Self {
        Self { rows: (g.big_h + 2 * g.padding).div_ceil(2), cols: (g.big_w + 2 * g.padding).div_ceil(2) }
    }

    fn len(&self) -> usize {
        4 * self.rows * self.cols
    }

    /// Offset of the first value kernel tap `(ky, kx)` reads: row `ky / 2`, column `kx / 2` of
    /// its phase.
    fn window_start(&self, ky: usize, kx: usize) -> usize {
        let phase = 2 * (ky % 2) + kx % 2;
        (phase * self.rows + ky / 2) * self.cols + kx / 2
    }

    /// Where input pixel `(iy, ix)` lands in the phases.
    fn index(&self, g: &Geometry, iy: usize, ix: usize) -> usize {
        let (py, px) = (iy + g.padding, ix + g.padding);
        ((2 * (py % 2) + px % 2) * self.rows + py / 2) * self.cols + px / 2
    }

    /// Writes one image plane into `phases`, zeros in the padding.
    fn split(&self, g: &Geometry, plane: &[f32], phases: &mut [f32]) {
        phases.fill(0.0);
        for (iy, row) in plane.chunks_exact(g.big_w).enumerate() {
            let first = self.index(g, iy, 0);
            let second = self.index(g, iy, 1.min(g.big_w - 1));
            for (j, pair) in row.chunks(2).enumerate() {
                phases[first + j] = pair[0];
                if let Some(&v) = pair.get(1) {
                    phases[second + j] = v;
                }
            }
        }
    }

    /// Reads one image plane back out of `phases`, dropping the padding.
    fn merge(&self, g: &Geometry, phases: &[f32], plane: &mut [f32]) {
        for (iy, row) in plane.chunks_exact_mut(g.big_w).enumerate() {
            let first = self.index(g, iy, 0);
            let second = self.index(g, iy, 1.min(g.big_w - 1));
            for (j, pair) in row.chunks_mut(2).enumerate() {
                pair[0] = phases[first + j];
                if let Some(v) = pair.get_mut(1) {
                    *v = phases[second + j];
                }
            }
        }
    }
}

/// Unrolls `big` (C, N, H, W) into `cols` (C*k*k, N*OH*OW); [`applies`] must hold.
pub(super) fn im2col(g: &Geometry, big: &[f32], cols: &mut [f32]) {
    let phases = Phases::of(g);
    let (k, plane, segment, ncols) = (g.kernel, g.big_h * g.big_w, g.small_h * g.small_w, g.cols());
    cols[..g.rows() * ncols].par_chunks_mut(k * k * ncols).enumerate().for_each_init(
        || vec![0.0f32; phases.len()],
        |split, (c, out)| {
            for n in 0..g.batch {
                phases.split(g, &big[(c * g.batch + n) * plane..][..plane], split);
                for ky in 0..k {
                    for kx in 0..k {
                        let window = &split[phases.window_start(ky, kx)..];
                        let dst = &mut out[(ky * k + kx) * ncols + n * segment..][..segment];
                        for_each_window_row(g.small_w, phases.cols, window, dst, |d, s| d.copy_from_slice(s));
                    }
                }
            }
        },
    );
}

/// Folds `cols` (C*k*k, N*OH*OW) into `big` (C, N, H, W), overwriting it; [`applies`] must hold.
pub(super) fn col2im(g: &Geometry, cols: &[f32], big: &mut [f32]) {
    let phases = Phases::of(g);
    let (plane, segment, ncols) = (g.big_h * g.big_w, g.small_h * g.small_w, g.cols());
    big.par_chunks_mut(plane).enumerate().for_each_init(
        || vec![0.0f32; phases.len()],
        |split, (cn, dst)| {
            let (c, n) = (cn / g.batch, cn % g.batch);
            fold_plane(g, &phases, &cols[n * segment..], ncols, c, split, dst);
        },
    );
}

/// The polyphase body of [`super::col2im_images`]; [`applies`] must hold.
///
/// # Safety
/// As [`super::col2im_images`] says.
pub(super) unsafe fn col2im_images(
    g: &Geometry,
    cols: &[f32],
    row_stride: usize,
    first: usize,
    count: usize,
    big: *mut f32,
    split: &mut Vec<f32>,
) {
    let phases = Phases::of(g);
    split.resize(phases.len(), 0.0);
    let (plane, segment) = (g.big_h * g.big_w, g.small_h * g.small_w);
    for c in 0..g.channels {
        for i in 0..count {
            // SAFETY: image `first + i` of channel `c` is inside the tensor and this call's alone
            // (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(big.add((c * g.batch + first + i) * plane), plane) };
            fold_plane(g, &phases, &cols[i * segment..], row_stride, c, split, dst);
        }
    }
}

/// Folds one image's columns of channel `c` into its plane `dst`. `cols` starts at the image's
/// first column; its rows lie `row_stride` apart.
fn fold_plane(
    g: &Geometry,
    phases: &Phases,
    cols: &[f32],
    row_stride: usize,
    c: usize,
    split: &mut [f32],
    dst: &mut [f32],
) {
    let (k, segment) = (g.kernel, g.small_h * g.small_w);
    split.fill(0.0);
    for ky in 0..k {
        for kx in 0..k {
            let src = &cols[((c * k + ky) * k + kx) * row_stride..][..segment];
            let window = &mut split[phases.window_start(ky, kx)..];
            for_each_window_row_mut(g.small_w, phases.cols, window, src, |w, s| {
                w.iter_mut().zip(s).for_each(|(w, s)| *w += s)
            });
        }
    }
    phases.merge(g, split, dst);
}

/// Calls `f(segment row, window row)` for each `width`-long row of `segment`, the window's rows
/// lying `stride` apart. The widths DCGAN has are compiled as constants, so each row is a
/// fixed-size vector move rather than a loop of unknown length.
fn for_each_window_row(
    width: usize,
    stride: usize,
    window: &[f32],
    segment: &mut [f32],
    f: impl Fn(&mut [f32], &[f32]),
) {
    fn rows<const W: usize>(stride: usize, window: &[f32], segment: &mut [f32], f: impl Fn(&mut [f32], &[f32])) {
        for (r, dst) in segment.chunks_exact_mut(W).enumerate() {
            f(dst, &window[r * stride..][..W]);
        }
    }
    match width {
        4 => rows::<4>(stride, window, segment, f),
        8 => rows::<8>(stride, window, segment, f),
        16 => rows::<16>(stride, window, segment, f),
        32 => rows::<32>(stride, window, segment, f),
        _ => segment.chunks_exact_mut(width).enumerate().for_each(|(r, dst)| f(dst, &window[r * stride..][..width])),
    }
}

/// [`for_each_window_row`] with the window written: `f(window row, segment row)`.
fn for_each_window_row_mut(
    width: usize,
    stride: usize,
    window: &mut [f32],
    segment: &[f32],
    f: impl Fn(&mut [f32], &[f32]),
) {
    fn rows<const W: usize>(stride: usize, window: &mut [f32], segment: &[f32], f: impl Fn(&mut [f32], &[f32])) {
        for (r, src) in segment.chunks_exact(W).enumerate() {
            f(&mut window[r * stride..][..W], src);
        }
    }
    match width {
        4 => rows::<4>(stride, window, segment, f),
        8 => rows::<8>(stride, window, segment, f),
        16 => rows::<16>(stride, window, segment, f),
        32 => rows::<32>(stride, window, segment, f),
        _ => segment.chunks_exact(width).enumerate().for_each(|(r, src)| f(&mut window[r * stride..][..width], src)),
    }
}
