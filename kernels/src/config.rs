//! The shapes of the two networks and the optimiser's hyper-parameters.

use serde::{Deserialize, Serialize};

use crate::KernelError;

/// The DCGAN architecture's free parameters, as the PyTorch example names them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Side of the square images: 32, 64 or 128.
    pub image_size: usize,
    /// Image channels: 1 for grayscale, 3 for colour.
    pub nc: usize,
    /// Length of the latent vector z.
    pub nz: usize,
    /// Generator feature maps at the last (largest) layer.
    pub ngf: usize,
    /// Discriminator feature maps at the first layer.
    pub ndf: usize,
}

impl ModelConfig {
    /// The PyTorch DCGAN example's default networks: 64x64 colour, nz=100, ngf=ndf=64.
    pub fn dcgan64() -> Self {
        Self { image_size: 64, nc: 3, nz: 100, ngf: 64, ndf: 64 }
    }

    /// The 32x32 grayscale networks used for MNIST-like data.
    pub fn dcgan32_gray() -> Self {
        Self { image_size: 32, nc: 1, nz: 100, ngf: 64, ndf: 64 }
    }

    /// Number of stride-2 layers: the networks go between 4x4 and `image_size`.
    pub fn upsampling_layers(&self) -> usize {
        self.image_size.trailing_zeros() as usize - 2
    }

    /// Refuses sizes the architecture cannot build, naming the field.
    pub fn validate(&self) -> Result<(), KernelError> {
        if ![32, 64, 128].contains(&self.image_size) {
            return Err(KernelError::Config(format!("image_size must be 32, 64 or 128, got {}", self.image_size)));
        }
        for (name, v) in [("nc", self.nc), ("nz", self.nz), ("ngf", self.ngf), ("ndf", self.ndf)] {
            if v == 0 || v > 4096 {
                return Err(KernelError::Config(format!("{name} must be in 1..=4096, got {v}")));
            }
        }
        Ok(())
    }
}

/// Adam's hyper-parameters; the defaults are the DCGAN paper's (lr 2e-4, beta1 0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 }
    }
}

impl OptimConfig {
    /// Refuses hyper-parameters Adam cannot use, naming the field.
    pub fn validate(&self) -> Result<(), KernelError> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(KernelError::Config(format!("lr must be a positive number, got {}", self.lr)));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(KernelError::Config(format!("{name} must be in [0, 1), got {b}")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(KernelError::Config(format!("eps must be positive, got {}", self.eps)));
        }
        Ok(())
    }
}
