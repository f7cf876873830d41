//! The admin API's unix socket: one per agent instance, `admin-<pid>.sock`, mode 0600 in a
//! 0700 directory owned by the agent's user, so that only that user (root) can reach it: a
//! host-network pod's process reaches 127.0.0.1, not this. Two instances run side by side
//! during a rollout, so the CLI picks among the sockets of the directory ([`discover`]).

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::SystemTime,
};

use tokio::net::UnixListener;

/// The default directory of a node's admin sockets.
pub fn default_dir(node: &str) -> PathBuf {
    // Node names are DNS names; a slash would leave the directory.
    PathBuf::from(RUN_DIR).join(node.replace('/', "_"))
}

/// Where every node's directory is (the CLI looks in all of them without `--node`).
pub const RUN_DIR: &str = "/run/mtls-agent";

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("admin socket directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error(
        "admin socket directory {dir} is not a directory owned by uid {uid} (found: {found}); \
         refusing to put the admin socket there"
    )]
    NotOurs { dir: PathBuf, uid: u32, found: String },
    #[error("admin socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// The bound socket; the file is removed when this drops (the agent exits).
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
}

impl AdminSocket {
    /// Makes `dir` (0700), removes the sockets of instances that are gone, and binds this
    /// instance's socket (0600).
    pub fn bind(dir: &Path) -> Result<(AdminSocket, UnixListener), SocketError> {
        let dir_err = |source| SocketError::Dir { dir: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(dir_err)?;
        let uid = nix::unistd::geteuid().as_raw();
        // Not through a symlink, and not a directory someone else made for us to write into.
        let meta = fs::symlink_metadata(dir).map_err(dir_err)?;
        if !meta.is_dir() || meta.uid() != uid {
            let found = format!(
                "{}, uid {}",
                if meta.is_dir() { "directory" } else { "not a directory" },
                meta.uid()
            );
            return Err(SocketError::NotOurs { dir: dir.to_owned(), uid, found });
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
        remove_stale(dir);
        let path = dir.join(format!("admin-{}.sock", std::process::id()));
        let bind_err = |source| SocketError::Bind { path: path.clone(), source };
        // A file of that name is a dead instance's that had our pid.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        let guard = AdminSocket { path: path.clone() };
        // The directory already keeps others out; the mode says so for the socket itself too.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok((guard, listener))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The pid in an admin socket's name.
pub(crate) fn socket_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("admin-")?.strip_suffix(".sock")?.parse().ok()
}

/// Removes sockets whose instance is gone (killed, so it could not remove its own).
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        let Some(pid) = socket_pid(&path) else { continue };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_file(&path);
        }
    }
}

/// The admin sockets in `dir`, newest first.
pub fn discover(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<(SystemTime, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| socket_pid(p).is_some())
        .map(|p| {
            let t = fs::metadata(&p).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            (t, p)
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_ours_alone_and_removed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("node1");
        // A socket left by an instance that is gone (no such pid) is removed at bind.
        fs::create_dir_all(&dir).unwrap();
        let stale = dir.join(format!("admin-{}.sock", u32::MAX - 1));
        fs::write(&stale, b"").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        let (sock, _listener) = AdminSocket::bind(&dir).unwrap();
        assert!(!stale.exists());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(sock.path()), 0o600);
        assert_eq!(discover(&dir).unwrap(), vec![sock.path().to_owned()]);
        let path = sock.path().to_owned();
        drop(sock);
        assert!(!path.exists());
    }

    #[test]
    fn a_directory_that_is_not_a_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        let link = tmp.path().join("node1");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        let e = AdminSocket::bind(&link).unwrap_err();
        assert!(matches!(e, SocketError::NotOurs { .. }), "{e}");
    }

    #[test]
    fn socket_names_carry_the_pid() {
        assert_eq!(socket_pid(Path::new("/r/admin-42.sock")), Some(42));
        assert_eq!(socket_pid(Path::new("/r/admin-x.sock")), None);
        assert_eq!(socket_pid(Path::new("/r/other.sock")), None);
    }
}
