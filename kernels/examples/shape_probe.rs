// scratch: time im2col vs gemm for D's layers (not committed)
use kernels::ops::conv::ConvShape;
use kernels::ops::im2col::{Geometry, col2im, im2col};
use kernels::ops::matmul::{Layout, matmul};
use std::time::Instant;
fn t<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut v = vec![];
    for _ in 0..7 {
        let s = Instant::now();
        f();
        v.push(s.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[3]
}
fn main() {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    for (ic, oc, side) in [(64usize, 128usize, 32usize), (128, 256, 16), (256, 512, 8), (3, 64, 64)] {
        let s = ConvShape { in_channels: ic, out_channels: oc, kernel: 4, stride: 2, padding: 1 };
        let g = Geometry::for_conv(ic, 64, side, side, 4, 2, 1);
        let x: Vec<f32> = (0..g.big_len()).map(|i| (i as f32 * 0.1).sin()).collect();
        let w: Vec<f32> = (0..s.weight_len()).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut cols = vec![0f32; g.rows() * g.cols()];
        let mut y = vec![0f32; oc * g.cols()];
        let ti = t(|| im2col(&g, &x, &mut cols));
        let tg = t(|| matmul(oc, g.cols(), g.rows(), &w, Layout::Normal, &cols, Layout::Normal, &mut y, false));
        let mut sc = vec![0f32; g.rows() * g.cols()];
        let tgt = t(|| matmul(g.rows(), g.cols(), oc, &w, Layout::Transposed, &y, Layout::Normal, &mut sc, false));
        let mut dx = vec![0f32; g.big_len()];
        let tc = t(|| col2im(&g, &sc, &mut dx));
        let fl = 2.0 * (oc * g.cols() * g.rows()) as f64;
        println!(
            "{ic}->{oc} {side}: im2col {ti:.2} ms ({:.1} GB/s)  gemm fwd {tg:.2} ms ({:.0} GF/s)  gemm dT {tgt:.2} ms ({:.0} GF/s) col2im {tc:.2} ms",
            (g.rows() * g.cols() * 4) as f64 / ti / 1e6,
            fl / tg / 1e6,
            fl / tgt / 1e6
        );
    }
}
