//! Where the pinned maps of each layout version live, and which versions a node's bpffs
//! directory holds.
//!
//! bpffs holds pins and directories only (no regular files), so the version is the directory:
//! `maps/v<N>/<NAME>` for version N >= 2; pins straight under `maps/` are version 1, the
//! layout before versions were recorded.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use mtls_agent_ebpf::LAYOUT_VERSION;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading the pinned maps' directory {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} holds the pinned maps of layout v{found}, newer than this agent's v{ours}: \
         refusing to run over them (a downgrade). The newer programs stay attached and keep \
         enforcing; run the newer agent again, or remove every pin with `mtls-agent uninstall` \
         before starting this one"
    )]
    Newer { path: PathBuf, found: u32, ours: u32 },
    #[error("staging this layout's maps in {path}: {source}")]
    Stage { path: PathBuf, source: io::Error },
}

/// The directory of this version's map pins.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    version_dir(bpffs, LAYOUT_VERSION)
}

/// The directory of the map pins of layout `version`.
pub fn version_dir(bpffs: &Path, version: u32) -> PathBuf {
    let base = bpffs.join("maps");
    if version <= 1 {
        base
    } else {
        base.join(format!("v{version}"))
    }
}

/// Where this layout's maps are made when they take over an older layout's state: renamed to
/// [`maps_dir`] only once the copy is done, so `maps/v<N>` existing means "taken over" and a
/// restart mid-handover never copies the older (stale) state over live maps again. bpffs
/// forbids dots in names.
pub fn staging_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps").join(format!("staging_v{LAYOUT_VERSION}"))
}

/// Makes an empty staging directory, emptying one a start that crashed mid-copy left.
pub fn start_staging(bpffs: &Path) -> Result<PathBuf, LayoutError> {
    let dir = staging_dir(bpffs);
    let err = |source| LayoutError::Stage { path: dir.clone(), source };
    if dir.exists() {
        for entry in fs::read_dir(&dir).map_err(err)? {
            fs::remove_file(entry.map_err(err)?.path()).map_err(err)?;
        }
        info!(dir = %dir.display(), "emptied the maps of a take-over a crash interrupted");
    } else {
        fs::create_dir_all(&dir).map_err(err)?;
    }
    Ok(dir)
}

/// Turns the staged maps (the older layout's state copied in) into this layout's.
pub fn commit_staging(bpffs: &Path) -> Result<(), LayoutError> {
    let (from, to) = (staging_dir(bpffs), maps_dir(bpffs));
    fs::rename(&from, &to).map_err(|source| LayoutError::Stage { path: to, source })
}

/// Older layouts whose pins a node's bpffs directory holds (ascending), or the refusal of a
/// newer one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub older: Vec<u32>,
}

/// Reads `<bpffs>/maps`: a pin there is layout 1, a directory `v<N>` is layout N. Other
/// directories are left alone (not ours to judge or remove).
pub fn inspect(bpffs: &Path) -> Result<Found, LayoutError> {
    let base = bpffs.join("maps");
    let entries = match fs::read_dir(&base) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::default()),
        Err(source) => return Err(LayoutError::Read { path: base, source }),
    };
    let mut older = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LayoutError::Read { path: base.clone(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let version = if !is_dir {
            1
        } else {
            match name.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()) {
                Some(v) if v >= 2 => v,
                // Made again by the start that needs it.
                _ if name.starts_with("staging_v") => continue,
                _ => {
                    warn!(path = %entry.path().display(), "not a layout directory; left alone");
                    continue;
                }
            }
        };
        if version > LAYOUT_VERSION {
            return Err(LayoutError::Newer {
                path: entry.path(),
                found: version,
                ours: LAYOUT_VERSION,
            });
        }
        if version < LAYOUT_VERSION && !older.contains(&version) {
            older.push(version);
        }
    }
    older.sort_unstable();
    Ok(Found { older })
}

/// Removes the pins of layout `version` (a map lives on while a program still holds it: only
/// the names go). Returns how many were removed.
pub fn remove_version(bpffs: &Path, version: u32) -> usize {
    let dir = version_dir(bpffs, version);
    let Ok(rd) = fs::read_dir(&dir) else { return 0 };
    let mut removed = 0;
    for entry in rd.flatten() {
        // Version 1's pins share `maps/` with the directories of the later versions.
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(true) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => warn!(path = %entry.path().display(), "removing an old layout's pin: {e}"),
        }
    }
    if version > 1 {
        if let Err(e) = fs::remove_dir(&dir) {
            warn!(path = %dir.display(), "removing an old layout's directory: {e}");
        }
    }
    info!(version, removed, "removed the pins of an older map layout");
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_under_maps_are_v1_version_dirs_say_theirs_and_a_newer_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let bpffs = tmp.path();
        assert_eq!(inspect(bpffs).unwrap(), Found::default(), "a fresh node");
        fs::create_dir_all(maps_dir(bpffs)).unwrap();
        fs::write(maps_dir(bpffs).join("ENROLLED_PODS"), b"").unwrap();
        assert_eq!(inspect(bpffs).unwrap(), Found::default(), "this version only");
        fs::write(bpffs.join("maps/ENROLLED_PODS"), b"").unwrap();
        fs::create_dir(bpffs.join("maps/not-a-version")).unwrap();
        assert_eq!(inspect(bpffs).unwrap(), Found { older: vec![1] });

        assert_eq!(remove_version(bpffs, 1), 1);
        assert!(maps_dir(bpffs).join("ENROLLED_PODS").exists(), "this version's pins stay");
        assert!(bpffs.join("maps/not-a-version").exists());
        assert_eq!(inspect(bpffs).unwrap(), Found::default());

        let newer = bpffs.join(format!("maps/v{}", LAYOUT_VERSION + 1));
        fs::create_dir(&newer).unwrap();
        let err = inspect(bpffs).unwrap_err().to_string();
        assert!(err.contains(&newer.display().to_string()), "{err}");
        assert!(err.contains(&format!("newer than this agent's v{LAYOUT_VERSION}")), "{err}");
    }

    #[test]
    fn staged_maps_become_this_layouts_only_when_committed_and_a_leftover_is_emptied() {
        let tmp = tempfile::tempdir().unwrap();
        let bpffs = tmp.path();
        fs::create_dir_all(bpffs.join("maps")).unwrap();
        fs::write(bpffs.join("maps/ENROLLED_PODS"), b"").unwrap();
        // A start that crashed mid-copy: its half-filled maps are not this layout's.
        let dir = start_staging(bpffs).unwrap();
        fs::write(dir.join("INBOUND_RULES"), b"half").unwrap();
        assert!(!maps_dir(bpffs).exists(), "staged maps count as taken over");
        assert_eq!(inspect(bpffs).unwrap(), Found { older: vec![1] }, "staging is no layout");
        // The next start begins again from nothing.
        let dir = start_staging(bpffs).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "a leftover map was kept");
        fs::write(dir.join("INBOUND_RULES"), b"copied").unwrap();
        commit_staging(bpffs).unwrap();
        assert_eq!(fs::read(maps_dir(bpffs).join("INBOUND_RULES")).unwrap(), b"copied");
        assert!(!staging_dir(bpffs).exists());
    }
}
