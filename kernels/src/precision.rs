//! How the convolutions' products are computed (`--precision`): the mode, where it can run, and
//! the products in it. One module, so that the ops do not import the configuration back.

use serde::{Deserialize, Serialize};

use crate::ops::bf16;
use crate::ops::matmul::{self, Gemm, Operand, Output, Window};
use crate::{Device, KernelError};

/// How the convolutions' products are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 operands and accumulation everywhere.
    #[default]
    #[cfg_attr(feature = "clap", value(name = "f32", alias = "fp32"))]
    F32,
    /// Operands rounded to bf16 (nearest even) for the products, which accumulate in fp32 on the
    /// AVX512-BF16 dot product; parameters, Adam's state, BatchNorm and activations stay fp32
    /// (the master weights), as in PyTorch's CPU autocast.
    #[cfg_attr(feature = "clap", value(name = "bf16"))]
    Bf16,
}

impl Precision {
    /// Refuses bf16 on a CPU without the AVX512-BF16 instructions, naming what is missing and the
    /// way out, instead of emulating it at a fraction of fp32's speed.
    pub fn check_supported(self) -> Result<(), KernelError> {
        if self == Precision::Bf16 && !bf16::supported() {
            return Err(KernelError::Config(
                "--precision bf16 needs a CPU with AVX-512 and AVX512-BF16 (vdpbf16ps), which this one lacks; \
                 use --precision f32"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether this mode can run on `device`, the one rule: bf16 is a CPU mode (refused on any
    /// GPU, [`Device::refusal`]'s message), and on the CPU it needs this machine's AVX512-BF16
    /// ([`Precision::check_supported`]). `Auto` is resolved first.
    pub fn check_for(self, device: Device) -> Result<(), KernelError> {
        if self == Precision::F32 {
            return Ok(());
        }
        match device {
            Device::Cuda(ordinal) => Err(KernelError::DeviceUnavailable(format!(
                "--precision bf16 is a CPU mode and this rank trains on cuda:{ordinal}: run the workers with \
                 --device cpu, or the coordinator with --precision f32"
            ))),
            Device::Cpu => self.check_supported(),
            Device::Auto => self.check_for(device.resolve()),
        }
    }
}

/// The products of a convolution in the chosen precision: fp32 on the `gemm` crate, or bf16
/// operands with fp32 accumulation ([`bf16`]). Products with a dimension of 1 (D's last layer)
/// stay fp32 in both: they are vector loops bound by memory, where bf16 saves nothing.
impl Precision {
    /// [`matmul::matmul`] in this precision.
    pub fn matmul(self, s: Gemm, a: Operand<'_>, b: Operand<'_>, c: Output<'_>) {
        if self.uses_bf16(s) {
            bf16::matmul(s, a, b, c);
        } else {
            matmul::matmul(s, a, b, c);
        }
    }

    /// [`matmul::matmul_column_block`] in this precision.
    pub fn matmul_column_block(self, s: Gemm, a: Operand<'_>, b: Window<'_>, c: &mut [f32]) {
        if self.uses_bf16(s) {
            bf16::matmul_column_block(s, a, b, c);
        } else {
            matmul::matmul_column_block(s, a, b, c);
        }
    }

    /// [`matmul::matmul_nt_split_k`] in this precision.
    pub fn matmul_nt_split_k(self, s: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        if self.uses_bf16(s) {
            bf16::matmul_nt_split_k(s, a, b, c);
        } else {
            matmul::matmul_nt_split_k(s, a, b, c);
        }
    }

    fn uses_bf16(self, s: Gemm) -> bool {
        self == Precision::Bf16 && s.m > 1 && s.n > 1 && s.k > 1
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(KernelError::Config(format!("precision must be f32 or bf16, got {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [Precision::F32, Precision::Bf16] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("f16".parse::<Precision>().is_err());
    }

    #[test]
    fn bf16_is_refused_on_a_gpu_and_f32_runs_anywhere() {
        for device in [Device::Cpu, Device::Cuda(0), Device::Cuda(3)] {
            assert!(Precision::F32.check_for(device).is_ok(), "{device}");
        }
        let e = Precision::Bf16.check_for(Device::Cuda(2)).unwrap_err().to_string();
        assert!(e.starts_with("--precision bf16 is a CPU mode and this rank trains on cuda:2"), "{e}");
        assert_eq!(
            Precision::Bf16.check_for(Device::Cpu).map_err(|e| e.to_string()),
            Precision::Bf16.check_supported().map_err(|e| e.to_string())
        );
    }

    #[cfg(feature = "clap")]
    #[test]
    fn the_value_enum_names_are_the_display_names() {
        use clap::ValueEnum;
        for p in Precision::value_variants() {
            assert_eq!(p.to_possible_value().unwrap().get_name(), p.to_string());
        }
        assert_eq!(Precision::from_str("fp32", false), Ok(Precision::F32));
    }
}
