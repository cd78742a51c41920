//! The PID file: always names a live process that serves, never a half-written file.

use std::io::{self, Write};
use std::path::Path;

/// Writes `pid` to `path` atomically: a temporary file beside it, then `rename`, so that a
/// reader sees the old content or the new, never an empty or partial file.
///
/// No `fsync`: a PID file names a live process, and after a machine crash it names nothing
/// alive whatever its content. What matters is what a reader sees while the system runs,
/// which `rename` alone guarantees; the sync cost ~0.6 ms on the upgrade's critical path.
pub(crate) fn write(path: &Path, pid: u32) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::other("PID file path has no file name"))?;
    let mut temporary_name = file_name.to_os_string();
    temporary_name.push(format!(".{pid}.tmp"));
    let temporary = path.with_file_name(temporary_name);
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{pid}")?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
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
}
