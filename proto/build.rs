//! Generates the helloworld client, server and message types, plus a file descriptor set that the
//! server hands to gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("helloworld_descriptor.bin"))
        .compile_protos(&["helloworld.proto"], &["."])?;
    Ok(())
}
