//! Element-wise activations, applied in place; each backward reads the activation's output,
//! so no copy of its input is kept.

use rayon::prelude::*;

/// Slices shorter than this are processed on the calling thread.
const PAR_CHUNK: usize = 1 << 14;

/// The slope of LeakyReLU on negative inputs, as the DCGAN paper uses it.
pub const LEAKY_SLOPE: f32 = 0.2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    LeakyRelu,
    Tanh,
    Sigmoid,
    /// No-op in the network: D's sigmoid is folded into the loss, which works on logits.
    SigmoidInLoss,
}

impl Activation {
    /// `x <- act(x)`.
    pub fn forward_in_place(self, x: &mut [f32]) {
        // One monomorphised loop per activation, so each inner loop is a straight vectorisable
        // map rather than a call through a function pointer per element.
        fn apply(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
            x.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
        }
        match self {
            Activation::Relu => apply(x, |v| v.max(0.0)),
            Activation::LeakyRelu => apply(x, |v| if v < 0.0 { v * LEAKY_SLOPE } else { v }),
            Activation::Tanh => apply(x, f32::tanh),
            Activation::Sigmoid => apply(x, sigmoid),
            Activation::SigmoidInLoss => {}
        }
    }

    /// `dy <- dy * act'(x)`, computed from the output `y = act(x)`.
    pub fn backward_in_place(self, y: &[f32], dy: &mut [f32]) {
        assert_eq!(y.len(), dy.len());
        fn apply(y: &[f32], dy: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
            dy.par_chunks_mut(PAR_CHUNK)
                .zip(y.par_chunks(PAR_CHUNK))
                .for_each(|(d, y)| d.iter_mut().zip(y).for_each(|(d, y)| *d = f(*y, *d)));
        }
        match self {
            // PyTorch's convention at 0: ReLU passes nothing, LeakyReLU passes the slope.
            Activation::Relu => apply(y, dy, |y, d| if y <= 0.0 { 0.0 } else { d }),
            Activation::LeakyRelu => apply(y, dy, |y, d| if y <= 0.0 { d * LEAKY_SLOPE } else { d }),
            Activation::Tanh => apply(y, dy, |y, d| d * (1.0 - y * y)),
            Activation::Sigmoid => apply(y, dy, |y, d| d * y * (1.0 - y)),
            Activation::SigmoidInLoss => {}
        }
    }
}

/// The logistic function, computed without overflow for large |x|.
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
