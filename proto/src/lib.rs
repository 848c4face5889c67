//! Tandem's gRPC API, package `tandem.v1`, generated from the `.proto` files
//! in `proto/tandem/v1/` at build time with `protox` (no system `protoc`).

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// Messages and services of package `tandem.v1`.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// The encoded `FileDescriptorSet` of every Tandem proto file, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
