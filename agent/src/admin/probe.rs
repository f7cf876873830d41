//! `mtls-agent probe ready|live`: the kubelet's exec probe of one agent instance. During a
//! surge rollout two instances run on the node with the host's network, so any TCP port they
//! share (SO_REUSEPORT) may be answered by either; an exec probe runs inside its own
//! container's cgroup instead, so it asks the instance whose process shares that cgroup (found
//! through the pid in each `admin-<pid>.sock` name) over that instance's own unix socket. No
//! other instance stands in for it: without its own instance, the probe fails.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::client::{self, ClientError, Endpoint};

/// Which of the instance's health answers to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeKind {
    /// `/healthz/ready`: this instance serves (programs attached, first sync done, listeners
    /// up in the pods it enrolled).
    Ready,
    /// `/healthz/live`: this instance answers at all.
    Live,
}

impl ProbeKind {
    fn path(self) -> &'static str {
        match self {
            ProbeKind::Ready => "/healthz/ready",
            ProbeKind::Live => "/healthz/live",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading {path}: {source}")]
    OwnCgroup { path: PathBuf, source: std::io::Error },
    #[error("no agent instance of this container's cgroup ({cgroup}) has an admin socket in {dirs}{found}")]
    NotFound { cgroup: String, dirs: String, found: String },
    #[error("{at}: {source}")]
    Ask { at: PathBuf, source: ClientError },
}

/// How long the probe waits for its instance (under the DaemonSet's `timeoutSeconds: 2`).
pub const TIMEOUT: Duration = Duration::from_millis(1500);

/// The admin socket of the instance whose process is in the same cgroup(s) as this one, as
/// `proc_root` shows them (`<proc>/self/cgroup` against `<proc>/<pid>/cgroup`).
pub fn own_instance(dirs: &[PathBuf], proc_root: &Path) -> Result<PathBuf, ProbeError> {
    let own_path = proc_root.join("self/cgroup");
    let own = std::fs::read_to_string(&own_path)
        .map_err(|source| ProbeError::OwnCgroup { path: own_path, source })?;
    let mut others = Vec::new();
    for dir in dirs {
        // A directory that cannot be read has no instance of ours: reported below.
        let Ok(sockets) = super::socket::discover(dir) else { continue };
        for s in sockets {
            let Some(pid) = super::socket::socket_pid(&s) else { continue };
            // A socket whose process is gone, or whose cgroup differs, is another container's.
            match std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")) {
                Ok(c) if c == own => return Ok(s),
                Ok(_) => others.push(format!("pid {pid}: another cgroup")),
                Err(_) => others.push(format!("pid {pid}: gone")),
            }
        }
    }
    let dirs = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    let found = if others.is_empty() {
        String::new()
    } else {
        format!(" (others there: {})", others.join(", "))
    };
    Err(ProbeError::NotFound { cgroup: own.trim().replace('\n', " "), dirs, found })
}

/// Asks this container's own instance; the body of a 200 answer, else the error (a 503 says
/// why the instance is not ready).
pub fn probe(dirs: &[PathBuf], proc_root: &Path, kind: ProbeKind) -> Result<String, ProbeError> {
    let socket = own_instance(dirs, proc_root)?;
    let at = Endpoint::Unix(socket.clone());
    client::get_within(&at, kind.path(), TIMEOUT)
        .map_err(|source| ProbeError::Ask { at: socket, source })
}

#[cfg(test)]
mod tests {
    use std::{io::Read, io::Write, os::unix::net::UnixListener};

    use super::*;

    /// A fake /proc: `self` and each pid's cgroup file.
    fn proc_with(root: &Path, own: &str, pids: &[(u32, &str)]) {
        std::fs::create_dir_all(root.join("self")).unwrap();
        std::fs::write(root.join("self/cgroup"), own).unwrap();
        for (pid, cg) in pids {
            std::fs::create_dir_all(root.join(pid.to_string())).unwrap();
            std::fs::write(root.join(pid.to_string()).join("cgroup"), cg).unwrap();
        }
    }

    fn instance(dir: &Path, pid: u32, status: &'static str, body: &'static str) {
        let l = UnixListener::bind(dir.join(format!("admin-{pid}.sock"))).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(2) {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ =
                    write!(s, "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            }
        });
    }

    #[test]
    fn the_instance_of_the_own_cgroup_answers_even_when_another_is_ready() {
        let tmp = tempfile::tempdir().unwrap();
        let (proc_root, dir) = (tmp.path().join("proc"), tmp.path().join("run"));
        std::fs::create_dir_all(&dir).unwrap();
        proc_with(&proc_root, "0::/new\n", &[(10, "0::/old\n"), (20, "0::/new\n")]);
        instance(&dir, 10, "200 OK", "ready: old\n");
        instance(&dir, 20, "503 Service Unavailable", "not ready: waiting\n");
        let dirs = [dir.clone()];
        assert_eq!(own_instance(&dirs, &proc_root).unwrap(), dir.join("admin-20.sock"));
        let e = probe(&dirs, &proc_root, ProbeKind::Ready).unwrap_err().to_string();
        assert!(e.contains("not ready: waiting"), "{e}");
    }

    #[test]
    fn without_its_own_instance_the_probe_fails_and_says_whom_it_saw() {
        let tmp = tempfile::tempdir().unwrap();
        let (proc_root, dir) = (tmp.path().join("proc"), tmp.path().join("run"));
        std::fs::create_dir_all(&dir).unwrap();
        // The ready instance is another container's; pid 30's socket is left by a dead one.
        proc_with(&proc_root, "0::/new\n", &[(10, "0::/old\n")]);
        instance(&dir, 10, "200 OK", "ready: old\n");
        std::fs::write(dir.join("admin-30.sock"), b"").unwrap();
        let e = probe(&[dir], &proc_root, ProbeKind::Live).unwrap_err().to_string();
        assert!(e.contains("no agent instance of this container's cgroup (0::/new)"), "{e}");
        assert!(e.contains("pid 10: another cgroup") && e.contains("pid 30: gone"), "{e}");
    }
}
