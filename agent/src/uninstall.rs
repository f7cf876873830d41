//! `mtls-agent uninstall`: the way out of the mesh for one node.
//!
//! The agent's programs and maps are pinned so that they outlive it: a deleted DaemonSet (or
//! a crashed agent) leaves every enrolled pod failing closed (connect()s redirected to a port
//! nobody listens on, plaintext to STRICT ports dropped) until this runs. It undoes what the
//! agent set up: in the pods' namespaces first (`net.ipv4.tcp_migrate_req`, where the agent
//! turned it on; recorded in the pod's `ENROLLED` entry, so it needs the maps), then the
//! per-pod inbound (`sk_lookup`) links, the node-wide cgroup links and the maps. Running it
//! again finds nothing and says so.

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Socket, Type};
use tracing::warn;

use crate::{
    capture::{self, Capture, Unpinned, POD_SET_MIGRATE_REQ},
    inpod::{netns_cookie, MIGRATE_REQ},
};

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("removing the pins under {path}: {source}")]
    Unpin { path: PathBuf, source: std::io::Error },
    #[error("an agent of this node is still running (pid {pids:?}): it would go on as if nothing happened; stop it first (kubectl delete -f deploy/daemonset.yaml), or pass --force")]
    AgentRunning { pids: Vec<u32> },
}

/// What an uninstall did.
#[derive(Debug, Default)]
pub struct Report {
    pub bpffs: PathBuf,
    /// `None`: nothing was pinned (never installed, or already uninstalled).
    pub unpinned: Option<Unpinned>,
    /// Pods' namespaces where `tcp_migrate_req` was turned off again.
    pub sysctls_restored: usize,
    /// Namespaces the agent changed that were not found among the node's processes (their
    /// pods are gone, and the setting with them) or could not be changed.
    pub sysctls_not_restored: Vec<String>,
}

impl Report {
    pub fn nothing_left_before(&self) -> bool {
        self.unpinned.is_none()
    }

    /// The report, one line each.
    pub fn lines(&self) -> Vec<String> {
        let dir = self.bpffs.display();
        let Some(u) = &self.unpinned else {
            return vec![format!("nothing to uninstall: no pins under {dir} (already uninstalled, or never installed)")];
        };
        let mut out = vec![
            format!(
                "detached {} node-wide capture program(s) (connect, sock_ops, ...) and {} pod inbound (sk_lookup) program(s); removed {} pinned map(s) and {dir}",
                u.node_links, u.pod_links, u.maps
            ),
            format!(
                "turned net.ipv4.tcp_migrate_req off again in {} pod namespace(s) where the agent had turned it on",
                self.sysctls_restored
            ),
        ];
        for s in &self.sysctls_not_restored {
            out.push(format!("left alone: {s}"));
        }
        out
    }
}

/// Uninstalls the node whose pins are under `bpffs`; pods' namespaces are found through the
/// processes under `proc_root`.
pub fn uninstall(bpffs: &Path, proc_root: &Path, force: bool) -> Result<Report, UninstallError> {
    let mut report = Report { bpffs: bpffs.to_owned(), ..Report::default() };
    if !bpffs.exists() {
        return Ok(report);
    }
    // A running agent keeps enrolling and would re-pin behind us: it goes first.
    let running = Capture::running_instances_pinned(bpffs).unwrap_or_default();
    if !running.is_empty() && !force {
        return Err(UninstallError::AgentRunning { pids: running });
    }
    // Before the maps go: they say which namespaces the agent changed.
    let changed: BTreeSet<u64> = match Capture::enrolled_flags_pinned(bpffs) {
        Ok(pods) => pods
            .into_iter()
            .filter(|(_, flags)| flags & POD_SET_MIGRATE_REQ != 0)
            .map(|(cookie, _)| cookie)
            .collect(),
        Err(e) => {
            warn!("reading the enrolled pods: {e}; pods' tcp_migrate_req left as they are");
            BTreeSet::new()
        }
    };
    let (restored, left) = restore_migrate_req(&changed, proc_root);
    report.sysctls_restored = restored;
    report.sysctls_not_restored = left;
    let unpinned = capture::unpin_all(bpffs)
        .map_err(|source| UninstallError::Unpin { path: bpffs.to_owned(), source })?;
    report.unpinned = Some(unpinned);
    Ok(report)
}

/// Turns `tcp_migrate_req` off in the namespaces with these cookies, found through the node's
/// processes (each namespace entered once). Returns how many, and what was not done.
fn restore_migrate_req(cookies: &BTreeSet<u64>, proc_root: &Path) -> (usize, Vec<String>) {
    let mut left = cookies.clone();
    let mut restored = 0;
    let mut failed = Vec::new();
    let mut seen = HashSet::new();
    let entries = match std::fs::read_dir(proc_root) {
        Ok(e) => e,
        Err(e) if !left.is_empty() => {
            return (
                0,
                vec![format!("{} namespace(s): reading {}: {e}", left.len(), proc_root.display())],
            )
        }
        Err(_) => return (0, vec![]),
    };
    for entry in entries.flatten() {
        if left.is_empty() {
            break;
        }
        let pid = entry.file_name();
        if !pid.to_str().is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // A process that exited meanwhile, or a kernel thread: nothing to read.
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(file) = File::open(&path) else { continue };
        match in_netns(&file, &left) {
            Ok(Some(cookie)) => {
                left.remove(&cookie);
                restored += 1;
            }
            Ok(None) => {}
            Err((cookie, e)) => {
                left.remove(&cookie);
                failed.push(format!("namespace of {} (cookie {cookie}): {e}", path.display()));
            }
        }
    }
    failed.extend(left.iter().map(|c| {
        format!("namespace with cookie {c}: no process of the node is in it (its pod is gone)")
    }));
    (restored, failed)
}

/// In the namespace of `file`: if its cookie is one of `wanted`, turns `tcp_migrate_req`
/// off. The cookie it changed, `None` if it is not one of them.
fn in_netns(file: &File, wanted: &BTreeSet<u64>) -> Result<Option<u64>, (u64, std::io::Error)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Only this thread moves; the process stays where it is.
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| (0, e.into()))?;
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| (0, e))?;
                let cookie = netns_cookie(&s).map_err(|e| (0, e))?;
                if !wanted.contains(&cookie) {
                    return Ok(None);
                }
                std::fs::write(MIGRATE_REQ, "0").map_err(|e| (cookie, e))?;
                Ok(Some(cookie))
            })
            .join()
            .unwrap_or_else(|_| Err((0, std::io::Error::other("thread panicked"))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_finds_nothing_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("node1");
        let r = uninstall(&gone, Path::new("/proc"), false).expect("uninstall");
        assert!(r.nothing_left_before());
        let lines = r.lines();
        assert!(lines.len() == 1 && lines[0].contains("nothing to uninstall"), "{lines:?}");
    }

    #[test]
    fn a_namespace_not_found_is_reported_not_guessed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No process lists: every cookie is left, by name.
        let (n, left) = restore_migrate_req(&BTreeSet::from([7u64]), dir.path());
        assert_eq!(n, 0);
        assert!(left.len() == 1 && left[0].contains("cookie 7"), "{left:?}");
    }
}
