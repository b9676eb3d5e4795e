//! Rust code generated from `proto/helloworld.proto` (package `helloworld`).
//!
//! The generated module is re-exported as [`helloworld`]; [`FILE_DESCRIPTOR_SET`] is the encoded
//! descriptor set for gRPC reflection.
//!
//! ```no_run
//! use proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
//! # async fn demo(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
//! let mut client = GreeterClient::new(channel);
//! let reply = client.say_hello(HelloRequest { name: "world".into() }).await?;
//! println!("{} (from {})", reply.get_ref().message, reply.get_ref().instance_id);
//! # Ok(())
//! # }
//! ```

/// Messages, client and server for the `helloworld` package.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)]
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// Encoded `FileDescriptorSet` of `helloworld.proto`, for `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("helloworld_descriptor");
