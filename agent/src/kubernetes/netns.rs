//! A pod's network namespace without a CNI plugin: `/proc/<pid>/ns/net` of the pod's sandbox
//! process, found through the pod's cgroup, which the kubelet names after the pod's uid.
//!
//! The kubelet's layouts, for QoS class `burstable` or `besteffort` (guaranteed pods sit
//! directly under the top directory):
//! - systemd driver: `<top>.slice/<top>-<qos>.slice/<top>-<qos>-pod<uid>.slice`, with the uid's
//!   `-` written as `_`; `<top>` is `kubepods`, or `kubelet-kubepods` under kind (inside
//!   `kubelet.slice`);
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>`.
//!
//! The top directory sits at the cgroup root, or below it with a custom kubelet `cgroupRoot`
//! or in a kind node: it is searched for, bounded in depth and breadth. The pod's processes
//! live in its containers' cgroups below its directory; which of them holds the pod's
//! namespace is [`super::sandbox`]'s choice. The namespace is opened once and the file kept,
//! so the pod stays enrolled whichever of its processes exits later.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::sandbox::{self, Chosen, Member, SandboxError};
use crate::inpod::{InpodError, PodNetns};

/// QoS classes that get their own directory, in the order they are looked for.
const QOS_DIRS: [&str; 2] = ["burstable", "besteffort"];
/// How deep below the pod's directory processes are looked for (container scopes and the
/// runtime's own sub-cgroups).
const MAX_DEPTH: usize = 3;
/// How deep below the cgroup root the kubelet's top directories are looked for (kind:
/// `kubelet.slice/kubelet-kubepods.slice`; a custom `cgroupRoot` adds its own levels).
const MAX_TOP_DEPTH: usize = 4;
/// Most directories looked at while searching for the top directories.
const MAX_TOP_VISITS: usize = 4096;
/// Most processes of one pod tried.
const MAX_MEMBERS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("pod uid {uid:?} is not a Kubernetes uid")]
    BadUid { uid: String },
    #[error("pod {uid}: no cgroup under {root} (tried {tried})")]
    NoCgroup { uid: String, root: PathBuf, tried: String },
    #[error("pod {uid}: no process in its cgroup {dir} or below")]
    NoProcess { uid: String, dir: PathBuf },
    #[error("pod {uid}: {source}")]
    Sandbox { uid: String, source: SandboxError },
    #[error("pod {uid}: reading {path}: {source}")]
    Read { uid: String, path: PathBuf, source: io::Error },
    #[error("pod {uid}: {source}")]
    Open { uid: String, source: InpodError },
}

impl NetnsError {
    /// Whether the pod can never be captured here (its runtime gives it its own kernel).
    pub fn not_capturable(&self) -> bool {
        matches!(self, NetnsError::Sandbox { source: SandboxError::OwnKernel(_), .. })
    }
}

/// Where the kubelet's pod cgroups and the node's processes are seen from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroups {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
}

fn check_uid(uid: &str) -> Result<(), NetnsError> {
    // The uid comes from the API server and becomes part of a path.
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(NetnsError::BadUid { uid: uid.to_owned() })
    }
}

/// Whether a directory name is one of the kubelet's top directories.
fn is_top(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

impl PodCgroups {
    pub fn new(cgroup_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> PodCgroups {
        PodCgroups { cgroup_root: cgroup_root.into(), proc_root: proc_root.into() }
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The directories a pod with `uid` may have below the kubelet's top directory `top` (its
    /// name decides the driver's naming), in the order they are tried.
    pub fn candidates_in(top: &str, uid: &str) -> Result<Vec<PathBuf>, NetnsError> {
        check_uid(uid)?;
        let mut v = Vec::new();
        if let Some(stem) = top.strip_suffix(".slice") {
            let u = uid.replace('-', "_");
            for qos in QOS_DIRS {
                v.push(PathBuf::from(format!("{stem}-{qos}.slice/{stem}-{qos}-pod{u}.slice")));
            }
            v.push(PathBuf::from(format!("{stem}-pod{u}.slice")));
        } else {
            for qos in QOS_DIRS {
                v.push(PathBuf::from(format!("{qos}/pod{uid}")));
            }
            v.push(PathBuf::from(format!("pod{uid}")));
        }
        Ok(v)
    }

    /// The directories a pod with `uid` may have, relative to the cgroup root, when the
    /// kubelet's top directories sit at the root, in the order they are tried.
    pub fn candidates(uid: &str) -> Result<Vec<PathBuf>, NetnsError> {
        let mut v = Vec::new();
        for top in ["kubepods.slice", "kubepods"] {
            v.extend(Self::candidates_in(top, uid)?.into_iter().map(|p| Path::new(top).join(p)));
        }
        Ok(v)
    }

    /// The kubelet's top directories (`kubepods`, `kubepods.slice`, `kubelet-kubepods.slice`)
    /// at or below the cgroup root, breadth first, bounded in depth and in directories
    /// visited; a top directory is not searched below.
    pub fn top_dirs(&self) -> Vec<PathBuf> {
        let mut tops = Vec::new();
        let mut level = vec![self.cgroup_root.clone()];
        let mut visits = 0;
        for _ in 0..MAX_TOP_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                let Ok(children) = subdirs("", &dir) else { continue };
                for child in children {
                    visits += 1;
                    if visits > MAX_TOP_VISITS {
                        return tops;
                    }
                    let name = child.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    if is_top(name) {
                        tops.push(child);
                    } else if !name.contains("pod") {
                        // Not some other pod's cgroup: may hold a custom cgroupRoot.
                        next.push(child);
                    }
                }
            }
            level = next;
        }
        tops
    }

    /// The pod's cgroup directory, looked for below `tops` (see [`PodCgroups::top_dirs`]).
    pub fn pod_dir_in(&self, uid: &str, tops: &[PathBuf]) -> Result<PathBuf, NetnsError> {
        check_uid(uid)?;
        let mut tried = Vec::new();
        for top in tops {
            let name = top.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            for rel in Self::candidates_in(name, uid)? {
                let dir = top.join(rel);
                if dir.is_dir() {
                    return Ok(dir);
                }
                tried.push(
                    dir.strip_prefix(&self.cgroup_root).unwrap_or(&dir).display().to_string(),
                );
            }
        }
        if tried.is_empty() {
            tried.push("no kubepods directory found".into());
        }
        Err(NetnsError::NoCgroup {
            uid: uid.to_owned(),
            root: self.cgroup_root.clone(),
            tried: tried.join(", "),
        })
    }

    /// The pod's cgroup directory.
    pub fn pod_dir(&self, uid: &str) -> Result<PathBuf, NetnsError> {
        self.pod_dir_in(uid, &self.top_dirs())
    }

    /// Every process of the pod's cgroup tree, breadth first (the pod's own directory, then
    /// its containers'), bounded.
    pub fn members(&self, uid: &str) -> Result<(PathBuf, Vec<Member>), NetnsError> {
        let top = self.pod_dir(uid)?;
        let mut members = Vec::new();
        let mut level = vec![top.clone()];
        for _ in 0..=MAX_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                for pid in read_procs(uid, &dir)? {
                    if members.len() < MAX_MEMBERS {
                        members.push(Member { pid, cgroup: dir.clone() });
                    }
                }
                next.extend(subdirs(uid, &dir)?);
            }
            level = next;
        }
        Ok((top, members))
    }

    /// The pod's sandbox process: see [`sandbox::choose`]. `ips` are the pod's addresses when
    /// the API knows them (its namespace must hold them), else empty.
    pub fn sandbox(&self, uid: &str, ips: &[IpAddr]) -> Result<Chosen, NetnsError> {
        let (top, members) = self.members(uid)?;
        if members.is_empty() {
            return Err(NetnsError::NoProcess { uid: uid.to_owned(), dir: top });
        }
        sandbox::choose(&self.proc_root, &members, ips)
            .map_err(|source| NetnsError::Sandbox { uid: uid.to_owned(), source })
    }

    /// Opens the pod's network namespace through its sandbox process.
    pub fn open_sandbox(&self, uid: &str, ips: &[IpAddr]) -> Result<PodNetns, NetnsError> {
        let chosen = self.sandbox(uid, ips)?;
        let path = self.proc_root.join(chosen.pid.to_string()).join("ns/net");
        let netns =
            PodNetns::open(&path).map_err(|source| NetnsError::Open { uid: uid.into(), source })?;
        // The pid could have exited and been reused between reading cgroup.procs and opening
        // its namespace; still being in the pod's cgroup, in the namespace chosen, rules that
        // out.
        let same = sandbox::netns_id(&path).ok() == Some(chosen.netns);
        if !same || !read_procs(uid, &chosen.cgroup)?.contains(&chosen.pid) {
            return Err(NetnsError::NoProcess { uid: uid.to_owned(), dir: chosen.cgroup });
        }
        Ok(netns)
    }

    /// Opens the network namespaces of the pod's processes that are not the host's nor in
    /// `skip`, at most `max` (see [`sandbox::namespaces`]); a process that left its cgroup
    /// between the read and the open is not taken (its pid may be another's by now).
    pub fn open_namespaces(
        &self,
        uid: &str,
        skip: &std::collections::BTreeSet<(u64, u64)>,
        max: usize,
    ) -> Result<Vec<(Chosen, PodNetns)>, NetnsError> {
        let (_, members) = self.members(uid)?;
        let mut out = Vec::new();
        for chosen in sandbox::namespaces(&self.proc_root, &members, skip, max) {
            let path = self.proc_root.join(chosen.pid.to_string()).join("ns/net");
            let netns = PodNetns::open(&path)
                .map_err(|source| NetnsError::Open { uid: uid.into(), source })?;
            let same = sandbox::netns_id(&path).ok() == Some(chosen.netns);
            if same && read_procs(uid, &chosen.cgroup)?.contains(&chosen.pid) {
                out.push((chosen, netns));
            }
        }
        Ok(out)
    }

    /// Opens the pod's network namespace before its IPs are known.
    pub fn open_netns(&self, uid: &str) -> Result<PodNetns, NetnsError> {
        self.open_sandbox(uid, &[])
    }
}

/// `(dev, inode)` of an open namespace, to compare with [`Chosen::netns`].
pub fn open_netns_id(netns: &PodNetns) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    netns.file().metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// The PIDs in `dir/cgroup.procs` (none if the cgroup is gone).
fn read_procs(uid: &str, dir: &Path) -> Result<Vec<u32>, NetnsError> {
    let path = dir.join("cgroup.procs");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NetnsError::Read { uid: uid.to_owned(), path, source }),
    };
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// The child cgroups of `dir`, sorted so the choice is stable.
fn subdirs(uid: &str, dir: &Path) -> Result<Vec<PathBuf>, NetnsError> {
    let read = |source| NetnsError::Read { uid: uid.to_owned(), path: dir.to_owned(), source };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read(e)),
    };
    let mut v = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read)?;
        if entry.file_type().map_err(read)?.is_dir() {
            v.push(entry.path());
        }
    }
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f0e3dad-9990-4c4c-bd6a-1e2b3c4d5e6f";

    #[test]
    fn both_drivers_and_all_qos_classes_are_tried() {
        let c: Vec<String> =
            PodCgroups::candidates(UID).unwrap().iter().map(|p| p.display().to_string()).collect();
        let u = UID.replace('-', "_");
        assert_eq!(
            c,
            [
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
                ),
                format!("kubepods.slice/kubepods-pod{u}.slice"),
                format!("kubepods/burstable/pod{UID}"),
                format!("kubepods/besteffort/pod{UID}"),
                format!("kubepods/pod{UID}"),
            ]
        );
    }

    #[test]
    fn a_uid_cannot_leave_the_cgroup_root() {
        for bad in ["../../etc", "a/b", "", "x y"] {
            let err = PodCgroups::candidates(bad).unwrap_err();
            assert!(matches!(err, NetnsError::BadUid { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn every_process_below_the_pod_is_a_member() {
        // Plain directories stand in for cgroups: only cgroup.procs is read.
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods/besteffort").join(format!("pod{UID}"));
        std::fs::create_dir_all(pod.join("ctr-a")).unwrap();
        std::fs::create_dir_all(pod.join("ctr-b")).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "4000\n").unwrap();
        std::fs::write(pod.join("ctr-b/cgroup.procs"), "4242\n4243\n").unwrap();
        let cg = PodCgroups::new(root.path(), "/proc");
        assert_eq!(cg.pod_dir(UID).unwrap(), pod);
        let (dir, members) = cg.members(UID).unwrap();
        assert_eq!(dir, pod);
        let got: Vec<(u32, PathBuf)> = members.into_iter().map(|m| (m.pid, m.cgroup)).collect();
        assert_eq!(
            got,
            [(4000, pod.clone()), (4242, pod.join("ctr-b")), (4243, pod.join("ctr-b"))]
        );
    }

    #[test]
    fn kind_and_custom_cgroup_roots_are_found_below_the_root() {
        let root = tempfile::tempdir().unwrap();
        let u = UID.replace('-', "_");
        // kind (systemd driver inside the node container).
        let kind = root.path().join(format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{u}.slice"
        ));
        std::fs::create_dir_all(&kind).unwrap();
        // Unrelated trees are searched through, other pods' cgroups are not.
        std::fs::create_dir_all(root.path().join("system.slice/containerd.service")).unwrap();
        let cg = PodCgroups::new(root.path(), "/proc");
        assert_eq!(cg.pod_dir(UID).unwrap(), kind);
        // A custom cgroupRoot (cgroupfs driver) two levels down.
        let other = "0b1c2d3e-0000-4c4c-bd6a-1e2b3c4d5e6f";
        let custom = root.path().join(format!("custom/root/kubepods/pod{other}"));
        std::fs::create_dir_all(&custom).unwrap();
        assert_eq!(cg.pod_dir(other).unwrap(), custom);
        let mut tops = cg.top_dirs();
        tops.sort();
        assert_eq!(
            tops,
            [
                root.path().join("custom/root/kubepods"),
                root.path().join("kubelet.slice/kubelet-kubepods.slice")
            ]
        );
    }

    #[test]
    fn errors_name_the_pod_and_what_is_missing() {
        let root = tempfile::tempdir().unwrap();
        let cg = PodCgroups::new(root.path(), "/proc");
        let err = cg.pod_dir(UID).unwrap_err().to_string();
        assert!(err.contains(UID) && err.contains("no kubepods directory"), "{err}");
        let pod =
            root.path().join(format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_")));
        std::fs::create_dir_all(pod.join("ctr")).unwrap();
        let err = cg.sandbox(UID, &[]).unwrap_err();
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        assert!(err.to_string().contains("no process"), "{err}");
        let other = "0b1c2d3e-0000-4c4c-bd6a-1e2b3c4d5e6f";
        let err = cg.pod_dir(other).unwrap_err().to_string();
        assert!(err.contains("kubepods.slice/kubepods-burstable.slice/"), "{err}");
    }
}
