//! Times the pieces of D's strided convolutions on their own, at DCGAN's shapes: the unrolling
//! (`im2col`), the fold (`col2im`), the forward product, and the weight gradient's product
//! split by the `gemm` crate over its output against split by `k` between the threads
//! (`matmul_nt_split_k`); where the CPU has AVX512-BF16, also the forward and weight-gradient
//! products with bf16 operands (`--precision bf16`). `step_bench --profile` shows where a step's
//! time goes; this shows how fast each piece runs, to choose how to build it.

use anyhow::{Context, Result};
use clap::Parser;
use kernels::Precision;
use kernels::ops::bf16;
use kernels::ops::im2col::{Geometry, col2im, im2col};
use kernels::ops::matmul::{Gemm, Operand, Output, matmul, matmul_nt_split_k};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Times im2col, col2im and the products of D's strided convolutions")]
struct Args {
    /// Compute threads (rayon pool size).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed repetitions of each piece (the median is printed).
    #[arg(long, default_value_t = 7)]
    repeats: usize,
}

/// Median milliseconds of `repeats` runs of `f`, after one untimed run.
fn time_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    dcgan_bench::median(&mut times)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(args.threads).build().context("building the thread pool")?;
    let with_bf16 = bf16::supported();
    println!(
        "{:<24} {:>10} {:>10} {:>12} {:>16} {:>16} {:>14} {:>16}",
        "layer (in->out, side)",
        "im2col ms",
        "col2im ms",
        "fwd GFLOP/s",
        "dW gemm GFLOP/s",
        "dW split-k GF/s",
        "fwd bf16 GF/s",
        "dW bf16 GF/s"
    );
    // D's stride-2 4x4 layers of DCGAN-32 (grayscale) and DCGAN-64.
    for (ic, oc, side) in [(1, 64, 32), (64, 128, 16), (128, 256, 8), (3, 64, 64), (64, 128, 32), (256, 512, 8)] {
        let g = Geometry::for_conv(ic, args.batch, side, side, 4, 2, 1);
        let (rows, cols_n) = (g.rows(), g.cols());
        let x: Vec<f32> = (0..g.big_len()).map(|i| (i as f32 * 0.1).sin()).collect();
        let w: Vec<f32> = (0..oc * rows).map(|i| (i as f32 * 0.3).cos()).collect();
        let dy: Vec<f32> = (0..oc * cols_n).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut cols = vec![0.0; rows * cols_n];
        let mut y = vec![0.0; oc * cols_n];
        let mut back = vec![0.0; g.big_len()];
        // The weight gradient's product in the orientation the layer runs it, its larger side
        // as rows: (rows x oc) = cols x dy^T, or (oc x rows) = dy x cols^T.
        let mut dw = vec![0.0; rows * oc];
        let flops = 2.0 * (oc * rows * cols_n) as f64;
        let rate = |ms: f64| flops / ms / 1e6;
        let (t_im2col, t_col2im, t_fwd, t_dw_gemm, t_dw_split, bf16_times) = pool.install(|| {
            let t_im2col = time_ms(args.repeats, || im2col(&g, &x, &mut cols));
            let t_col2im = time_ms(args.repeats, || col2im(&g, &cols, &mut back));
            let fwd = Gemm { m: oc, n: cols_n, k: rows };
            let t_fwd = time_ms(args.repeats, || {
                matmul(fwd, Operand::normal(&w), Operand::normal(&cols), Output::overwrite(&mut y))
            });
            let (m, n, lhs, rhs) = if rows > oc { (rows, oc, &cols, &dy) } else { (oc, rows, &dy, &cols) };
            let dw_shape = Gemm { m, n, k: cols_n };
            let t_dw_gemm = time_ms(args.repeats, || {
                matmul(dw_shape, Operand::normal(lhs), Operand::transposed(rhs), Output::overwrite(&mut dw))
            });
            let t_dw_split = time_ms(args.repeats, || matmul_nt_split_k(dw_shape, lhs, rhs, &mut dw));
            // bf16: the same products, the weight gradient in the orientation its tiles prefer.
            let bf16_times = with_bf16.then(|| {
                let t_fwd = time_ms(args.repeats, || {
                    Precision::Bf16.matmul(fwd, Operand::normal(&w), Operand::normal(&cols), Output::overwrite(&mut y))
                });
                let (m, n, lhs, rhs) = if bf16::transposed_product_is_cheaper(oc, rows) {
                    (rows, oc, &cols, &dy)
                } else {
                    (oc, rows, &dy, &cols)
                };
                let dw_shape = Gemm { m, n, k: cols_n };
                let t_dw = time_ms(args.repeats, || Precision::Bf16.matmul_nt_split_k(dw_shape, lhs, rhs, &mut dw));
                (t_fwd, t_dw)
            });
            (t_im2col, t_col2im, t_fwd, t_dw_gemm, t_dw_split, bf16_times)
        });
        let (bf16_fwd, bf16_dw) = match bf16_times {
            Some((f, d)) => (format!("{:.0}", rate(f)), format!("{:.0}", rate(d))),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:<24} {:>10.2} {:>10.2} {:>12.0} {:>16.0} {:>16.0} {:>14} {:>16}",
            format!("{ic}->{oc}, {side}->{}", side / 2),
            t_im2col,
            t_col2im,
            rate(t_fwd),
            rate(t_dw_gemm),
            rate(t_dw_split),
            bf16_fwd,
            bf16_dw
        );
    }
    Ok(())
}
