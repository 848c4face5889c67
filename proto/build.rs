//! Compiles `proto/tandem/v1/*.proto` with `protox` (pure Rust), so building
//! Tandem never needs a system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    // The directory too: a new .proto file must trigger a rebuild.
    println!("cargo:rerun-if-changed={}", root.join("tandem/v1").display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root.join("tandem/v1"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
    files.sort();
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set is kept for gRPC server reflection.
    std::fs::write(out.join("tandem_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
