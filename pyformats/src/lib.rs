//! File formats from the Python world, read without Python and without executing anything.
//!
//! [`pickle`] runs the data subset of Python's pickle format and keeps every call unevaluated,
//! for the callers to recognise the few shapes they expect: torchvision's pickled CIFAR-10
//! batches (in `data`) and PyTorch `.pth` state dicts ([`pth`], turned into safetensors).

pub mod pickle;
#[cfg(any(test, feature = "writer"))]
pub mod pickle_writer;
pub mod pth;
