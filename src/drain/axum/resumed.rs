//! A WebSocket migrated from the predecessor: its upgrade request travels as its state, and
//! the successor runs it through the router again, so that the same handler takes the same
//! TCP connection, without a handshake.

use std::sync::{Arc, Mutex};

use ::axum::body::Body;
use hyper::{HeaderMap, Request, Uri};
use serde::{Deserialize, Serialize};

use super::Server;
use crate::drain::connection::TrackedConnection;
use crate::drain::shared_connection::SharedConnection;
use crate::drain::strategy::DrainStrategy;
use crate::drain::websocket;
use crate::migration::Resumed;

/// The upgrade request of a WebSocket, as it moves: what routes it to its handler again and
/// what the handler's extractors read (headers: a subprotocol, a cookie).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Head {
    uri: String,
    /// The headers whose values are text (others do not move).
    headers: Vec<(String, String)>,
}

impl Head {
    pub(crate) fn new(uri: &Uri, headers: &HeaderMap) -> Self {
        let headers = headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect();
        Self {
            uri: uri.to_string(),
            headers,
        }
    }

    /// The request again, with an empty body.
    fn request(&self) -> Result<Request<Body>, hyper::http::Error> {
        let mut request = Request::get(self.uri.as_str());
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request.body(Body::empty())
    }
}

/// In a resumed WebSocket's request: the connection, for the extractor to take without a
/// handshake (once).
#[derive(Debug, Clone)]
pub(crate) struct ResumedUpgrade(pub(crate) Arc<Mutex<Option<Resumed<()>>>>);

impl ResumedUpgrade {
    pub(crate) fn take(&self) -> Option<Resumed<()>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The strategy resuming a [`Server`]'s migrated WebSockets.
pub(super) struct ResumedWebSockets(pub(super) Arc<Server>);

impl DrainStrategy<Resumed<Head>> for ResumedWebSockets {
    async fn serve(&self, resumed: Resumed<Head>, connection: TrackedConnection) {
        let Resumed {
            stream,
            state: head,
            leftover,
        } = resumed;
        let connection = SharedConnection::new(connection);
        let peer = stream.peer_addr().ok();
        let slot = ResumedUpgrade(Arc::new(Mutex::new(Some(Resumed {
            stream,
            state: (),
            leftover,
        }))));
        match head.request() {
            Ok(mut request) => {
                request.extensions_mut().insert(connection.clone());
                request.extensions_mut().insert(slot.clone());
                // The response (a 101) goes nowhere: the client has had the first one.
                let _ = self.0.routed(peer).route(request).await;
            }
            Err(error) => tracing::warn!(%error, uri = head.uri, "a migrated WebSocket's request does not parse"),
        }
        // The route upgrades no more (a new version of the app): the client is told to
        // reconnect.
        if let Some(resumed) = slot.take() {
            tracing::info!(
                uri = head.uri,
                "a migrated WebSocket's route did not take it; closing it (1001)"
            );
            let (socket, ()) = websocket::resume(resumed, None).await;
            websocket::finish(socket, &connection, |_| {}).await;
        }
    }

    fn protocol(&self) -> &str {
        "websocket"
    }
}
