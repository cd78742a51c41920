//! gRPC (tonic) on a registry listener, drained by the library: `echo.Echo/Say` (unary) answers
//! the message with this process's generation; `echo.Echo/Count` (server streaming) sends
//! `count` messages, `delay_ms` apart.
//!
//! ```text
//! cargo run --example grpc_echo -- --pid-file /tmp/grpc_echo.pid --control /tmp/grpc_echo.sock &
//! handoverctl status --control /tmp/grpc_echo.sock   # the drain's connection counts
//! kill -USR2 $(cat /tmp/grpc_echo.pid)               # streams in flight finish on the old process
//! ```
//!
//! What tonic's own server does not give: the socket survives the upgrade (no refused
//! connection), the old process's drain has a deadline (`--drain-timeout`), `status` counts its
//! connections, and HTTP/2 connections get their GOAWAY only once quiet, so that it never
//! crosses a call being sent. The messages (`examples/common/echo.rs`) are declared with prost's
//! derive (no `protoc`), and the service is routed by hand: `tonic-build` would generate the
//! same.

mod common;
#[path = "common/echo.rs"]
mod echo;

use echo::{EchoReply, EchoRequest, COUNT, SAY};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Parser;
use futures_util::stream::{self, BoxStream, StreamExt};
use handover::drain::http;
use tonic::server::{Grpc, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// gRPC echo server, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
}

/// The name of the listener.
const LISTENER: &str = "grpc";

/// The service: routes the two methods to tonic's codec and handlers.
#[derive(Clone)]
struct Echo {
    generation: u64,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<hyper::Request<hyper::body::Incoming>> for Echo {
    type Response = hyper::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let echo = self.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            Ok(match request.uri().path() {
                SAY => grpc.unary(echo, request).await,
                COUNT => grpc.server_streaming(echo, request).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

impl UnaryService<EchoRequest> for Echo {
    type Response = EchoReply;
    type Future = BoxFuture<Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let reply = EchoReply {
            message: request.into_inner().message,
            generation: self.generation,
        };
        Box::pin(async move { Ok(Response::new(reply)) })
    }
}

impl ServerStreamingService<EchoRequest> for Echo {
    type Response = EchoReply;
    type ResponseStream = BoxStream<'static, Result<EchoReply, Status>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let (request, generation) = (request.into_inner(), self.generation);
        let delay = Duration::from_millis(request.delay_ms.into());
        let replies = stream::iter(0..request.count).then(move |index| {
            let message = format!("{} {index}", request.message);
            async move {
                if index > 0 {
                    tokio::time::sleep(delay).await;
                }
                Ok(EchoReply { message, generation })
            }
        });
        Box::pin(async move { Ok(Response::new(replies.boxed())) })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args.server.builder().start().await?;
    let listener = handoff
        .registry()
        .tcp(LISTENER, args.server.listen_or("127.0.0.1:50051"))?;
    let echo = Echo {
        generation: handoff.generation(),
    };
    // tonic's service is a tower service: hyper-util adapts it to hyper's.
    let server = Arc::new(http::Server::new(hyper_util::service::TowerToHyperService::new(echo)));
    let drain = args.server.drain();
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, generation = handoff.generation(), "serving grpc_echo");
    drain.serve(&handoff, listener, server).await;
    common::log_exit(&handoff);
    Ok(())
}
