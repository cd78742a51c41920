//! Starting a successor with `posix_spawn`: [`spawn`] a [`Spawn`] into a [`Child`].
//!
//! Not `std::process::Command`: its `pre_exec` hook (needed to hold signals and to keep every
//! descriptor but the channel from the successor) forces a `fork`, which copies this process's
//! page tables and, on a busy machine, took 0.4–2.7 ms where glibc's `posix_spawn` (a
//! `CLONE_VFORK` child sharing our memory until it execs) takes 0.08 ms. `posix_spawn` does
//! the same work as the hook did, in the child, before `exec`:
//! - the signal mask is set to the held signals (`POSIX_SPAWN_SETSIGMASK`), and `SIGPIPE`,
//!   which the Rust runtime ignores, is reset to its default, as `Command` does;
//! - the channel is duplicated onto a known number without close-on-exec, and every
//!   descriptor above it is closed (`posix_spawn_file_actions_addclosefrom_np`, glibc 2.34:
//!   `close_range`, or `/proc/self/fd` on older kernels): the successor inherits exactly one.
//!   Without that function (an older glibc, musl), every descriptor of ours from 3 on is made
//!   close-on-exec before the spawn instead (harmless to us: it only matters at `exec`);
//! - the working directory is entered (`posix_spawn_file_actions_addchdir_np`). Without it
//!   (glibc before 2.29), the successor starts where we are, and another directory is an
//!   error that says why.
//!
//! The started process is a [`Child`], whose exit is awaited through a pidfd or a thread of
//! its own. What the system offers is found at run time ([`Platform`]), so that the crate
//! links and runs on any of them.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use nix::sys::signal::SigSet;

use super::child::Child;
use super::platform::{AddChdir, AddCloseFrom, Platform};

/// What to start.
pub(crate) struct Spawn<'a> {
    /// The executable (a name without a slash is looked up on `PATH`, as `Command` does).
    pub executable: &'a Path,
    /// `argv`, `argv[0]` included.
    pub args: Vec<OsString>,
    /// The directory it starts in.
    pub working_dir: &'a Path,
    /// Our environment, minus `remove`, plus `set` (which replaces variables of the same name).
    pub remove: &'a [&'a str],
    pub set: Vec<(&'a str, OsString)>,
    /// Blocked in the child from before `exec` on.
    pub held_signals: SigSet,
}

/// The descriptor number the child finds its channel at: 3, or 4 when the channel already is
/// 3 in this process (duplicating a descriptor onto itself would leave it close-on-exec).
pub(crate) fn inherited_number(channel: BorrowedFd<'_>) -> RawFd {
    if channel.as_raw_fd() == 3 {
        4
    } else {
        3
    }
}

/// Starts `spawn` with `channel` as its one inherited descriptor (at [`inherited_number`]).
pub(crate) fn spawn(spawn: &Spawn<'_>, channel: BorrowedFd<'_>) -> io::Result<Child> {
    spawn_on(&Platform::detected(), spawn, channel)
}

/// [`spawn`], with what `platform` offers.
fn spawn_on(platform: &Platform, spawn: &Spawn<'_>, channel: BorrowedFd<'_>) -> io::Result<Child> {
    let program = c_string(spawn.executable.as_os_str())?;
    let args = spawn.args.iter().map(|a| c_string(a)).collect::<io::Result<Vec<_>>>()?;
    let env = environment(spawn)?;
    let working_dir = c_string(spawn.working_dir.as_os_str())?;
    let target = inherited_number(channel);
    let mut actions = FileActions::new()?;
    actions.dup2(channel.as_raw_fd(), target)?;
    match platform.close_from {
        Some(close_from) => actions.close_from(close_from, target + 1)?,
        None => close_on_exec_from(3)?,
    }
    if target == 4 {
        actions.close(3)?; // the channel's own number: a copy of it, with close-on-exec
    }
    match platform.chdir {
        Some(chdir) => actions.chdir(chdir, &working_dir)?,
        None => already_there(spawn.working_dir)?,
    }
    let mut attributes = Attributes::new()?;
    attributes.hold(&spawn.held_signals)?;
    let argv = null_terminated(&args);
    let envp = null_terminated(&env);
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: `program` and the strings behind `argv`
    // and `envp` live until the end of this function, both arrays end with a null pointer,
    // and `actions` and `attributes` were initialised by their `init` functions. glibc runs
    // the child on a separate stack, sharing our memory only until it execs.
    let error = unsafe {
        libc::posix_spawnp(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attributes.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    if error != 0 {
        return Err(io::Error::from_raw_os_error(error));
    }
    Child::new(pid, platform.pidfd)
}

/// Marks every descriptor of this process from `first` on close-on-exec, so that a child
/// inherits none of them but what its file actions duplicate (a `dup2` target is never
/// close-on-exec). Ours already are, but for strays inherited from our own parent.
fn close_on_exec_from(first: RawFd) -> io::Result<()> {
    let numbers: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first)
        .collect();
    for fd in numbers {
        // SAFETY: F_GETFD/F_SETFD read and set the flags of a descriptor number; one closed
        // since the listing fails with EBADF, which is ignored.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Without a way to change the child's directory, it starts in ours: fine if that is the
/// directory asked for.
fn already_there(working_dir: &Path) -> io::Result<()> {
    let ours = std::env::current_dir()?;
    if std::fs::canonicalize(&ours)? == std::fs::canonicalize(working_dir)? {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "starting the successor in {} (this process is in {}) needs posix_spawn_file_actions_addchdir_np, which this C library lacks (glibc 2.29 or later has it)",
            working_dir.display(),
            ours.display()
        ),
    ))
}

/// `NAME=value` for each variable of our environment the successor gets.
fn environment(spawn: &Spawn<'_>) -> io::Result<Vec<CString>> {
    let replaced = |name: &OsStr| {
        spawn.remove.iter().any(|r| OsStr::new(r) == name) || spawn.set.iter().any(|(s, _)| OsStr::new(s) == name)
    };
    let ours = std::env::vars_os().filter(|(name, _)| !replaced(name));
    let theirs = spawn
        .set
        .iter()
        .map(|(name, value)| (OsString::from(name), value.clone()));
    ours.chain(theirs)
        .map(|(name, value)| {
            let mut pair = name.into_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            c_string(OsStr::from_bytes(&pair))
        })
        .collect()
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a nul byte in an argument"))
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    let mut pointers: Vec<*mut libc::c_char> = strings.iter().map(|s| s.as_ptr().cast_mut()).collect();
    pointers.push(std::ptr::null_mut());
    pointers
}

/// What the child does with its descriptors and directory before `exec`.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        let mut actions = std::mem::MaybeUninit::uninit();
        // SAFETY: init fills in the structure it is given.
        check(unsafe { libc::posix_spawn_file_actions_init(actions.as_mut_ptr()) })?;
        // SAFETY: initialised just above.
        Ok(Self(unsafe { actions.assume_init() }))
    }
    fn dup2(&mut self, fd: RawFd, target: RawFd) -> io::Result<()> {
        // SAFETY: appends an action to the list `init` made; copies the numbers.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, target) })
    }
    fn close(&mut self, fd: RawFd) -> io::Result<()> {
        // SAFETY: as `dup2`.
        check(unsafe { libc::posix_spawn_file_actions_addclose(&mut self.0, fd) })
    }
    fn close_from(&mut self, close_from: AddCloseFrom, first: RawFd) -> io::Result<()> {
        // SAFETY: as `dup2` (`close_from` is the C library's function of that name).
        check(unsafe { close_from(&mut self.0, first) })
    }
    fn chdir(&mut self, chdir: AddChdir, dir: &CString) -> io::Result<()> {
        // SAFETY: as `dup2` (`chdir` is the C library's function of that name); it copies
        // the path.
        check(unsafe { chdir(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: frees what `init` and the `add` calls allocated, once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// The child's signal mask and dispositions at `exec`.
struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    fn new() -> io::Result<Self> {
        let mut attributes = std::mem::MaybeUninit::uninit();
        // SAFETY: init fills in the structure it is given.
        check(unsafe { libc::posix_spawnattr_init(attributes.as_mut_ptr()) })?;
        // SAFETY: initialised just above.
        Ok(Self(unsafe { attributes.assume_init() }))
    }

    /// `held` blocked, `SIGPIPE` to its default action.
    fn hold(&mut self, held: &SigSet) -> io::Result<()> {
        let mut pipe = SigSet::empty();
        pipe.add(nix::sys::signal::Signal::SIGPIPE);
        let flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        // SAFETY: each call copies a signal set or the flags into the attributes `init` made.
        unsafe {
            check(libc::posix_spawnattr_setsigmask(&mut self.0, held.as_ref()))?;
            check(libc::posix_spawnattr_setsigdefault(&mut self.0, pipe.as_ref()))?;
            check(libc::posix_spawnattr_setflags(&mut self.0, flags as libc::c_short))
        }
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: frees what `init` allocated, once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

fn check(error: libc::c_int) -> io::Result<()> {
    match error {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::path::PathBuf;
    use std::time::Duration;

    use nix::sys::signal::Signal;
    use tokio::sync::{Mutex, MutexGuard};

    use super::*;

    /// Taken by each test here for its whole run: what a child inherits is decided
    /// process-wide, and the tests are threads of one process. A spawn on the older system's
    /// path marks every descriptor of ours close-on-exec, then spawns: a stray that another
    /// test makes inheritable in between leaks into its child; and the marking, landing on
    /// that test's stray, would leave its check that the stray stays out proving nothing.
    async fn alone() -> MutexGuard<'static, ()> {
        static DESCRIPTORS: Mutex<()> = Mutex::const_new(());
        DESCRIPTORS.lock().await
    }

    /// Waits, 10 s at most, until the child whose `/proc` directory is `proc` (a `sleep`) is
    /// blocked in its sleep: only then are its descriptors those it inherited, and its
    /// environment there to read.
    ///
    /// `posix_spawn` returns once the child has left our memory (glibc's child shares it,
    /// `CLONE_VFORK`, until its exec gives it memory of its own), which is halfway through
    /// the exec: the kernel has yet to close the close-on-exec descriptors and to lay out the
    /// new program's environment (`environ` reads empty until then). Started, the program
    /// opens and closes descriptors of its own (the dynamic loader its libraries, `setlocale`
    /// the locale's files), which a listing in between would count as leaked. Blocked in its
    /// `nanosleep`, `sleep` is past all of that.
    async fn until_asleep(proc: &str) -> io::Result<()> {
        let sleeping = [libc::SYS_clock_nanosleep, libc::SYS_nanosleep];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // `NR arguments… sp pc` while blocked in system call NR, else `running` or `-1 sp
            // pc`. Readable by who may ptrace the child (we, its parent); not at some points of
            // an exec (then we look again).
            let syscall = std::fs::read_to_string(format!("{proc}/syscall"));
            let number = syscall
                .as_ref()
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<libc::c_long>().ok());
            if number.is_some_and(|n| sleeping.contains(&n)) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{proc} is not asleep after 10 s (its syscall file: {syscall:?})"),
                ));
            }
            // The period of the poll, not a guess at how long the start takes: the deadline
            // bounds the wait.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Starts `sleep 30` on `platform` in `working_dir` with a stray descriptor open here,
    /// waits until it sleeps, reads what it got, kills it, then checks: exactly the channel
    /// (no stray), the directory, the environment, the held signals.
    async fn the_child_gets_the_channel_alone(platform: Platform, working_dir: &Path) {
        // A descriptor without close-on-exec, which the child must not get.
        let stray = tempfile::NamedTempFile::new().unwrap();
        let stray_fd: OwnedFd = stray.reopen().unwrap().into();
        nix::fcntl::fcntl(&stray_fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
        let (channel, _ours) = crate::wire::pair().unwrap();
        let mut held = SigSet::empty();
        held.add(Signal::SIGUSR2);
        let number = inherited_number(channel.as_fd());
        let start = Spawn {
            executable: Path::new("sleep"),
            args: vec!["sleep".into(), "30".into()],
            working_dir,
            remove: &["HOME"],
            set: vec![("HANDOFF_FD", number.to_string().into())],
            held_signals: held,
        };
        let mut child = spawn_on(&platform, &start, channel.as_fd()).unwrap();
        let proc = format!("/proc/{}", child.id());
        // Wait, read everything, then kill the child, then check: a failed wait or check
        // leaves nothing running.
        let asleep = until_asleep(&proc).await;
        let fds: io::Result<Vec<(RawFd, PathBuf)>> = std::fs::read_dir(format!("{proc}/fd")).and_then(|dir| {
            dir.map(|entry| {
                let entry = entry?;
                let number = entry.file_name().to_str().and_then(|n| n.parse().ok());
                let number = number.ok_or_else(|| io::Error::other(format!("{entry:?}: not a descriptor")))?;
                Ok((number, std::fs::read_link(entry.path())?))
            })
            .collect()
        });
        let status = std::fs::read_to_string(format!("{proc}/status"));
        let environment = std::fs::read(format!("{proc}/environ"));
        let cwd = std::fs::read_link(format!("{proc}/cwd"));
        child.kill().await.unwrap();

        asleep.unwrap();
        let (mut fds, status, environment, cwd) = (fds.unwrap(), status.unwrap(), environment.unwrap(), cwd.unwrap());
        fds.sort_unstable();
        let numbers: Vec<RawFd> = fds.iter().map(|(fd, _)| *fd).collect();
        assert_eq!(
            numbers,
            [0, 1, 2, number],
            "the stray ({:?}) or another leaked: {fds:?}",
            stray.path()
        );
        assert_eq!(cwd, std::fs::canonicalize(working_dir).unwrap());
        let variables: Vec<&[u8]> = environment.split(|b| *b == 0).collect();
        assert!(variables.contains(&format!("HANDOFF_FD={number}").as_bytes()));
        assert!(!variables.iter().any(|v| v.starts_with(b"HOME=")));
        // SIGUSR2 is signal 12: bit 11 of the blocked mask, in hexadecimal.
        let blocked = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap().trim();
        assert_eq!(u64::from_str_radix(blocked, 16).unwrap(), 1 << 11, "{blocked}");
    }

    #[tokio::test]
    async fn the_child_gets_the_channel_alone_its_directory_and_the_held_signals() {
        let _alone = alone().await;
        let dir = tempfile::tempdir().unwrap();
        the_child_gets_the_channel_alone(Platform::detected(), dir.path()).await;
    }

    /// Without `addclosefrom_np`, `addchdir_np` and pidfds (glibc before 2.29, musl, Linux
    /// before 5.3): the same child, the same single descriptor, watched by a thread; another
    /// directory than ours is refused with a reason.
    #[tokio::test]
    async fn on_an_older_system_the_child_still_gets_the_channel_alone() {
        let _alone = alone().await;
        let here = std::env::current_dir().unwrap();
        the_child_gets_the_channel_alone(Platform::minimal(), &here).await;

        let (channel, _ours) = crate::wire::pair().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let start = Spawn {
            executable: Path::new("sleep"),
            args: vec!["sleep".into(), "30".into()],
            working_dir: elsewhere.path(),
            remove: &[],
            set: vec![],
            held_signals: SigSet::empty(),
        };
        let error = spawn_on(&Platform::minimal(), &start, channel.as_fd()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
        assert!(
            error.to_string().contains(&elsewhere.path().display().to_string()),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_killed_child_is_reaped_with_its_signal() {
        let _alone = alone().await;
        for platform in [Platform::detected(), Platform::minimal()] {
            killed_and_reaped(platform).await;
        }
    }

    async fn killed_and_reaped(platform: Platform) {
        use std::os::unix::process::ExitStatusExt;
        let (channel, _ours) = crate::wire::pair().unwrap();
        let start = Spawn {
            executable: Path::new("sleep"),
            args: vec!["sleep".into(), "30".into()],
            working_dir: &std::env::current_dir().unwrap(),
            remove: &[],
            set: vec![],
            held_signals: SigSet::empty(),
        };
        let mut child = spawn_on(&platform, &start, channel.as_fd()).unwrap();
        let pid = child.id();
        child.kill().await.unwrap();
        assert_eq!(child.wait().await.unwrap().signal(), Some(libc::SIGKILL));
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_err(),
            "reaped, not a zombie"
        );
    }
}
