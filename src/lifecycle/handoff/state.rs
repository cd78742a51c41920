//! The application's state across an upgrade, on the handle: the writer a predecessor runs
//! for each successor, and the stream a successor reads (see `app_state`).

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Handoff;
use crate::lifecycle::app_state::{StateReader, StateWriter, Writer};

/// The two slots, each taken whole under its lock.
#[derive(Default)]
pub(super) struct StateSlots {
    writer: Mutex<Option<Arc<Writer>>>,
    received: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for StateSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSlots")
            .field("writer", &lock(&self.writer).is_some())
            .field("received", &lock(&self.received).is_some())
            .finish()
    }
}

impl StateSlots {
    pub(super) fn received(stream: Option<OwnedFd>) -> Self {
        Self {
            writer: Mutex::default(),
            received: Mutex::new(stream),
        }
    }
}

fn lock<T>(slot: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each slot holds an `Option` swapped whole: consistent even if a holder panicked.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handoff {
    /// Hands the application's state to every successor: at each upgrade, `writer` gets a
    /// [`StateWriter`] and writes a snapshot (of a cache, a session table, a room's history),
    /// any size, with backpressure, while the successor starts; the successor reads it with
    /// [`take_state`](Self::take_state) before it says ready. The stream ends when the
    /// future returns (dropping the writer). Put a version first: the successor may refuse
    /// a format it does not know.
    ///
    /// The writer is bounded by the upgrade: once the successor is ready (or the upgrade
    /// fails or times out) a writer still running is dropped, so a successor that does not
    /// read cannot hold this process. Replaces an earlier writer.
    ///
    /// ```no_run
    /// # async fn example(handoff: handover::Handoff) {
    /// use std::sync::{Arc, Mutex};
    /// use tokio::io::AsyncWriteExt;
    ///
    /// let history = Arc::new(Mutex::new(vec![String::from("hello")]));
    /// let snapshot = history.clone();
    /// handoff.send_state_with(move |mut writer| {
    ///     let lines = snapshot.lock().unwrap().join("\n");
    ///     async move { writer.write_all(format!("v1\n{lines}").as_bytes()).await }
    /// });
    /// # }
    /// ```
    pub fn send_state_with<F, Fut>(&self, writer: F)
    where
        F: Fn(StateWriter) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<()>> + Send + 'static,
    {
        let writer: Arc<Writer> = Arc::new(move |state| Box::pin(writer(state)));
        *lock(&self.inner.state.writer) = Some(writer);
    }

    /// The state the predecessor sent (see [`send_state_with`](Self::send_state_with)), to
    /// read to its EOF before [`ready`](Self::ready); `None` on a first start, when the
    /// predecessor sends none, or once taken. A stream not taken by `ready()` is closed
    /// there. To start cold instead (a version this process does not read), call
    /// [`StateReader::refuse`].
    ///
    /// ```no_run
    /// # async fn example(handoff: handover::Handoff) -> std::io::Result<()> {
    /// use tokio::io::AsyncReadExt;
    ///
    /// let mut history = String::new();
    /// if let Some(mut state) = handoff.take_state() {
    ///     state.read_to_string(&mut history).await?;
    /// }
    /// handoff.ready().await.expect("ready");
    /// # Ok(()) }
    /// ```
    pub fn take_state(&self) -> Option<StateReader> {
        let fd = lock(&self.inner.state.received).take()?;
        match StateReader::new(fd) {
            Ok(reader) => Some(reader),
            Err(error) => {
                tracing::warn!(%error, "the predecessor's application state cannot be read; starting without it");
                None
            }
        }
    }

    /// At ready: a state nobody took is closed, so that the predecessor's writer stops.
    pub(super) fn close_untaken_state(&self) {
        if lock(&self.inner.state.received).take().is_some() {
            tracing::debug!("the predecessor's application state was not taken; closed");
        }
    }

    pub(super) fn state_writer(&self) -> Option<Arc<Writer>> {
        lock(&self.inner.state.writer).clone()
    }
}
