//! The `dcgan.v1` gRPC protocol between the coordinator and its workers.
//!
//! The code is generated at build time by protox (no system `protoc`) and tonic-prost. Beside it
//! live the two things both ends must agree on byte for byte: the size limits and the framing of
//! the large payloads (checkpoints in chunks with a declared size and sha256, pixels as
//! little-endian f32), so that neither side re-implements the other's half.

pub mod auth;
pub mod framing;

/// Generated messages, the `Coordinator` client and server.
pub mod dcgan {
    pub mod v1 {
        tonic::include_proto!("dcgan.v1");
    }
}

pub use dcgan::v1;

/// TensorFlow's `Event` and `Summary` messages (the subset the coordinator writes), with
/// TensorFlow's field numbers so that TensorBoard reads the coordinator's event files.
pub mod tensorboard {
    include!(concat!(env!("OUT_DIR"), "/tensorboard.rs"));
}

/// The encoded `FileDescriptorSet` of the gRPC API's `.proto` files (imports included), for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dcgan_descriptor.bin"));

/// Largest message either side accepts. Chunked payloads stay under [`CHUNK_BYTES`], so this
/// leaves room for the envelope while refusing anything absurd before it is buffered.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest payload carried by one chunk of a shard or a checkpoint.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Largest checkpoint a coordinator accepts (sum of its files): a DCGAN-128 with Adam's state is
/// a few hundred MB, so this catches a corrupt header without refusing any real model.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;

impl std::fmt::Display for v1::WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} (run {}, generation {})", self.rank, self.run_id, self.generation)
    }
}

impl v1::ComputeDevice {
    pub fn cpu() -> Self {
        Self { kind: v1::DeviceKind::Cpu as i32, index: 0 }
    }

    pub fn cuda(index: u32) -> Self {
        Self { kind: v1::DeviceKind::Cuda as i32, index }
    }
}

/// As users write it on the command line: `cpu`, `cuda:N`; `unspecified` for a message without
/// a kind the coordinator knows.
impl std::fmt::Display for v1::ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match v1::DeviceKind::try_from(self.kind) {
            Ok(v1::DeviceKind::Cpu) => f.write_str("cpu"),
            Ok(v1::DeviceKind::Cuda) => write!(f, "cuda:{}", self.index),
            _ => f.write_str("unspecified"),
        }
    }
}
