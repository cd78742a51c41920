//! The PID file: always names a live process that serves, never a half-written file.
//!
//! Not `tempfile`'s `NamedTempFile::persist`, which does the same write-then-rename: its
//! random names would hide whose a leftover is, and the predecessor removes the temporary of
//! a successor it killed before the commit by its pid-derived name.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A PID file written beside its final path, waiting to be put in place.
///
/// Preparing is the part that can fail (a missing directory, permissions); it happens before
/// a successor reports ready, so that such a failure leaves the predecessor serving. Putting
/// it in place is one `rename`, after the commit. Dropped without being put in place, the
/// temporary file is removed.
#[derive(Debug)]
pub(crate) struct Prepared {
    temporary: PathBuf,
    path: PathBuf,
    placed: bool,
}

/// Writes `pid` to a temporary file beside `path`.
///
/// No `fsync`: a PID file names a live process, and after a machine crash it names nothing
/// alive whatever its content. What matters is what a reader sees while the system runs,
/// which `rename` alone guarantees; the sync cost ~0.6 ms on the upgrade's critical path.
pub(crate) fn prepare(path: &Path, pid: u32) -> io::Result<Prepared> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::other("PID file path has no file name"))?;
    let prepared = Prepared {
        temporary: temporary(path, file_name, pid),
        path: path.to_owned(),
        placed: false,
    };
    // A leftover of an earlier process with our pid goes; then O_EXCL: never through a
    // symbolic link someone placed at the name.
    let _ = std::fs::remove_file(&prepared.temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&prepared.temporary)?;
    writeln!(file, "{pid}")?;
    Ok(prepared)
}

/// The temporary file process `pid` writes beside `path`.
fn temporary(path: &Path, file_name: &std::ffi::OsStr, pid: u32) -> PathBuf {
    let mut temporary_name = file_name.to_os_string();
    temporary_name.push(format!(".{pid}.tmp"));
    path.with_file_name(temporary_name)
}

/// Removes the temporary file that process `pid` may have left beside `path`: a successor
/// killed between preparing its PID file and the commit cannot remove its own.
pub(crate) fn remove_leftover(path: &Path, pid: u32) {
    if let Some(file_name) = path.file_name() {
        let _ = std::fs::remove_file(temporary(path, file_name, pid));
    }
}

impl Prepared {
    /// Renames the file into place: a reader sees the old content or the new, never an empty
    /// or partial file.
    pub(crate) fn place(mut self) -> io::Result<()> {
        std::fs::rename(&self.temporary, &self.path)?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Writes `pid` to `path` atomically.
#[cfg(test)]
pub(crate) fn write(path: &Path, pid: u32) -> io::Result<()> {
    prepare(path, pid)?.place()
}

/// Removes the PID file if it names one of `pids`: after a final stop, by the process that
/// owns the paths (which may still find its predecessor's pid there, if the stop came just
/// after the commit); never after a handover (the successor writes its own).
pub(crate) fn remove_if_naming(path: &Path, pids: &[u32]) {
    let named = std::fs::read_to_string(path)
        .ok()
        .and_then(|content| content.trim().parse::<u32>().ok());
    if named.is_some_and(|pid| pids.contains(&pid)) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_replaced_and_removed_only_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.pid");
        write(&path, 10).unwrap();
        write(&path, 11).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "11\n");
        remove_if_naming(&path, &[10]);
        assert!(path.exists());
        remove_if_naming(&path, &[10, 11]);
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temporary file left"
        );
    }

    #[test]
    fn a_prepared_file_dropped_unplaced_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.pid");
        write(&path, 10).unwrap();
        drop(prepare(&path, 11).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "10\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(prepare(&dir.path().join("missing/server.pid"), 11).is_err());
    }

    #[test]
    fn a_leftover_temporary_is_removed_and_a_planted_link_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.pid");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("server.pid.12.tmp")).unwrap();
        prepare(&path, 12).unwrap().place().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "12\n");
        std::mem::forget(prepare(&path, 13).unwrap()); // as if killed before placing it
        remove_leftover(&path, 13);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "server.pid and elsewhere"
        );
    }
}
