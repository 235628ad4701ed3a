//! Strata's wire API, package `strata.v1`.
//!
//! This crate owns the `.proto` files and nothing else of ours: it depends on
//! no other Strata crate. Clients are generated behind the `client` feature,
//! servers behind `server`. [`FILE_DESCRIPTOR_SET`] feeds gRPC server
//! reflection so generic tools (grpcurl, grpc_cli) can call the daemon.
//! [`names`] holds what the daemon and its clients must spell alike (span
//! attribute keys, the JSON form of an audit entry).

/// Generated types and services of package `strata.v1`.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/strata.v1.rs"));
}

pub mod names;

/// Encoded `google.protobuf.FileDescriptorSet` of every `strata.v1` file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/strata_descriptor.bin"));

/// Metadata key of the binary trailer carrying a [`v1::ErrorDetail`] on failed calls.
pub const ERROR_DETAIL_TRAILER: &str = "strata-error-bin";
