//! Which device a worker computes on, as users write it (`auto`, `cpu`, `cuda`, `cuda:N`), and
//! what `auto` means on this machine.

use std::fmt;
use std::str::FromStr;

use crate::KernelError;

/// A compute device as asked for on a command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The first GPU when a CUDA driver and a GPU are present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU with this index among the visible ones (`CUDA_VISIBLE_DEVICES` applies).
    Cuda(usize),
}

/// Why a device string was refused; the message lists what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid device {input:?}: {reason}; expected auto, cpu, cuda or cuda:N (e.g. cuda:1)")]
pub struct ParseDeviceError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Device {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ParseDeviceError { input: s.to_string(), reason: reason.to_string() };
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let Some(index) = t.strip_prefix("cuda:") else {
                    return Err(fail("unknown device"));
                };
                if index.is_empty() {
                    return Err(fail("the GPU index after \"cuda:\" is missing"));
                }
                index
                    .parse::<usize>()
                    .map(Device::Cuda)
                    .map_err(|_| fail("the GPU index after \"cuda:\" must be a non-negative integer"))
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    /// `auto` made concrete: `cuda:0` when a CUDA driver and at least one GPU are present,
    /// otherwise `cpu`. `cpu` and `cuda:N` are returned as they are; whether `cuda:N` can
    /// actually be used is for [`crate::cuda::probe`] (or [`Device::check`]) to say.
    pub fn resolve(self) -> Device {
        match self {
            Device::Auto => match crate::cuda::gpu_count() {
                Ok(n) if n > 0 => Device::Cuda(0),
                _ => Device::Cpu,
            },
            other => other,
        }
    }

    /// [`Device::resolve`], then, for a GPU, checks that it exists and that the libraries the
    /// CUDA backend needs load, so that a worker refuses a bad `--device` before it joins a run.
    /// The error names what is missing and the way out; nothing here panics.
    pub fn check(self) -> Result<Device, KernelError> {
        let device = self.resolve();
        if let Device::Cuda(i) = device {
            crate::cuda::probe(i)?;
        }
        Ok(device)
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

/// What a run asks of the device each rank trains on: the settings a GPU rank cannot honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunDemands {
    pub precision: crate::Precision,
    pub sync_batch_norm: bool,
    /// Ranks in the run.
    pub world: usize,
}

impl Device {
    /// Why a rank on this (resolved) device cannot train a run that asks `demands`, or `None`.
    /// One rule, asked by the coordinator before it launches GPU workers, when an external
    /// worker joins, and by the worker itself, so that a refusal is said once, before training.
    pub fn refusal(self, demands: &RunDemands) -> Option<String> {
        if !self.is_cuda() {
            return None;
        }
        // The precision's rule for a GPU; its CPU side (this machine's AVX512-BF16) is not asked:
        // the rank's CPU may not be this one.
        if let Err(e) = demands.precision.check_for(self) {
            return Some(e.to_string());
        }
        if demands.sync_batch_norm && demands.world > 1 {
            return Some(format!(
                "--sync-bn is not implemented on GPUs and this run has {} ranks on cuda: train without --sync-bn, \
                 or on the CPU (--device cpu)",
                demands.world
            ));
        }
        None
    }
}

/// `--device` on the command line: the same [`FromStr`] and its error, with the accepted forms
/// listed in `--help` and shell completions. Not a `clap::ValueEnum`, whose values are a fixed
/// list: `cuda:N` carries the GPU's index.
#[cfg(feature = "clap")]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceParser;

#[cfg(feature = "clap")]
impl clap::builder::TypedValueParser for DeviceParser {
    type Value = Device;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Device, clap::Error> {
        let from_str = |text: &str| text.parse::<Device>();
        from_str.parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        use clap::builder::PossibleValue;
        Some(Box::new(
            [
                PossibleValue::new("auto").help("The first GPU if a CUDA driver sees one, else the CPU"),
                PossibleValue::new("cpu"),
                PossibleValue::new("cuda").help("GPU 0"),
                PossibleValue::new("cuda:N").help("GPU N among the visible ones (CUDA_VISIBLE_DEVICES applies)"),
            ]
            .into_iter(),
        ))
    }
}

#[cfg(feature = "clap")]
impl clap::builder::ValueParserFactory for Device {
    type Parser = DeviceParser;

    fn value_parser() -> DeviceParser {
        DeviceParser
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_spellings() {
        assert_eq!("auto".parse(), Ok(Device::Auto));
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("CPU".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(Device::Cuda(0)));
        assert_eq!(" cuda:7 ".parse(), Ok(Device::Cuda(7)));
        for d in [Device::Auto, Device::Cpu, Device::Cuda(3)] {
            assert_eq!(d.to_string().parse(), Ok(d), "{d} round-trips");
        }
    }

    #[test]
    fn refuses_the_rest_with_a_message_that_says_what_is_accepted() {
        for (input, reason) in [
            ("tpu", "unknown device"),
            ("", "unknown device"),
            ("cuda:", "is missing"),
            ("cuda:x", "non-negative integer"),
            ("cuda:-1", "non-negative integer"),
            ("cuda0", "unknown device"),
        ] {
            let e = input.parse::<Device>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(reason), "{input:?}: {msg}");
            assert!(msg.contains("expected auto, cpu, cuda or cuda:N"), "{input:?}: {msg}");
        }
    }

    #[test]
    fn a_gpu_rank_refuses_what_only_the_cpu_does() {
        use crate::Precision;
        let run = |precision, sync_batch_norm, world| RunDemands { precision, sync_batch_norm, world };
        let gpu = Device::Cuda(1);
        assert_eq!(gpu.refusal(&run(Precision::F32, false, 8)), None);
        assert_eq!(gpu.refusal(&run(Precision::F32, true, 1)), None, "one rank: sync-BN computes the same");
        let e = gpu.refusal(&run(Precision::F32, true, 2)).unwrap();
        assert!(e.starts_with("--sync-bn is not implemented on GPUs and this run has 2 ranks"), "{e}");
        let e = gpu.refusal(&run(Precision::Bf16, false, 1)).unwrap();
        assert!(e.starts_with("--precision bf16 is a CPU mode and this rank trains on cuda:1"), "{e}");
        for cpu in [Device::Cpu, Device::Auto] {
            assert_eq!(cpu.refusal(&run(Precision::Bf16, true, 4)), None);
        }
    }

    #[cfg(feature = "clap")]
    #[test]
    fn the_flag_parses_like_from_str_lists_its_forms_and_names_a_bad_value() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Flags {
            #[arg(long, default_value = "auto")]
            device: Device,
        }
        assert_eq!(Flags::try_parse_from(["w", "--device", "cuda:2"]).unwrap().device, Device::Cuda(2));
        assert_eq!(Flags::try_parse_from(["w"]).unwrap().device, Device::Auto);
        let e = Flags::try_parse_from(["w", "--device", "gpu"]).unwrap_err().to_string();
        assert!(
            e.contains("'gpu'") && e.contains("--device") && e.contains("expected auto, cpu, cuda or cuda:N"),
            "{e}"
        );
        let mut cmd = <Flags as clap::CommandFactory>::command();
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("cuda:N") && help.contains("CUDA_VISIBLE_DEVICES"), "{help}");
    }
}
