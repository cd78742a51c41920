//! The connections a process serves, per protocol, for `status`: every [`Drain`] that
//! [`Drain::serve`] runs for a [`Handoff`](super::Handoff) registers here.

use std::sync::Mutex;

use serde::Serialize;

use crate::drain::Drain;

/// The connections of one protocol (one strategy type) in this process: an element of the
/// `connections` array of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConnectionCounts {
    /// The drain strategy's type name (`Http`, `Echo`…), which names the protocol.
    pub protocol: String,
    /// Open connections while this process serves.
    pub active: usize,
    /// Open connections once this process drains (a stop, or a successor took over).
    pub draining: usize,
    /// Connections closed by force at the drain's deadline.
    pub forced: usize,
}

/// The drains of one process, by protocol. Registered once per listener: a handful.
#[derive(Debug, Default)]
pub(crate) struct Connections(Mutex<Vec<(&'static str, Drain)>>);

impl Connections {
    /// Counts `drain`'s connections under the name of the strategy type `S`.
    pub fn register<S: ?Sized>(&self, drain: &Drain) {
        let protocol = short_type_name(std::any::type_name::<S>());
        let mut drains = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Several listeners may share one drain: count its connections once.
        if !drains.iter().any(|(_, known)| known.same_as(drain)) {
            drains.push((protocol, drain.clone()));
        }
    }

    /// The counts, one entry per protocol, in the order of registration.
    pub fn counts(&self) -> Vec<ConnectionCounts> {
        let drains = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: Vec<ConnectionCounts> = Vec::new();
        for (protocol, drain) in drains.iter() {
            let index = match counts.iter().position(|c| c.protocol == *protocol) {
                Some(index) => index,
                None => {
                    counts.push(ConnectionCounts {
                        protocol: (*protocol).to_owned(),
                        active: 0,
                        draining: 0,
                        forced: 0,
                    });
                    counts.len() - 1
                }
            };
            let entry = &mut counts[index];
            if drain.is_draining() {
                entry.draining += drain.open();
            } else {
                entry.active += drain.open();
            }
            entry.forced += drain.forced();
        }
        counts
    }
}

/// `my_crate::drain::Http<Router>` → `Http`.
fn short_type_name(full: &'static str) -> &'static str {
    let path = full.split('<').next().unwrap_or(full);
    path.rsplit("::").next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    struct Http<T>(T);

    #[tokio::test]
    async fn counts_are_per_protocol_and_a_shared_drain_counts_once() {
        let connections = Connections::default();
        let (web, echo) = (Drain::builder().build(), Drain::builder().build());
        connections.register::<Http<Vec<u8>>>(&web);
        connections.register::<Http<Vec<u8>>>(&web);
        connections.register::<Echo>(&echo);
        let _a = web.track();
        let _b = web.track();
        let _c = echo.track();
        let counts = connections.counts();
        let summary: Vec<_> = counts
            .iter()
            .map(|c| (c.protocol.as_str(), c.active, c.draining))
            .collect();
        assert_eq!(summary, [("Http", 2, 0), ("Echo", 1, 0)]);
        let draining = tokio::spawn({
            let echo = echo.clone();
            async move { echo.drain().await }
        });
        tokio::task::yield_now().await;
        while !echo.is_draining() {
            tokio::task::yield_now().await;
        }
        let echo_counts = connections.counts().remove(1);
        assert_eq!((echo_counts.active, echo_counts.draining), (0, 1));
        drop(_c);
        draining.await.unwrap();
    }
}
