//! [`Program`]: how to start a successor (which executable, its `argv`, its working directory
//! and environment), captured at start-up, and the spawn that starts it.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::SigSet;

use super::builder::Builder;
use super::child::Child;
use super::spawn::{self, Spawn};
use super::upgrade_error::UpgradeError;
use crate::wire::CHANNEL_FD_VAR;

/// How to start a successor: what this process was started as, captured at start-up.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    /// The path a successor runs: the path this process was started as (`argv[0]`, made
    /// absolute against the start directory, or found on `PATH`), its symlinks left for
    /// `exec` to resolve at each upgrade. So a deploy that replaces the file, or swaps a
    /// `current -> releases/vN` symlink, runs the new release (not `/proc/self/exe`, which
    /// would run the old inode again).
    pub executable: PathBuf,
    /// `argv`, including `argv[0]`.
    pub args: Vec<OsString>,
    /// The working directory a successor starts in: the one this process started in, as the
    /// shell named it (`$PWD`, symlinks kept, so `cd current && ./server` follows the swap).
    pub cwd: PathBuf,
    /// The signals the successor starts with blocked, until it handles them.
    pub held_signals: SigSet,
    /// Whether `executable` came from `argv[0]` (false: an override, or the fallback).
    from_argv0: bool,
}

impl Program {
    /// What this process was started as.
    pub(crate) fn current() -> std::io::Result<Self> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let cwd = start_directory();
        let running = running_executable()?;
        let start_path = args
            .first()
            .and_then(|argv0| resolve_start_path(argv0, &cwd, std::env::var_os("PATH").as_deref()))
            .filter(|path| same_file(path, &running));
        if start_path.is_none() {
            tracing::debug!(executable = %running.display(), "argv[0] does not name our executable; upgrades run the running one's path");
        }
        Ok(Self {
            from_argv0: start_path.is_some(),
            executable: start_path.unwrap_or(running),
            args,
            cwd,
            held_signals: SigSet::empty(),
        })
    }

    /// What this process was started as, with the overrides of `config`
    /// ([`Builder::executable`], [`Builder::working_dir`]).
    pub(crate) fn configured(config: &Builder) -> std::io::Result<Self> {
        let mut program = Self::current()?;
        if let Some(executable) = &config.executable {
            program.executable = executable.clone();
            program.from_argv0 = false;
        }
        if let Some(dir) = &config.working_dir {
            program.cwd = dir.clone();
        }
        Ok(program)
    }

    /// The `argv[0]` a successor gets: ours when it finds the same path again in the
    /// successor (a name looked up on `PATH`, an absolute path), else the path it runs.
    fn argv0(&self) -> OsString {
        match self.args.first() {
            Some(argv0) if self.from_argv0 && (!has_slash(argv0) || Path::new(argv0).is_absolute()) => argv0.clone(),
            _ => self.executable.clone().into(),
        }
    }

    /// The directory a successor starts in: ours, or `/` if it has vanished (a deploy
    /// removed the old release): a server that serves is better than an upgrade refused.
    fn working_dir(&self) -> &Path {
        if self.cwd.is_dir() {
            return &self.cwd;
        }
        tracing::warn!(working_dir = %self.cwd.display(), "the working directory has vanished; the successor starts in /");
        Path::new("/")
    }

    /// The error of a spawn that failed with `source`: names the working directory when
    /// that is what could not be entered, else the executable.
    fn spawn_error(&self, working_dir: &Path, source: std::io::Error) -> UpgradeError {
        let enterable = nix::unistd::access(working_dir, nix::unistd::AccessFlags::X_OK).is_ok();
        UpgradeError::Spawn {
            executable: self.executable.clone(),
            working_dir: (!enterable).then(|| working_dir.to_path_buf()),
            source,
        }
    }
}

/// The executable this process runs, at the path it was started from: what the kernel
/// names it, without the " (deleted)" the kernel adds once the file has been replaced (the
/// path a deploy wrote to is the one without the suffix).
fn running_executable() -> std::io::Result<PathBuf> {
    let executable = std::env::current_exe()?;
    Ok(match executable.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => executable,
    })
}

/// The directory this process started in: `$PWD` when it names the same directory (it keeps
/// the symlinks a shell went through, as `pwd -L`), else the kernel's, else `/`.
fn start_directory() -> PathBuf {
    let Ok(physical) = std::env::current_dir() else {
        tracing::warn!("the working directory has vanished; successors start in /");
        return PathBuf::from("/");
    };
    match std::env::var_os("PWD").map(PathBuf::from) {
        Some(logical) if logical.is_absolute() && same_file(&logical, &physical) => logical,
        _ => physical,
    }
}

/// The absolute path `argv0` names, the way a shell found it: a path with a slash, against
/// `cwd`; a bare name, on `path_var`. Symlinks are not resolved. `None` if there is none.
fn resolve_start_path(argv0: &OsStr, cwd: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if argv0.is_empty() {
        return None;
    }
    if has_slash(argv0) {
        return Some(cwd.join(argv0));
    }
    std::env::split_paths(path_var?)
        .map(|dir| cwd.join(dir).join(argv0)) // an empty or relative entry: against cwd
        .find(|candidate| is_executable_file(candidate))
}

fn has_slash(path: &OsStr) -> bool {
    path.as_bytes().contains(&b'/')
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `a` and `b` are the same file (device and inode, through symlinks).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The variable that tells a successor which pid started it (ours): should we die before it
/// takes its channel, it is reparented and can no longer find us as its parent, but can still
/// tell that the channel's creator is the process that started it, and is gone.
pub(crate) const PREDECESSOR_PID_VAR: &str = "HANDOFF_PREDECESSOR_PID";

/// Variables that describe descriptors of this process, which a successor must not
/// mistake for its own: systemd's socket activation (read once, by the first generation).
const FOREIGN_DESCRIPTOR_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

impl Program {
    /// Starts the executable (what its path names now) with our arguments, working
    /// directory and environment, plus the channel's descriptor number. The channel is the
    /// only descriptor it inherits, and the held signals are blocked from before its `exec`
    /// (see
    /// [`spawn`](super::spawn)).
    pub fn spawn(&self, channel: BorrowedFd<'_>) -> Result<Child, UpgradeError> {
        let working_dir = self.working_dir();
        let mut args = vec![self.argv0()];
        args.extend(self.args.iter().skip(1).cloned());
        let start = Spawn {
            executable: &self.executable,
            args,
            working_dir,
            remove: &FOREIGN_DESCRIPTOR_VARS,
            set: vec![
                // What a shell would say after `cd`: the successor finds its start directory in it.
                ("PWD", working_dir.as_os_str().to_owned()),
                (CHANNEL_FD_VAR, spawn::inherited_number(channel).to_string().into()),
                (PREDECESSOR_PID_VAR, std::process::id().to_string().into()),
            ],
            held_signals: self.held_signals,
        };
        spawn::spawn(&start, channel).map_err(|source| self.spawn_error(working_dir, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_path_with_a_slash_is_made_absolute_against_the_start_directory_unresolved() {
        let cwd = Path::new("/srv/app");
        let resolve = |argv0: &str| resolve_start_path(OsStr::new(argv0), cwd, None);
        assert_eq!(
            resolve("current/server"),
            Some(PathBuf::from("/srv/app/current/server"))
        );
        assert_eq!(resolve("./server"), Some(PathBuf::from("/srv/app/./server")));
        assert_eq!(resolve("/opt/bin/server"), Some(PathBuf::from("/opt/bin/server")));
        assert_eq!(resolve(""), None);
    }

    #[test]
    fn a_bare_name_is_looked_up_on_path_in_order() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        for bin in [&first, &second] {
            std::fs::create_dir(bin).unwrap();
            std::fs::write(bin.join("server"), "").unwrap();
        }
        // Not executable: skipped, as a shell skips it.
        std::fs::set_permissions(second.join("server"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([&first, &second]).unwrap();
        let found = resolve_start_path(OsStr::new("server"), Path::new("/"), Some(&path));
        assert_eq!(found, Some(second.join("server")));
        assert_eq!(
            resolve_start_path(OsStr::new("absent"), Path::new("/"), Some(&path)),
            None
        );
        assert_eq!(resolve_start_path(OsStr::new("server"), Path::new("/"), None), None);
    }

    #[test]
    fn the_builder_overrides_the_executable_and_the_working_directory() {
        let config = Builder::default()
            .executable("/opt/server")
            .working_dir("/var/lib/server");
        let program = Program::configured(&config).unwrap();
        assert_eq!(program.executable, Path::new("/opt/server"));
        assert_eq!(program.cwd, Path::new("/var/lib/server"));
        assert_eq!(program.argv0(), OsStr::new("/opt/server"), "argv[0] names what runs");
    }

    #[test]
    fn a_spawn_error_names_the_working_directory_when_it_is_what_failed() {
        let error = |working_dir: Option<&str>| UpgradeError::Spawn {
            executable: PathBuf::from("/srv/app/current/server"),
            working_dir: working_dir.map(PathBuf::from),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(
            error(Some("/srv/app/data")).to_string(),
            "starting /srv/app/current/server: working directory /srv/app/data: Permission denied (os error 13)"
        );
        assert_eq!(
            error(None).to_string(),
            "starting /srv/app/current/server: Permission denied (os error 13)"
        );
    }
}
