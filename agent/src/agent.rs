//! The node agent's main loop: loads capture, enrolls the node's pods from the workloads file
//! or the API server, keeps enrollment in step with it, and serves the admin API.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
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
    capture::{Capture, CaptureConfig, InboundMode, InboundRule, OrigDstMap, StatsReader},
    identity::{self, CaSigner, CertIssuer, CertStore, SpiffeId},
    inpod::PodNetns,
    kubernetes,
    policy::{Mode, PolicySet, Warning},
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
/// A connect() record older than this was never taken by TCP_CONNECT_CB (which follows within
/// microseconds): the connect() failed early.
const PENDING_MAX_AGE: Duration = Duration::from_secs(10);
const PENDING_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often enrollment is retried for pods of the node that failed it (Kubernetes mode: a
/// pod can be running before its processes are visible).
const ENROLL_RETRY: Duration = Duration::from_secs(2);
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Clone)]
pub struct AgentConfig {
    pub node: String,
    pub cgroup: PathBuf,
    pub source: Source,
    pub bpffs: PathBuf,
    pub admin: SocketAddr,
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub root_namespace: String,
    /// The node's address, the source of kubelet probes.
    pub node_ip: Option<IpAddr>,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub set_log_level: Option<admin::SetLogLevel>,
    /// How long a stopping agent lets open connections finish.
    pub drain_timeout: Duration,
}

/// Where pods, services and policies come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `workloads.yaml` and a policy directory (PeerAuthentication, v1alpha1 Policy; none means
    /// PERMISSIVE everywhere), both watched.
    Files { workloads: PathBuf, policies: Option<PathBuf> },
    /// The API server; pods' namespaces found through their cgroups.
    Kubernetes(kubernetes::Settings),
}

impl AgentConfig {
    fn workloads_file(&self) -> Option<&Path> {
        match &self.source {
            Source::Files { workloads, .. } => Some(workloads),
            Source::Kubernetes(_) => None,
        }
    }

    fn policy_dir(&self) -> Option<&Path> {
        match &self.source {
            Source::Files { policies, .. } => policies.as_deref(),
            Source::Kubernetes(_) => None,
        }
    }
}

/// A pod this agent has enrolled: its namespace and the tasks serving its listeners.
struct EnrolledPod {
    workload: Workload,
    netns: PodNetns,
    tasks: Vec<JoinHandle<()>>,
    /// Its entry in the admin API's registry of namespaces, removed with the pod.
    _netns_entry: crate::inpod::Registration,
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
    policies_tx: watch::Sender<Arc<PolicySet>>,
    pods: BTreeMap<String, EnrolledPod>,
    next_endpoint: Arc<AtomicUsize>,
    readiness: admin::Readiness,
    /// The policy warnings logged last (file, line, what), so a workload change logs only new
    /// ones.
    policy_warnings: HashSet<(PathBuf, usize, String)>,
    /// The last reload of the policy directory failed (its last good set is in force).
    policies_broken: bool,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let initial = match cfg.workloads_file() {
        Some(file) => WorkloadSet::load(file, &cfg.node)
            .with_context(|| format!("loading {}", file.display()))?,
        // Nothing is enrolled (nor released) before the first full sync.
        None => WorkloadSet::default(),
    };
    identity::validate_trust_domain(&cfg.trust_domain)?;
    let policies = match cfg.policy_dir() {
        Some(dir) => load_policies(dir, &cfg.root_namespace)?,
        None => PolicySet::empty(),
    };
    let feed = match &cfg.source {
        Source::Kubernetes(k) => {
            let client = kubernetes::client(k.kubeconfig.as_deref()).await?;
            info!(node = %cfg.node, "Kubernetes mode: watching the API server");
            Some(kubernetes::start(client, &cfg.root_namespace))
        }
        Source::Files { .. } => None,
    };
    let signer = Arc::new(CaSigner::load(&cfg.ca_dir)?);
    let certs = Arc::new(CertStore::new());
    let mut capture = Capture::load(&CaptureConfig {
        node_ip: cfg.node_ip,
        ebpf_log: tracing::enabled!(target: "mtls_agent_ebpf", tracing::Level::DEBUG),
        bpffs: cfg.bpffs.clone(),
        cgroup: cfg.cgroup.clone(),
    })?;
    if let Some(logger) = capture.take_logger() {
        tokio::spawn(pump_ebpf_logs(logger));
    }
    let events = capture.take_events();
    let plaintext_events = capture.take_plaintext_events();
    let program_ids = capture.program_ids();
    let log_switch = capture.log_switch();
    let orig_dst = Arc::new(capture.take_orig_dst().context("ORIG_DST map already taken")?);
    let (workloads_tx, workloads_rx) = watch::channel(Arc::new(initial));
    let (policies_tx, policies_rx) = watch::channel(Arc::new(policies));
    let mesh = Arc::new(Mesh {
        trust_domain: cfg.trust_domain.clone(),
        trust: Arc::new(signer.trust_bundle().clone()),
        certs: certs.clone(),
        pool: hbone::Pool::new(hbone::PoolConfig::default()),
        conns: ConnectionTable::default(),
        drain: Default::default(),
        workloads: workloads_rx,
        policies: policies_rx,
        stats: Default::default(),
        netns: Default::default(),
    });
    if let Some(ring) = plaintext_events {
        tokio::spawn(track_plaintext(ring, mesh.clone()));
    }
    if let Some(events) = events {
        tokio::spawn(log_rejections(events, mesh.clone()));
    }
    let issuer: Arc<dyn CertIssuer> = signer.clone();
    tokio::spawn(identity::run_renewals(certs, issuer, cfg.cert_ttl));

    let mut agent = Agent {
        cfg: cfg.clone(),
        capture,
        orig_dst,
        signer,
        mesh: mesh.clone(),
        workloads_tx,
        policies_tx,
        pods: BTreeMap::new(),
        next_endpoint: Arc::new(AtomicUsize::new(0)),
        readiness: admin::Readiness::default(),
        policy_warnings: HashSet::new(),
        policies_broken: false,
    };
    if feed.is_none() {
        agent.log_policy_warnings(true);
        agent.reconcile(true);
    } else {
        agent.readiness.set(false, "waiting for the first sync with the API server".into());
    }

    let admin_listener = bind_shared(cfg.admin)
        .with_context(|| format!("binding the admin API on {}", cfg.admin))?;
    info!(addr = %admin_listener.local_addr()?, "admin API listening");
    let ebpf = match StatsReader::open_pinned(&cfg.bpffs, program_ids) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            warn!("eBPF counters unavailable: {e}");
            None
        }
    };
    // A level change reaches the eBPF programs' lines too: they write them only while
    // `mtls_agent_ebpf` is at debug, because writing them costs every captured connection.
    let set_log_level = cfg.set_log_level.clone().map(|set| {
        let log_switch = log_switch.clone();
        Arc::new(move |level: &str| {
            set(level)?;
            let on = tracing::enabled!(target: "mtls_agent_ebpf", tracing::Level::DEBUG);
            // The agent's level has changed by now; a failed switch only leaves the programs'
            // lines as they were, which is worth a warning, not a refusal.
            if let Err(e) = log_switch.set(on) {
                warn!("switching the eBPF programs' log lines: {e}");
            }
            Ok(())
        }) as admin::SetLogLevel
    });
    let admin_state = admin::AdminState {
        node: cfg.node.clone(),
        mesh,
        ebpf,
        set_log_level,
        readiness: agent.readiness.clone(),
    };
    let metrics_listener = bind_shared(cfg.metrics)
        .with_context(|| format!("binding the metrics endpoint on {}", cfg.metrics))?;
    let health_listener = bind_shared(cfg.health)
        .with_context(|| format!("binding the health endpoint on {}", cfg.health))?;
    let (ready, detail) = agent.readiness.get();
    if ready {
        info!(%detail, "node ready");
    } else {
        warn!(%detail, "node not ready");
    }
    tokio::spawn(admin::serve_metrics(metrics_listener, admin_state.clone()));
    tokio::spawn(admin::serve_health(health_listener, admin_state.clone()));
    tokio::spawn(admin::serve(admin_listener, admin_state));

    tokio::spawn(return_freed_memory(agent.mesh.clone()));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut watcher = cfg.workloads_file().map(Watch::new);
    let mut policy_watch = cfg.policy_dir().map(Watch::new);
    let mut snapshots = feed.as_ref().map(kubernetes::Feed::subscribe);
    let mut synced = false;
    let mut next_retry = tokio::time::Instant::now() + ENROLL_RETRY;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_sweep.elapsed() >= PENDING_SWEEP_INTERVAL {
                    last_sweep = tokio::time::Instant::now();
                    let swept = agent.capture.sweep_pending(PENDING_MAX_AGE);
                    if swept > 0 {
                        tracing::debug!(records = swept, "swept original destinations of connect()s that never completed");
                    }
                }
                if watcher.as_mut().is_some_and(Watch::changed) {
                    agent.reload();
                }
                if policy_watch.as_mut().is_some_and(Watch::changed) {
                    agent.reload_policies();
                }
                if synced && tokio::time::Instant::now() >= next_retry {
                    next_retry = tokio::time::Instant::now() + ENROLL_RETRY;
                    agent.retry_enrollment();
                }
            }
            Some(snapshot) = next_snapshot(&mut snapshots) => {
                agent.apply_snapshot(&snapshot, !synced);
                synced = true;
            }
            _ = sigterm.recv() => { info!("SIGTERM: handing over (programs stay pinned)"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: handing over (programs stay pinned)"); break; }
        }
    }
    // Stop accepting: with tcp_migrate_req on in every pod, connections still queued on our
    // listeners move to a new instance's listeners in the same SO_REUSEPORT group. Then tell
    // peers to open new tunnels elsewhere (GOAWAY) and let every accepted connection finish,
    // bounded: exiting with one still in flight would cut it off.
    agent.pods.clear();
    agent.mesh.drain.start();
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
    let live = || agent.mesh.drain.in_flight();
    if live() > 0 {
        info!(connections = live(), timeout = ?cfg.drain_timeout, "draining open connections");
    }
    while live() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if live() > 0 {
        warn!(connections = live(), "drain timeout: closing the remaining connections");
    } else {
        info!("drained; exiting");
    }
    Ok(())
}

/// The next complete state from the API server; never resolves in file mode.
async fn next_snapshot(
    rx: &mut Option<watch::Receiver<Option<Arc<kubernetes::Snapshot>>>>,
) -> Option<Arc<kubernetes::Snapshot>> {
    let Some(rx) = rx else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            // The watchers are gone; keep serving the last state.
            return std::future::pending().await;
        }
        if let Some(s) = rx.borrow_and_update().clone() {
            return Some(s);
        }
    }
}

/// After a burst of connections, hands the memory they used back to the OS: glibc keeps freed
/// memory in its per-thread arenas otherwise, and the agent's RSS would stay at its peak.
async fn return_freed_memory(mesh: Arc<Mesh>) {
    let mut last = 0usize;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let live = mesh.conns.live_count();
        if live + 64 < last || (live == 0 && last > 0) {
            // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
            unsafe { libc::malloc_trim(0) };
        }
        last = live;
    }
}

/// A listener on a node address that a new agent instance can bind too during a handover.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

impl Agent {
    /// Takes a complete state from the API server. The first one also releases what a
    /// previous instance left enrolled for pods that are gone.
    fn apply_snapshot(&mut self, s: &kubernetes::Snapshot, first: bool) {
        let workloads_changed = **self.workloads_tx.borrow() != s.workloads;
        let policies_changed = **self.policies_tx.borrow() != s.policies;
        if !first && !workloads_changed && !policies_changed {
            return;
        }
        if policies_changed {
            info!(policies = s.policies.len(), "policies changed");
        }
        self.workloads_tx.send_replace(Arc::new(s.workloads.clone()));
        self.policies_tx.send_replace(Arc::new(s.policies.clone()));
        self.log_policy_warnings(first || policies_changed);
        self.reconcile(first);
        self.apply_policies();
    }

    /// Logs the policies' warnings against the current workloads: all of them after a
    /// policy change, else only those that are new (a pod or service came or went).
    fn log_policy_warnings(&mut self, policies_changed: bool) {
        let ws = self.workloads_tx.borrow().clone();
        let ps = self.policies_tx.borrow().clone();
        let mut now = ps.warnings();
        now.extend(ps.lint(&ws));
        // Keyed by the object and the kind of finding, not the whole text: a warning that
        // lists affected workloads changes with every pod added or removed, yet is not news.
        let key = |w: &Warning| {
            let kind: String = w.message.chars().take_while(|c| *c != ':').collect();
            (w.file.clone(), w.line, kind)
        };
        for w in &now {
            if policies_changed || !self.policy_warnings.contains(&key(w)) {
                warn!("{w}");
            }
        }
        self.policy_warnings = now.iter().map(key).collect();
    }

    /// Enrolls the node's pods whose enrollment failed before.
    fn retry_enrollment(&mut self) {
        let node = self.cfg.node.clone();
        let ws = self.workloads_tx.borrow().clone();
        if ws.on_node(&node).any(|w| !self.pods.contains_key(&w.key())) {
            self.reconcile(false);
        }
    }

    fn reload_policies(&mut self) {
        let Some(dir) = self.cfg.policy_dir().map(Path::to_path_buf) else { return };
        match load_policies(&dir, &self.cfg.root_namespace) {
            Ok(ps) => {
                let was_broken = std::mem::take(&mut self.policies_broken);
                // The directory changes for more than policies (editors' temp files, a
                // ConfigMap's `..data` swap): only a different set is news.
                if ps == **self.policies_tx.borrow() {
                    if was_broken {
                        info!(dir = %dir.display(), "policies valid again, and unchanged");
                    }
                    return;
                }
                info!(dir = %dir.display(), policies = ps.len(), "policies changed");
                self.policies_tx.send_replace(Arc::new(ps));
                self.log_policy_warnings(true);
                self.apply_policies();
            }
            // Keep enforcing the last good set.
            Err(e) => {
                self.policies_broken = true;
                error!("{}; keeping the previous policies", crate::error_text(&e));
            }
        }
    }

    /// Writes every enrolled pod's inbound rules from the current policies.
    fn apply_policies(&mut self) {
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in keys {
            let Some(w) = self.pods.get(&key).map(|p| p.workload.clone()) else { continue };
            if let Err(e) = self.apply_pod_policy(&w) {
                error!(pod = %key, "applying policy: {}", crate::error_text(&e));
            }
        }
    }

    fn apply_pod_policy(&mut self, w: &Workload) -> anyhow::Result<()> {
        let ws = self.workloads_tx.borrow().clone();
        let ps = self.policies_tx.borrow().clone();
        let (default, ports) = ps.workload_modes(&ws, w);
        let mut rules =
            vec![InboundRule { port: 0, mode: inbound_mode(default.mode), probe: false }];
        for (port, d) in &ports {
            rules.push(InboundRule { port: *port, mode: inbound_mode(d.mode), probe: false });
        }
        for &port in &w.probe_ports {
            let d = ps.decide(&ws, w, port);
            match rules.iter_mut().find(|r| r.port == port) {
                Some(r) => r.probe = true,
                None => rules.push(InboundRule { port, mode: inbound_mode(d.mode), probe: true }),
            }
        }
        let strict_probe = rules.iter().any(|r| r.probe && r.mode == InboundMode::Strict);
        if strict_probe && self.cfg.node_ip.is_none() {
            warn!(pod = %w.key(), "probePorts are declared but --node-ip is not set: STRICT refuses the kubelet's probes");
        }
        self.capture.set_inbound_rules(w.ip, &rules)?;
        let ports_desc: Vec<String> =
            ports.iter().map(|(p, d)| format!("{p}={}", d.mode)).collect();
        info!(
            pod = %w.key(),
            mode = %default.mode,
            decided_by = %default.reason,
            ports = %ports_desc.join(","),
            "policy applied"
        );
        Ok(())
    }

    fn reload(&mut self) {
        let Some(file) = self.cfg.workloads_file().map(Path::to_path_buf) else { return };
        match WorkloadSet::load(&file, &self.cfg.node) {
            Ok(ws) => {
                info!(file = %file.display(), "workloads changed");
                self.workloads_tx.send_replace(Arc::new(ws));
                self.log_policy_warnings(false);
                self.reconcile(false);
                self.apply_policies();
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
                self.capture.detach_inbound(pod.netns.cookie());
                if let Err(e) = self.capture.clear_inbound_rules(pod.workload.ip) {
                    warn!(pod = %key, "clearing inbound rules: {e}");
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
                Err(e) => error!(pod = %key, "enrollment failed: {}", crate::error_text(&e)),
            }
        }
        let enrolled = wanted.keys().filter(|k| self.pods.contains_key(*k)).count();
        let with_cert = wanted.keys().filter(|k| self.mesh.certs.get(k).is_some()).count();
        let ready = enrolled == wanted.len() && with_cert == wanted.len();
        self.readiness.set(
            ready,
            format!("{enrolled} of {} pods enrolled, {with_cert} with certificates", wanted.len()),
        );
        if at_start {
            let ours: Vec<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
            for cookie in self.capture.inbound_link_cookies() {
                if !ours.contains(&cookie) {
                    self.capture.detach_inbound(cookie);
                }
            }
            let ips: Vec<IpAddr> = self.pods.values().map(|p| p.workload.ip).collect();
            self.capture.retain_inbound_rules(&ips);
            for cookie in self.capture.enrolled_cookies() {
                if !ours.contains(&cookie) {
                    info!(cookie, "releasing a pod enrolled by a previous instance that is gone");
                    if let Err(e) = self.capture.release(cookie) {
                        warn!(cookie, "releasing: {e}");
                    }
                }
            }
        }
    }

    fn enroll(&mut self, w: &Workload) -> anyhow::Result<EnrolledPod> {
        let netns = match (&w.netns, &w.uid, &self.cfg.source) {
            (Some(path), _, _) => PodNetns::open(path)?,
            (None, Some(uid), Source::Kubernetes(k)) => k.cgroups.open_netns(uid)?,
            _ => anyhow::bail!("no netns for this pod"),
        };
        // Queued connections of a closing listener move to the next instance's (handover).
        if let Err(e) = netns.enable_listener_migration() {
            warn!(pod = %w.key(), "tcp_migrate_req unavailable, a handover may drop queued connections: {e}");
        }
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
        tasks.push(tokio::spawn(outbound::serve(TcpListener::from_std(l4)?, ctx.clone())));
        match netns.listen(v6, LISTEN_BACKLOG) {
            Ok(l6) => tasks.push(tokio::spawn(outbound::serve(TcpListener::from_std(l6)?, ctx))),
            // A pod without IPv6 loopback still gets IPv4 capture.
            Err(e) => warn!(pod = %w.key(), "no IPv6 outbound listener: {e}"),
        }
        let tunnel = netns.listen(SocketAddr::new(w.ip, HBONE_PORT), LISTEN_BACKLOG)?;
        let ictx = Arc::new(InboundContext::new(w.key(), w.ip, netns.clone(), self.mesh.clone()));
        tasks.push(tokio::spawn(inbound::serve(TcpListener::from_std(tunnel)?, ictx)));
        // Inbound enforcement is in place before the pod counts as enrolled.
        self.apply_pod_policy(w)?;
        self.capture.attach_inbound(&netns)?;
        // Only now that the listeners exist may connect()s be redirected to them.
        self.capture.enroll(netns.cookie())?;
        let _netns_entry = self.mesh.netns.register(w.key(), &netns);
        Ok(EnrolledPod { workload: w.clone(), netns, tasks, _netns_entry })
    }
}

fn inbound_mode(m: Mode) -> InboundMode {
    match m {
        Mode::Strict => InboundMode::Strict,
        Mode::Permissive => InboundMode::Permissive,
        Mode::Disable => InboundMode::Disable,
    }
}

/// The policies of `dir`; their warnings are logged by [`Agent::log_policy_warnings`].
fn load_policies(dir: &Path, root_namespace: &str) -> anyhow::Result<PolicySet> {
    Ok(PolicySet::load_dir(dir, root_namespace)?)
}

/// Detects changes to a file, or to any file of a directory, by name, modification time, size
/// and inode (editors and `mv` replace files rather than write them in place).
struct Watch {
    path: PathBuf,
    last: Vec<(PathBuf, SystemTime, u64, u64)>,
}

impl Watch {
    fn new(path: &Path) -> Watch {
        let mut w = Watch { path: path.to_owned(), last: vec![] };
        w.last = w.stamp();
        w
    }

    fn stamp(&self) -> Vec<(PathBuf, SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let entry = |p: PathBuf| -> Option<(PathBuf, SystemTime, u64, u64)> {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().ok()?, m.len(), m.ino()))
        };
        let mut v: Vec<_> = match std::fs::read_dir(&self.path) {
            Ok(rd) => rd.flatten().filter_map(|e| entry(e.path())).collect(),
            Err(_) => entry(self.path.clone()).into_iter().collect(),
        };
        v.sort();
        v
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

/// Logs each plaintext connection the inbound program refused, with the deciding policy.
async fn log_rejections(events: aya::maps::RingBuf<aya::maps::MapData>, mesh: Arc<Mesh>) {
    each_time_readable(events, "refusal events", |ring| {
        while let Some(item) = ring.next() {
            let Some((client, dst)) = crate::capture::parse_reject_event(&item) else { continue };
            let ws = mesh.workloads.borrow().clone();
            let pod = ws.by_ip(dst.ip());
            let policy = pod.map(|w| mesh.policies.borrow().decide(&ws, w, dst.port()).reason);
            mesh.stats
                .inbound_plaintext_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(
                src = %client,
                dst = %dst,
                dst_pod = pod.map(|w| w.key()).unwrap_or_default(),
                policy = policy.as_deref().unwrap_or("none: destination not in the workload set"),
                "rejected: plaintext to STRICT port {}",
                dst.port()
            );
        }
    })
    .await
}

/// Most plaintext connections the table follows at once; past it the oldest is forgotten
/// (its close event was lost, or it outlives the bound), so lost events never grow memory.
const MAX_PLAINTEXT_TRACKED: usize = 65536;

/// Puts plaintext connections that enrolled pods' apps accepted directly (PERMISSIVE, DISABLE,
/// probes) in the connection table, from the kernel's reports: the agent is not in their path,
/// yet the operator asking "is this encrypted?" must see them.
async fn track_plaintext(ring: aya::maps::RingBuf<aya::maps::MapData>, mesh: Arc<Mesh>) {
    use crate::capture::PlaintextSeen;
    use crate::tunnel::connections::{ConnectionRecord, Direction};
    // Socket cookie -> connection table id, and back (ids grow, so the first is the oldest).
    let mut ids: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut cookies: BTreeMap<u64, u64> = BTreeMap::new();
    each_time_readable(ring, "plaintext connection reports", |ring| {
        while let Some(item) = ring.next() {
            match crate::capture::parse_plaintext_event(&item) {
                Some(PlaintextSeen::Opened { cookie, client, pod }) => {
                    let ws = mesh.workloads.borrow().clone();
                    let dst = ws.by_ip(pod.ip());
                    let decision = dst.map(|w| mesh.policies.borrow().decide(&ws, w, pod.port()));
                    // Its bytes are known only at close: the kernel reports them then.
                    let (id, _) = mesh.conns.open(ConnectionRecord {
                        id: 0,
                        direction: Direction::Inbound,
                        source_pod: ws.by_ip(client.ip()).map(|w| w.key()),
                        source: client,
                        original_destination: pod,
                        destination: pod,
                        destination_pod: dst.map(|w| w.key()),
                        mode: crate::tunnel::connections::MODE_PLAINTEXT_SEEN.into(),
                        local_identity: None,
                        peer_identity: None,
                        tls: "PLAINTEXT".into(),
                        policy: decision.map(|d| format!("{} ({})", d.reason, d.mode)),
                        started_at: std::time::SystemTime::now(),
                        bytes_sent: 0,
                        bytes_received: 0,
                        age_ms: None,
                        duration_ms: None,
                        open: true,
                        error: None,
                    });
                    if let Some(stale) = ids.insert(cookie, id) {
                        cookies.remove(&stale);
                        mesh.conns.close(stale, 0, 0, Some("no close report (lost)".into()));
                    }
                    cookies.insert(id, cookie);
                    while cookies.len() > MAX_PLAINTEXT_TRACKED {
                        let Some((old_id, old_cookie)) = cookies.pop_first() else { break };
                        ids.remove(&old_cookie);
                        mesh.conns.close(old_id, 0, 0, Some("no close report (lost)".into()));
                    }
                }
                Some(PlaintextSeen::Closed { cookie, bytes_received, bytes_sent }) => {
                    // A connection opened before this agent started is not in the table.
                    let Some(id) = ids.remove(&cookie) else { continue };
                    cookies.remove(&id);
                    // As for every record, "sent" travels source -> destination: here the
                    // client's bytes, which the pod's app received.
                    if let Some(rec) = mesh.conns.close(id, bytes_received, bytes_sent, None) {
                        info!(
                            direction = "inbound",
                            src = %rec.source,
                            dst = %rec.destination,
                            dst_pod = rec.destination_pod.as_deref().unwrap_or("-"),
                            tls = "PLAINTEXT",
                            policy = rec.policy.as_deref().unwrap_or("-"),
                            bytes_sent = rec.bytes_sent,
                            bytes_received = rec.bytes_received,
                            duration_ms = rec.duration_ms.unwrap_or_default(),
                            "plaintext connection closed (accepted by the pod's app, not carried by the agent)"
                        );
                    }
                }
                None => {}
            }
        }
    })
    .await
}

/// Forwards eBPF log lines (aya-log) into the agent's log.
async fn pump_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    each_time_readable(logger, "eBPF log reader", |l| l.flush()).await
}

/// Calls `drain` each time the kernel makes `source` readable: the programs' ring buffers and
/// log reader, which own their fds. Ends with a warning if polling fails.
async fn each_time_readable<T: std::os::fd::AsRawFd>(
    source: T,
    what: &str,
    mut drain: impl FnMut(&mut T),
) {
    // SAFETY: `source` owns the fd and moves into the AsyncFd, so the fd stays open for as long
    // as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(source, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("{what}: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            Err(e) => {
                warn!("{what}: {e}");
                return;
            }
        }
    }
}
