//! The CPU operations a DCGAN step is made of, each a forward and a backward on flat slices.
//!
//! Activations are channel-major (C, N, H, W) throughout, so that a convolution over the whole
//! batch is one GEMM and a BatchNorm channel is one contiguous run.

pub mod activation;
pub mod adam;
pub mod batchnorm;
pub mod bf16;
pub mod conv;
pub mod im2col;
pub mod isa_rate;
pub mod loss;
pub mod matmul;
