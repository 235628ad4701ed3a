//! Compiles `strata/v1/*.proto` with the pure-Rust `protox` compiler (no
//! `protoc` needed) and generates prost messages plus tonic clients/servers
//! according to the crate's `client` / `server` features.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "strata/v1/common.proto",
    "strata/v1/admin.proto",
    "strata/v1/tenant.proto",
    "strata/v1/config.proto",
    "strata/v1/registry.proto",
    "strata/v1/backup.proto",
    "strata/v1/auth.proto",
    "strata/v1/audit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out_dir.join("strata_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .compile_fds(fds)?;
    Ok(())
}
