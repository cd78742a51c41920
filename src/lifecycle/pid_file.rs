//! The PID file: always names a live process that serves, never a half-written file.

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
    let mut temporary_name = file_name.to_os_string();
    temporary_name.push(format!(".{pid}.tmp"));
    let prepared = Prepared {
        temporary: path.with_file_name(temporary_name),
        path: path.to_owned(),
        placed: false,
    };
    let mut file = std::fs::File::create(&prepared.temporary)?;
    writeln!(file, "{pid}")?;
    Ok(prepared)
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

/// Removes the PID file if it still names `pid`: after a final stop, not after a handover
/// (the successor has written its own by then).
pub(crate) fn remove_if_ours(path: &Path, pid: u32) {
    if std::fs::read_to_string(path).is_ok_and(|content| content.trim() == pid.to_string()) {
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
        remove_if_ours(&path, 10);
        assert!(path.exists());
        remove_if_ours(&path, 11);
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
}
