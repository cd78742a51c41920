//! A drop-in for `axum::extract::ws`: the same items, and a [`WebSocketUpgrade`] and
//! [`WebSocket`] with axum's methods and messages, drained (Close 1001 and the closing
//! handshake) or migrated when the library serves them; axum's own otherwise. Change the
//! `use` line, nothing else:
//!
//! ```
//! use axum::response::Response;
//! // was: use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
//! use handover::drain::axum::ws::{Message, WebSocket, WebSocketUpgrade};
//!
//! async fn handler(ws: WebSocketUpgrade) -> Response {
//!     ws.on_upgrade(handle_socket)
//! }
//!
//! async fn handle_socket(mut socket: WebSocket) {
//!     while let Some(msg) = socket.recv().await {
//!         let Ok(msg) = msg else { return }; // client disconnected
//!         if let Message::Text(text) = &msg {
//!             println!("{text}");
//!         }
//!         if socket.send(msg).await.is_err() {
//!             return; // client disconnected
//!         }
//!     }
//! }
//! ```

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::future::Future;

use ::axum::extract::ws as axum_ws;
use ::axum::extract::FromRequestParts;
use ::axum::response::Response;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

pub use super::socket::WebSocket;
pub use ::axum::extract::ws::{close_code, rejection, CloseCode, CloseFrame, Message, OnFailedUpgrade, Utf8Bytes};

use super::resumed::{Head, ResumedUpgrade};
use super::socket::{Drained, Inner, Migration};
use super::Served;
use crate::drain::http;
use crate::drain::shared_connection::SharedConnection;
use crate::drain::websocket;
use crate::migration::Resumed;

/// The default [`OnFailedUpgrade`] of [`WebSocketUpgrade`], as axum's: it ignores the error.
#[non_exhaustive]
#[derive(Debug)]
pub struct DefaultOnFailedUpgrade;

impl OnFailedUpgrade for DefaultOnFailedUpgrade {
    fn call(self, _error: ::axum::Error) {}
}

/// Extractor for establishing WebSocket connections, as axum's
/// (`axum::extract::ws::WebSocketUpgrade`): the same methods and rejection. See the
/// [module](self).
#[must_use]
pub struct WebSocketUpgrade<F = DefaultOnFailedUpgrade> {
    upgrade: Upgrade,
    config: WebSocketConfig,
    /// The chosen protocol sent in the `Sec-WebSocket-Protocol` header of the response.
    protocol: Option<HeaderValue>,
    requested: BTreeSet<HeaderValue>,
    on_failed_upgrade: F,
}

/// Who upgrades the connection.
enum Upgrade {
    /// axum: not served by the library (the drain absent), or a WebSocket that stays.
    Axum(Box<axum_ws::WebSocketUpgrade>, Option<SharedConnection>),
    /// The library, over the TCP stream itself, so that the WebSocket can move.
    Own(Box<Own>),
}

struct Own {
    connection: SharedConnection,
    source: Source,
    migration: Migration,
}

enum Source {
    /// A new WebSocket: hyper's upgrade, and the client's `Sec-WebSocket-Key`.
    Upgrade(OnUpgrade, HeaderValue),
    /// A WebSocket the predecessor handed over: no handshake.
    Resumed(ResumedUpgrade),
}

impl<F> std::fmt::Debug for WebSocketUpgrade<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("config", &self.config)
            .field("protocol", &self.protocol)
            .field("requested", &self.requested)
            .finish_non_exhaustive()
    }
}

impl<F> WebSocketUpgrade<F> {
    /// Applies `set` to the library's configuration, and to axum's when axum upgrades.
    fn configure(
        mut self,
        set: impl FnOnce(WebSocketConfig) -> WebSocketConfig,
        axum: impl FnOnce(axum_ws::WebSocketUpgrade) -> axum_ws::WebSocketUpgrade,
    ) -> Self {
        self.config = set(self.config);
        if let Upgrade::Axum(upgrade, connection) = self.upgrade {
            self.upgrade = Upgrade::Axum(Box::new(axum(*upgrade)), connection);
        }
        self
    }

    /// Read buffer capacity. The default value is 128KiB
    pub fn read_buffer_size(self, size: usize) -> Self {
        self.configure(|c| c.read_buffer_size(size), |u| u.read_buffer_size(size))
    }

    /// The target minimum size of the write buffer to reach before writing the data to the
    /// underlying stream. The default value is 128 KiB.
    pub fn write_buffer_size(self, size: usize) -> Self {
        self.configure(|c| c.write_buffer_size(size), |u| u.write_buffer_size(size))
    }

    /// The max size of the write buffer in bytes. The default value is unlimited.
    pub fn max_write_buffer_size(self, max: usize) -> Self {
        self.configure(|c| c.max_write_buffer_size(max), |u| u.max_write_buffer_size(max))
    }

    /// Set the maximum message size (defaults to 64 megabytes)
    pub fn max_message_size(self, max: usize) -> Self {
        self.configure(|c| c.max_message_size(Some(max)), |u| u.max_message_size(max))
    }

    /// Set the maximum frame size (defaults to 16 megabytes)
    pub fn max_frame_size(self, max: usize) -> Self {
        self.configure(|c| c.max_frame_size(Some(max)), |u| u.max_frame_size(max))
    }

    /// Allow server to accept unmasked frames (defaults to false)
    pub fn accept_unmasked_frames(self, accept: bool) -> Self {
        self.configure(
            |c| c.accept_unmasked_frames(accept),
            |u| u.accept_unmasked_frames(accept),
        )
    }

    /// Set the known protocols, in decreasing order of preference: the first the client
    /// asked for is chosen, and sent in the response's `Sec-WebSocket-Protocol` header.
    pub fn protocols<I>(mut self, protocols: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Cow<'static, str>>,
    {
        self.protocol = protocols
            .into_iter()
            .filter_map(|protocol| HeaderValue::from_str(&protocol.into()).ok())
            .find(|protocol| self.requested.contains(protocol));
        self
    }

    /// Return the WebSocket subprotocols requested by the client.
    pub fn requested_protocols(&self) -> impl Iterator<Item = &HeaderValue> {
        self.requested.iter()
    }

    /// Set the chosen WebSocket subprotocol.
    pub fn set_selected_protocol(&mut self, protocol: HeaderValue) {
        self.protocol = Some(protocol);
    }

    /// Return the selected WebSocket subprotocol, if one has been chosen.
    pub fn selected_protocol(&self) -> Option<&HeaderValue> {
        self.protocol.as_ref()
    }

    /// Provide a callback to call if upgrading the connection fails.
    pub fn on_failed_upgrade<C>(self, callback: C) -> WebSocketUpgrade<C>
    where
        C: OnFailedUpgrade,
    {
        WebSocketUpgrade {
            upgrade: self.upgrade,
            config: self.config,
            protocol: self.protocol,
            requested: self.requested,
            on_failed_upgrade: callback,
        }
    }

    /// Finalize upgrading the connection and call the provided callback with the stream.
    #[must_use = "to set up the WebSocket connection, this response must be returned"]
    pub fn on_upgrade<C, Fut>(self, callback: C) -> Response
    where
        C: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
        F: OnFailedUpgrade,
    {
        let protocol = self.protocol.clone();
        let own = match self.upgrade {
            Upgrade::Axum(mut upgrade, connection) => {
                if let Some(protocol) = self.protocol {
                    upgrade.set_selected_protocol(protocol);
                }
                let upgrade = upgrade.on_failed_upgrade(self.on_failed_upgrade);
                return upgrade.on_upgrade(move |socket| {
                    let drained = connection.as_ref().map(|c| Drained::new(c.clone(), None));
                    let socket = WebSocket::new(Inner::Axum(socket), protocol, drained);
                    until_hard_stop(connection, callback(socket))
                });
            }
            Upgrade::Own(own) => *own,
        };
        let Own {
            connection,
            source,
            migration,
        } = own;
        let (config, on_failed) = (self.config, self.on_failed_upgrade);
        let key = match source {
            Source::Upgrade(on_upgrade, key) => {
                let connection = connection.clone();
                tokio::spawn(async move {
                    let upgraded = match on_upgrade.await {
                        Ok(upgraded) => upgraded,
                        Err(error) => return on_failed.call(::axum::Error::new(error)),
                    };
                    let (inner, migration) = match http::upgraded_tcp(upgraded) {
                        Ok((stream, read)) => {
                            let resumed = Resumed {
                                stream,
                                state: (),
                                leftover: read.to_vec(),
                            };
                            let (socket, ()) = websocket::resume(resumed, Some(config)).await;
                            (Inner::Local(socket), Some(migration))
                        }
                        Err(upgraded) => {
                            let io = TokioIo::new(upgraded);
                            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                            (Inner::Upgraded(socket), None)
                        }
                    };
                    let drained = Drained::new(connection.clone(), migration);
                    let socket = WebSocket::new(inner, protocol, Some(drained));
                    until_hard_stop(Some(connection), callback(socket)).await;
                });
                Some(key)
            }
            // Taken now, so that the library knows, once the route has answered, whether
            // it took it.
            Source::Resumed(slot) => {
                if let Some(resumed) = slot.take() {
                    tokio::spawn(async move {
                        let (socket, ()) = websocket::resume(resumed, Some(config)).await;
                        let drained = Drained::new(connection.clone(), Some(migration));
                        let socket = WebSocket::new(Inner::Local(socket), protocol, Some(drained));
                        until_hard_stop(Some(connection), callback(socket)).await;
                    });
                }
                None
            }
        };
        switching_protocols(key.as_ref(), self.protocol)
    }
}

/// `task`, dropped at the drain's hard stop when the library serves its connection.
async fn until_hard_stop(connection: Option<SharedConnection>, task: impl Future<Output = ()>) {
    match connection {
        Some(connection) => {
            let hard_stop = connection.hard_stop_owned();
            drop(connection);
            tokio::select! {
                () = hard_stop => {}
                () = task => {}
            }
        }
        None => task.await,
    }
}

/// The 101 answer to an HTTP/1.1 upgrade to WebSocket (RFC 6455, 4.2.2), as axum makes it.
fn switching_protocols(key: Option<&HeaderValue>, protocol: Option<HeaderValue>) -> Response {
    let mut response = Response::new(::axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Some(key) = key {
        let accept = derive_accept_key(key.as_bytes());
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a header value"),
        );
    }
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade<DefaultOnFailedUpgrade> {
    type Rejection = rejection::WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let requested = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .filter_map(|protocol| HeaderValue::from_bytes(protocol.trim_ascii()).ok())
            .collect();
        let upgrade = upgrade(parts, state).await?;
        Ok(Self {
            upgrade,
            config: WebSocketConfig::default(),
            protocol: None,
            requested,
            on_failed_upgrade: DefaultOnFailedUpgrade,
        })
    }
}

/// Who upgrades the request's connection: the library when it serves the connection and its
/// WebSockets may move; axum otherwise (with the request checked as axum checks it).
async fn upgrade<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<Upgrade, rejection::WebSocketUpgradeRejection> {
    let connection = parts.extensions.get::<SharedConnection>().cloned();
    let listener = parts.extensions.get::<Served>().and_then(|s| s.websockets.clone());
    if let (Some(connection), Some(slot), Some(listener)) =
        (&connection, parts.extensions.get::<ResumedUpgrade>(), &listener)
    {
        let source = Source::Resumed(slot.clone());
        return Ok(own(connection.clone(), source, listener.clone(), parts));
    }
    // A clone of hyper's upgrade, kept should the library upgrade: axum's extractor takes
    // the original, and is dropped unused then (only one of them is ever awaited).
    let ours = parts.extensions.get::<OnUpgrade>().cloned();
    let key = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let axum = axum_ws::WebSocketUpgrade::from_request_parts(parts, state).await?;
    match (connection, listener, ours, key) {
        (Some(connection), Some(listener), Some(on_upgrade), Some(key)) if parts.version <= Version::HTTP_11 => {
            Ok(own(connection, Source::Upgrade(on_upgrade, key), listener, parts))
        }
        (connection, ..) => Ok(Upgrade::Axum(Box::new(axum), connection)),
    }
}

/// The library's upgrade, the WebSocket to move under `listener` with the request's head.
fn own(connection: SharedConnection, source: Source, listener: std::sync::Arc<str>, parts: &Parts) -> Upgrade {
    let migration = Migration {
        listener,
        head: Head::new(&parts.uri, &parts.headers),
    };
    Upgrade::Own(Box::new(Own {
        connection,
        source,
        migration,
    }))
}
