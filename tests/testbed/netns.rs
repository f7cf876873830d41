//! Named network namespaces, made the way `ip netns add` makes them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where `ip netns` keeps its namespace files (a symlink to /run on most systems).
pub const NETNS_DIR: &str = "/var/run/netns";

/// A bind-mounted network namespace file; unmounted and unlinked on drop.
#[derive(Debug)]
pub struct NetnsFile {
    path: PathBuf,
    removed: bool,
}

impl NetnsFile {
    /// Creates a new, empty network namespace pinned at `NETNS_DIR/<name>`.
    pub fn create(name: &str) -> Result<NetnsFile> {
        fs::create_dir_all(NETNS_DIR).with_context(|| format!("create {NETNS_DIR}"))?;
        let path = Path::new(NETNS_DIR).join(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&path)
            .with_context(|| format!("create netns file {}", path.display()))?;
        // From here on the guard owns the file, so any failure below removes it.
        let guard = NetnsFile { path: path.clone(), removed: false };
        // unshare() on a private thread only moves that thread, never the caller.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .with_context(|| format!("bind-mount netns onto {}", path.display()))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and unlinks the file; idempotent.
    pub fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        remove_netns_file(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for NetnsFile {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("testbed: cleanup of {}: {e:#}", self.path.display());
        }
    }
}

/// Unmounts (lazily, so open fds elsewhere don't block us) and unlinks a
/// namespace file. Missing or already-unmounted files are fine.
pub fn remove_netns_file(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("umount {}", path.display())),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unlink {}", path.display())),
    }
}

/// The namespace inode number behind a namespace file or `/proc/<pid>/ns/net`.
pub fn ns_inode(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.ino())
}

/// Runs `f` on a fresh thread that has entered the network namespace at
/// `netns`. Panics inside `f` propagate to the caller.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    let expected = ns_inode(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", netns.display()))?;
            // Guard against ever configuring the wrong namespace (e.g. the host's).
            let now = ns_inode(Path::new("/proc/thread-self/ns/net"))?;
            if now != expected {
                bail!("setns into {} did not take effect", netns.display());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
