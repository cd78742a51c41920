//! The states of one process, and why it stops serving.

use serde::Serialize;

/// Where a process is in its life. Every change goes through one transition table (`next`,
/// in `src/lifecycle/transitions.rs`, which a test holds to this diagram): each arrow is an
/// event of the table.
///
/// ```text
///           Ready             Trigger             CommitTo: the successor is ready
/// Starting ─────────▶ Ready ───────────▶ Upgrading ── and we have not given up ──▶ Draining ⟲ Stop
///    │                ▲ ▲ │               │    │                                      │
///    │                │ └─┼───────────────┼────┼─── SuccessorDied: on probation ──────┘
///    │                │   │               │    │
///    │                └───┼───────────────┘    │
///    │                    │  UpgradeFailed:    │
///    │                    │  failure, timeout, │
///    │                    │  cancel            │
///    │ Stop               │ Stop               │ Stop: the successor is killed and reaped
///    ▼                    ▼                    ▼
///    └────────────────────┴────▶ Stopping ◀────┘ ⟲ Stop
/// ```
///
/// `Ready`: the work of `Handoff::ready` got through (a successor's
/// includes its predecessor's commit). `Trigger`: an upgrade is asked for
/// (`Handoff::upgrade`, SIGUSR2, the control socket).
/// `UpgradeFailed`: the upgrade failed or was abandoned before its commit. `CommitTo`: we
/// commit to our ready successor, the point of no return. `Stop`: SIGTERM, SIGINT or
/// `Handoff::stop`. `SuccessorDied`: see below. The events that change no state are not drawn:
/// `PredecessorCommitted` (a successor's predecessor committed to it: it owns the shared
/// paths from then on), `PredecessorExited`, and the steps of `ready()`'s own work,
/// `ReadyCalled` (the first call starts it) and `ReadyDone` (its outcome, which every call
/// returns).
///
/// In `Stopping`, a second stop makes the drain's deadline now; in `Draining`, the first stop
/// is only noted (a supervisor stopping a service signals old processes too) and the second
/// makes the deadline now. Nothing leaves `Stopping`, and only a take-back leaves `Draining`:
/// `SuccessorDied`, the successor dead on probation without having said that it leaves, and
/// no stop here first (`Builder::probation`). `ProbationOver` (its time is up, or the
/// successor said it leaves) changes no state: the sockets kept for a take-back are let go.
/// Triggers are refused, with their reason, everywhere but in `Ready`, and in `Ready` when
/// as many generations as `Builder::max_generations` allows are alive (this one and older
/// ones still draining). A successor owns no shared path (Unix listener
/// paths, the control socket's, the PID file) until its predecessor commits; a stop before
/// that removes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum State {
    /// Binding and adopting sockets; not yet serving.
    Starting,
    /// Serving; an upgrade may start.
    Ready,
    /// A successor is starting; this process still serves.
    Upgrading,
    /// The successor serves; this process finishes its connections and exits (after its
    /// probation, in which it takes the service back if the successor dies).
    Draining,
    /// A final stop was requested; this process finishes its connections and exits.
    Stopping,
}

/// Why a process stops serving: what `Handoff::shutdown_signal`
/// resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
#[non_exhaustive]
pub enum Shutdown {
    /// A successor took over the sockets and serves: stop accepting and drain.
    Upgraded {
        /// The successor's pid.
        successor_pid: u32,
    },
    /// A final stop (SIGTERM, SIGINT or `Handoff::stop`): drain and exit.
    Stopped,
}
