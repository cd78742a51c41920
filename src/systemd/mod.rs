//! Running under systemd: socket activation on a first start, and the notifications that
//! tell the service manager which process serves (`READY=1`, `RELOADING=1`, `MAINPID=`,
//! `STOPPING=1`, `STATUS=`, `EXTEND_TIMEOUT_USEC=`).
//!
//! Both follow the protocols of sd_listen_fds(3) and sd_notify(3) without linking libsystemd;
//! both are inert when the variables are not set, so the same server runs from a terminal,
//! and when the `systemd` feature is off (the variables are then ignored).

pub(crate) mod activation;
pub(crate) mod notify;
