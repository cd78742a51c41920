//! Deploys as people do them: a `current -> releases/vN` symlink swapped between upgrades, a
//! binary replaced in place, a working directory removed. The successor runs what the start
//! path names now.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::{cwd_of, example, exe_of, install, point_symlink, Server};

/// A deploy directory next to the built examples (so that releases can be hard links).
fn deploy_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(example("tcp_echo").parent().unwrap()).unwrap()
}

/// `releases/v1/server` and `releases/v2/server`, and `current -> releases/v1`.
fn two_releases(root: &Path) -> (PathBuf, PathBuf) {
    let binary = example("tcp_echo");
    let (v1, v2) = (root.join("releases/v1"), root.join("releases/v2"));
    install(&binary, &v1.join("server"));
    install(&binary, &v2.join("server"));
    point_symlink(&root.join("current"), Path::new("releases/v1"));
    (v1.join("server"), v2.join("server"))
}

/// Starts `current/server` as a shell in `root` would (`cd root && current/server`).
fn start_current(root: &Path) -> Server {
    let root = root.to_path_buf();
    Server::start_with(
        &root.join("current/server"),
        &["--listen", "127.0.0.1:0"],
        move |command| {
            command.arg0("current/server").current_dir(&root);
        },
    )
}

#[test]
fn a_symlink_swap_then_an_upgrade_runs_the_new_release_and_swapping_back_the_old() {
    let root = deploy_dir();
    let (v1, v2) = two_releases(root.path());
    let server = start_current(root.path());
    assert_eq!(exe_of(server.first_pid()), v1);

    point_symlink(&root.path().join("current"), Path::new("releases/v2"));
    let second = server.upgrade_and_settle();
    assert_eq!(exe_of(second), v2, "the successor runs what current/ names now");

    point_symlink(&root.path().join("current"), Path::new("releases/v1"));
    let third = server.upgrade_and_settle();
    assert_eq!(exe_of(third), v1, "a rollback is a swap back");
}

#[test]
fn a_bare_name_found_on_path_is_looked_up_through_the_symlink_at_each_upgrade() {
    let root = deploy_dir();
    let (_v1, v2) = two_releases(root.path());
    let current = root.path().join("current");
    let server = Server::start_with(&current.join("server"), &["--listen", "127.0.0.1:0"], |command| {
        command.arg0("server").env("PATH", &current);
    });
    point_symlink(&current, Path::new("releases/v2"));
    let successor = server.upgrade_and_settle();
    assert_eq!(exe_of(successor), v2);
}

#[test]
fn a_binary_replaced_in_place_is_what_the_successor_runs() {
    let root = deploy_dir();
    let path = root.path().join("server");
    install(&example("tcp_echo"), &path);
    let server = Server::start(&path, &["--listen", "127.0.0.1:0"]);
    let old_inode = std::fs::metadata(&path).unwrap().ino();

    // A deploy writes the new file beside the old one and renames it over.
    let new = root.path().join("server.new");
    std::fs::copy(example("tcp_echo"), &new).unwrap();
    std::fs::rename(&new, &path).unwrap();
    let new_inode = std::fs::metadata(&path).unwrap().ino();
    assert_ne!(new_inode, old_inode);

    let successor = server.upgrade_and_settle();
    let running = std::fs::metadata(format!("/proc/{successor}/exe")).unwrap().ino();
    assert_eq!(running, new_inode);
}

#[test]
fn a_working_directory_that_vanished_falls_back_to_the_root_with_a_warning() {
    let root = deploy_dir();
    let (_v1, _v2) = two_releases(root.path());
    let work = root.path().join("releases/v1/work");
    std::fs::create_dir(&work).unwrap();
    let started_in = work.clone();
    let server = Server::start_with(
        &root.path().join("current/server"),
        &["--listen", "127.0.0.1:0"],
        move |command| {
            command.current_dir(&started_in);
        },
    );
    std::fs::remove_dir(&work).unwrap();

    let successor = server.upgrade_and_settle();
    assert_eq!(cwd_of(successor), Path::new("/"));
    assert!(server.has_log(|l| l.contains("WARN") && l.contains("working directory has vanished")));
}
