//! Matrix products with bf16 operands and fp32 accumulation, for `--precision bf16`.
//!
//! The operands stay f32 in memory. They are rounded to bf16 (nearest even) as they are packed
//! into the panels the micro-kernel reads; `vdpbf16ps` multiplies two bf16 pairs per fp32 lane
//! and adds both products to the lane's fp32 sum, so the results are fp32. Written by hand: the
//! `gemm` crate has no bf16 kernel (its f16 path converts to f32 and multiplies in f32), and no
//! other maintained Rust crate offers a GEMM on this instruction.
//!
//! The blocking is Goto's: KC values of k at a time; B in panels of NR columns and A in panels
//! of MR rows, both holding k in pairs. The u32 at (pair q, column j) of a B panel is
//! (b[2q][j], b[2q+1][j]); the one at (q, row i) of an A panel is (a[i][2q], a[i][2q+1]). The
//! micro-kernel broadcasts an A pair against 16 B columns, for an MR x NR tile of C in 24 zmm
//! registers. Where a pair is short (odd k) its second half is zero.

use super::matmul::{
    Gemm, Layout, Operand, Output, PARALLEL_THRESHOLD, Window, add_k_slices, product_left, split_k_pays, window_fits,
};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of C per micro-kernel call: 12 rows x 2 zmm = 24 accumulators, leaving registers for
/// the two B vectors and the broadcast.
const MR: usize = 12;
/// Columns of C per micro-kernel call: two zmm of 16 fp32 lanes.
const NR: usize = 32;
/// Values of k per packed block: a B micro-panel (16 KiB) and an A micro-panel (6 KiB) stay in
/// the 48 KiB L1 while the micro-kernel runs.
const KC: usize = 256;
/// Rows of A packed at a time (96 KiB, in L2).
const MC: usize = 192;
/// Columns of B packed at a time (512 KiB, in the 2 MiB L2).
const NC: usize = 1024;

/// Whether this CPU has the instructions the bf16 products use.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `c (m x n) = a x b^T` is better computed as its transpose `c^T = b x a^T`: the one
/// with fewer padded MR x NR tiles wins, since edge tiles cost as much as full ones (DCGAN-64's
/// first weight gradient, 64 x 48, runs 1.2-1.6x faster as 48 x 64: four full row panels, two
/// full column panels); on a tie, the larger side goes to the rows.
pub fn transposed_product_is_cheaper(m: usize, n: usize) -> bool {
    let padded = |rows: usize, cols: usize| rows.next_multiple_of(MR) * cols.next_multiple_of(NR);
    padded(n, m) < padded(m, n) || (padded(n, m) == padded(m, n) && n > m)
}

/// A matrix read through strides: element (r, c) at `data[r * row_stride + c * col_stride]`;
/// one of the two strides is 1.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Strided<'a> {
    /// A `rows x cols` operand stored as its [`Layout`] says.
    fn new(op: Operand<'a>, rows: usize, cols: usize) -> Self {
        match op.layout {
            Layout::Normal => Self { data: op.data, row_stride: cols, col_stride: 1 },
            Layout::Transposed => Self { data: op.data, row_stride: 1, col_stride: rows },
        }
    }

    /// The transpose, without moving anything.
    fn transposed(self) -> Self {
        Self { row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// The same matrix from row `r` and column `c` on.
    fn offset(self, r: usize, c: usize) -> Self {
        Self { data: &self.data[r * self.row_stride + c * self.col_stride..], ..self }
    }
}

/// `c (m x n) = a (m x k) x b (k x n)`, plus the old `c` when `c.accumulate`: the bf16 twin of
/// [`super::matmul::matmul`]. The caller checks [`supported`].
pub fn matmul(s: Gemm, a: Operand<'_>, b: Operand<'_>, c: Output<'_>) {
    assert!(supported(), "bf16 products need AVX512-BF16 (Precision::check_supported)");
    let Gemm { m, n, k } = s;
    let Output { data: c, accumulate } = c;
    if !product_left(s, a.data, b.data.len() >= k * n, c, accumulate) {
        return;
    }
    let (a, b) = (Strided::new(a, m, k), Strided::new(b, k, n));
    let out = OutPtr(c.as_mut_ptr());
    let threads = rayon::current_num_threads();
    if threads == 1 || m * n * k < PARALLEL_THRESHOLD {
        // SAFETY: the checks above keep every operand element and every write in bounds.
        unsafe { product_on_this_thread(s, a, b, out.get(), n, accumulate) };
    } else if n >= m {
        // One slice of columns per thread: each packs its own part of B and all of A.
        let width = n.div_ceil(threads).next_multiple_of(NR);
        (0..n.div_ceil(width)).into_par_iter().for_each(|t| {
            let j0 = t * width;
            let part = Gemm { m, n: width.min(n - j0), k };
            // SAFETY: as above; the threads write disjoint columns of `c`.
            unsafe { product_on_this_thread(part, a, b.offset(0, j0), out.get().add(j0), n, accumulate) }
        });
    } else {
        let height = m.div_ceil(threads).next_multiple_of(MR);
        (0..m.div_ceil(height)).into_par_iter().for_each(|t| {
            let i0 = t * height;
            let part = Gemm { m: height.min(m - i0), n, k };
            // SAFETY: as above; the threads write disjoint rows of `c`.
            unsafe { product_on_this_thread(part, a.offset(i0, 0), b, out.get().add(i0 * n), n, accumulate) }
        });
    }
}

/// `c (m x n) = a (m x k) x b` on the calling thread, where `b` is a window of `n` columns: the
/// bf16 twin of [`super::matmul::matmul_column_block`].
pub fn matmul_column_block(s: Gemm, a: Operand<'_>, b: Window<'_>, c: &mut [f32]) {
    assert!(supported(), "bf16 products need AVX512-BF16 (Precision::check_supported)");
    if !product_left(s, a.data, window_fits(s.n, s.k, b), c, false) {
        return;
    }
    let a = Strided::new(a, s.m, s.k);
    let b = Strided { data: b.data, row_stride: b.row_stride, col_stride: 1 };
    // SAFETY: the checks above keep every operand element and every write in bounds.
    unsafe { product_on_this_thread(s, a, b, c.as_mut_ptr(), s.n, false) }
}

/// `c (m x n) += a (m x k) x b^T`, with `b` stored n x k: the bf16 twin of
/// [`super::matmul::matmul_nt_split_k`], which says why the threads split `k`.
pub fn matmul_nt_split_k(s: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(supported(), "bf16 products need AVX512-BF16 (Precision::check_supported)");
    let Gemm { m, n, k } = s;
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "operands too short for {m}x{n}x{k}");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let a = Strided { data: a, row_stride: k, col_stride: 1 };
    let b = Strided { data: b, row_stride: 1, col_stride: k };
    if !split_k_pays(m, n, k) {
        // SAFETY: the assert above keeps every operand element and every write in bounds.
        unsafe { product_on_this_thread(s, a, b, c.as_mut_ptr(), n, true) };
        return;
    }
    add_k_slices(m, n, k, c, |k0, len, part| {
        let slice = Gemm { m, n, k: len };
        // SAFETY: columns k0..k0+len of both operands are in bounds; `part` is m x n.
        unsafe { product_on_this_thread(slice, a.offset(0, k0), b.offset(k0, 0), part.as_mut_ptr(), n, false) }
    });
}

/// The output's address, shared by tasks that each write their own rows or columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks that share it write disjoint parts of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// A method, not the field, so closures capture the whole (Send) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Packed A and B panels, reused from call to call.
    static PANELS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `c (m x n, rows `ldc` apart) = a x b`, plus the old `c` when `accumulate`, on this thread.
///
/// # Safety
/// `a` must hold m x k elements and `b` k x n through their strides, `c` must be valid for
/// m rows of n values `ldc` apart, and the CPU must have AVX512-BF16 ([`supported`]).
unsafe fn product_on_this_thread(s: Gemm, a: Strided<'_>, b: Strided<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
    let Gemm { m, n, k } = s;
    #[cfg(target_arch = "x86_64")]
    // Nothing inside calls into the thread pool, so no other task borrows PANELS meanwhile.
    PANELS.with_borrow_mut(|(a_panels, b_panels)| {
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let pairs = kc.div_ceil(2);
            let overwrite = pc == 0 && !accumulate;
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                // SAFETY (all three): the caller's contract, and the blocks lie inside m x n x k.
                unsafe { x86::pack_panels(b.offset(pc, jc), kc, nc, NR, b_panels) };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    unsafe { x86::pack_panels(a.offset(ic, pc).transposed(), kc, mc, MR, a_panels) };
                    for jr in (0..nc).step_by(NR) {
                        for ir in (0..mc).step_by(MR) {
                            unsafe {
                                x86::micro_kernel(
                                    pairs,
                                    a_panels.as_ptr().add(ir / MR * pairs * MR),
                                    b_panels.as_ptr().add(jr / NR * pairs * NR),
                                    c.add((ic + ir) * ldc + jc + jr),
                                    ldc,
                                    x86::Corner { rows: MR.min(mc - ir), cols: NR.min(nc - jr) },
                                    overwrite,
                                )
                            }
                        }
                    }
                }
            }
        }
    });
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 products on a CPU without AVX512-BF16 ({m}x{n}x{k}, {ldc}, {accumulate})");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR, Strided};
    use std::arch::x86_64::*;

    /// The lowest `count` bits set (count <= 16).
    fn lanes(count: usize) -> u16 {
        ((1u32 << count) - 1) as u16
    }

    /// Rounds 16 + 16 floats to bf16 and interleaves them: u32 lane l holds (x0[l], x1[l]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn interleave_pairs(x0: __m512, x1: __m512) -> __m512i {
        // cvtne2ps puts x0's 16 values in the low half and x1's in the high half; the
        // permutation takes them alternately.
        let halves: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0)) };
        let alternate = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_permutexvar_epi16(alternate, halves)
    }

    /// Writes `slots` u32 at `dst` (at most 32): lane j is (row0[j], row1[j]) for j < `width`,
    /// zero beyond; a missing `row1` (the last pair of an odd k) reads as zeros.
    ///
    /// # Safety
    /// `row0` and `row1` must hold `width` values, `dst` `slots` u32.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn interleave_rows(row0: *const f32, row1: Option<*const f32>, width: usize, dst: *mut u32, slots: usize) {
        for half in 0..slots.div_ceil(16) {
            let read = lanes(width.saturating_sub(16 * half).min(16));
            let write = lanes(slots.saturating_sub(16 * half).min(16));
            // SAFETY: masked lanes are neither read nor written (wrapping_add: their addresses
            // may lie past the operand).
            unsafe {
                let x0 = _mm512_maskz_loadu_ps(read, row0.wrapping_add(16 * half));
                let x1 = row1.map_or(_mm512_setzero_ps(), |r| _mm512_maskz_loadu_ps(read, r.wrapping_add(16 * half)));
                _mm512_mask_storeu_epi32(dst.wrapping_add(16 * half).cast(), write, interleave_pairs(x0, x1));
            }
        }
    }

    /// Rounds the `len` contiguous values at `src` to bf16 and writes them as pairs, pair q to
    /// `dst[q * stride]`; a last odd value is paired with zero.
    ///
    /// # Safety
    /// `src` must hold `len` values and `dst` reach `(len.div_ceil(2) - 1) * stride`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn scatter_pairs(src: *const f32, len: usize, dst: *mut u32, stride: usize) {
        let offsets = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(stride as i32),
        );
        for first in (0..len).step_by(32) {
            let count = (len - first).min(32);
            // SAFETY: masked lanes are neither read nor written.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(lanes(count.min(16)), src.add(first));
                let hi = _mm512_maskz_loadu_ps(lanes(count.saturating_sub(16)), src.add(first).wrapping_add(16));
                // Low half from `lo`, high half from `hi`: the values in order, so u32 lane l is
                // the pair (2l, 2l+1) of this run of 32.
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_i32scatter_epi32::<4>(
                    dst.add(first / 2 * stride).cast(),
                    lanes(count.div_ceil(2)),
                    offsets,
                    pairs,
                );
            }
        }
    }

    /// Packs k values `0..kc` and columns `0..width` of `m` (a k x n view) into panels of
    /// `slots` columns, zero-padded: B's panels (NR) from B, A's (MR) from A's transpose.
    ///
    /// # Safety
    /// `m` must hold that block through its strides; the CPU must have AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_panels(m: Strided<'_>, kc: usize, width: usize, slots: usize, out: &mut Vec<u32>) {
        let pairs = kc.div_ceil(2);
        out.resize(width.div_ceil(slots) * pairs * slots, 0);
        let src = m.data.as_ptr();
        for (panel, j0) in (0..width).step_by(slots).enumerate() {
            let used = slots.min(width - j0);
            let dst = unsafe { out.as_mut_ptr().add(panel * pairs * slots) };
            // SAFETY: the caller's contract; the panel lies inside `out`.
            unsafe {
                if m.col_stride == 1 {
                    // Rows are contiguous: a pair's halves are two rows.
                    for q in 0..pairs {
                        let row = |p: usize| src.wrapping_add(p * m.row_stride + j0);
                        let second = (2 * q + 1 < kc).then(|| row(2 * q + 1));
                        interleave_rows(row(2 * q), second, used, dst.add(q * slots), slots);
                    }
                } else {
                    // Columns are contiguous: each column is a run of pairs.
                    for j in 0..slots {
                        if j < used {
                            scatter_pairs(src.add((j0 + j) * m.col_stride), kc, dst.add(j), slots);
                        } else {
                            (0..pairs).for_each(|q| *dst.add(q * slots + j) = 0);
                        }
                    }
                }
            }
        }
    }

    /// The part of an MR x NR tile that lies inside C (all of it but at C's edges). Two fields,
    /// so it is passed in two registers as the two sizes were.
    #[derive(Clone, Copy)]
    pub(super) struct Corner {
        pub rows: usize,
        pub cols: usize,
    }

    /// The `rows x cols` corner of an MR x NR tile of C: `c = a_panel x b_panel` (plus the old
    /// `c` unless `overwrite`), over `pairs` k-pairs.
    ///
    /// # Safety
    /// The panels must hold `pairs` pairs; `c` must be valid for `rows` rows of `cols` values
    /// `ldc` apart.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn micro_kernel(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        Corner { rows, cols }: Corner,
        overwrite: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for q in 0..pairs {
            // SAFETY: the caller's contract on the panels.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16).cast()));
                let a_pairs = a.add(q * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_pairs.add(i) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
            }
        }
        let masks = [lanes(cols.min(16)), lanes(cols.saturating_sub(16))];
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (half, &mask) in masks.iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                // SAFETY: the caller's contract on `c`; masked lanes are neither read nor written.
                unsafe {
                    let at = c.add(i * ldc).wrapping_add(16 * half);
                    let sum =
                        if overwrite { row[half] } else { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), row[half]) };
                    _mm512_mask_storeu_ps(at, mask, sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Precision;
    use half::bf16;

    /// The product of the operands rounded to bf16, in f64, and the sum of the products'
    /// magnitudes (the scale of fp32 accumulation error).
    fn reference(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> (Vec<f64>, Vec<f64>) {
        let round = |x: f32| bf16::from_f32(x).to_f64();
        let (mut c, mut scale) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = round(if ta { a[p * m + i] } else { a[i * k + p] });
                    let bv = round(if tb { b[j * k + p] } else { b[p * n + j] });
                    c[i * n + j] += av * bv;
                    scale[i * n + j] += (av * bv).abs();
                }
            }
        }
        (c, scale)
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * seed).sin() * 1.7).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], scale: &[f64], offset: f64, what: &str) {
        for (idx, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
            let tolerance = 1e-5 * (1.0 + s);
            assert!((*g as f64 - w - offset).abs() <= tolerance, "{what} [{idx}]: {g} vs {}", w + offset);
        }
    }

    /// Where the CPU lacks the instructions, the mode is refused with a message instead.
    fn bf16_or_refused() -> bool {
        if supported() {
            return true;
        }
        let refusal = Precision::Bf16.check_supported().unwrap_err().to_string();
        assert!(refusal.contains("AVX512-BF16"), "{refusal}");
        eprintln!("this CPU has no AVX512-BF16: checked that bf16 is refused instead");
        false
    }

    #[test]
    fn products_match_the_bf16_rounded_reference_in_every_layout_and_edge() {
        if !bf16_or_refused() {
            return;
        }
        // Edges of MR (12), NR (32) and the 16-lane halves, odd k, k past KC (256), m past MC
        // (192), n past NC (1024).
        let shapes = [(1, 1, 1), (5, 7, 3), (13, 33, 257), (12, 32, 256), (25, 17, 600), (200, 40, 31), (3, 1100, 9)];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, n, k) in shapes {
            let (a, b) = (data(m * k, 0.37), data(k * n, 0.11));
            for (ta, la) in [(false, Layout::Normal), (true, Layout::Transposed)] {
                for (tb, lb) in [(false, Layout::Normal), (true, Layout::Transposed)] {
                    let (want, scale) = reference(m, n, k, &a, ta, &b, tb);
                    let what = format!("{m}x{n}x{k} {la:?} {lb:?}");
                    let mut c = vec![f32::NAN; m * n];
                    let (a, b) = (Operand { data: &a[..], layout: la }, Operand { data: &b[..], layout: lb });
                    matmul(Gemm { m, n, k }, a, b, Output::overwrite(&mut c));
                    assert_close(&c, &want, &scale, 0.0, &what);
                    let mut c = vec![1.0; m * n];
                    pool.install(|| matmul(Gemm { m, n, k }, a, b, Output::add_to(&mut c)));
                    assert_close(&c, &want, &scale, 1.0, &format!("{what}, accumulated on 3 threads"));
                }
            }
        }
    }

    #[test]
    fn the_operands_are_rounded_to_bf16() {
        if !bf16_or_refused() {
            return;
        }
        // 1 + 2^-10 is not a bf16 (8 bits of mantissa): it rounds to 1.
        let (a, b) = (vec![1.0 + 1.0 / 1024.0; 4], vec![1.0; 4]);
        let mut c = [0.0];
        matmul(Gemm { m: 1, n: 1, k: 4 }, Operand::normal(&a), Operand::normal(&b), Output::overwrite(&mut c));
        assert_eq!(c[0], 4.0);
    }

    #[test]
    fn a_column_block_and_the_k_split_match_the_reference() {
        if !bf16_or_refused() {
            return;
        }
        let (m, n, k, first, width) = (14, 70, 45, 9, 37);
        let (a, b) = (data(m * k, 0.29), data(k * n, 0.13));
        for (ta, layout) in [(false, Layout::Normal), (true, Layout::Transposed)] {
            let (whole, scale) = reference(m, n, k, &a, ta, &b, false);
            let mut block = vec![f32::NAN; m * width];
            let window = Window { data: &b[first..], row_stride: n };
            matmul_column_block(Gemm { m, n: width, k }, Operand { data: &a[..], layout }, window, &mut block);
            let pick = |v: &[f64]| -> Vec<f64> { (0..m).flat_map(|i| v[i * n + first..][..width].to_vec()).collect() };
            assert_close(&block, &pick(&whole), &pick(&scale), 0.0, &format!("window {layout:?}"));
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, n, k) in [(20, 13, 4099), (3, 40, 7)] {
            let (a, b) = (data(m * k, 0.37), data(n * k, 0.11));
            let (want, scale) = reference(m, n, k, &a, false, &b, true);
            let mut c = vec![0.5; m * n];
            pool.install(|| matmul_nt_split_k(Gemm { m, n, k }, &a, &b, &mut c));
            assert_close(&c, &want, &scale, 0.5, &format!("split k {m}x{n}x{k}"));
        }
    }
}
