//! Where the cgroup v2 hierarchy is, given the path the operator passed (`--cgroup`,
//! `--cgroup-root`, `--kubelet-cgroup`). The capture programs attach to cgroup v2 only. On a
//! unified node `/sys/fs/cgroup` is the v2 hierarchy; on a hybrid node (cgroup v1 controllers
//! plus v2) it is a tmpfs of v1 hierarchies with v2 mounted at `/sys/fs/cgroup/unified`; on a
//! v1-only node there is no v2 at all. One set of arguments (the DaemonSet's
//! `--cgroup=/host/sys/fs/cgroup`) then works on the first two: a path that is not on cgroup v2
//! is looked for below the `unified` mount of itself or of an ancestor.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where hybrid systems (systemd, older distributions) mount the v2 hierarchy, below the v1
/// tmpfs.
const HYBRID_DIR: &str = "unified";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cgroup2Error {
    /// No cgroup v2 is mounted anywhere on the node (a v1-only node): a property of the node,
    /// not of the arguments.
    #[error("{flag}={path} is not on cgroup v2 and no cgroup v2 hierarchy is mounted on this node, at {hybrid} or anywhere else (a cgroup v1-only node): the capture programs attach to cgroup v2 only")]
    NoV2 { flag: &'static str, path: PathBuf, hybrid: PathBuf },
    /// Nothing at the path, on v2 or below a hybrid `unified` mount: a wrong argument.
    #[error("{flag}={path}: no such cgroup directory (nor {tried})")]
    Missing { flag: &'static str, path: PathBuf, tried: String },
    /// The path is not on cgroup v2 although the node has cgroup v2: a wrong argument.
    #[error("{flag}={path} is not a cgroup v2 directory, and none stands for it below a hybrid `unified` mount ({tried}), though this node has cgroup v2 (mounted at {v2}): give a directory of that hierarchy")]
    NotV2 { flag: &'static str, path: PathBuf, tried: String, v2: String },
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Whether `dir` is where a filesystem is mounted (its device differs from its parent's).
fn is_mount_point(dir: &Path) -> bool {
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
    match (dev(dir), dir.parent()) {
        (Ok(d), Some(parent)) => dev(parent).map_or(true, |p| p != d),
        _ => true,
    }
}

/// The cgroup v2 directory `path` (the value of `flag`) stands for: itself when it is on
/// cgroup v2, else the same place below the hybrid `unified` mount of the nearest ancestor
/// that has one.
pub fn resolve(flag: &'static str, path: &Path) -> Result<PathBuf, Cgroup2Error> {
    resolve_on(flag, path, node_cgroup2)
}

/// Where this node has cgroup v2 mounted; `None` on a v1-only node. An unreadable mountinfo
/// counts as "has v2": a wrong argument exits, a v1-only node would be served as refused.
fn node_cgroup2() -> Option<String> {
    match super::self_cgroup::any_cgroup2_mount() {
        Ok(m) => m.map(|m| m.display().to_string()),
        Err(e) => Some(format!("unknown: {e}")),
    }
}

fn resolve_on(
    flag: &'static str,
    path: &Path,
    node_v2: fn() -> Option<String>,
) -> Result<PathBuf, Cgroup2Error> {
    if is_cgroup2(path) {
        return Ok(path.to_owned());
    }
    let mut tried = Vec::new();
    for ancestor in path.ancestors() {
        if !ancestor.exists() {
            continue;
        }
        // A `unified` below a cgroup v2 directory is an ordinary child cgroup, not a hybrid
        // mount; and the hybrid mount sits on the v1 tmpfs, never above its mount point.
        let unified = ancestor.join(HYBRID_DIR);
        if !is_cgroup2(ancestor) && is_cgroup2(&unified) && is_mount_point(&unified) {
            let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
            let candidate = unified.join(rest);
            if is_cgroup2(&candidate) {
                tracing::info!(
                    given = %path.display(),
                    v2 = %candidate.display(),
                    "cgroup v1/hybrid node: using the cgroup v2 hierarchy below it"
                );
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
        if is_mount_point(ancestor) {
            break;
        }
    }
    let tried_text = || {
        if tried.is_empty() {
            "a cgroup v2 hierarchy below it".to_owned()
        } else {
            tried.join(", ")
        }
    };
    if !path.exists() {
        return Err(Cgroup2Error::Missing { flag, path: path.to_owned(), tried: tried_text() });
    }
    match node_v2() {
        None => {
            Err(Cgroup2Error::NoV2 { flag, path: path.to_owned(), hybrid: path.join(HYBRID_DIR) })
        }
        Some(v2) => {
            Err(Cgroup2Error::NotV2 { flag, path: path.to_owned(), tried: tried_text(), v2 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAG: &str = "--cgroup";

    #[test]
    fn a_v2_directory_is_itself() {
        let Ok(root) = super::super::self_cgroup::cgroup2_root() else { return };
        assert_eq!(resolve(FLAG, &root), Ok(root.clone()));
        // A hybrid machine (this one): its v1 tmpfs stands for the v2 hierarchy below it.
        if root.ends_with(HYBRID_DIR) {
            let v1 = root.parent().unwrap();
            assert!(!is_cgroup2(v1));
            assert_eq!(resolve(FLAG, v1), Ok(root.clone()));
            // A directory below it (`--cgroup=/sys/fs/cgroup/kubepods.slice`), which the v1
            // tmpfs does not have, is found below `unified` too.
            let name = format!("mtls-unit-cgroup2-{}", std::process::id());
            let dir = root.join(&name);
            std::fs::create_dir(&dir).unwrap();
            let found = resolve(FLAG, &v1.join(&name));
            std::fs::remove_dir(&dir).unwrap();
            assert_eq!(found, Ok(dir));
        }
    }

    #[test]
    fn a_v1_only_node_is_refused_and_a_wrong_path_on_a_v2_node_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        // No cgroup2 mount anywhere: the node's property.
        let e = resolve_on(FLAG, tmp.path(), || None).unwrap_err();
        assert!(matches!(e, Cgroup2Error::NoV2 { .. }), "{e}");
        assert!(e.to_string().contains("cgroup v1-only node"), "{e}");
        // The same directory on a node that has cgroup v2 (this one): a wrong argument, named.
        let e = resolve(FLAG, tmp.path()).unwrap_err();
        assert!(matches!(e, Cgroup2Error::NotV2 { .. }), "{e}");
        let text = e.to_string();
        assert!(!text.contains("v1-only"), "{text}");
        assert!(text.starts_with(&format!("--cgroup={}", tmp.path().display())), "{text}");
        let e = resolve_on(FLAG, &tmp.path().join("kubepods.slice"), || None).unwrap_err();
        assert!(matches!(e, Cgroup2Error::Missing { .. }), "{e}");
    }

    #[test]
    fn a_v2_child_cgroup_named_unified_is_not_a_hybrid_mount() {
        let Ok(root) = super::super::self_cgroup::cgroup2_root() else { return };
        // A v2 cgroup with an ordinary child named `unified`, holding `x`; `--cgroup=<it>/x`
        // (a typo: there is no such child) must not be taken for `<it>/unified/x`.
        let parent = root.join(format!("mtls-unit-unified-{}", std::process::id()));
        let x = parent.join(HYBRID_DIR).join("x");
        std::fs::create_dir_all(&x).unwrap();
        let got = resolve(FLAG, &parent.join("x"));
        for d in [x.as_path(), x.parent().unwrap(), parent.as_path()] {
            std::fs::remove_dir(d).unwrap();
        }
        let e = got.unwrap_err();
        assert!(matches!(e, Cgroup2Error::Missing { .. }), "{e}");
    }
}
