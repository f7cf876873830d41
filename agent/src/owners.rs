//! Which pod each pinned enrollment (netns cookie) belongs to, kept across restarts.
//!
//! The pinned enforcement of a pod (capture entry, inbound program, inbound rules) outlives
//! the agent instance that set it up. A new instance must not release the enforcement of a
//! pod it is meant to enroll just because its own attempt failed, so it has to know whose
//! cookie is whose: every instance writes that mapping to a small state file beside its admin
//! sockets (`--admin-dir`, shared by the instances of a node), atomically. The file only ever
//! *releases* more: a cookie is released when its pod is known to be gone (not wanted on this
//! node any more, or replaced by a pod of a new uid, or enrolled in another namespace) or,
//! when its owner is unknown (no file, a corrupt one, no entry), when its namespace no longer
//! exists. Everything else stays pinned: fail closed.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The state file's name in the admin directory.
pub const FILE: &str = "enrollments.json";
const VERSION: u32 = 1;

/// The pod a cookie was enrolled for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// `name.namespace`.
    pub pod: String,
    /// The Pod's uid (Kubernetes mode): a recreated pod of the same name is another pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// Netns cookie -> owner.
    cookies: BTreeMap<u64, Owner>,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnersError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// serde_json's message names the line and column.
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{path}: version {found} is not {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is not a plain file of uid {uid}: not trusted")]
    NotOurs { path: PathBuf, uid: u32 },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The state file of `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The owners recorded in `dir`. A missing file is an empty map (a first start, or an upgrade
/// from a version without it); a file that cannot be read or parsed is an error, and the
/// caller treats every cookie as of unknown owner.
pub fn load(dir: &Path) -> Result<BTreeMap<u64, Owner>, OwnersError> {
    use std::os::unix::fs::MetadataExt;
    let path = path(dir);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(OwnersError::Read { path, source }),
    };
    // Its entries release enforcement: only a plain file of the agent's own user counts.
    let uid = nix::unistd::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != uid {
        return Err(OwnersError::NotOurs { path, uid });
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|source| OwnersError::Read { path: path.clone(), source })?;
    let file: StateFile = serde_json::from_str(&text)
        .map_err(|source| OwnersError::Parse { path: path.clone(), source })?;
    if file.version != VERSION {
        return Err(OwnersError::Version { path, found: file.version });
    }
    Ok(file.cookies)
}

/// Replaces the state file of `dir` with `owners`, atomically (a reader sees the old file or
/// the new one, never a part).
pub fn save(dir: &Path, owners: &BTreeMap<u64, Owner>) -> Result<(), OwnersError> {
    let path = path(dir);
    let err = |source| OwnersError::Write { path: path.clone(), source };
    let file = StateFile { version: VERSION, cookies: owners.clone() };
    let text = serde_json::to_vec_pretty(&file).map_err(|e| err(e.into()))?;
    // The admin directory may not exist yet (file mode enrolls before the admin socket binds).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| OwnersError::Write { path: dir.to_owned(), source })?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(&text).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(&path).map_err(|e| err(e.error))?;
    Ok(())
}

/// What to do with a pinned cookie this instance has not enrolled itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its pod is meant to be enrolled and is not (yet): keep it closed for that pod.
    HoldFor(String),
    /// Its owner is unknown and its namespace may still exist: keep it as it is.
    KeepUnknown,
    /// Known gone: release it.
    Release(&'static str),
}

/// The pod this node is meant to enroll, as far as a pinned cookie is concerned.
pub struct Wanted<'a> {
    pub uid: Option<&'a str>,
    /// Enrolled by this instance (then in a namespace of its own cookie).
    pub enrolled: bool,
}

/// Decides over a pinned cookie not enrolled by this instance. `wanted` looks up a pod of the
/// node by key; `netns_alive` is whether the cookie's namespace still exists (`None`: cannot
/// tell).
pub fn decide<'a>(
    owner: Option<&Owner>,
    wanted: impl Fn(&str) -> Option<Wanted<'a>>,
    netns_alive: Option<bool>,
) -> Verdict {
    match owner {
        Some(o) => match wanted(&o.pod) {
            None => Verdict::Release("its pod left the node"),
            Some(w) if o.uid.is_some() && w.uid.is_some() && o.uid.as_deref() != w.uid => {
                Verdict::Release("its pod was replaced by a new pod of the same name")
            }
            Some(w) if w.enrolled => Verdict::Release("its pod is enrolled in another namespace"),
            Some(_) if netns_alive == Some(false) => {
                // Nothing can reach a namespace that is gone; the pod's new one (if any) is
                // held closed when enrollment finds it.
                Verdict::Release("its network namespace is gone")
            }
            Some(_) => Verdict::HoldFor(o.pod.clone()),
        },
        None if netns_alive == Some(false) => Verdict::Release("its network namespace is gone"),
        None => Verdict::KeepUnknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(pod: &str, uid: Option<&str>) -> Owner {
        Owner { pod: pod.into(), uid: uid.map(Into::into) }
    }

    #[test]
    fn a_cookie_is_released_only_when_its_pod_is_known_gone() {
        let none = |_: &str| None;
        let wanted = |uid: Option<&'static str>, enrolled| {
            move |k: &str| (k == "a.ns").then_some(Wanted { uid, enrolled })
        };
        let a = owner("a.ns", Some("u1"));
        // Its pod is wanted and not enrolled: held, whatever the namespace looks like.
        assert_eq!(
            decide(Some(&a), wanted(Some("u1"), false), None),
            Verdict::HoldFor("a.ns".into())
        );
        assert_eq!(
            decide(Some(&a), wanted(Some("u1"), false), Some(true)),
            Verdict::HoldFor("a.ns".into())
        );
        assert!(matches!(decide(Some(&a), none, Some(true)), Verdict::Release(_)));
        assert!(matches!(decide(Some(&a), wanted(Some("u2"), false), None), Verdict::Release(_)));
        assert!(matches!(decide(Some(&a), wanted(Some("u1"), true), None), Verdict::Release(_)));
        assert!(matches!(
            decide(Some(&a), wanted(Some("u1"), false), Some(false)),
            Verdict::Release(_)
        ));
        // File mode: no uids.
        let f = owner("a.ns", None);
        assert_eq!(decide(Some(&f), wanted(None, false), None), Verdict::HoldFor("a.ns".into()));
        // Unknown owner: only a namespace that is gone is released.
        assert_eq!(decide(None, none, None), Verdict::KeepUnknown);
        assert_eq!(decide(None, none, Some(true)), Verdict::KeepUnknown);
        assert!(matches!(decide(None, none, Some(false)), Verdict::Release(_)));
    }

    #[test]
    fn the_file_round_trips_and_a_corrupt_one_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let mut m = BTreeMap::new();
        m.insert(42u64, owner("a.ns", Some("u1")));
        m.insert(7u64, owner("b.ns", None));
        save(dir.path(), &m).unwrap();
        assert_eq!(load(dir.path()).unwrap(), m);
        std::fs::write(path(dir.path()), "{\"version\": 1,\n \"cookies\": {\"x\": 1}}").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(FILE) && e.contains("line 2"), "{e}");
        std::fs::write(path(dir.path()), "{\"version\": 9, \"cookies\": {}}").unwrap();
        assert!(matches!(load(dir.path()), Err(OwnersError::Version { found: 9, .. })));
    }
}
