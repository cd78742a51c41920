//! A successor inherits exactly one descriptor, its channel: every other one the process
//! holds without close-on-exec (a wrapper's lock file, systemd's sockets, a library's) is
//! marked close-on-exec in the child, between `fork` and `exec`.

use std::os::fd::RawFd;
use std::sync::OnceLock;

/// How the child marks the descriptors, chosen in the parent (the child may not allocate).
#[derive(Debug)]
pub(crate) enum Plan {
    /// One `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` (Linux 5.11 and later).
    Range,
    /// Older kernels, or a seccomp profile that refuses `close_range`: these descriptors,
    /// listed from `/proc/self/fd` before the fork, one `fcntl` each.
    These(Vec<RawFd>),
}

impl Plan {
    /// The plan for this process, `close_range` when the kernel allows it (probed once).
    pub fn for_this_process() -> Self {
        static RANGE_WORKS: OnceLock<bool> = OnceLock::new();
        if *RANGE_WORKS.get_or_init(|| close_range_cloexec(u32::MAX - 1).is_ok()) {
            return Self::Range;
        }
        let open = std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten();
        let fds = open
            .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok())
            .filter(|fd| *fd > 2)
            .collect();
        Self::These(fds)
    }

    /// Marks the descriptors. Runs in the child between `fork` and `exec`: system calls only,
    /// no allocation. Descriptors opened by other threads after the listing are close-on-exec
    /// already (the standard library and tokio open every descriptor so).
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        match self {
            Self::Range => close_range_cloexec(3),
            Self::These(fds) => {
                for fd in fds {
                    // SAFETY: F_SETFD changes one flag of a descriptor number of this
                    // process; one closed since the listing gives EBADF, which is ignored.
                    unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                }
                Ok(())
            }
        }
    }
}

/// Marks every descriptor from `first` on close-on-exec.
fn close_range_cloexec(first: u32) -> std::io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on this process's
    // descriptors; it closes nothing and touches no memory.
    let result = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
