//! Choosing a device, on any machine: `--device` parses with clear errors, `auto` falls back to
//! the CPU where there is no GPU, and asking for CUDA where it cannot work is an error that says
//! what is missing and the way out, never a panic (cudarc panics when a library is missing).

use kernels::cuda::{self, Gpu};
use kernels::{Device, KernelError};

/// Whether this machine can run the CUDA backend at all (driver and at least one GPU).
fn has_gpu() -> bool {
    matches!(cuda::gpu_count(), Ok(n) if n > 0)
}

#[test]
fn device_strings_parse_or_say_what_is_accepted() {
    assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    let e = "cuda:one".parse::<Device>().unwrap_err().to_string();
    assert!(e.contains("cuda:one") && e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
    assert_eq!(Device::default(), Device::Auto);
}

#[test]
fn auto_is_the_cpu_without_a_gpu_and_the_first_gpu_with_one() {
    let want = if has_gpu() { Device::Cuda(0) } else { Device::Cpu };
    assert_eq!(Device::Auto.resolve(), want);
    assert_eq!(Device::Auto.check().unwrap(), want);
    assert_eq!(Device::Cpu.check().unwrap(), Device::Cpu);
}

#[test]
fn asking_for_cuda_without_one_is_a_clear_error_not_a_panic() {
    if has_gpu() {
        // A GPU index past the last visible one is refused with the count.
        let n = cuda::gpu_count().unwrap();
        let e = Device::Cuda(n).check().unwrap_err().to_string();
        assert!(e.contains(&format!("cuda:{n}")) && e.contains("--device cpu"), "{e}");
        return;
    }
    for result in [Device::Cuda(0).check().map(|_| ()), Gpu::open(0).map(|_| ()), cuda::probe(1).map(|_| ())] {
        let e = result.unwrap_err();
        assert!(matches!(e, KernelError::DeviceUnavailable(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("--device cpu"), "the way out is named: {msg}");
        assert!(msg.contains("libcuda.so") || msg.contains("no GPU"), "what is missing is named: {msg}");
    }
}

#[test]
fn nccl_without_its_library_is_a_clear_error_not_a_panic() {
    if cuda::libs::NCCL.loadable() {
        return;
    }
    let e = cuda::nccl_unique_id().unwrap_err().to_string();
    assert!(e.contains("NCCL") && e.contains("libnccl.so") && e.contains("--device cpu"), "{e}");
    assert!(cuda::find_nccl().is_err());
}
