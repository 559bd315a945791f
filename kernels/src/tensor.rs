//! A small owned f32 tensor: a shape and its row-major data.
//!
//! At the API boundary images are NCHW, as in PyTorch. Inside the networks activations are kept
//! channel-major (C, N, H, W): each convolution is then one GEMM over the whole batch and
//! BatchNorm reads every channel as one contiguous run.

use crate::KernelError;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data`, refusing a length that does not match `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, KernelError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(KernelError::Shape {
                what: "tensor data length".into(),
                expected: vec![expected],
                got: vec![data.len()],
            });
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { shape, data: vec![0.0; n] }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Checks the shape, for inputs that come from callers.
    pub fn expect_shape(&self, what: &str, expected: &[usize]) -> Result<(), KernelError> {
        if self.shape != expected {
            return Err(KernelError::Shape { what: what.into(), expected: expected.to_vec(), got: self.shape.clone() });
        }
        Ok(())
    }
}

/// Swaps the first two axes of a 4-d buffer laid out as (a, b, rest): NCHW <-> CNHW.
pub fn swap_leading_axes(src: &[f32], a: usize, b: usize, rest: usize, dst: &mut [f32]) {
    debug_assert_eq!(src.len(), a * b * rest);
    debug_assert_eq!(dst.len(), a * b * rest);
    for i in 0..a {
        for j in 0..b {
            let s = (i * b + j) * rest;
            let d = (j * a + i) * rest;
            dst[d..d + rest].copy_from_slice(&src[s..s + rest]);
        }
    }
}
