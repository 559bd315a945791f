//! Shared pieces of the benchmarks: step FLOP counts and process memory.

pub mod profile;

use kernels::ModelConfig;
use kernels::models::{discriminator_specs, generator_specs};
use kernels::net::ConvKind;

/// Multiply-add FLOPs (2 per MAC) of one convolution pass (forward, backward-data or
/// backward-weight all cost the same GEMM) per image, for each block of a network.
fn block_flops(specs: &[kernels::net::BlockSpec], input_side: usize) -> Vec<f64> {
    let mut side = input_side;
    specs
        .iter()
        .map(|s| {
            let sh = s.shape;
            let out = match s.kind {
                ConvKind::Conv => sh.conv_output(side),
                ConvKind::Transposed => sh.conv_transpose_output(side),
            };
            // For a transposed convolution the GEMM runs over the input's pixels.
            let pixels = match s.kind {
                ConvKind::Conv => out * out,
                ConvKind::Transposed => side * side,
            };
            side = out;
            2.0 * (sh.in_channels * sh.out_channels * sh.kernel * sh.kernel * pixels) as f64
        })
        .collect()
}

/// The convolution FLOPs of one training step per image, as PyTorch's loop does them (D on real,
/// G, D on fake, D again for G's loss, backward passes). Used for both programs, so the
/// GFLOP/s columns compare the same work; the work this crate skips (D's weight gradients in
/// G's half, D's input gradient at the first layer) still counts, as "useful" FLOPs.
pub fn step_flops_per_image(cfg: &ModelConfig) -> f64 {
    let g: f64 = block_flops(&generator_specs(cfg), 1).iter().sum();
    let d: f64 = block_flops(&discriminator_specs(cfg), cfg.image_size).iter().sum();
    // G: forward + backward (data + weight). D: 3 forwards, 3 backwards of 2 GEMMs each.
    3.0 * g + 3.0 * d + 3.0 * 2.0 * d
}

/// Peak resident memory of this process (VmHWM), in MiB, or None off Linux.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) }
}
