//! cgroup v2 directories for nodes and pods.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long we wait for killed members to leave a cgroup / for rmdir to succeed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Mount point of the cgroup v2 hierarchy, found in /proc/self/mountinfo
/// (/sys/fs/cgroup on unified systems, /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    for line in info.lines() {
        // Fields: id parent dev root mountpoint opts [optional...] - fstype source superopts
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = pre.split(' ').collect();
        // Only a mount of the hierarchy's root gives paths that match /proc/<pid>/cgroup.
        if fields.get(3) != Some(&"/") {
            continue;
        }
        if let Some(mount_point) = fields.get(4) {
            return Ok(PathBuf::from(unescape_mountinfo(mount_point)));
        }
    }
    bail!("no cgroup2 mount found in /proc/self/mountinfo")
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup path of `path` relative to the cgroup2 root, as it appears in
/// `/proc/<pid>/cgroup` ("0::/a/b").
pub fn relative_path(root: &Path, path: &Path) -> Result<String> {
    let rel = path
        .strip_prefix(root)
        .with_context(|| format!("{} is not under {}", path.display(), root.display()))?;
    Ok(format!("/{}", rel.display()))
}

/// A cgroup directory we created; removed (after its members are gone) on drop.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
    removed: bool,
}

impl CgroupDir {
    pub fn create(path: PathBuf) -> Result<CgroupDir> {
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(CgroupDir { path, removed: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills whatever is still inside (only processes our test bed put there,
    /// or their descendants), then removes the directory; idempotent.
    pub fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        kill_members(&self.path)?;
        rmdir_retrying(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("testbed: cleanup of {}: {e:#}", self.path.display());
        }
    }
}

/// PIDs listed in `<dir>/cgroup.procs`; empty if the directory is gone.
pub fn members(dir: &Path) -> Result<Vec<i32>> {
    let file = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", file.display())),
    };
    text.lines()
        .map(|l| {
            l.trim().parse::<i32>().with_context(|| format!("bad pid {l:?} in {}", file.display()))
        })
        .collect()
}

/// SIGKILLs every member of `dir` by PID and waits (bounded) until it is empty.
pub fn kill_members(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let pids = members(dir)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} did not leave {}", dir.display());
        }
        for pid in pids {
            // ESRCH just means it exited meanwhile.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// rmdir that tolerates the short window in which a just-killed member still
/// pins the cgroup.
pub fn rmdir_retrying(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// Removes a cgroup subtree bottom-up (for leftovers of dead test runs).
pub fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("read {}", dir.display()))?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    kill_members(dir)?;
    rmdir_retrying(dir)
}
