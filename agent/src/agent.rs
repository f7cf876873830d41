//! The node agent's main loop: loads capture, enrolls the node's pods from the workloads file,
//! keeps enrollment in step with the file, and serves the admin API.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::AtomicUsize, Arc},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use mtls_agent_ebpf::OUTBOUND_PORT;
use tokio::{io::unix::AsyncFd, net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    admin,
    capture::{Capture, CaptureConfig, OrigDstMap},
    identity::{self, CaSigner, CertIssuer, CertStore, SpiffeId},
    inpod::PodNetns,
    tunnel::{
        hbone::{self, HBONE_PORT},
        inbound::{self, InboundContext},
        outbound::{self, OutboundContext},
        ConnectionTable, Mesh,
    },
    workloads::{Workload, WorkloadSet},
};

/// How often the workloads file is checked for changes (changes apply within 1 s).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub cgroup: PathBuf,
    pub workloads: PathBuf,
    pub bpffs: PathBuf,
    pub admin: SocketAddr,
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    pub cert_ttl: Duration,
}

/// A pod this agent has enrolled: its namespace and the tasks serving its listeners.
struct EnrolledPod {
    workload: Workload,
    netns: PodNetns,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for EnrolledPod {
    fn drop(&mut self) {
        // Closing the listeners: new connections from the pod now fail fast (refused).
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Agent {
    cfg: AgentConfig,
    capture: Capture,
    orig_dst: Arc<OrigDstMap>,
    signer: Arc<CaSigner>,
    mesh: Arc<Mesh>,
    workloads_tx: watch::Sender<Arc<WorkloadSet>>,
    pods: BTreeMap<String, EnrolledPod>,
    next_endpoint: Arc<AtomicUsize>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let initial = WorkloadSet::load(&cfg.workloads, &cfg.node)
        .with_context(|| format!("loading {}", cfg.workloads.display()))?;
    identity::validate_trust_domain(&cfg.trust_domain)?;
    let signer = Arc::new(CaSigner::load(&cfg.ca_dir)?);
    let certs = Arc::new(CertStore::new());
    let mut capture = Capture::load(&CaptureConfig {
        bpffs: cfg.bpffs.clone(),
        cgroup: cfg.cgroup.clone(),
    })?;
    if let Some(logger) = capture.take_logger() {
        tokio::spawn(pump_ebpf_logs(logger));
    }
    let orig_dst = Arc::new(
        capture
            .take_orig_dst()
            .context("ORIG_DST map already taken")?,
    );
    let (workloads_tx, workloads_rx) = watch::channel(Arc::new(initial));
    let mesh = Arc::new(Mesh {
        trust_domain: cfg.trust_domain.clone(),
        trust: Arc::new(signer.trust_bundle().clone()),
        certs: certs.clone(),
        pool: hbone::Pool::new(hbone::PoolConfig::default()),
        conns: ConnectionTable::default(),
        workloads: workloads_rx,
        stats: Default::default(),
    });
    let issuer: Arc<dyn CertIssuer> = signer.clone();
    tokio::spawn(identity::run_renewals(certs, issuer, cfg.cert_ttl));

    let mut agent = Agent {
        cfg: cfg.clone(),
        capture,
        orig_dst,
        signer,
        mesh: mesh.clone(),
        workloads_tx,
        pods: BTreeMap::new(),
        next_endpoint: Arc::new(AtomicUsize::new(0)),
    };
    agent.reconcile(true);

    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("binding the admin API on {}", cfg.admin))?;
    info!(addr = %admin_listener.local_addr()?, "admin API listening");
    let admin_state = admin::AdminState {
        node: cfg.node.clone(),
        mesh,
    };
    tokio::spawn(admin::serve(admin_listener, admin_state));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut watcher = FileWatch::new(&cfg.workloads);
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if watcher.changed() {
                    agent.reload();
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping (programs stay pinned)"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping (programs stay pinned)"); break; }
        }
    }
    Ok(())
}

impl Agent {
    fn reload(&mut self) {
        match WorkloadSet::load(&self.cfg.workloads, &self.cfg.node) {
            Ok(ws) => {
                info!(file = %self.cfg.workloads.display(), "workloads changed");
                self.workloads_tx.send_replace(Arc::new(ws));
                self.reconcile(false);
            }
            // Keep serving the last good set.
            Err(e) => error!("{e}; keeping the previous workloads"),
        }
    }

    /// Brings enrollment in line with the current workloads: enrolls new pods, releases removed
    /// ones, re-enrolls changed ones. At start, also releases cookies a previous instance left
    /// enrolled for pods that are gone.
    fn reconcile(&mut self, at_start: bool) {
        let ws = self.workloads_tx.borrow().clone();
        let node = self.cfg.node.clone();
        let wanted: BTreeMap<String, &Workload> = ws.on_node(&node).map(|w| (w.key(), w)).collect();

        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, p)| wanted.get(*k).is_none_or(|w| **w != p.workload))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(pod) = self.pods.remove(&key) {
                if let Err(e) = self.capture.release(pod.netns.cookie()) {
                    warn!(pod = %key, "releasing: {e}");
                }
                // The pod's key leaves memory with its certificate.
                self.mesh.certs.remove(&key);
                info!(pod = %key, "released");
            }
        }
        for (key, w) in &wanted {
            if self.pods.contains_key(key) {
                continue;
            }
            match self.enroll(w) {
                Ok(pod) => {
                    info!(pod = %key, ip = %w.ip, cookie = pod.netns.cookie(), "enrolled");
                    self.pods.insert(key.clone(), pod);
                }
                Err(e) => error!(pod = %key, "enrollment failed: {e:#}"),
            }
        }
        if at_start {
            let ours: Vec<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
            for cookie in self.capture.enrolled_cookies() {
                if !ours.contains(&cookie) {
                    info!(
                        cookie,
                        "releasing a pod enrolled by a previous instance that is gone"
                    );
                    if let Err(e) = self.capture.release(cookie) {
                        warn!(cookie, "releasing: {e}");
                    }
                }
            }
        }
    }

    fn enroll(&mut self, w: &Workload) -> anyhow::Result<EnrolledPod> {
        let path = w.netns.as_deref().context("no netns for this pod")?;
        let netns = PodNetns::open(path)?;
        // The certificate exists before any listener does, so the first connection waits for
        // nothing.
        let id = SpiffeId::new(&self.cfg.trust_domain, &w.namespace, &w.service_account)?;
        let cert = self.signer.issue(&id, self.cfg.cert_ttl)?;
        self.mesh.certs.insert(w.key(), cert);
        let mut tasks = Vec::new();
        let ctx = Arc::new(OutboundContext {
            pod: w.key(),
            netns: netns.clone(),
            orig_dst: self.orig_dst.clone(),
            mesh: self.mesh.clone(),
            next_endpoint: self.next_endpoint.clone(),
        });
        let v4: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into();
        let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT).into();
        let l4 = netns.listen(v4, LISTEN_BACKLOG)?;
        tasks.push(tokio::spawn(outbound::serve(
            TcpListener::from_std(l4)?,
            ctx.clone(),
        )));
        match netns.listen(v6, LISTEN_BACKLOG) {
            Ok(l6) => tasks.push(tokio::spawn(outbound::serve(
                TcpListener::from_std(l6)?,
                ctx,
            ))),
            // A pod without IPv6 loopback still gets IPv4 capture.
            Err(e) => warn!(pod = %w.key(), "no IPv6 outbound listener: {e}"),
        }
        let tunnel = netns.listen(SocketAddr::new(w.ip, HBONE_PORT), LISTEN_BACKLOG)?;
        let ictx = Arc::new(InboundContext::new(
            w.key(),
            w.ip,
            netns.clone(),
            self.mesh.clone(),
        ));
        tasks.push(tokio::spawn(inbound::serve(
            TcpListener::from_std(tunnel)?,
            ictx,
        )));
        // Only now that the listeners exist may connect()s be redirected to them.
        self.capture.enroll(netns.cookie())?;
        Ok(EnrolledPod {
            workload: w.clone(),
            netns,
            tasks,
        })
    }
}

/// Detects changes to a file by modification time, size and inode (editors and `mv` replace).
struct FileWatch {
    path: PathBuf,
    last: Option<(SystemTime, u64, u64)>,
}

impl FileWatch {
    fn new(path: &Path) -> FileWatch {
        let mut w = FileWatch {
            path: path.to_owned(),
            last: None,
        };
        w.last = w.stamp();
        w
    }

    fn stamp(&self) -> Option<(SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    }

    fn changed(&mut self) -> bool {
        let now = self.stamp();
        if now != self.last {
            self.last = now;
            return true;
        }
        false
    }
}

/// Forwards eBPF log lines (aya-log) into the agent's log.
async fn pump_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the fd and moves into the AsyncFd, so the fd stays open for as
    // long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log reader: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                warn!("eBPF log reader: {e}");
                return;
            }
        }
    }
}
