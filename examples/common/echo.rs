//! `grpc_echo`'s messages and calls, shared by the example, its test and its benchmark. The
//! messages are declared with prost's derive (no `protoc`); `tonic-build` would generate the
//! same from:
//!
//! ```proto
//! service Echo {
//!   rpc Say(EchoRequest) returns (EchoReply);
//!   rpc Count(EchoRequest) returns (stream EchoReply);
//! }
//! message EchoRequest { string message = 1; uint32 count = 2; uint32 delay_ms = 3; }
//! message EchoReply { string message = 1; uint64 generation = 2; }
//! ```
#![allow(dead_code)] // each user takes its own subset

use hyper::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};
use tonic_prost::ProstCodec;

/// `Say`'s request, and `Count`'s.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    /// What to echo.
    #[prost(string, tag = "1")]
    pub message: String,
    /// `Count`: how many messages to stream back.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// `Count`: milliseconds between two messages.
    #[prost(uint32, tag = "3")]
    pub delay_ms: u32,
}

/// Every answer: the message, and the generation of the process that answered.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    /// The request's message (`Count`: with its index).
    #[prost(string, tag = "1")]
    pub message: String,
    /// The generation of the process that answered.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
}

/// The paths of the two methods.
pub const SAY: &str = "/echo.Echo/Say";
pub const COUNT: &str = "/echo.Echo/Count";

/// A tonic client of `grpc_echo` over `channel`, as generated code would make.
pub async fn say(channel: Channel, message: &str) -> Result<EchoReply, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let request = Request::new(EchoRequest {
        message: message.into(),
        ..Default::default()
    });
    let codec = ProstCodec::<EchoRequest, EchoReply>::default();
    Ok(grpc
        .unary(request, PathAndQuery::from_static(SAY), codec)
        .await?
        .into_inner())
}

/// `Count`: `count` replies, `delay_ms` apart.
pub async fn count(channel: Channel, count: u32, delay_ms: u32) -> Result<Streaming<EchoReply>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let request = Request::new(EchoRequest {
        message: "count".into(),
        count,
        delay_ms,
    });
    let codec = ProstCodec::<EchoRequest, EchoReply>::default();
    Ok(grpc
        .server_streaming(request, PathAndQuery::from_static(COUNT), codec)
        .await?
        .into_inner())
}

/// The smallest client configuration that takes tonic's client through every upgrade
/// without an error: retry a call that never reached the server's application. Those are
/// `CANCELLED` (hyper's client cancels, unsent, a call routed to a connection that got a
/// GOAWAY while another stream was open), `UNAVAILABLE` (made while the channel re-dials), and
/// the `UNKNOWN` "transport error" of a stream the server's final GOAWAY left out (h2's client
/// may still open a stream after the first GOAWAY; above the final last stream id, the server
/// never processed it, RFC 9113 6.8). Only the GOAWAY case is certain never to have run:
/// retry the others only for calls safe to repeat.
pub fn retryable(status: &Status) -> bool {
    matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unavailable) || refused_by_goaway(status)
}

/// Whether the call's stream was refused by the server's GOAWAY (h2's `GoAway` error, from
/// the server, NO_ERROR): it was never processed.
fn refused_by_goaway(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = cause.source();
    }
    false
}

/// A status's kind: its code, its message and its causes (the h2 or I/O error under a
/// transport error).
pub fn kind(status: &Status) -> String {
    let mut kind = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        kind = format!("{kind}: {cause}");
        source = cause.source();
    }
    kind
}
