//! The DCGAN generator and discriminator, built by the paper's rules from a [`ModelConfig`],
//! with the PyTorch example's `state_dict` names.

use crate::config::ModelConfig;
use crate::net::{BlockSpec, ConvKind, Net};
use crate::ops::activation::Activation;
use crate::ops::conv::ConvShape;
use crate::rng;

/// G: a 1x1 latent to image_size x image_size through transposed convolutions; BatchNorm and
/// ReLU on every block but the last, which has tanh.
pub fn generator_specs(cfg: &ModelConfig) -> Vec<BlockSpec> {
    let l = cfg.upsampling_layers();
    let mut specs = Vec::new();
    let mut channels = cfg.ngf << (l - 1);
    specs.push(BlockSpec {
        kind: ConvKind::Transposed,
        shape: ConvShape { in_channels: cfg.nz, out_channels: channels, kernel: 4, stride: 1, padding: 0 },
        batch_norm: true,
        activation: Activation::Relu,
    });
    for _ in 1..l {
        specs.push(BlockSpec {
            kind: ConvKind::Transposed,
            shape: ConvShape { in_channels: channels, out_channels: channels / 2, kernel: 4, stride: 2, padding: 1 },
            batch_norm: true,
            activation: Activation::Relu,
        });
        channels /= 2;
    }
    specs.push(BlockSpec {
        kind: ConvKind::Transposed,
        shape: ConvShape { in_channels: channels, out_channels: cfg.nc, kernel: 4, stride: 2, padding: 1 },
        batch_norm: false,
        activation: Activation::Tanh,
    });
    specs
}

/// D: image to one logit through strided convolutions; LeakyReLU(0.2) everywhere, BatchNorm on
/// every block but the first and the last; the final sigmoid lives in the loss.
pub fn discriminator_specs(cfg: &ModelConfig) -> Vec<BlockSpec> {
    let l = cfg.upsampling_layers();
    let mut specs = Vec::new();
    let mut channels = cfg.ndf;
    specs.push(BlockSpec {
        kind: ConvKind::Conv,
        shape: ConvShape { in_channels: cfg.nc, out_channels: channels, kernel: 4, stride: 2, padding: 1 },
        batch_norm: false,
        activation: Activation::LeakyRelu,
    });
    for _ in 1..l {
        specs.push(BlockSpec {
            kind: ConvKind::Conv,
            shape: ConvShape { in_channels: channels, out_channels: channels * 2, kernel: 4, stride: 2, padding: 1 },
            batch_norm: true,
            activation: Activation::LeakyRelu,
        });
        channels *= 2;
    }
    specs.push(BlockSpec {
        kind: ConvKind::Conv,
        shape: ConvShape { in_channels: channels, out_channels: 1, kernel: 4, stride: 1, padding: 0 },
        batch_norm: false,
        activation: Activation::SigmoidInLoss,
    });
    specs
}

pub fn generator(cfg: &ModelConfig) -> Net {
    Net::new(1, &generator_specs(cfg))
}

pub fn discriminator(cfg: &ModelConfig) -> Net {
    Net::new(cfg.image_size, &discriminator_specs(cfg))
}

/// Tag of the weight-initialisation streams, distinct from the noise streams.
const INIT_STREAM: u64 = 3;

/// The example's `weights_init`: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02), bias 0.
/// `which` tells the generator (0) from the discriminator (1) so they draw different weights.
pub fn initialise(net: &mut Net, seed: u64, which: u64) {
    let mut r = rng::stream(&[INIT_STREAM, seed, which]);
    for b in &net.blocks {
        rng::fill_normal(&mut r, 0.0, 0.02, &mut net.params[b.weight.clone()]);
        if let Some(bn) = &b.bn {
            rng::fill_normal(&mut r, 1.0, 0.02, &mut net.params[bn.gamma.clone()]);
            net.params[bn.beta.clone()].fill(0.0);
        }
    }
}

/// Where a block's modules sit in the example's `nn.Sequential` named `main`: conv, then
/// BatchNorm if any, then the activation (D's final Sigmoid counts too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleIndex {
    pub conv: usize,
    pub batch_norm: Option<usize>,
}

pub fn module_indices(net: &Net) -> Vec<ModuleIndex> {
    let mut next = 0;
    net.blocks
        .iter()
        .map(|b| {
            let conv = next;
            next += 1;
            let batch_norm = b.bn.as_ref().map(|_| {
                next += 1;
                next - 1
            });
            next += 1; // the activation
            ModuleIndex { conv, batch_norm }
        })
        .collect()
}
