//! The HTTP/2 drain's tests: GOAWAY once the connection is quiet, or at the deadline with the
//! grace after it for the streams still open.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};

use super::serve_connection;
use crate::drain::tracker::Drain;

/// A service answering `/slow` after `slow`, everything else at once.
fn service(
    slow: Duration,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| async move {
        if request.uri().path() == "/slow" {
            tokio::time::sleep(slow).await;
        }
        Ok(Response::new(Full::from("done")))
    })
}

/// An HTTP/2 client of a connection `drain` tracks, and the client's connection task.
async fn h2_client(
    drain: &Drain,
    slow: Duration,
) -> (SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<hyper::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    tokio::spawn(serve_connection(accepted, service(slow), drain.track()));
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}

async fn get(mut sender: SendRequest<Empty<Bytes>>, path: &str) -> hyper::Result<Bytes> {
    let request = Request::get(format!("http://test{path}")).body(Empty::new()).unwrap();
    let response = sender.send_request(request).await?;
    Ok(response.into_body().collect().await?.to_bytes())
}

/// A client busy with a stream when the drain starts, and sending its next request as soon
/// as that stream's answer is in, has both answered: no GOAWAY crosses it. Once quiet for
/// the idle grace, the connection gets its GOAWAY and closes cleanly.
#[tokio::test]
async fn a_busy_http2_connection_gets_goaway_only_once_quiet() {
    let drain = Drain::builder().idle_grace(Duration::from_millis(300)).build();
    let (sender, connection) = h2_client(&drain, Duration::from_millis(200)).await;
    get(sender.clone(), "/fast").await.unwrap();
    let slow = tokio::spawn(get(sender.clone(), "/slow"));
    while drain.open() == 0 {
        tokio::task::yield_now().await;
    }
    let drained = tokio::spawn({
        let drain = drain.clone();
        async move { drain.drain().await }
    });
    assert_eq!(slow.await.unwrap().unwrap(), "done");
    assert_eq!(
        get(sender.clone(), "/fast").await.unwrap(),
        "done",
        "sent between calls, answered"
    );
    drop(sender);
    connection.await.unwrap().expect("GOAWAY, then a clean close");
    assert_eq!(drained.await.unwrap().forced, 0);
}

/// A connection never quiet until the deadline gets its GOAWAY then, and the stream still
/// open finishes in the grace after the deadline instead of being cut.
#[tokio::test]
async fn an_http2_connection_never_quiet_gets_goaway_at_the_deadline_and_its_stream_finishes() {
    let drain = Drain::builder()
        .deadline(Duration::from_millis(200))
        .idle_grace(Duration::from_secs(60))
        .build();
    let (sender, connection) = h2_client(&drain, Duration::from_millis(500)).await;
    get(sender.clone(), "/fast").await.unwrap();
    let slow = tokio::spawn(get(sender.clone(), "/slow"));
    drop(sender);
    let report = drain.drain().await;
    assert_eq!(slow.await.unwrap().unwrap(), "done", "finished after the deadline");
    connection.await.unwrap().expect("GOAWAY, then a clean close");
    assert_eq!(
        (report.forced, report.aborted),
        (1, 0),
        "open at the deadline, not dropped"
    );
}
