//! The agent's own cgroup v2 and its id, which the capture programs compare with
//! `bpf_get_current_cgroup_id()` to leave the agent's own connect()s alone.
//!
//! The id of a cgroup v2 directory is its inode number on the cgroup2 filesystem (kernfs), and
//! also the 64-bit file handle `name_to_handle_at` gives for it: both are read and must agree,
//! so a wrong mount (a cgroup v1 hierarchy, an unrelated directory) is caught at start.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum SelfCgroupError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no cgroup v2 line (`0::/...`): the agent needs the unified hierarchy")]
    NoUnifiedLine { path: PathBuf },
    #[error("{path}: no cgroup2 mount of the hierarchy's root")]
    NoCgroup2Mount { path: PathBuf },
    #[error("cgroup {path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("cgroup {path}: inode {inode} and kernel cgroup id {kernel} differ")]
    Mismatch { path: PathBuf, inode: u64, kernel: u64 },
}

/// The cgroup v2 directory the calling process runs in, and its id.
pub fn own_cgroup() -> Result<(PathBuf, u64), SelfCgroupError> {
    let read = |p: &str| {
        fs::read_to_string(p).map_err(|source| SelfCgroupError::Read { path: p.into(), source })
    };
    let cgroups = read("/proc/self/cgroup")?;
    let rel = unified_path(&cgroups)
        .ok_or_else(|| SelfCgroupError::NoUnifiedLine { path: "/proc/self/cgroup".into() })?;
    let root = cgroup2_root()?;
    let dir = root.join(rel.trim_start_matches('/'));
    let id = cgroup_id(&dir)?;
    Ok((dir, id))
}

/// Where the cgroup v2 hierarchy's root is mounted.
pub fn cgroup2_root() -> Result<PathBuf, SelfCgroupError> {
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path)
        .map_err(|source| SelfCgroupError::Read { path: path.into(), source })?;
    cgroup2_mount(&text).ok_or_else(|| SelfCgroupError::NoCgroup2Mount { path: path.into() })
}

/// The id of the cgroup v2 directory `dir`, as `bpf_get_current_cgroup_id` reports it for its
/// member tasks.
pub fn cgroup_id(dir: &Path) -> Result<u64, SelfCgroupError> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let stat_err = |source| SelfCgroupError::Stat { path: dir.to_owned(), source };
    let fs_type = nix::sys::statfs::statfs(dir)
        .map_err(|e| stat_err(std::io::Error::from(e)))?
        .filesystem_type()
        .0 as i64;
    if fs_type != CGROUP2_SUPER_MAGIC {
        return Err(SelfCgroupError::NotCgroup2 { path: dir.to_owned() });
    }
    let inode = fs::metadata(dir).map_err(stat_err)?.ino();
    let kernel = handle_id(dir).map_err(stat_err)?;
    if inode != kernel {
        return Err(SelfCgroupError::Mismatch { path: dir.to_owned(), inode, kernel });
    }
    Ok(kernel)
}

/// `name_to_handle_at` of a cgroupfs directory: its 8-byte handle is the kernel's cgroup id.
fn handle_id(dir: &Path) -> std::io::Result<u64> {
    #[repr(C)]
    struct FileHandle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; 8],
    }
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut fh = FileHandle { handle_bytes: 8, handle_type: 0, f_handle: [0; 8] };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: a NUL-terminated path and a handle buffer whose size is in `handle_bytes`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            (&mut fh as *mut FileHandle).cast::<libc::c_void>(),
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if fh.handle_bytes != 8 {
        return Err(std::io::Error::other(format!(
            "a {}-byte file handle: not a cgroup v2 directory",
            fh.handle_bytes
        )));
    }
    Ok(u64::from_ne_bytes(fh.f_handle))
}

/// The path of the `0::` line of a `/proc/<pid>/cgroup`.
fn unified_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim_end)
}

/// Mount point of the cgroup2 hierarchy's root in a mountinfo text (/sys/fs/cgroup on unified
/// hosts, /sys/fs/cgroup/unified on hybrid ones).
fn cgroup2_mount(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // Fields: id parent dev root mountpoint opts [optional...] - fstype source superopts
        let (pre, post) = line.split_once(" - ")?;
        if post.split(' ').next() != Some("cgroup2") {
            return None;
        }
        let fields: Vec<&str> = pre.split(' ').collect();
        // Only a mount of the hierarchy's root gives paths that match /proc/self/cgroup.
        if fields.get(3) != Some(&"/") {
            return None;
        }
        fields.get(4).map(|m| PathBuf::from(unescape(m)))
    })
}

/// Where some cgroup v2 hierarchy is mounted (of its root or not), from /proc/self/mountinfo:
/// `None` only on a node without cgroup v2 (v1-only). An unreadable mountinfo is an error.
pub fn any_cgroup2_mount() -> Result<Option<PathBuf>, SelfCgroupError> {
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path)
        .map_err(|source| SelfCgroupError::Read { path: path.into(), source })?;
    Ok(first_cgroup2_mount(&text))
}

fn first_cgroup2_mount(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split(' ').next() != Some("cgroup2") {
            return None;
        }
        pre.split(' ').nth(4).map(|m| PathBuf::from(unescape(m)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_line_on_hybrid_hosts() {
        let text = "12:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice/x\n0::/a/b c\n";
        assert_eq!(unified_path(text), Some("/a/b c"));
        assert_eq!(unified_path("3:memory:/x\n"), None);
    }

    #[test]
    fn finds_the_cgroup2_root_mount_only() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 /sub /mnt/sub rw - cgroup2 cgroup2 rw
32 30 0:27 / /sys/fs/cgroup/uni\\040fied rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
33 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(cgroup2_mount(text), Some(PathBuf::from("/sys/fs/cgroup/uni fied")));
        assert_eq!(cgroup2_mount("33 30 0:28 / /x rw - cgroup cgroup rw\n"), None);
        // Any cgroup2 mount says the node has cgroup v2, of its root or not.
        assert_eq!(first_cgroup2_mount(text), Some(PathBuf::from("/mnt/sub")));
        assert_eq!(first_cgroup2_mount("33 30 0:28 / /x rw - cgroup cgroup rw\n"), None);
    }

    #[test]
    fn own_cgroup_id_is_the_inode_and_the_kernel_handle() {
        let (dir, id) = own_cgroup().unwrap();
        assert!(dir.is_dir(), "{}", dir.display());
        assert_eq!(id, fs::metadata(&dir).unwrap().ino());
    }

    #[test]
    fn a_directory_outside_cgroupfs_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = cgroup_id(tmp.path()).unwrap_err();
        assert!(matches!(err, SelfCgroupError::NotCgroup2 { .. }), "{err}");
    }
}
