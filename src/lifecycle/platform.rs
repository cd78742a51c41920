//! What this system's C library and kernel offer the successor's spawn, found at run time.
//!
//! The spawn's best tools are recent: `posix_spawn_file_actions_addclosefrom_np` (glibc 2.34),
//! `posix_spawn_file_actions_addchdir_np` (glibc 2.29, musl 1.1.24) and `pidfd_open` (Linux
//! 5.3). Linked by name, the first two would keep the crate from linking on glibc 2.31
//! (Debian 11, Ubuntu 20.04) or 2.28 (RHEL 8), and from building on musl at all; so they are
//! looked up with `dlsym`, and each has a fallback, which the spawn chooses when the piece
//! is missing.

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

/// `posix_spawn_file_actions_addclosefrom_np(actions, first)`.
pub(crate) type AddCloseFrom = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, c_int) -> c_int;
/// `posix_spawn_file_actions_addchdir_np(actions, path)`.
pub(crate) type AddChdir = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const c_char) -> c_int;

/// The optional pieces the spawn uses when they are there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Platform {
    /// Closes every descriptor from a number on, in the child.
    pub close_from: Option<AddCloseFrom>,
    /// Changes the child's working directory.
    pub chdir: Option<AddChdir>,
    /// Whether to watch the child through a pidfd (else a thread waits for it); a kernel
    /// without `pidfd_open` falls back to the thread by itself.
    pub pidfd: bool,
}

impl Platform {
    /// What this process's C library offers, looked up once.
    pub(crate) fn detected() -> Self {
        static DETECTED: OnceLock<Platform> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            // SAFETY: each symbol, when present, is the C library's function of that name,
            // whose signature is the one its type alias spells (glibc's and musl's headers).
            unsafe {
                Platform {
                    close_from: lookup(c"posix_spawn_file_actions_addclosefrom_np")
                        .map(|f| std::mem::transmute::<*mut libc::c_void, AddCloseFrom>(f)),
                    chdir: lookup(c"posix_spawn_file_actions_addchdir_np")
                        .map(|f| std::mem::transmute::<*mut libc::c_void, AddChdir>(f)),
                    pidfd: true,
                }
            }
        })
    }

    /// None of the optional pieces: what the oldest supported system offers. For the tests
    /// of the fallbacks.
    #[cfg(test)]
    pub(crate) fn minimal() -> Self {
        Platform {
            close_from: None,
            chdir: None,
            pidfd: false,
        }
    }
}

/// The address of the function `name` in the process's C library, if it has one (a static
/// binary has no dynamic symbols: none).
fn lookup(name: &CStr) -> Option<*mut libc::c_void> {
    // SAFETY: dlsym reads a nul-terminated name and returns an address or null.
    let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!address.is_null()).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_env = "gnu")]
    fn this_glibc_has_what_the_fast_spawn_uses() {
        // The CI machine's glibc is recent; the fallbacks have their own tests in `spawn`.
        let platform = Platform::detected();
        assert!(platform.close_from.is_some() && platform.chdir.is_some());
    }
}
