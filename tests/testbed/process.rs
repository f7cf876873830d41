//! Processes started inside pods and nodes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a SIGKILLed process may take to become reapable.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Captured output beyond this per stream is dropped (the pipe is still drained).
const OUTPUT_CAP: usize = 16 << 20;
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The child, shared by its `PodProcess` handle and the test bed's registry so
/// whichever side cleans up first reaps it. `std::process::Child` refuses to
/// signal a child it has already reaped, which rules out hitting a recycled PID.
#[derive(Debug)]
pub(crate) struct ProcShared {
    pid: u32,
    child: Mutex<Child>,
}

impl ProcShared {
    fn child(&self) -> MutexGuard<'_, Child> {
        // A panic while holding the lock leaves the Child itself intact.
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.child().try_wait().with_context(|| format!("waitpid {}", self.pid))
    }

    /// SIGKILL (unless already reaped) and reap, bounded by `REAP_TIMEOUT`.
    pub(crate) fn kill_and_reap(&self) -> Result<ExitStatus> {
        let mut child = self.child();
        if let Some(status) = child.try_wait().with_context(|| format!("waitpid {}", self.pid))? {
            return Ok(status);
        }
        child.kill().with_context(|| format!("kill pid {}", self.pid))?;
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            if let Some(status) =
                child.try_wait().with_context(|| format!("waitpid {}", self.pid))?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("pid {} not reapable {REAP_TIMEOUT:?} after SIGKILL", self.pid);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

#[derive(Default)]
struct StreamState {
    data: Vec<u8>,
    eof: bool,
}

/// One captured output stream, filled by a background reader thread.
#[derive(Default)]
struct Stream {
    state: Mutex<StreamState>,
    changed: Condvar,
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `src` to EOF on a detached thread; detached because a grandchild
    /// may keep the pipe open after our child is gone.
    fn start(src: impl Read + Send + 'static, name: String) -> Result<Arc<Stream>> {
        let stream = Arc::new(Stream::default());
        let sink = Arc::clone(&stream);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || sink.pump(src))
            .context("spawn output reader thread")?;
        Ok(stream)
    }

    fn pump(&self, mut src: impl Read) {
        let mut buf = [0u8; 8192];
        loop {
            let n = match src.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            let mut state = self.lock();
            if n == 0 {
                state.eof = true;
            } else {
                let room = OUTPUT_CAP.saturating_sub(state.data.len());
                state.data.extend_from_slice(&buf[..n.min(room)]);
            }
            let eof = state.eof;
            drop(state);
            self.changed.notify_all();
            if eof {
                return;
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Waits until EOF or `deadline`.
    fn wait_eof(&self, deadline: Instant) {
        let mut state = self.lock();
        while !state.eof {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A process started by the test bed in a pod or node. stdin is /dev/null;
/// stdout and stderr are captured (up to 16 MiB each). Dropping the handle
/// SIGKILLs and reaps the process.
pub struct PodProcess {
    label: String,
    shared: Arc<ProcShared>,
    stdout: Arc<Stream>,
    stderr: Arc<Stream>,
}

impl std::fmt::Debug for PodProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodProcess")
            .field("label", &self.label)
            .field("pid", &self.shared.pid)
            .finish()
    }
}

/// Spawns `cmd` so that, in the child before exec, it joins the cgroup whose
/// `cgroup.procs` is given (if any) and then the network namespace `netns`.
pub(crate) fn spawn(
    mut cmd: Command,
    cgroup_procs: Option<&Path>,
    netns: &Path,
    label: String,
) -> Result<(PodProcess, Arc<ProcShared>)> {
    // Opened (close-on-exec) before fork: the child may only make raw syscalls.
    let netns_file =
        File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    let cgroup_file = cgroup_procs
        .map(|p| {
            OpenOptions::new().write(true).open(p).with_context(|| format!("open {}", p.display()))
        })
        .transpose()?;
    let netns_fd = netns_file.as_raw_fd();
    let cgroup_fd = cgroup_file.as_ref().map(|f| f.as_raw_fd());

    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure only calls write(2) and setns(2) on fds that stay
    // open in the parent until spawn() returns; both are async-signal-safe and
    // nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_fd {
                // Writing "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("spawn {label}: {cmd:?}"))?;
    drop((netns_file, cgroup_file));

    let pid = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let shared = Arc::new(ProcShared { pid, child: Mutex::new(child) });
    // Until the handle exists, make sure an error here does not leak the child.
    let streams = (|| -> Result<(Arc<Stream>, Arc<Stream>)> {
        let out = stdout.context("stdout pipe missing")?;
        let err = stderr.context("stderr pipe missing")?;
        Ok((
            Stream::start(out, format!("stdout-{pid}"))?,
            Stream::start(err, format!("stderr-{pid}"))?,
        ))
    })();
    let (stdout, stderr) = match streams {
        Ok(s) => s,
        Err(e) => {
            let _ = shared.kill_and_reap();
            return Err(e);
        }
    };
    let process = PodProcess { label, shared: Arc::clone(&shared), stdout, stderr };
    Ok((process, shared))
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// SIGKILL and reap (no-op if it already exited and was reaped).
    pub fn kill(&mut self) -> Result<()> {
        self.shared.kill_and_reap().map(drop)
    }

    /// Exit status if the process has exited (reaps it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.shared.try_wait()
    }

    /// stdout captured so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.snapshot()).into_owned()
    }

    /// stderr captured so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.snapshot()).into_owned()
    }

    /// Waits until a stdout line contains `needle` and returns that line (e.g.
    /// `wait_for_stdout("listening", ..)` for e2e-tool servers). Fails at the
    /// timeout or as soon as stdout is closed without a match.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.lock();
        loop {
            let text = String::from_utf8_lossy(&state.data);
            // Only complete lines, so callers never see half a line.
            let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
            if let Some(line) = complete.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if state.eof {
                drop(state);
                bail!(
                    "{}: stdout closed without {needle:?}; stdout: {:?}; stderr: {:?}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                );
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                drop(state);
                bail!(
                    "{}: no {needle:?} on stdout within {timeout:?}; stdout: {:?}; stderr: {:?}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                );
            };
            state =
                self.stdout.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits (bounded) for the process to exit and returns its status and
    /// output. At the timeout the process is killed and an error carrying the
    /// output so far is returned.
    pub fn wait_with_output(self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.shared.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                self.shared.kill_and_reap()?;
                bail!(
                    "{}: still running after {timeout:?} (killed); stdout: {:?}; stderr: {:?}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        // Output written just before exit may still sit in the pipe.
        let drain_deadline = deadline.max(Instant::now() + Duration::from_millis(500));
        self.stdout.wait_eof(drain_deadline);
        self.stderr.wait_eof(drain_deadline);
        Ok(Output { status, stdout: self.stdout.snapshot(), stderr: self.stderr.snapshot() })
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Err(e) = self.shared.kill_and_reap() {
            eprintln!("testbed: {}: {e:#}", self.label);
        }
    }
}
