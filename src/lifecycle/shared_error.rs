//! [`SharedError`]: an [`Error`] kept in the lifecycle's status (the outcome of `ready()`), so
//! that every call returns the same typed error. [`Error`] is not `Clone` (an `io::Error`
//! never is): each call gets a copy, variant for variant, with the same message, and the same
//! kind and OS error code for an I/O error.

use std::io;
use std::sync::Arc;

use crate::error::Error;
use crate::wire::WireError;

/// An [`Error`] that many can hold; equal only to itself (to a clone of the same `Arc`).
#[derive(Debug, Clone)]
pub(crate) struct SharedError(Arc<Error>);

impl SharedError {
    pub fn new(error: Error) -> Self {
        Self(Arc::new(error))
    }

    /// A copy of the error, to return.
    pub fn to_error(&self) -> Error {
        copy_error(&self.0)
    }
}

impl PartialEq for SharedError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedError {}

fn copy_error(error: &Error) -> Error {
    match error {
        Error::Bind { socket, source } => Error::Bind {
            socket: socket.clone(),
            source: copy_io(source),
        },
        Error::DuplicateName(name) => Error::DuplicateName(name.clone()),
        Error::Unsupported { name, problem } => Error::Unsupported {
            name: name.clone(),
            problem: problem.clone(),
        },
        Error::ClaimedAfterReady { name, socket } => Error::ClaimedAfterReady {
            name: name.clone(),
            socket: socket.clone(),
        },
        Error::Inherit(source) => Error::Inherit(copy_wire(source)),
        Error::Ready(source) => Error::Ready(copy_wire(source)),
        Error::Stopped => Error::Stopped,
        Error::Io { context, source } => Error::Io {
            context: context.clone(),
            source: copy_io(source),
        },
    }
}

fn copy_wire(error: &WireError) -> WireError {
    match error {
        WireError::Io(source) => WireError::Io(copy_io(source)),
        &WireError::Closed { expected } => WireError::Closed { expected },
        // What a JSON error says, without its category (not `Clone` either).
        WireError::Malformed(source) => WireError::Malformed(serde::de::Error::custom(source)),
        &WireError::MessageTooLarge { bytes } => WireError::MessageTooLarge { bytes },
        &WireError::Truncated { what } => WireError::Truncated { what },
        &WireError::MalformedControl(what) => WireError::MalformedControl(what),
        &WireError::UnsupportedVersion { ours, theirs } => WireError::UnsupportedVersion { ours, theirs },
        &WireError::Unexpected { expected, got } => WireError::Unexpected { expected, got },
        &WireError::FdCountMismatch { batch, entries, fds } => WireError::FdCountMismatch { batch, entries, fds },
        &WireError::IncompleteManifest {
            announced,
            batches,
            received,
        } => WireError::IncompleteManifest {
            announced,
            batches,
            received,
        },
        &WireError::InconsistentManifest { sockets, batches } => WireError::InconsistentManifest { sockets, batches },
        WireError::DuplicateName(name) => WireError::DuplicateName(name.clone()),
        WireError::Peer(why) => WireError::Peer(why.clone()),
        WireError::SocketMismatch { socket, problem } => WireError::SocketMismatch {
            socket: socket.clone(),
            problem: problem.clone(),
        },
        WireError::Refused(reason) => WireError::Refused(reason.clone()),
        &WireError::TimedOut { waiting_for, after } => WireError::TimedOut { waiting_for, after },
    }
}

/// The same OS error, or one of the same kind and message.
fn copy_io(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_the_same_variant_with_the_same_message() {
        let malformed = serde_json::from_str::<u32>("{").unwrap_err();
        let errors = [
            Error::Stopped,
            Error::io(
                "writing the PID file /run/x.pid",
                io::Error::from_raw_os_error(libc::EACCES),
            ),
            Error::io("becoming ready", io::Error::other("the task panicked")),
            Error::Ready(WireError::Refused("stop requested".into())),
            Error::Ready(WireError::Io(io::ErrorKind::BrokenPipe.into())),
            Error::Ready(WireError::Malformed(malformed)),
            Error::Inherit(WireError::TimedOut {
                waiting_for: "commit",
                after: std::time::Duration::from_secs(3),
            }),
        ];
        for error in errors {
            let shared = SharedError::new(error);
            let copy = shared.to_error();
            assert_eq!(copy.to_string(), shared.0.to_string());
            assert_eq!(std::mem::discriminant(&copy), std::mem::discriminant(&*shared.0));
            if let (Error::Io { source: a, .. }, Error::Io { source: b, .. }) = (&copy, &*shared.0) {
                assert_eq!((a.kind(), a.raw_os_error()), (b.kind(), b.raw_os_error()));
            }
            if let (Error::Ready(a), Error::Ready(b)) = (&copy, &*shared.0) {
                assert_eq!(std::mem::discriminant(a), std::mem::discriminant(b));
                assert_eq!(a.is_peer_gone(), b.is_peer_gone());
            }
            assert_eq!(shared.clone(), shared);
            assert_ne!(SharedError::new(Error::Stopped), SharedError::new(Error::Stopped));
        }
    }
}
