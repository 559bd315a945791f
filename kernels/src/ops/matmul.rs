//! Row-major matrix products on the `gemm` crate, with transposes expressed as strides.

use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread: waking the pool costs
/// more than it saves.
pub(super) const PARALLEL_THRESHOLD: usize = 1 << 18;

/// How an operand is stored: as the (rows, cols) matrix the product needs, or as its transpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Normal,
    Transposed,
}

/// The shape of a product `c (m x n) = a (m x k) x b (k x n)`; one type for the fp32, bf16 and
/// CUDA products, so their calls read alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// An operand of a product with its storage: `a` is m x k (`Normal`) or k x m (`Transposed`),
/// `b` k x n or n x k, all row-major. `D` is the buffer: a slice here, a device view for
/// [`crate::cuda::ops::matmul`].
#[derive(Debug)]
pub struct Operand<'a, D: ?Sized = [f32]> {
    pub data: &'a D,
    pub layout: Layout,
}

impl<'a, D: ?Sized> Operand<'a, D> {
    pub fn normal(data: &'a D) -> Self {
        Self { data, layout: Layout::Normal }
    }

    pub fn transposed(data: &'a D) -> Self {
        Self { data, layout: Layout::Transposed }
    }
}

// Not derived: a derive would ask `D: Copy`, and a reference is Copy whatever it points to.
impl<D: ?Sized> Clone for Operand<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D: ?Sized> Copy for Operand<'_, D> {}

/// The result of a product, m x n row-major: `data` is overwritten, or the product is added to
/// it when `accumulate` (weight gradients summed over the passes of a step).
#[derive(Debug)]
pub struct Output<'a, D: ?Sized = [f32]> {
    pub data: &'a mut D,
    pub accumulate: bool,
}

impl<'a, D: ?Sized> Output<'a, D> {
    pub fn overwrite(data: &'a mut D) -> Self {
        Self { data, accumulate: false }
    }

    pub fn add_to(data: &'a mut D) -> Self {
        Self { data, accumulate: true }
    }
}

/// A window of `n` columns of a wider row-major matrix whose rows lie `row_stride` apart: the
/// `b` of [`matmul_column_block`], one block of images of the whole batch's matrix.
#[derive(Clone, Copy, Debug)]
pub struct Window<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
}

/// `c (m x n) = a (m x k) * b (k x n)`, plus the old `c` when `c.accumulate`.
pub fn matmul(s: Gemm, a: Operand<'_>, b: Operand<'_>, c: Output<'_>) {
    let Gemm { m, n, k } = s;
    let Output { data: c, accumulate } = c;
    if !product_left(s, a.data, b.data.len() >= k * n, c, accumulate) {
        return;
    }
    if degenerate(s, a, b, c, accumulate) {
        return;
    }
    let b_strides = match b.layout {
        Layout::Normal => (n, 1),
        Layout::Transposed => (1, k),
    };
    let threads = rayon::current_num_threads();
    let parallelism =
        if threads > 1 && m * n * k >= PARALLEL_THRESHOLD { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the checks above keep every index the strides reach inside the slices.
    unsafe { gemm_row_major(s, a, b.data, b_strides, Output { data: c, accumulate }, parallelism) }
}

/// Checks the operands of `c (m x n) = a (m x k) x b` (`b_fits`: whether `b` holds its k x n
/// values) and does the products that need no multiplication: none when `c` is empty, zeros
/// (unless `accumulate`) when k is 0. Returns whether a product is left to compute.
pub(super) fn product_left(s: Gemm, a: &[f32], b_fits: bool, c: &mut [f32], accumulate: bool) -> bool {
    let Gemm { m, n, k } = s;
    assert!(a.len() >= m * k, "lhs too short for {m}x{k}");
    assert!(b_fits, "rhs too short for {k}x{n}");
    assert!(c.len() >= m * n, "dst too short for {m}x{n}");
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return false;
    }
    true
}

/// Whether `b` holds a window of `n` columns and `k` rows.
pub(super) fn window_fits(n: usize, k: usize, b: Window<'_>) -> bool {
    n <= b.row_stride && (k == 0 || b.data.len() >= (k - 1) * b.row_stride + n)
}

/// One call of the `gemm` crate: `c (m x n, row-major) = a x b`, plus the old `c` when
/// `c.accumulate`; `b` given by its (row, column) strides.
///
/// # Safety
/// Every element of `b` the strides reach for a k x n matrix must lie inside `b`, and `a` and `c`
/// must be at least m x k and m x n.
unsafe fn gemm_row_major(
    s: Gemm,
    a: Operand<'_>,
    b: &[f32],
    (b_row_stride, b_col_stride): (usize, usize),
    c: Output<'_>,
    parallelism: Parallelism,
) {
    let Gemm { m, n, k } = s;
    let (a_rs, a_cs) = match a.layout {
        Layout::Normal => (k as isize, 1),
        Layout::Transposed => (1, m as isize),
    };
    // SAFETY: the caller's contract; `c` is borrowed mutably so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            1,
            n as isize,
            c.accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_col_stride as isize,
            b_row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c (m x n) = a (m x k) x b` on the calling thread, where `b` is a window of `n` columns: one
/// block of a product the caller splits between threads itself (by images, so each block's
/// result stays in cache for what follows it). `c` is m x n, row-major, and overwritten.
pub fn matmul_column_block(s: Gemm, a: Operand<'_>, b: Window<'_>, c: &mut [f32]) {
    if !product_left(s, a.data, window_fits(s.n, s.k, b), c, false) {
        return;
    }
    // SAFETY: the checks above keep every index the strides reach inside the slices.
    unsafe { gemm_row_major(s, a, b.data, (b.row_stride, 1), Output::overwrite(c), Parallelism::None) }
}

/// Shortest slice of `k` worth a thread of its own in [`matmul_nt_split_k`]; shorter ones are
/// left to the `gemm` crate's own split of the output.
const MIN_K_SLICE: usize = 1024;

/// `c (m x n) += a (m x k) x b^T`, with `b` stored n x k, for a long `k`: the weight gradients
/// (e.g. 64 x 48 or 1024 x 128 outputs over 16384 to 65536 pixels). The `gemm` crate
/// parallelises over tiles of `c`, which keeps two threads busy poorly on such outputs (64 x 48:
/// slower than one thread; 1024 x 128: 240 GFLOP/s against 290 split by k), so the threads take
/// slices of `k` instead and their partial products are summed. The partials live in a
/// per-thread buffer reused from call to call.
pub fn matmul_nt_split_k(s: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k } = s;
    if !split_k_pays(m, n, k) {
        matmul(s, Operand::normal(a), Operand::transposed(b), Output::add_to(c));
        return;
    }
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "operands too short for {m}x{n}x{k}");
    add_k_slices(m, n, k, c, |k0, len, part| {
        // SAFETY: columns k0..k0+len of a (m x k, row stride k) and b (n x k, row stride k) are
        // in bounds (checked above); `part` is m x n, row-major.
        unsafe {
            gemm::gemm(
                m,
                n,
                len,
                part.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr().add(k0),
                1,
                k as isize,
                b.as_ptr().add(k0),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
}

/// Whether an m x n x k product is worth splitting by `k` between this pool's threads.
pub(super) fn split_k_pays(m: usize, n: usize, k: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && m * n * k >= PARALLEL_THRESHOLD && k >= threads * MIN_K_SLICE
}

/// `c (m x n) += ` the sum of one partial product per thread, each over its own slice of `k`:
/// `product(k0, len, part)` writes slice `k0..k0+len`'s m x n product into `part` (overwriting
/// it). The partials live in a per-thread buffer reused from call to call; the fp32 and bf16
/// weight gradients share this.
pub(super) fn add_k_slices(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    product: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    thread_local! {
        static PARTIALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let threads = rayon::current_num_threads();
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(threads * m * n, 0.0);
        let slice = k.div_ceil(threads);
        partials.par_chunks_mut(m * n).enumerate().for_each(|(t, part)| {
            let k0 = (t * slice).min(k);
            let len = slice.min(k - k0);
            if len == 0 {
                part.fill(0.0);
            } else {
                product(k0, len, part);
            }
        });
        for part in partials.chunks_exact(m * n) {
            c[..m * n].iter_mut().zip(part).for_each(|(c, p)| *c += p);
        }
    });
}

/// Products with one dimension of 1 (D's last layer, one output channel: a row times a matrix,
/// or an outer product in its backward) as plain loops over contiguous rows. The `gemm` crate
/// takes its general path for them, which profiles showed 10-30x slower than these loops.
/// Returns whether it handled the product.
fn degenerate(s: Gemm, a: Operand<'_>, b: Operand<'_>, c: &mut [f32], accumulate: bool) -> bool {
    let Gemm { m, n, k } = s;
    let (a, a_layout, b, b_layout) = (a.data, a.layout, b.data, b.layout);
    let c = &mut c[..m * n];
    if !accumulate && (k == 1 || m == 1 || n == 1) {
        c.fill(0.0);
    }
    let axpy = |y: &mut [f32], alpha: f32, x: &[f32]| y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(x, y)| x * y).sum::<f32>();
    if k == 1 {
        // c += a (m x 1) b (1 x n): both operands are contiguous vectors whatever their layout.
        c.chunks_exact_mut(n).zip(&a[..m]).for_each(|(row, &ai)| axpy(row, ai, &b[..n]));
        return true;
    }
    if m == 1 {
        // a is a contiguous row of k either way.
        match b_layout {
            Layout::Normal => b.chunks_exact(n).take(k).zip(&a[..k]).for_each(|(row, &ap)| axpy(c, ap, row)),
            Layout::Transposed => c.iter_mut().zip(b.chunks_exact(k)).for_each(|(cj, col)| *cj += dot(&a[..k], col)),
        }
        return true;
    }
    if n == 1 {
        // b is a contiguous column of k either way.
        match a_layout {
            Layout::Normal => c.iter_mut().zip(a.chunks_exact(k)).for_each(|(ci, row)| *ci += dot(row, &b[..k])),
            Layout::Transposed => a.chunks_exact(m).take(k).zip(&b[..k]).for_each(|(row, &bp)| axpy(c, bp, row)),
        }
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn the_k_split_product_matches_the_naive_one() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, n, k) in [(5, 3, 1000), (64, 48, 4099), (2, 2, 2)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = naive(m, n, k, &a, false, &b, true);
            let mut c = vec![1.0; m * n];
            pool.install(|| matmul_nt_split_k(Gemm { m, n, k }, &a, &b, &mut c));
            for (x, y) in c.iter().zip(&want) {
                assert!((x - (y + 1.0)).abs() < 1e-3 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} vs {}", y + 1.0);
            }
        }
    }

    #[test]
    fn a_column_block_is_that_window_of_the_whole_product() {
        let (m, n, k, first, width) = (7, 40, 9, 13, 17);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (ta, layout) in [(false, Layout::Normal), (true, Layout::Transposed)] {
            let whole = naive(m, n, k, &a, ta, &b, false);
            let mut block = vec![f32::NAN; m * width];
            let window = Window { data: &b[first..], row_stride: n };
            matmul_column_block(Gemm { m, n: width, k }, Operand { data: &a[..], layout }, window, &mut block);
            for (i, row) in block.chunks_exact(width).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let want = whole[i * n + first + j];
                    assert!((v - want).abs() < 1e-4, "{layout:?} ({i}, {j}): {v} vs {want}");
                }
            }
        }
    }

    #[test]
    fn all_layouts_and_degenerate_shapes_match_the_naive_product() {
        for (m, n, k) in [(7, 5, 9), (1, 5, 9), (7, 1, 9), (7, 5, 1), (1, 1, 9), (1, 5, 1), (7, 1, 1)] {
            check_against_naive(m, n, k);
        }
    }

    fn check_against_naive(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (ta, la) in [(false, Layout::Normal), (true, Layout::Transposed)] {
            for (tb, lb) in [(false, Layout::Normal), (true, Layout::Transposed)] {
                let want = naive(m, n, k, &a, ta, &b, tb);
                let mut c = vec![1.0; m * n];
                let (a, b) = (Operand { data: &a[..], layout: la }, Operand { data: &b[..], layout: lb });
                matmul(Gemm { m, n, k }, a, b, Output::add_to(&mut c));
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - (y + 1.0)).abs() < 1e-4, "{m}x{n}x{k} {la:?} {lb:?}: {x} vs {}", y + 1.0);
                }
                matmul(Gemm { m, n, k }, a, b, Output::overwrite(&mut c));
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "{m}x{n}x{k} {la:?} {lb:?}: {x} vs {y}");
                }
            }
        }
    }
}
