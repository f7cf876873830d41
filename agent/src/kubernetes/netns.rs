//! A pod's network namespace without a CNI plugin: `/proc/<pid>/ns/net` of a process in the
//! pod's cgroup, which the kubelet names after the pod's uid.
//!
//! The kubelet's layouts under the cgroup v2 root, for QoS class `burstable` or `besteffort`
//! (guaranteed pods sit directly under the top directory):
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`, with
//!   the uid's `-` written as `_`;
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>`.
//!
//! The pod's processes live in its containers' cgroups below that directory; every one of them
//! shares the pod's network namespace, so any will do. The namespace is opened once and the
//! file kept, so the pod stays enrolled whichever of its processes exits later.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::inpod::{InpodError, PodNetns};

/// QoS classes that get their own directory, in the order they are looked for.
const QOS_DIRS: [&str; 2] = ["burstable", "besteffort"];
/// How deep below the pod's directory processes are looked for (container scopes and the
/// runtime's own sub-cgroups).
const MAX_DEPTH: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("pod uid {uid:?} is not a Kubernetes uid")]
    BadUid { uid: String },
    #[error("pod {uid}: no cgroup under {root} (tried {tried})")]
    NoCgroup { uid: String, root: PathBuf, tried: String },
    #[error("pod {uid}: no process in its cgroup {dir} or below")]
    NoProcess { uid: String, dir: PathBuf },
    #[error("pod {uid}: reading {path}: {source}")]
    Read { uid: String, path: PathBuf, source: io::Error },
    #[error("pod {uid}: {source}")]
    Open { uid: String, source: InpodError },
}

/// Where the kubelet's pod cgroups and the node's processes are seen from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroups {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
}

impl PodCgroups {
    pub fn new(cgroup_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> PodCgroups {
        PodCgroups { cgroup_root: cgroup_root.into(), proc_root: proc_root.into() }
    }

    /// The directories a pod with `uid` may have, relative to the cgroup root, in the order
    /// they are tried.
    pub fn candidates(uid: &str) -> Result<Vec<PathBuf>, NetnsError> {
        // The uid comes from the API server and becomes part of a path.
        let valid = !uid.is_empty()
            && uid.len() <= 64
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(NetnsError::BadUid { uid: uid.to_owned() });
        }
        let systemd_uid = uid.replace('-', "_");
        let mut v = Vec::new();
        for qos in QOS_DIRS {
            v.push(PathBuf::from(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{systemd_uid}.slice"
            )));
        }
        v.push(PathBuf::from(format!("kubepods.slice/kubepods-pod{systemd_uid}.slice")));
        for qos in QOS_DIRS {
            v.push(PathBuf::from(format!("kubepods/{qos}/pod{uid}")));
        }
        v.push(PathBuf::from(format!("kubepods/pod{uid}")));
        Ok(v)
    }

    /// The pod's cgroup directory.
    pub fn pod_dir(&self, uid: &str) -> Result<PathBuf, NetnsError> {
        let candidates = Self::candidates(uid)?;
        for rel in &candidates {
            let dir = self.cgroup_root.join(rel);
            if dir.is_dir() {
                return Ok(dir);
            }
        }
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        Err(NetnsError::NoCgroup {
            uid: uid.to_owned(),
            root: self.cgroup_root.clone(),
            tried: tried.join(", "),
        })
    }

    /// A process of the pod and the cgroup it was found in.
    pub fn pod_process(&self, uid: &str) -> Result<(u32, PathBuf), NetnsError> {
        let top = self.pod_dir(uid)?;
        let mut level = vec![top.clone()];
        for _ in 0..=MAX_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                if let Some(pid) = read_procs(uid, &dir)?.first() {
                    return Ok((*pid, dir));
                }
                next.extend(subdirs(uid, &dir)?);
            }
            level = next;
        }
        Err(NetnsError::NoProcess { uid: uid.to_owned(), dir: top })
    }

    /// Opens the pod's network namespace through one of its processes.
    pub fn open_netns(&self, uid: &str) -> Result<PodNetns, NetnsError> {
        let (pid, dir) = self.pod_process(uid)?;
        let path = self.proc_root.join(pid.to_string()).join("ns/net");
        let netns =
            PodNetns::open(&path).map_err(|source| NetnsError::Open { uid: uid.into(), source })?;
        // The pid could have exited and been reused between reading cgroup.procs and opening
        // its namespace; still being in the pod's cgroup rules that out.
        if !read_procs(uid, &dir)?.contains(&pid) {
            return Err(NetnsError::NoProcess { uid: uid.to_owned(), dir });
        }
        Ok(netns)
    }
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
    fn a_process_is_found_in_a_container_below_the_pod() {
        // Plain directories stand in for cgroups: only cgroup.procs is read.
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods/besteffort").join(format!("pod{UID}"));
        std::fs::create_dir_all(pod.join("ctr-a")).unwrap();
        std::fs::create_dir_all(pod.join("ctr-b")).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        std::fs::write(pod.join("ctr-b/cgroup.procs"), "4242\n4243\n").unwrap();
        let cg = PodCgroups::new(root.path(), "/proc");
        assert_eq!(cg.pod_dir(UID).unwrap(), pod);
        assert_eq!(cg.pod_process(UID).unwrap(), (4242, pod.join("ctr-b")));
    }

    #[test]
    fn errors_name_the_pod_and_what_is_missing() {
        let root = tempfile::tempdir().unwrap();
        let cg = PodCgroups::new(root.path(), "/proc");
        let err = cg.pod_process(UID).unwrap_err().to_string();
        assert!(err.contains(UID) && err.contains("kubepods/pod"), "{err}");
        let pod =
            root.path().join(format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_")));
        std::fs::create_dir_all(pod.join("ctr")).unwrap();
        let err = cg.pod_process(UID).unwrap_err();
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        assert!(err.to_string().contains("no process"), "{err}");
    }
}
