//! What the discriminator computes, for the commands that look inside it: its features as a
//! representation (max-pooled from every layer, as the paper's CIFAR-10 experiment) and
//! guided backpropagation from one of its feature maps to the input image.

use anyhow::{Result, anyhow};
use kernels::Gan;
use kernels::net::{ConvKind, Net};
use kernels::ops::activation::Activation;
use kernels::ops::batchnorm::{BnMode, EPS};
use kernels::ops::conv::{ConvGrads, Unrolled, conv2d_backward};
use kernels::tensor::swap_leading_axes;

/// Side of the grid every layer is max-pooled to: the paper's 4x4.
pub const POOL_GRID: usize = 4;

/// Images per forward pass when extracting features.
const CHUNK: usize = 256;

/// Runs D (running statistics) on NCHW `images` in chunks, calling `visit(first_index, batch,
/// net)` after each chunk's forward so the caller can read every block's output.
pub fn forward_chunks(
    gan: &mut Gan,
    images: &[f32],
    mut visit: impl FnMut(usize, usize, &Net) -> Result<()>,
) -> Result<()> {
    let cfg = gan.model_config().clone();
    let per = cfg.nc * cfg.image_size * cfg.image_size;
    let n_all = images.len() / per;
    let mut xc = Vec::new();
    for start in (0..n_all).step_by(CHUNK) {
        let n = CHUNK.min(n_all - start);
        let part = &images[start * per..(start + n) * per];
        xc.resize(part.len(), 0.0);
        swap_leading_axes(part, n, cfg.nc, cfg.image_size * cfg.image_size, &mut xc);
        let net = gan.discriminator_net();
        net.forward(&xc, n, BnMode::Eval, None).map_err(|e| anyhow!("discriminator forward failed: {e}"))?;
        visit(start, n, net)?;
    }
    Ok(())
}

/// Length of one sample's [`d_features`] vector.
pub fn d_feature_len(net: &Net) -> usize {
    feature_blocks(net).map(|i| net.blocks[i].shape.out_channels * POOL_GRID * POOL_GRID).sum()
}

/// Every block but the last (whose output is the logit, not a feature).
fn feature_blocks(net: &Net) -> impl Iterator<Item = usize> + '_ {
    (0..net.blocks.len().saturating_sub(1)).filter(|&i| net.blocks[i].out_side >= POOL_GRID)
}

/// D's features for NCHW `images`, row-major (n x [`d_feature_len`]): each feature block's
/// output max-pooled to a 4x4 grid, flattened and concatenated, as the paper builds its
/// 28672-dimensional CIFAR-10 representation.
pub fn d_features(gan: &mut Gan, images: &[f32]) -> Result<Vec<f32>> {
    let cfg = gan.model_config().clone();
    let n_all = images.len() / (cfg.nc * cfg.image_size * cfg.image_size);
    let dim = d_feature_len(gan.discriminator_net());
    let mut out = vec![0.0; n_all * dim];
    forward_chunks(gan, images, |start, n, net| {
        let mut offset = 0;
        for b in feature_blocks(net) {
            let block = &net.blocks[b];
            let (c, side) = (block.shape.out_channels, block.out_side);
            let y = block.output();
            let win = side / POOL_GRID;
            for ch in 0..c {
                for i in 0..n {
                    let plane = &y[(ch * n + i) * side * side..][..side * side];
                    let row =
                        &mut out[(start + i) * dim + offset + ch * POOL_GRID * POOL_GRID..][..POOL_GRID * POOL_GRID];
                    for gy in 0..POOL_GRID {
                        for gx in 0..POOL_GRID {
                            let mut m = f32::NEG_INFINITY;
                            for y0 in gy * win..(gy + 1) * win {
                                for x0 in gx * win..(gx + 1) * win {
                                    m = m.max(plane[y0 * side + x0]);
                                }
                            }
                            row[gy * POOL_GRID + gx] = m;
                        }
                    }
                }
            }
            offset += c * POOL_GRID * POOL_GRID;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Guided backpropagation (Springenberg et al.) from block `block`'s output gradient `d_out`
/// (C, N*H*W) to the input (C, N, H, W), through the net's last forward, which must have run
/// with running statistics (eval mode).
///
/// `Net::guided_input_gradient` in kernels differentiates the *training-mode* BatchNorm (batch
/// statistics), which mixes the samples of a batch and needs a training forward. For a
/// per-image saliency map the eval-mode network is the right one: there BatchNorm is a fixed
/// per-channel scale, so it is done here with kernels' convolution backward.
pub fn guided_backprop_eval(net: &Net, block: usize, batch: usize, d_out: &[f32]) -> Vec<f32> {
    let mut grad = d_out.to_vec();
    let mut scratch = Vec::new();
    for i in (0..=block).rev() {
        let b = &net.blocks[i];
        debug_assert_eq!(b.kind, ConvKind::Conv);
        b.activation.backward_in_place(b.output(), &mut grad);
        if matches!(b.activation, Activation::Relu | Activation::LeakyRelu) {
            grad.iter_mut().for_each(|g| *g = g.max(0.0));
        }
        if let Some(bn) = &b.bn {
            let m = grad.len() / bn.layer.channels;
            let gamma = &net.params[bn.gamma.clone()];
            for (ch, g) in grad.chunks_mut(m).enumerate() {
                let scale = gamma[ch] / (bn.layer.running_var[ch] + EPS).sqrt();
                g.iter_mut().for_each(|v| *v *= scale);
            }
        }
        let mut dx = vec![0.0; b.shape.in_channels * batch * b.in_side * b.in_side];
        let w = &net.params[b.weight.clone()];
        let grads = ConvGrads { weight: None, input: Some(&mut dx[..]) };
        let p = b.shape.on(batch, b.in_side);
        conv2d_backward(&p, &grad, w, Unrolled::Kept(&[]), grads, &mut scratch, net.precision());
        grad = dx;
    }
    grad
}
