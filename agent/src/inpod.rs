//! In-pod sockets: the agent lives in the host network namespace but creates its listening and
//! dialing sockets inside each pod's namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread later drives it, so a
//! short-lived thread `setns`es into the pod's namespace, creates the socket and ends; the
//! agent's tokio runtime then owns the socket. The thread ends instead of switching back so that
//! no runtime thread ever runs in a pod's namespace.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// `SO_NETNS_COOKIE` (Linux 5.14+); not yet in libc for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("in network namespace {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("network namespace {path} is the agent's own (host network pods are never enrolled)")]
    HostNetns { path: PathBuf },
    #[error("in-pod worker thread for {path} panicked")]
    Panicked { path: PathBuf },
}

impl InpodError {
    /// Whether this is a bind that failed because something else holds the address.
    pub fn is_addr_in_use(&self) -> bool {
        matches!(self, InpodError::Io { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
    }
}

/// An open handle on a pod's network namespace.
#[derive(Clone, Debug)]
pub struct PodNetns {
    path: PathBuf,
    file: Arc<File>,
    cookie: u64,
    dialer: Arc<Dialer>,
}

/// A request to the pod's dialer thread.
enum DialJob {
    /// A socket for this destination, now.
    Now(SocketAddr, tokio::sync::oneshot::Sender<io::Result<Socket>>),
    /// Top up the spare sockets of this address family.
    Refill(Family),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4 = 0,
    V6 = 1,
}

impl Family {
    fn of(addr: SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// Any address of the family: a socket's namespace and family are all that matter before
    /// `connect`.
    fn any(self) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from(([0, 0, 0, 0], 0)),
            Family::V6 => SocketAddr::from(([0u16; 8], 0)),
        }
    }
}

/// Unconnected sockets made ahead of time per family, so a dial on the hot path takes one
/// instead of waiting for the dialer thread (a cross-thread round trip per new connection).
const SPARES: usize = 8;
/// The dialer is woken to top up only when this few are left: one wake per several dials.
const REFILL_AT: usize = SPARES / 2;

type Spares = Arc<[Mutex<Vec<Socket>>; 2]>;

/// A thread that lives in the pod's namespace and creates dialing sockets on request and keeps
/// a few spares ready. It ends when the last handle on the namespace is dropped.
#[derive(Debug)]
struct Dialer {
    jobs: std::sync::mpsc::Sender<DialJob>,
    spares: Spares,
}

fn lock_spares(m: &Mutex<Vec<Socket>>) -> std::sync::MutexGuard<'_, Vec<Socket>> {
    // A poisoned list holds plain sockets; still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dialer {
    fn start(path: &Path, file: Arc<File>) -> Result<Dialer, InpodError> {
        let (jobs, rx) = std::sync::mpsc::channel::<DialJob>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spares: Spares = Arc::new([Mutex::new(Vec::new()), Mutex::new(Vec::new())]);
        let thread_spares = spares.clone();
        let name =
            format!("dial-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    match job {
                        DialJob::Now(dst, reply) => {
                            let _ = reply.send(agent_socket(dst));
                        }
                        DialJob::Refill(family) => {
                            let list = &thread_spares[family as usize];
                            while lock_spares(list).len() < SPARES {
                                // Out of fds or similar: the hot path falls back to `Now`.
                                let Ok(s) = agent_socket(family.any()) else { break };
                                lock_spares(list).push(s);
                            }
                        }
                    }
                }
            })
            .map_err(|source| InpodError::Io { path: path.to_owned(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Dialer { jobs, spares }),
            Ok(Err(source)) => Err(InpodError::Enter { path: path.to_owned(), source }),
            Err(_) => Err(InpodError::Panicked { path: path.to_owned() }),
        }
    }
}

/// The sysctl the agent turns on in every pod it enrolls (read in the current task's netns).
pub const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl PodNetns {
    /// Opens the namespace file and reads its cookie (the key the eBPF programs use).
    pub fn open(path: &Path) -> Result<PodNetns, InpodError> {
        let file = File::open(path)
            .map_err(|source| InpodError::Open { path: path.to_owned(), source })?;
        let file = Arc::new(file);
        let dialer = Arc::new(Dialer::start(path, file.clone())?);
        let mut ns = PodNetns { path: path.to_owned(), file, cookie: 0, dialer };
        ns.cookie = ns.run(|| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            netns_cookie(&s)
        })?;
        let own = Socket::new(Domain::IPV4, Type::STREAM, None)
            .and_then(|s| netns_cookie(&s))
            .map_err(|source| InpodError::Io { path: path.to_owned(), source })?;
        if own == ns.cookie {
            return Err(InpodError::HostNetns { path: path.to_owned() });
        }
        Ok(ns)
    }

    /// The namespace file (for attaching per-namespace programs).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on a fresh thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> Result<T, InpodError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|source| InpodError::Enter { path: self.path.clone(), source })?;
                    f().map_err(|source| InpodError::Io { path: self.path.clone(), source })
                })
                .join()
                .map_err(|_| InpodError::Panicked { path: self.path.clone() })?
        })
    }

    /// Sets `net.ipv4.tcp_migrate_req` in the pod's namespace (Linux 5.14+): when a listener
    /// closes, connections waiting in its accept queue move to another listener of the same
    /// `SO_REUSEPORT` group instead of being reset.
    pub fn enable_listener_migration(&self) -> Result<(), InpodError> {
        // Net sysctls apply to the namespace of the task that opens the file.
        self.run(|| std::fs::write(MIGRATE_REQ, "1"))
    }

    /// Turns `net.ipv4.tcp_migrate_req` off again (the kernel's default).
    pub fn disable_listener_migration(&self) -> Result<(), InpodError> {
        self.run(|| std::fs::write(MIGRATE_REQ, "0"))
    }

    /// Whether `net.ipv4.tcp_migrate_req` is on in the pod's namespace.
    pub fn listener_migration(&self) -> Result<bool, InpodError> {
        self.run(|| Ok(std::fs::read_to_string(MIGRATE_REQ)?.trim() != "0"))
    }

    /// A non-blocking TCP listener bound to `addr` inside the pod. `SO_REUSEPORT` lets a new
    /// agent instance bind next to an old one during a handover.
    pub fn listen(
        &self,
        addr: SocketAddr,
        backlog: i32,
    ) -> Result<std::net::TcpListener, InpodError> {
        self.run(|| {
            let s = agent_socket(addr)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            s.listen(backlog)?;
            Ok(s.into())
        })
    }

    /// An unconnected TCP socket inside the pod for dialing `dst` (the capture programs leave
    /// it alone: it is connected by a task in the agent's cgroup).
    pub async fn dial_socket(&self, dst: SocketAddr) -> Result<tokio::net::TcpSocket, InpodError> {
        let family = Family::of(dst);
        let gone = || InpodError::Panicked { path: self.path.clone() };
        let (spare, left) = {
            let mut list = lock_spares(&self.dialer.spares[family as usize]);
            let spare = list.pop();
            (spare, list.len())
        };
        // Top up in the background: waking the dialer thread costs a context switch, so only
        // now and then.
        if left == REFILL_AT || spare.is_none() {
            self.dialer.jobs.send(DialJob::Refill(family)).map_err(|_| gone())?;
        }
        let s = match spare {
            Some(s) => s,
            None => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                self.dialer.jobs.send(DialJob::Now(dst, reply)).map_err(|_| gone())?;
                answer
                    .await
                    .map_err(|_| gone())?
                    .map_err(|source| InpodError::Io { path: self.path.clone(), source })?
            }
        };
        let std_stream: std::net::TcpStream = s.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
    }
}

/// The network namespaces of the pods this agent has enrolled, by pod (`name.namespace`), for
/// the admin API (`check` reads a pod's UDP sockets from inside it). An entry lives as long as
/// the [`Registration`] the enrolled pod holds: no handle, and so no dialer thread, outlives the
/// pod's release.
#[derive(Clone, Debug, Default)]
pub struct EnrolledNetns(Arc<Mutex<Registry>>);

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    pods: std::collections::BTreeMap<String, (u64, PodNetns)>,
}

/// Keeps a pod's entry in [`EnrolledNetns`]; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    registry: EnrolledNetns,
    pod: String,
    id: u64,
}

impl EnrolledNetns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A poisoned map of handles is still consistent: each change is one insert or remove.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `netns` as `pod`'s until the returned registration is dropped.
    pub fn register(&self, pod: String, netns: &PodNetns) -> Registration {
        let mut r = self.lock();
        r.next_id += 1;
        let id = r.next_id;
        r.pods.insert(pod.clone(), (id, netns.clone()));
        Registration { registry: self.clone(), pod, id }
    }

    pub fn get(&self, pod: &str) -> Option<PodNetns> {
        self.lock().pods.get(pod).map(|(_, ns)| ns.clone())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut r = self.registry.lock();
        // A newer registration of the same pod (re-enrolled before this one was dropped) stays.
        if r.pods.get(&self.pod).is_some_and(|(id, _)| *id == self.id) {
            r.pods.remove(&self.pod);
        }
    }
}

/// A non-blocking TCP socket. No mark: the capture programs know the agent's sockets by the
/// agent's cgroup (`AGENT_CGROUPS`), which an app cannot forge.
fn agent_socket(addr: SocketAddr) -> io::Result<Socket> {
    // Non-blocking and close-on-exec from socket() itself: no fcntl calls per dial.
    let ty = Type::STREAM.nonblocking().cloexec();
    let s = Socket::new_raw(Domain::for_address(addr), ty, Some(Protocol::TCP))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The cookie of the network namespace a socket belongs to.
pub fn netns_cookie(s: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn own_netns_cookie_is_stable() {
        let a = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let b = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        assert_eq!(netns_cookie(&a).unwrap(), netns_cookie(&b).unwrap());
        assert_ne!(netns_cookie(&a).unwrap(), 0);
    }

    #[test]
    fn the_agents_own_netns_is_refused() {
        let err = PodNetns::open(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(matches!(err, InpodError::HostNetns { .. }), "{err}");
    }

    /// A fresh network namespace held by a parked thread; it goes away with the thread.
    pub(crate) fn private_netns() -> (PathBuf, std::sync::mpsc::Sender<()>) {
        let (path_tx, path_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
            let tid = nix::unistd::gettid();
            let _ = path_tx.send(PathBuf::from(format!("/proc/self/task/{tid}/ns/net")));
            let _ = stop_rx.recv();
        });
        (path_rx.recv().unwrap(), stop_tx)
    }

    #[tokio::test]
    async fn dial_sockets_belong_to_the_pod_spare_or_not() {
        let (path, _stop) = private_netns();
        let ns = PodNetns::open(&path).unwrap();
        // More than the spares, both families: the first of each is made on demand, the
        // rest come from the spares the dialer keeps.
        for dst in ["10.0.0.1:80", "[fd00::1]:80"] {
            let dst: SocketAddr = dst.parse().unwrap();
            for _ in 0..SPARES * 3 {
                let s = ns.dial_socket(dst).await.unwrap();
                assert_eq!(netns_cookie(&s).unwrap(), ns.cookie());
                assert_eq!(s.local_addr().unwrap().is_ipv4(), dst.is_ipv4());
            }
        }
    }

    #[test]
    fn a_registration_lasts_until_dropped_and_a_newer_one_survives_an_older_drop() {
        let (path, _stop) = private_netns();
        let ns = PodNetns::open(&path).unwrap();
        let reg = EnrolledNetns::default();
        let first = reg.register("a.ns".into(), &ns);
        assert_eq!(reg.get("a.ns").map(|n| n.cookie()), Some(ns.cookie()));
        let second = reg.register("a.ns".into(), &ns);
        drop(first);
        assert!(reg.get("a.ns").is_some(), "the newer registration was removed");
        drop(second);
        assert!(reg.get("a.ns").is_none());
    }

    #[test]
    fn missing_netns_names_the_path() {
        let err = PodNetns::open(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
