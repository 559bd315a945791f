//! Compiles `dcgan/v1/*.proto` and `tensorboard/event.proto` with protox (a pure-Rust protobuf
//! compiler: no system `protoc` needed) and writes the encoded descriptor set of the gRPC API
//! next to the generated code for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = ["dcgan/v1/coordinator.proto"];
    // Messages only (TensorBoard's event files), no service: kept out of the reflection set.
    let files_only = ["tensorboard/event.proto"];
    for f in api.iter().chain(&files_only) {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true);
    compiler.open_files(api)?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("dcgan_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    compiler.open_files(files_only)?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
