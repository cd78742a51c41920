//! The connections a process serves, per listener and protocol, for `status`: every accept
//! loop (and migration receiver) a drain runs for a `Handoff` registers a census here (a
//! closure: the lifecycle knows nothing of drains).

use std::sync::Mutex;

use serde::Serialize;

/// The connections of one listener and protocol in this process: an element of the
/// `connections` array of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConnectionCounts {
    /// The listener's name in the registry (`http`), or `None` for connections the drain
    /// tracks without one (a listener the registry does not hold, `Drain::spawn`).
    pub listener: Option<String>,
    /// The protocol, as its drain strategy names it (`http`, `websocket`, `tcp`, or a name
    /// the application gives).
    pub protocol: String,
    /// Open connections while this process serves.
    pub active: usize,
    /// Open connections once this process drains (a stop, or a successor took over).
    pub draining: usize,
    /// Connections closed by force at the drain's deadline.
    pub forced: usize,
}

/// What one drain reports when `status` asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Census {
    /// Open connections.
    pub(crate) open: usize,
    /// Whether the drain has started.
    pub(crate) draining: bool,
    /// Connections closed by force at its deadline.
    pub(crate) forced: usize,
}

/// Takes a drain's census.
pub(crate) type CensusTaker = Box<dyn Fn() -> Census + Send + Sync>;

/// One registered source of connections.
struct Source {
    /// Tells sources apart: one registered twice is counted once.
    identity: usize,
    listener: Option<String>,
    protocol: String,
    census: CensusTaker,
}

/// The connection sources of one process. Registered once per listener: a handful.
#[derive(Default)]
pub(crate) struct Connections(Mutex<Vec<Source>>);

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").finish_non_exhaustive()
    }
}

impl Connections {
    /// Counts the connections `census` reports under `listener` and `protocol`, unless the
    /// source `identity` names is counted already.
    pub(crate) fn register(&self, identity: usize, listener: Option<String>, protocol: &str, census: CensusTaker) {
        let mut sources = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.iter().any(|known| known.identity == identity) {
            sources.push(Source {
                identity,
                listener,
                protocol: protocol.to_owned(),
                census,
            });
        }
    }

    /// The counts, one entry per listener and protocol, in the order of registration.
    pub(crate) fn counts(&self) -> Vec<ConnectionCounts> {
        let sources = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: Vec<ConnectionCounts> = Vec::new();
        for source in sources.iter() {
            let same = |c: &ConnectionCounts| c.listener == source.listener && c.protocol == source.protocol;
            let index = match counts.iter().position(same) {
                Some(index) => index,
                None => {
                    counts.push(ConnectionCounts {
                        listener: source.listener.clone(),
                        protocol: source.protocol.clone(),
                        active: 0,
                        draining: 0,
                        forced: 0,
                    });
                    counts.len() - 1
                }
            };
            let census = (source.census)();
            let entry = &mut counts[index];
            if census.draining {
                entry.draining += census.open;
            } else {
                entry.active += census.open;
            }
            entry.forced += census.forced;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A drain's census whose open count the test sets.
    fn source(open: &Arc<AtomicUsize>, draining: bool) -> CensusTaker {
        let open = open.clone();
        Box::new(move || Census {
            open: open.load(Ordering::Relaxed),
            draining,
            forced: 0,
        })
    }

    #[test]
    fn counts_are_per_listener_and_protocol_and_a_source_counts_once() {
        let connections = Connections::default();
        let (web, echo, admin, resumed) = (Arc::default(), Arc::default(), Arc::default(), Arc::default());
        let name = |n: &str| Some(n.to_owned());
        connections.register(1, name("web"), "http", source(&web, false));
        connections.register(1, name("web"), "http", source(&web, false));
        connections.register(2, name("echo"), "tcp", source(&echo, true));
        connections.register(3, name("admin"), "http", source(&admin, false));
        connections.register(4, name("web"), "http", source(&resumed, false));
        web.store(2, Ordering::Relaxed);
        echo.store(1, Ordering::Relaxed);
        admin.store(4, Ordering::Relaxed);
        resumed.store(1, Ordering::Relaxed);
        let summary: Vec<_> = connections
            .counts()
            .into_iter()
            .map(|c| (c.listener.unwrap(), c.protocol, c.active, c.draining))
            .collect();
        let row = |l: &str, p: &str, active, draining| (l.to_owned(), p.to_owned(), active, draining);
        assert_eq!(
            summary,
            [
                row("web", "http", 3, 0),
                row("echo", "tcp", 0, 1),
                row("admin", "http", 4, 0)
            ]
        );
    }
}
