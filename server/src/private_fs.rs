//! Creating the daemon's own files and directories so that only its user
//! can use them, whatever the umask: the data dir holds the whole store and
//! the admin token, and outside the systemd unit (`UMask=0077`) the usual
//! umask 022 would make them readable by every local user.
//!
//! Directories the daemon creates are 0700 and files 0600. Existing ones
//! keep their mode — the operator may have chosen it (a group for a backup
//! agent; a mount point the daemon may not chmod) — but a data dir or store
//! file that others can use is reported with a warning naming the fix.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and any missing parents as 0700; existing ones are left
/// as they are.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Opens `path` for writing, creating it as 0600 when missing (an existing
/// file keeps its contents and mode). Refuses a symlink in its place: the
/// daemon's files are never reached through one planted in the data dir.
pub fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates `path` as a new 0600 file; fails when anything (a symlink
/// included) is already there.
pub fn create_new_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Logs a warning when `path` (a directory or file the daemon keeps private
/// data in) can be used by its group or by others.
pub fn warn_if_shared(what: &str, path: &Path) {
    let Ok(metadata) = std::fs::metadata(path) else {
        return;
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return;
    }
    let fix = if metadata.is_dir() {
        "chmod 700"
    } else {
        "chmod 600"
    };
    tracing::warn!(
        path = %path.display(),
        "the {what} {} can be used by other local users (mode {mode:04o}); it holds the store \
         and secrets: `{fix} {}` (stratad keeps an existing mode, creates its own 0700/0600)",
        path.display(),
        path.display(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_dirs_and_files_are_private_and_symlinks_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        create_file(&dir.join("f")).unwrap();
        assert_eq!(mode(&dir.join("f")), 0o600);
        create_new_file(&dir.join("g")).unwrap();
        assert_eq!(mode(&dir.join("g")), 0o600);
        assert!(create_new_file(&dir.join("g")).is_err(), "exists already");

        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("link")).unwrap();
        assert!(create_file(&dir.join("link")).is_err());
        assert!(create_new_file(&dir.join("link")).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
