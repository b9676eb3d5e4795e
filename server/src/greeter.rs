//! `helloworld.Greeter/SayHello`, answering with the identity of the instance that served it.

use proto::helloworld::{HelloReply, HelloRequest, greeter_server};
use tonic::{Request, Response, Status};

/// The Greeter of one instance.
#[derive(Debug, Clone)]
pub struct Greeter {
    instance_id: String,
    addr: String,
}

impl Greeter {
    /// A greeter that identifies itself as `instance_id` at `addr`.
    pub fn new(instance_id: String, addr: String) -> Self {
        Self { instance_id, addr }
    }
}

#[tonic::async_trait]
impl greeter_server::Greeter for Greeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = &request.get_ref().name;
        let name = if name.is_empty() { "stranger" } else { name };
        Ok(Response::new(HelloReply {
            message: format!("Hello {name}, from {}", self.instance_id),
            instance_id: self.instance_id.clone(),
            addr: self.addr.clone(),
        }))
    }
}
