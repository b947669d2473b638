//! Generates the orders service from `proto/orders.proto` with the `protoc` binary that
//! `protoc-bin-vendored` ships, so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/orders.proto"],
        &["proto"],
    )?;
    Ok(())
}
