//! Where the cgroup v2 hierarchy is, given the path the operator passed (`--cgroup`,
//! `--cgroup-root`, `--kubelet-cgroup`). The capture programs attach to cgroup v2 only. On a
//! unified node `/sys/fs/cgroup` is the v2 hierarchy; on a hybrid node (cgroup v1 controllers
//! plus v2) it is a tmpfs of v1 hierarchies with v2 mounted at `/sys/fs/cgroup/unified`; on a
//! v1-only node there is no v2 at all. One set of arguments (the DaemonSet's
//! `--cgroup=/host/sys/fs/cgroup`) then works on the first two: a path that is not on cgroup v2
//! is looked for below the `unified` mount of itself or of an ancestor.

use std::path::{Path, PathBuf};

/// Where hybrid systems (systemd, older distributions) mount the v2 hierarchy, below the v1
/// tmpfs.
const HYBRID_DIR: &str = "unified";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cgroup2Error {
    /// The node has no cgroup v2 where the path points (a v1-only node): a property of the
    /// node, not of the arguments.
    #[error("{path} is not on cgroup v2 and no cgroup v2 hierarchy is mounted at {hybrid} (a cgroup v1-only node): the capture programs attach to cgroup v2 only")]
    NoV2 { path: PathBuf, hybrid: PathBuf },
    /// Nothing at the path, on v2 or below a hybrid `unified` mount: a wrong argument.
    #[error("{path}: no such cgroup directory (nor {tried})")]
    Missing { path: PathBuf, tried: String },
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 directory `path` stands for: itself when it is on cgroup v2, else the same
/// place below the hybrid `unified` mount of the nearest ancestor that has one.
pub fn resolve(path: &Path) -> Result<PathBuf, Cgroup2Error> {
    if is_cgroup2(path) {
        return Ok(path.to_owned());
    }
    let mut tried = Vec::new();
    for ancestor in path.ancestors() {
        let unified = ancestor.join(HYBRID_DIR);
        if !is_cgroup2(&unified) {
            continue;
        }
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
    if path.exists() {
        Err(Cgroup2Error::NoV2 { path: path.to_owned(), hybrid: path.join(HYBRID_DIR) })
    } else {
        let tried = if tried.is_empty() {
            "a cgroup v2 hierarchy below it".into()
        } else {
            tried.join(", ")
        };
        Err(Cgroup2Error::Missing { path: path.to_owned(), tried })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_directory_is_itself() {
        let Ok(root) = super::super::self_cgroup::cgroup2_root() else { return };
        assert_eq!(resolve(&root), Ok(root.clone()));
        // A hybrid machine (this one): its v1 tmpfs stands for the v2 hierarchy below it.
        if root.ends_with(HYBRID_DIR) {
            let v1 = root.parent().unwrap();
            assert!(!is_cgroup2(v1));
            assert_eq!(resolve(v1), Ok(root.clone()));
            // A directory below it (`--cgroup=/sys/fs/cgroup/kubepods.slice`), which the v1
            // tmpfs does not have, is found below `unified` too.
            let name = format!("mtls-unit-cgroup2-{}", std::process::id());
            let dir = root.join(&name);
            std::fs::create_dir(&dir).unwrap();
            let found = resolve(&v1.join(&name));
            std::fs::remove_dir(&dir).unwrap();
            assert_eq!(found, Ok(dir));
        }
    }

    #[test]
    fn a_directory_without_cgroup_v2_is_a_v1_node_and_a_missing_one_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let e = resolve(tmp.path()).unwrap_err();
        assert!(matches!(e, Cgroup2Error::NoV2 { .. }), "{e}");
        assert!(e.to_string().contains("cgroup v1-only node"), "{e}");
        let e = resolve(&tmp.path().join("kubepods.slice")).unwrap_err();
        assert!(matches!(e, Cgroup2Error::Missing { .. }), "{e}");
    }
}
