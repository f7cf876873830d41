//! The node agent's main loop: loads capture, enrolls the node's pods from the workloads file
//! or the API server, keeps enrollment in step with it, and serves the admin API.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
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
    certservice,
    enrollment::{Failures, Step},
    identity::{self, CaSigner, CertIssuer, CertStore, SpiffeId},
    inpod::PodNetns,
    kubernetes,
    owners::{self, Owner, Verdict},
    policy::{Mode, PolicySet, Warning},
    tunnel::{
        hbone::{self, HBONE_PORT},
        inbound::{self, InboundContext},
        outbound::{self, OutboundContext},
        ConnectionTable, Mesh,
    },
    workloads::{Workload, WorkloadSet},
};

mod early;
mod snapshot_delta;

/// How often the workloads file is checked for changes (changes apply within 1 s).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How often the agent writes its cgroup id into `AGENT_CGROUPS` again.
const OWN_CGROUP_REFRESH: Duration = Duration::from_secs(5);
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
    /// The admin API over TCP too (loopback), only when asked for.
    pub admin: Option<SocketAddr>,
    /// Directory of the admin sockets (one per instance).
    pub admin_dir: PathBuf,
    pub ca: CaSource,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub root_namespace: String,
    /// The node's address (`--node-ip`): grants nothing any more, kept for older manifests.
    pub node_ip: Option<IpAddr>,
    /// The kubelet's cgroup: its connections may reach STRICT probe ports in plaintext.
    pub kubelet_cgroup: Option<PathBuf>,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub set_log_level: Option<admin::SetLogLevel>,
    /// How long a stopping agent lets open connections finish.
    pub drain_timeout: Duration,
}

/// Where the pods' certificates come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// A CA directory whose key is on this node (development and the demo).
    Dir(PathBuf),
    /// The certificate service (`ca serve`, or istiod), over Istio's CA protocol.
    Service { address: String, token_file: PathBuf, root: PathBuf, server_name: Option<String> },
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
    _tasks: Tasks,
    /// Its entry in the admin API's registry of namespaces, removed with the pod.
    _netns_entry: crate::inpod::Registration,
}

/// The tasks serving a pod's listeners, stopped when dropped: when the pod leaves, and when
/// its enrollment fails half-way (no task is left detached).
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        // Closing the listeners: new connections from the pod now fail fast (refused).
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A pod of the node whose enrollment failed, held closed until a retry succeeds.
struct FailedPod {
    workload: Workload,
    /// The cookie of its namespace when its inbound program (or more) is in place.
    netns_cookie: Option<u64>,
}

/// Why enrolling a pod failed, and whether it is held closed.
struct EnrollError {
    step: Step,
    /// Set once the pod's inbound program is attached: from then on it is closed.
    netns_cookie: Option<u64>,
    error: anyhow::Error,
}

struct Agent {
    cfg: AgentConfig,
    capture: Capture,
    orig_dst: Arc<OrigDstMap>,
    /// With `--ca-dir`: certificates are signed here, during enrollment. Otherwise the
    /// store's driver asks the certificate service.
    signer: Option<Arc<CaSigner>>,
    mesh: Arc<Mesh>,
    workloads_tx: watch::Sender<Arc<WorkloadSet>>,
    policies_tx: watch::Sender<Arc<PolicySet>>,
    pods: BTreeMap<String, EnrolledPod>,
    /// Pods of the node whose enrollment failed (reported through `failures`).
    failed: BTreeMap<String, FailedPod>,
    /// Enrolled pods whose inbound rules could not be written: written again on the retry
    /// tick, since no snapshot may come to do it (their old rules, maybe PERMISSIVE, stay).
    rules_failed: BTreeSet<String>,
    /// Which ports of each pod the AuthorizationPolicies close to plaintext, per policy set.
    refusals: crate::authz::kernel::RefusalCache,
    failures: Failures,
    /// Kubernetes mode: for Events on pods whose enrollment fails.
    kube: Option<kube::Client>,
    /// Kubernetes mode: whether each pod of the node is in the mesh, and why.
    membership: kubernetes::membership::Registry,
    /// The membership Event last posted per pod (what it said), so each change posts one.
    announced: BTreeMap<String, String>,
    /// Namespaces a previous instance had enrolled: their enrollment by this one is a
    /// handover, not news worth an Event.
    inherited: HashSet<u64>,
    next_endpoint: Arc<AtomicUsize>,
    readiness: admin::Readiness,
    /// The policy warnings logged last (file, line, what), so a workload change logs only new
    /// ones.
    policy_warnings: HashSet<(PathBuf, usize, String)>,
    /// The last reload of the policy directory failed (its last good set is in force).
    policies_broken: bool,
    /// Pinned enrollments this instance did not make and keeps (their pod is meant to be
    /// enrolled, or their owner is unknown and their namespace may exist), with their owner.
    kept: BTreeMap<u64, Option<Owner>>,
    /// The owners of pinned cookies from the state file, as found at start.
    owners_at_start: BTreeMap<u64, Owner>,
    /// What this instance last wrote to the state file.
    owners_written: Option<BTreeMap<u64, Owner>>,
    /// Kubernetes mode: whether each policy kind is served and answers.
    sources: kubernetes::sources::Sources,
    /// The failing policy sources readiness named last.
    sources_failing: Vec<String>,
    /// Kubernetes mode: pods bound to this node, held closed and enrolled before their IP.
    bound: early::Bound,
    /// How many pods of the node the last reconcile wanted (readiness, recomputed when a
    /// certificate comes).
    wanted: usize,
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
    let (feed, kube) = match &cfg.source {
        Source::Kubernetes(k) => {
            let client = kubernetes::client(k.kubeconfig.as_deref()).await?;
            info!(node = %cfg.node, "Kubernetes mode: watching the API server");
            // Off the data plane's runtime: the watchers and the builder have a thread.
            let feed = kubernetes::thread::start_on_thread(kubernetes::thread::FeedSettings {
                kubeconfig: k.kubeconfig.clone(),
                root_namespace: cfg.root_namespace.clone(),
                membership: k.membership.clone(),
                discovery_interval: k.discovery_interval,
            })
            .await?;
            (Some(feed), Some(client))
        }
        Source::Files { .. } => (None, None),
    };
    if cfg.node_ip.is_some() {
        warn!("--node-ip grants nothing any more: the probe exemption follows --kubelet-cgroup");
    }
    let (issuer, trust, signer) = certificate_source(&cfg.ca)?;
    let certs = Arc::new(CertStore::new());
    let mut capture = Capture::load(&CaptureConfig {
        node_ip: cfg.node_ip,
        kubelet_cgroup: cfg.kubelet_cgroup.clone(),
        ebpf_log: tracing::enabled!(target: "mtls_agent_ebpf", tracing::Level::DEBUG),
        bpffs: cfg.bpffs.clone(),
        cgroup: cfg.cgroup.clone(),
    })?;
    let inherited = capture.enrolled_cookies().into_iter().collect();
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
        trust,
        certs: certs.clone(),
        pool: hbone::Pool::new(hbone::PoolConfig::default()),
        conns: ConnectionTable::default(),
        drain: Default::default(),
        workloads: workloads_rx,
        services: crate::services::ServiceCache::new(&cfg.node),
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
    let mut cert_news = certs.subscribe();
    tokio::spawn(identity::run_renewals(certs, issuer, cfg.cert_ttl));

    // Read before anything is enrolled: which pinned cookie is whose pod (item: a restart
    // never opens a pod). Unreadable means unknown owners, never "nothing to keep".
    let owners_at_start = owners::load(&cfg.admin_dir).unwrap_or_else(|e| {
        error!("{e}; pinned enrollments of unknown owner stay until their namespace is gone");
        BTreeMap::new()
    });
    let mut agent = Agent {
        cfg: cfg.clone(),
        capture,
        orig_dst,
        signer,
        mesh: mesh.clone(),
        workloads_tx,
        policies_tx,
        pods: BTreeMap::new(),
        failed: BTreeMap::new(),
        rules_failed: BTreeSet::new(),
        refusals: Default::default(),
        failures: Failures::default(),
        kube,
        membership: Default::default(),
        announced: BTreeMap::new(),
        inherited,
        next_endpoint: Arc::new(AtomicUsize::new(0)),
        readiness: admin::Readiness::default(),
        policy_warnings: HashSet::new(),
        policies_broken: false,
        kept: BTreeMap::new(),
        owners_at_start,
        owners_written: None,
        sources: feed.as_ref().map(kubernetes::Feed::sources).unwrap_or_default(),
        sources_failing: Vec::new(),
        bound: early::Bound::default(),
        wanted: 0,
    };
    if feed.is_none() {
        agent.log_policy_warnings(true);
        agent.reconcile(true);
        // Our programs and maps enforce for every pod now: an older map layout's go.
        agent.finish_layout_handover();
    } else {
        agent.readiness.set(false, "waiting for the first sync with the API server".into());
    }

    // The socket file goes when `_admin_socket` drops, on every way out of this function.
    let (_admin_socket, admin_unix) = admin::socket::AdminSocket::bind(&cfg.admin_dir)?;
    info!(socket = %_admin_socket.path().display(), "admin API listening");
    let admin_tcp = match cfg.admin {
        Some(addr) => {
            let l =
                bind_shared(addr).with_context(|| format!("binding the admin API on {addr}"))?;
            info!(addr = %l.local_addr()?, "admin API listening on TCP too (--admin)");
            Some(l)
        }
        None => None,
    };
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
        enrollment: agent.failures.clone(),
        membership: agent.membership.clone(),
        policy_sources: agent.sources.clone(),
        refusal: None,
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
    if let Some(l) = admin_tcp {
        tokio::spawn(admin::serve(l, admin_state.clone()));
    }
    tokio::spawn(admin::serve(admin::Listener::Unix(admin_unix), admin_state));

    tokio::spawn(return_freed_memory(agent.mesh.clone()));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut watcher = cfg.workloads_file().map(Watch::new);
    let mut policy_watch = cfg.policy_dir().map(Watch::new);
    let mut snapshots = feed.as_ref().map(kubernetes::Feed::subscribe);
    // Before the first snapshot: the node's pods of the mesh, to hold closed (not enroll).
    let mut bound_before_sync = feed.as_ref().map(kubernetes::Feed::subscribe_bound);
    // File mode has its workloads from the start; Kubernetes mode after the first snapshot.
    let mut synced = feed.is_none();
    let mut next_retry = tokio::time::Instant::now() + ENROLL_RETRY;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    let mut hold_tick = tokio::time::interval(early::HOLD_POLL);
    hold_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // No sweep of pending connect() records: the programs delete them when the
                // socket is released, and bound each pod's share.
                if last_refresh.elapsed() >= OWN_CGROUP_REFRESH {
                    last_refresh = tokio::time::Instant::now();
                    agent.capture.refresh_own_cgroup();
                }
                if watcher.as_mut().is_some_and(Watch::changed) {
                    agent.reload();
                }
                if policy_watch.as_mut().is_some_and(Watch::changed) {
                    agent.reload_policies();
                }
                if !synced {
                    agent.update_waiting_readiness();
                } else if agent.sources_failing != agent.sources.failing() {
                    // A policy source failed or answers again: readiness says so.
                    let wanted = agent.workloads_tx.borrow().on_node(&agent.cfg.node).count();
                    agent.update_readiness(wanted);
                }
                if synced && tokio::time::Instant::now() >= next_retry {
                    next_retry = tokio::time::Instant::now() + ENROLL_RETRY;
                    agent.check_sandboxes();
                    agent.retry_enrollment();
                    agent.finish_layout_handover();
                }
            }
            _ = hold_tick.tick(), if feed.is_some() => agent.poll_holds(false),
            Ok(()) = cert_news.changed(), if synced => {
                // A certificate came or a request failed: readiness says so.
                agent.update_readiness(agent.wanted);
            }
            Some(bound) = next_bound(&mut bound_before_sync), if !synced => {
                agent.take_bound_before_sync(&bound);
            }
            Some(snapshot) = next_snapshot(&mut snapshots) => {
                agent.apply_snapshot(&snapshot, !synced);
                // A snapshot not taken (nothing changed) still holds a set and a table.
                drop_elsewhere(snapshot);
                if !synced {
                    // As in file mode: after the first reconcile, an older layout's go.
                    agent.finish_layout_handover();
                }
                synced = true;
                next_retry = tokio::time::Instant::now() + ENROLL_RETRY;
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
    agent.capture.forget_own_cgroup();
    Ok(())
}

/// The certificate issuer, the trust bundle and, with `--ca-dir`, the node's own signer.
type CertificateSource = (Arc<dyn CertIssuer>, Arc<identity::SharedTrust>, Option<Arc<CaSigner>>);

fn certificate_source(ca: &CaSource) -> anyhow::Result<CertificateSource> {
    match ca {
        CaSource::Dir(dir) => {
            let signer = Arc::new(CaSigner::load(dir)?);
            warn!(
                ca_dir = %dir.display(),
                "this node holds the mesh's CA key (--ca-dir): whoever is root here can mint any \
                 identity of the mesh. For development and the demo only; in production use \
                 --ca-address (mtls-agent ca serve, or istiod)"
            );
            let trust = Arc::new(identity::SharedTrust::new(signer.trust_bundle().clone()));
            Ok((signer.clone(), trust, Some(signer)))
        }
        CaSource::Service { address, token_file, root, server_name } => {
            let bundle = identity::TrustBundle::from_pem_file(root)
                .with_context(|| format!("--ca-root {}", root.display()))?;
            let trust = Arc::new(identity::SharedTrust::new(bundle));
            // At start a missing token is a mistake in the manifest, worth refusing to run.
            certservice::issuer::read_token(token_file).context("--ca-token-file")?;
            let issuer = certservice::issuer::RemoteIssuer::new(
                address,
                server_name.as_deref(),
                token_file.clone(),
                trust.clone(),
            )?;
            info!(
                ca = %address,
                "certificates from the certificate service; keys are made here and never leave this node"
            );
            tokio::spawn(follow_trust_bundle(root.clone(), trust.clone()));
            Ok((Arc::new(issuer), trust, None))
        }
    }
}

/// How often the trust bundle file is looked at (a ConfigMap volume changes within a minute).
const TRUST_BUNDLE_POLL: Duration = Duration::from_secs(2);

/// Replaces the trust bundle when its file changes (a root rotation: the ConfigMap gets the
/// new root beside the old). A file that does not parse is logged and the bundle in force
/// stays; new handshakes use a new bundle, open connections keep theirs.
async fn follow_trust_bundle(path: PathBuf, trust: Arc<identity::SharedTrust>) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(TRUST_BUNDLE_POLL).await;
        let Ok(now) = std::fs::read(&path) else { continue };
        if last.as_ref() == Some(&now) {
            continue;
        }
        match identity::TrustBundle::from_pem(&now) {
            Ok(bundle) => {
                info!(file = %path.display(), roots = bundle.len(), "trust bundle changed: new handshakes use it");
                trust.replace(bundle);
            }
            Err(e) => error!(file = %path.display(), "{e}: the trust bundle in force stays"),
        }
        last = Some(now);
    }
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

/// The bound pods published before the first snapshot; never resolves in file mode.
async fn next_bound(
    rx: &mut Option<watch::Receiver<Option<Arc<Vec<kubernetes::binding::BoundPod>>>>>,
) -> Option<Arc<Vec<kubernetes::binding::BoundPod>>> {
    let Some(rx) = rx else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(b) = rx.borrow_and_update().clone() {
            return Some(b);
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

/// Drops `value` on the runtime's blocking pool rather than here: the last reference to a
/// large cluster's workload set or service table frees hundreds of thousands of allocations,
/// time the data plane's thread would not serve connections.
fn drop_elsewhere<T: Send + 'static>(value: T) {
    tokio::task::spawn_blocking(move || drop(value));
}

/// A listener on a node address that a new agent instance can bind too during a handover.
pub(crate) fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
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
        let before = self.workloads_tx.borrow().clone();
        let workloads_changed = !Arc::ptr_eq(&before, &s.workloads) && before != s.workloads;
        let policies_changed = **self.policies_tx.borrow() != s.policies;
        self.membership.replace(s.membership.iter().cloned());
        if !first && !workloads_changed && !policies_changed {
            // A pod that opted in and is skipped changes no workload, yet gets its Event.
            self.announce_membership();
            // A pod bound to this node without an IP yet changes only this.
            self.take_bound(s, false);
            return;
        }
        if policies_changed {
            info!(policies = s.policies.len(), "policies changed");
        }
        let ws = s.workloads.clone();
        let replaced = self.workloads_tx.send_replace(ws.clone());
        // The service table is the feed's, built on its thread; without one (no node given
        // to the feed) it is built here, not by the first connection after the change.
        let replaced_table = match &s.routes {
            Some(table) => self.mesh.services.install(&ws, table.clone()),
            None => {
                self.mesh.services.table(&ws);
                None
            }
        };
        self.policies_tx.send_replace(Arc::new(s.policies.clone()));
        self.log_policy_warnings(first || policies_changed);
        // Before the reconcile: what a previous instance enrolled early stays enrolled.
        self.take_bound(s, first);
        let cheap = snapshot_delta::Delta::between(&before, &ws, &self.cfg.node, first);
        if cheap.local_pods_same && self.nothing_pending(&ws) {
            // Only remote pods or services changed: no enrollment of this node to redo.
            self.update_readiness(ws.on_node(&self.cfg.node).count());
            self.announce_membership();
            self.save_owners();
        } else {
            self.reconcile(first);
        }
        // A pod's rules depend on the policies, the pod and the services selecting it.
        if policies_changed
            || !cheap.local_pods_same
            || !cheap.services_same
            || !self.failed.is_empty()
            || !self.rules_failed.is_empty()
        {
            self.apply_policies();
        }
        // Freeing a large cluster's last set and table is off the data plane's thread too.
        drop_elsewhere((before, replaced, replaced_table));
    }

    /// Every pod of the node enrolled, no failed enrollment to retry, no kept or early
    /// enrollment to review: what a reconcile would look at when the node's pods stay the same.
    fn nothing_pending(&self, ws: &WorkloadSet) -> bool {
        self.failed.is_empty()
            && self.kept.is_empty()
            && self.bound.early.is_empty()
            && ws.on_node(&self.cfg.node).all(|w| self.pods.contains_key(&w.key()))
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
        // Kept pinned enrollments are looked at again too: their pod or namespace may be gone.
        if !self.kept.is_empty() || ws.on_node(&node).any(|w| !self.pods.contains_key(&w.key())) {
            self.reconcile(false);
        }
        if !self.rules_failed.is_empty() {
            self.apply_policies();
        }
    }

    /// Ends a handover from an older map layout unless an older instance still runs (it may
    /// put its inbound program back on a pod: asked again on every retry tick). Every enrolled
    /// pod gets this instance's inbound link first, replacing one the old instance put back.
    fn finish_layout_handover(&mut self) {
        if !self.capture.in_layout_handover()
            || !self.capture.layout_handover_blocked_by().is_empty()
        {
            return;
        }
        let mut left = 0;
        for (key, pod) in &self.pods {
            if let Err(e) = self.capture.attach_inbound(&pod.netns) {
                warn!(pod = %key, "re-attaching the inbound program at the end of a layout handover: {e}");
                left += 1;
            }
        }
        // A pod still on the older layout's inbound link reads its (then frozen) rules: the
        // older layout stays until every enrolled pod has ours.
        if left > 0 {
            warn!(
                pods = left,
                "map layout handover waits: enrolled pods still on an older inbound link"
            );
            return;
        }
        self.capture.finish_layout_handover();
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

    /// Writes the inbound rules of every enrolled pod, and of every pod held closed after a
    /// failed enrollment, from the current policies.
    fn apply_policies(&mut self) {
        let held = self
            .failed
            .iter()
            .filter_map(|(k, f)| Some((k.clone(), (f.workload.clone(), f.netns_cookie?))));
        let pods: Vec<(String, (Workload, u64))> = self
            .pods
            .iter()
            .map(|(k, p)| (k.clone(), (p.workload.clone(), p.netns.cookie())))
            .chain(held)
            .collect();
        self.rules_failed.clear();
        for (key, (w, cookie)) in pods {
            if let Err(e) = self.apply_pod_policy(&w, cookie) {
                error!(pod = %key, "applying policy: {}", crate::error_text(&e));
                self.rules_failed.insert(key);
            }
        }
    }

    /// Writes the inbound rules of pod `w`, whose network namespace has `netns_cookie`.
    fn apply_pod_policy(&mut self, w: &Workload, netns_cookie: u64) -> anyhow::Result<()> {
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
        // Plaintext the AuthorizationPolicies refuse (from any source) is refused in the kernel
        // as STRICT refuses it, so it stays refused while the agent is down.
        let refusals = self.refusals.get(&ps, w);
        for &(port, _) in &refusals.ports {
            if !rules.iter().any(|r| r.port == port) {
                let d = ps.decide(&ws, w, port);
                rules.push(InboundRule { port, mode: inbound_mode(d.mode), probe: false });
            }
        }
        for r in &mut rules {
            if r.mode != InboundMode::Strict && refusals.refuses(r.port) {
                r.mode = InboundMode::Strict;
            }
        }
        let strict_probe = rules.iter().any(|r| r.probe && r.mode == InboundMode::Strict);
        if strict_probe && self.cfg.kubelet_cgroup.is_none() {
            warn!(pod = %w.key(), "probePorts are declared under STRICT but --kubelet-cgroup is not set: STRICT refuses the kubelet's probes");
        }
        self.capture.set_inbound_rules(netns_cookie, &rules)?;
        // A retry of a failing enrollment writes the same rules again: not news.
        if self.failed.get(&w.key()).is_some_and(|f| f.workload == *w) {
            return Ok(());
        }
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
    /// ones, re-enrolls changed ones, retries failed ones. At start, also releases cookies a
    /// previous instance left enrolled for pods that are gone.
    fn reconcile(&mut self, at_start: bool) {
        let ws = self.workloads_tx.borrow().clone();
        let node = self.cfg.node.clone();
        let wanted: BTreeMap<String, &Workload> = ws.on_node(&node).map(|w| (w.key(), w)).collect();

        // A pod whose labels or probe ports changed, nothing of its identity: new rules in
        // place, same listeners, same capture (no gap, open connections carry on).
        let in_place: Vec<(String, Workload)> = self
            .pods
            .iter()
            .filter_map(|(k, p)| {
                let w = wanted.get(k)?;
                (**w != p.workload && w.same_identity(&p.workload))
                    .then(|| (k.clone(), (*w).clone()))
            })
            .collect();
        for (key, w) in in_place {
            let Some(pod) = self.pods.get_mut(&key) else { continue };
            pod.workload = w.clone();
            let cookie = pod.netns.cookie();
            match self.apply_pod_policy(&w, cookie) {
                Ok(()) => info!(pod = %key, "updated in place (labels or probe ports changed)"),
                // The next policy or pod change writes them again.
                Err(e) => error!(pod = %key, "updating policy in place: {}", crate::error_text(&e)),
            }
        }

        // A changed pod keeps its inbound program and capture until it is enrolled again: its
        // old namespace is released only if the new attempt does not use it.
        let mut previous: BTreeMap<String, u64> = BTreeMap::new();
        if at_start {
            // So does a pod a previous instance enrolled: held closed if this instance cannot
            // enroll it, released only once it is enrolled elsewhere or gone.
            let pinned = self.pinned_cookies();
            for (cookie, o) in &self.owners_at_start {
                let same_pod = wanted.get(&o.pod).is_some_and(|w| {
                    o.uid.is_none() || w.uid.is_none() || o.uid.as_deref() == w.uid.as_deref()
                });
                if same_pod && pinned.contains(cookie) && !previous.contains_key(&o.pod) {
                    previous.insert(o.pod.clone(), *cookie);
                }
            }
        }
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, p)| wanted.get(*k).is_none_or(|w| **w != p.workload))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(pod) = self.pods.remove(&key) {
                let cookie = pod.netns.cookie();
                let netns = pod.netns.clone();
                // Dropping the pod stops its listeners.
                drop(pod);
                if wanted.contains_key(&key) {
                    previous.insert(key, cookie);
                } else {
                    self.undo_in_pod(&key, &netns);
                    self.release_pod(&key, Some(cookie));
                    info!(pod = %key, "released");
                }
            }
        }
        let stale: Vec<String> = self
            .failed
            .iter()
            .filter(|(k, f)| wanted.get(*k).is_none_or(|w| **w != f.workload))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(f) = self.failed.remove(&key) {
                if wanted.contains_key(&key) {
                    if let Some(c) = f.netns_cookie {
                        previous.insert(key, c);
                    }
                } else {
                    self.release_pod(&key, f.netns_cookie);
                    self.failures.clear(&key);
                    info!(pod = %key, "released (it was never enrolled)");
                }
            }
        }
        for (key, w) in &wanted {
            if self.pods.contains_key(key) {
                continue;
            }
            // Enrolled before its IP: that namespace and its outbound listeners serve until
            // the full enrollment replaces them (no capture gap).
            let early = self.bound.early.remove(key);
            let attempt = self.enroll(w, early.as_ref().map(|e| &e.netns));
            let now_cookie = match &attempt {
                Ok(pod) => Some(pod.netns.cookie()),
                Err(e) => e.netns_cookie,
            };
            if let Some(e) = early {
                match &attempt {
                    Err(_) => {
                        self.bound.early.insert(key.clone(), e);
                    }
                    Ok(pod) if pod.netns.cookie() != e.netns.cookie() => {
                        let old = e.netns.cookie();
                        drop(e);
                        self.release_cookie(old);
                    }
                    Ok(_) => drop(e),
                }
            }
            // The namespace the pod is held closed in so far (a failed pod retried, a changed
            // one, one of a previous instance).
            let old = previous.remove(key).or_else(|| self.failed.get(key)?.netns_cookie);
            // A failure before anything is in place keeps the old enforcement: never open.
            let held = match &attempt {
                Err(e) if e.netns_cookie.is_none() => old,
                _ => None,
            };
            if let Some(old) = old {
                if now_cookie != Some(old) && held.is_none() {
                    self.release_cookie(old);
                }
            }
            match attempt {
                Ok(pod) => {
                    self.failed.remove(key);
                    match self.failures.clear(key) {
                        Some(f) => info!(
                            pod = %key,
                            ip = %w.ip,
                            cookie = pod.netns.cookie(),
                            attempts = f.attempts,
                            "enrolled (after {} failed attempts)", f.attempts
                        ),
                        None => {
                            info!(pod = %key, ip = %w.ip, cookie = pod.netns.cookie(), "enrolled")
                        }
                    }
                    self.pods.insert(key.clone(), pod);
                }
                Err(e) => {
                    let reason = crate::error_text(&e.error);
                    let netns_cookie = e.netns_cookie.or(held);
                    let closed = netns_cookie.is_some();
                    if self.failures.record(key, e.step, reason.clone(), closed) {
                        let holds = if closed {
                            "fails closed: STRICT ports refuse plaintext, outbound stays captured"
                        } else {
                            "nothing to hold closed"
                        };
                        warn!(
                            pod = %key,
                            step = e.step.as_str(),
                            "enrollment failed ({holds}); retrying every {}s: {reason}",
                            ENROLL_RETRY.as_secs()
                        );
                        if let (Some(client), Some(_)) = (&self.kube, &w.uid) {
                            tokio::spawn(kubernetes::events::enrollment_failed(
                                client.clone(),
                                (*w).clone(),
                                e.step,
                                reason.clone(),
                                node.clone(),
                                closed,
                            ));
                        }
                    } else {
                        tracing::debug!(pod = %key, step = e.step.as_str(), "enrollment failed again: {reason}");
                    }
                    let first_hold = held.is_some() && !self.failed.contains_key(key);
                    self.failed
                        .insert(key.clone(), FailedPod { workload: (*w).clone(), netns_cookie });
                    if let (true, Some(cookie)) = (first_hold, held) {
                        info!(pod = %key, cookie, "kept closed in its namespace enrolled before");
                        // Its rules follow the current policies while it is held.
                        if let Err(e) = self.apply_pod_policy(w, cookie) {
                            error!(pod = %key, "applying policy: {}", crate::error_text(&e));
                        }
                    }
                }
            }
        }
        self.failures.retain(|k| wanted.contains_key(k));
        if at_start {
            // Everything else a previous instance left pinned is looked at below; rules of a
            // cookie with neither capture nor an inbound program protect nothing.
            let ours = self.our_cookies();
            for cookie in self.pinned_cookies() {
                if !ours.contains(&cookie) {
                    self.kept.insert(cookie, self.owners_at_start.get(&cookie).cloned());
                }
            }
            let keep: Vec<u64> = ours.iter().chain(self.kept.keys()).copied().collect();
            self.capture.retain_inbound_rules(&keep);
        }
        self.review_kept(&wanted, at_start);
        self.update_readiness(wanted.len());
        self.announce_membership();
        self.save_owners();
    }

    /// Cookies of the pods this instance enrolled or holds closed, and of the namespaces it
    /// closed for held pods.
    fn our_cookies(&self) -> Vec<u64> {
        let mut v = self.enrolled_cookies();
        v.extend(self.closed_cookies());
        v
    }

    /// Cookies of the pods this instance enrolled or holds closed.
    fn enrolled_cookies(&self) -> Vec<u64> {
        self.pods
            .values()
            .map(|p| p.netns.cookie())
            .chain(self.failed.values().filter_map(|f| f.netns_cookie))
            .chain(self.early_cookies())
            .collect()
    }

    /// Cookies with pinned enforcement: capture or an inbound program.
    fn pinned_cookies(&self) -> Vec<u64> {
        let mut v = self.capture.enrolled_cookies();
        v.extend(self.capture.inbound_link_cookies());
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Releases the kept enrollments whose pod is known gone ([`owners::decide`]).
    fn review_kept(&mut self, wanted: &BTreeMap<String, &Workload>, at_start: bool) {
        let ours = self.our_cookies();
        self.kept.retain(|c, _| !ours.contains(c));
        let kept: Vec<(u64, Option<Owner>)> =
            self.kept.iter().map(|(c, o)| (*c, o.clone())).collect();
        for (cookie, owner) in kept {
            let (pods, bound) = (&self.pods, &self.bound);
            // A pod bound to this node without an IP yet is as wanted as a running one.
            let lookup = |k: &str| match wanted.get(k) {
                Some(w) => {
                    Some(owners::Wanted { uid: w.uid.as_deref(), enrolled: pods.contains_key(k) })
                }
                None => Some(owners::Wanted {
                    uid: Some(bound.uid_of(k)?),
                    enrolled: bound.early.contains_key(k),
                }),
            };
            let pod = owner.as_ref().map_or_else(|| "-".to_owned(), |o| o.pod.clone());
            match owners::decide(owner.as_ref(), lookup, self.capture.netns_alive(cookie)) {
                Verdict::Release(why) => {
                    self.kept.remove(&cookie);
                    self.release_cookie(cookie);
                    info!(
                        cookie,
                        pod, "released a pinned enrollment of a previous instance: {why}"
                    );
                }
                Verdict::HoldFor(pod) if at_start => {
                    warn!(cookie, pod, "kept closed: a pinned enrollment of this pod (from a previous instance) stays until the pod is enrolled again or leaves");
                }
                Verdict::KeepUnknown if at_start => {
                    warn!(cookie, "kept: a pinned enrollment of unknown owner (no entry in {}) stays until its network namespace is gone", owners::path(&self.cfg.admin_dir).display());
                }
                Verdict::HoldFor(_) | Verdict::KeepUnknown => {}
            }
        }
    }

    /// Posts one Event per change of a node's pod's place in the mesh: enrolled (an opted-in
    /// pod, once its listeners are up), skipped (opted in but out: a sidecar, a protected
    /// namespace), released (an enrolled pod opted out). Pods that never opted in get none.
    fn announce_membership(&mut self) {
        use kubernetes::{events, membership::Membership};
        let Some(client) = self.kube.clone() else { return };
        let node = self.cfg.node.clone();
        let members = self.membership.list();
        for m in &members {
            let uid = m.uid.clone().unwrap_or_default();
            let last = self.announced.get(&m.pod);
            let (said, type_, reason, message) = match &m.membership {
                Membership::In { by } => {
                    // Not enrolled yet, or failing (which has its own Event).
                    let Some(pod) = self.pods.get(&m.pod) else { continue };
                    let said = format!("enrolled {uid}");
                    if self.inherited.remove(&pod.netns.cookie()) {
                        self.announced.insert(m.pod.clone(), said);
                        continue;
                    }
                    let message = format!(
                        "enrolled in the mesh by mtls-agent on node {node} ({by}): its TCP \
                         connections to mesh pods are mutual TLS"
                    );
                    (said, "Normal", events::MESH_ENROLLED, message)
                }
                Membership::Out { reason, opted_in: true } => {
                    let message = format!("not enrolled by mtls-agent on node {node}: {reason}");
                    (format!("skipped {uid} {reason}"), "Warning", events::MESH_SKIPPED, message)
                }
                Membership::Out { reason, opted_in: false } => {
                    if !last.is_some_and(|l| l.starts_with("enrolled ")) {
                        continue;
                    }
                    let message =
                        format!("released from the mesh by mtls-agent on node {node}: {reason}");
                    (format!("released {uid}"), "Normal", events::MESH_RELEASED, message)
                }
            };
            if last == Some(&said) {
                continue;
            }
            self.announced.insert(m.pod.clone(), said);
            let pod = events::PodRef {
                name: m.name.clone(),
                namespace: m.namespace.clone(),
                uid: m.uid.clone(),
            };
            info!(pod = %m.pod, reason, "{message}");
            tokio::spawn(events::post(client.clone(), pod, type_, reason, message, node.clone()));
        }
        self.announced.retain(|k, _| members.iter().any(|m| m.pod == *k));
    }

    /// Writes which pod each pinned cookie is for, when that changed, for the next instance.
    fn save_owners(&mut self) {
        let owner =
            |w: &Workload| Owner { pod: w.key(), uid: w.uid.as_ref().map(|u| u.to_string()) };
        let mut now: BTreeMap<u64, Owner> = BTreeMap::new();
        // Before the first sync nothing of a previous instance is reviewed yet: its owners
        // stay recorded for the next instance.
        if !self.bound_synced() {
            now.extend(self.owners_at_start.iter().map(|(c, o)| (*c, o.clone())));
        }
        // Closed for held pods: a restart keeps them closed for their pod.
        now.extend(self.closed_owners());
        for (c, o) in &self.kept {
            if let Some(o) = o {
                now.insert(*c, o.clone());
            }
        }
        for f in self.failed.values() {
            if let Some(c) = f.netns_cookie {
                now.insert(c, owner(&f.workload));
            }
        }
        for p in self.pods.values() {
            now.insert(p.netns.cookie(), owner(&p.workload));
        }
        // Enrolled before their IP: known by name and uid too.
        for (key, e) in &self.bound.early {
            now.insert(e.netns.cookie(), Owner { pod: key.clone(), uid: Some(e.uid.clone()) });
        }
        if self.owners_written.as_ref() == Some(&now) {
            return;
        }
        match owners::save(&self.cfg.admin_dir, &now) {
            Ok(()) => self.owners_written = Some(now),
            Err(e) => warn!("{e}: a restart keeps these pods' enforcement as of unknown owner"),
        }
    }

    /// Ready once the programs are attached and the first sync is done, with listeners up in
    /// every pod that is enrolled: a pod that fails enrollment is held closed and named here,
    /// but cannot hold back the node (one tenant must not stall a rollout).
    fn update_readiness(&mut self, wanted: usize) {
        self.wanted = wanted;
        let enrolled = self.pods.len();
        let with_cert = self.pods.keys().filter(|k| self.mesh.certs.get(k).is_some()).count();
        let mut detail =
            format!("{enrolled} of {wanted} pods enrolled, {with_cert} with certificates");
        // The CA being down fails no probe: pods with certificates keep working, and an
        // unready node would stall the rollout that may be what brings the CA back.
        let waiting = self.mesh.certs.pending();
        if !waiting.is_empty() {
            detail.push_str(&format!(
                "; waiting for a first certificate, mesh traffic closed: {}",
                identity::describe_pending(&waiting)
            ));
        }
        if let Some((since, why)) = self.mesh.certs.health().failing {
            detail.push_str(&format!(
                "; the certificate service fails since {}: {why} (certificates in hand work until they expire)",
                humantime::format_rfc3339_seconds(since)
            ));
        }
        let failures = self.failures.list();
        if !failures.is_empty() {
            let names: Vec<String> = failures
                .iter()
                .map(|f| format!("{} ({}: {})", f.pod, f.step.as_str(), f.reason))
                .collect();
            detail.push_str(&format!("; not enrolled, held closed: {}", names.join("; ")));
        }
        if !self.kept.is_empty() {
            detail.push_str(&format!(
                "; {} pinned enrollments of a previous instance kept closed",
                self.kept.len()
            ));
        }
        // The last known policies stay in force while a source fails: named, not unready
        // (the node's pods are protected as they were).
        let sources = self.sources.failing();
        if !sources.is_empty() {
            detail.push_str(&format!("; {}", sources.join("; ")));
        }
        self.sources_failing = sources;
        self.readiness.set(true, detail);
    }

    /// Before the first sync: not ready, saying what is awaited (a policy source that fails
    /// holds the first sync back, so nothing is enrolled on a guess).
    fn update_waiting_readiness(&self) {
        let mut detail = "waiting for the first sync with the API server".to_owned();
        if let Some(why) = self.sources.waiting_for() {
            detail.push_str(&format!(": {why}"));
        }
        if self.readiness.get() != (false, detail.clone()) {
            self.readiness.set(false, detail);
        }
    }

    /// Puts back what the agent changed in a pod's namespace (a pod that leaves the mesh but
    /// lives on): `tcp_migrate_req`, if the agent turned it on.
    fn undo_in_pod(&self, key: &str, netns: &PodNetns) {
        let flags = self.capture.pod_flags(netns.cookie()).unwrap_or_default();
        if flags & crate::capture::POD_SET_MIGRATE_REQ != 0 {
            if let Err(e) = netns.disable_listener_migration() {
                warn!(pod = %key, "turning tcp_migrate_req off again: {e}");
            }
        }
    }

    /// Removes everything of a pod that left the node: capture, inbound program and rules,
    /// certificate.
    fn release_pod(&mut self, key: &str, netns_cookie: Option<u64>) {
        if let Some(cookie) = netns_cookie {
            self.release_cookie(cookie);
        }
        // The pod's key leaves memory with its certificate.
        self.mesh.certs.remove(key);
    }

    fn release_cookie(&mut self, cookie: u64) {
        if let Err(e) = self.capture.release(cookie) {
            warn!(cookie, "releasing: {e}");
        }
        self.capture.detach_inbound(cookie);
        if let Err(e) = self.capture.clear_inbound_rules(cookie) {
            warn!(cookie, "clearing inbound rules: {e}");
        }
    }

    /// Enrolls a pod, failing closed: its inbound program first (with no rules yet it refuses
    /// every connection from outside the pod), then its rules, then capture (its connect()s are
    /// redirected to the agent's listener, refused until that exists), and only then its
    /// certificate and the agent's listeners. A failure at any step leaves the pod closed,
    /// never open; the caller retries.
    fn enroll(
        &mut self,
        w: &Workload,
        early: Option<&PodNetns>,
    ) -> Result<EnrolledPod, EnrollError> {
        let fail = |step: Step, netns_cookie: Option<u64>| {
            move |error: anyhow::Error| EnrollError { step, netns_cookie, error }
        };
        let netns = match (&w.netns, &w.uid, &self.cfg.source) {
            (Some(path), _, _) => PodNetns::open(path).map_err(anyhow::Error::from),
            (None, Some(uid), Source::Kubernetes(_)) => self.kube_netns(uid, &w.ips, early),
            _ => Err(anyhow::anyhow!("no netns for this pod")),
        }
        .map_err(fail(Step::Netns, None))?;
        let cookie = netns.cookie();
        self.capture
            .attach_inbound(&netns)
            .map_err(|e| fail(Step::InboundProgram, None)(e.into()))?;
        let closed = Some(cookie);
        self.apply_pod_policy(w, cookie).map_err(fail(Step::InboundRules, closed))?;
        // Whether the agent turns tcp_migrate_req on here is recorded with the pod's entry, so
        // `mtls-agent uninstall` turns it off again (and leaves a pod's own setting alone).
        let migration = netns.listener_migration();
        let flags = match migration {
            Ok(false) => crate::capture::POD_SET_MIGRATE_REQ,
            _ => 0,
        };
        self.capture
            .enroll_with_flags(cookie, flags)
            .map_err(|e| fail(Step::Capture, closed)(e.into()))?;
        // Queued connections of a closing listener move to the next instance's (handover).
        let enabled = match migration {
            Ok(false) => netns.enable_listener_migration(),
            other => other.map(|_| ()),
        };
        if let Err(e) = enabled {
            warn!(pod = %w.key(), "tcp_migrate_req unavailable, a handover may drop queued connections: {e}");
        }
        // The certificate exists before any listener does, so the first connection waits for
        // nothing; a retry keeps the one it has, unless it names another identity (the pod was
        // recreated under the same name with another service account).
        let id = SpiffeId::new(&self.cfg.trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| fail(Step::Certificate, closed)(e.into()))?;
        self.want_certificate(&w.key(), &id)
            .map_err(|e| fail(Step::Certificate, closed)(e.into()))?;
        let tasks = self.start_listeners(w, &netns).map_err(fail(Step::Listeners, closed))?;
        let _netns_entry = self.mesh.netns.register(w.key(), &netns);
        Ok(EnrolledPod { workload: w.clone(), netns, _tasks: tasks, _netns_entry })
    }

    /// Says the pod holds `id`. With `--ca-dir` its certificate is signed here and now, so
    /// it exists before any listener does. With a certificate service the store's driver asks
    /// for it: enrollment never waits on the network, and the pod's mesh connections wait a
    /// little for it, then fail closed.
    fn want_certificate(&self, key: &str, id: &SpiffeId) -> Result<(), identity::IdentityError> {
        if let (None, Some(signer)) = (self.mesh.certs.want(key, id), &self.signer) {
            self.mesh.certs.insert(key, signer.issue(id, self.cfg.cert_ttl)?);
        }
        Ok(())
    }

    /// Opens the agent's listeners in the pod and steers the agent's ports to them. Each is
    /// bound on its fixed port (`SO_REUSEPORT`, so a new instance binds beside an old one);
    /// if an app holds that port, on a free one, and the pod's inbound program hands the
    /// agent's port to it all the same.
    fn start_listeners(&mut self, w: &Workload, netns: &PodNetns) -> anyhow::Result<Tasks> {
        use mtls_agent_ebpf::{SLOT_TUNNEL_V4, SLOT_TUNNEL_V6};
        let cookie = netns.cookie();
        // Dropped on failure: every task started so far stops.
        let mut tasks = Tasks::default();
        self.start_outbound(&w.key(), netns, &mut tasks)?;
        let ictx = Arc::new(InboundContext::new(w.key(), w.ip, netns.clone(), self.mesh.clone()));
        let primary = listen_steered(netns, SocketAddr::new(w.ip, HBONE_PORT))?;
        let (slot, other) = match w.ip {
            IpAddr::V4(_) => (SLOT_TUNNEL_V4, SocketAddr::from(([0u16; 8], HBONE_PORT))),
            IpAddr::V6(_) => (SLOT_TUNNEL_V6, SocketAddr::from(([0u8; 4], HBONE_PORT))),
        };
        self.capture.set_listener(cookie, slot, &primary)?;
        tasks.0.push(tokio::spawn(inbound::serve(TcpListener::from_std(primary)?, ictx.clone())));
        // Tunnels to the pod's addresses of the other family (peers dial the primary address;
        // this serves those that dial another).
        let other_slot = if slot == SLOT_TUNNEL_V4 { SLOT_TUNNEL_V6 } else { SLOT_TUNNEL_V4 };
        match listen_steered(netns, other) {
            Ok(l) => {
                self.capture.set_listener(cookie, other_slot, &l)?;
                tasks.0.push(tokio::spawn(inbound::serve(TcpListener::from_std(l)?, ictx)));
            }
            Err(e) => tracing::debug!(pod = %w.key(), "no tunnel listener for {other}: {e}"),
        }
        Ok(tasks)
    }
}

impl Agent {
    /// Opens the agent's outbound listeners in the pod (loopback, port 15001) and steers
    /// captured connections to them; they need no pod IP.
    fn start_outbound(
        &mut self,
        key: &str,
        netns: &PodNetns,
        tasks: &mut Tasks,
    ) -> anyhow::Result<()> {
        use mtls_agent_ebpf::{SLOT_OUTBOUND_V4, SLOT_OUTBOUND_V6};
        let cookie = netns.cookie();
        let ctx = Arc::new(OutboundContext {
            pod: key.to_owned(),
            netns: netns.clone(),
            orig_dst: self.orig_dst.clone(),
            mesh: self.mesh.clone(),
            next_endpoint: self.next_endpoint.clone(),
        });
        let v4: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into();
        let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT).into();
        let l4 = listen_steered(netns, v4)?;
        self.capture.set_listener(cookie, SLOT_OUTBOUND_V4, &l4)?;
        tasks.0.push(tokio::spawn(outbound::serve(TcpListener::from_std(l4)?, ctx.clone())));
        match listen_steered(netns, v6) {
            Ok(l6) => {
                self.capture.set_listener(cookie, SLOT_OUTBOUND_V6, &l6)?;
                tasks.0.push(tokio::spawn(outbound::serve(TcpListener::from_std(l6)?, ctx)));
            }
            // A pod without IPv6 loopback still gets IPv4 capture (IPv6 connect()s are refused).
            Err(e) => warn!(pod = %key, "no IPv6 outbound listener: {e}"),
        }
        Ok(())
    }
}

/// A listener of the agent in the pod on `addr`, or on the same address and a free port when
/// something else holds `addr` (the pod's inbound program steers the agent's port to it).
fn listen_steered(netns: &PodNetns, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    match netns.listen(addr, LISTEN_BACKLOG) {
        Ok(l) => Ok(l),
        Err(e) if e.is_addr_in_use() => {
            let l = netns.listen(SocketAddr::new(addr.ip(), 0), LISTEN_BACKLOG)?;
            let got = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            warn!(listener = %got, "{addr} is taken in the pod (not by this agent): listening on {got}, the agent's port steered to it");
            Ok(l)
        }
        Err(e) => Err(e.into()),
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
            let Some((client, dst, no_rules)) = crate::capture::parse_reject_event(&item) else {
                continue;
            };
            let ws = mesh.workloads.borrow().clone();
            let pod = ws.by_ip(dst.ip());
            if no_rules {
                mesh.stats
                    .inbound_plaintext_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let policy = "none: fail closed (the pod has no inbound rules: being enrolled, or its enrollment failed)";
                // Rate-limited as every refusal line: a flood must not flood the log.
                let Some(more) = crate::loglimit::refusal(client.ip(), dst, policy) else {
                    continue;
                };
                warn!(
                    src = %client,
                    dst = %dst,
                    dst_pod = pod.map(|w| w.key()).unwrap_or_default(),
                    policy,
                    "rejected: connection to port {} of a pod held closed{more}",
                    dst.port()
                );
                continue;
            }
            let ps = mesh.policies.borrow().clone();
            let decision = pod.map(|w| ps.decide(&ws, w, dst.port()));
            mesh.stats
                .inbound_plaintext_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let (Some(w), Some(d)) = (pod, decision.as_ref()) {
                if d.mode != crate::policy::Mode::Strict {
                    // Not the mode: the AuthorizationPolicies refused it (see apply_pod_policy).
                    log_plaintext_denial(&mesh, &ps, w, client, dst);
                    continue;
                }
            }
            let policy = decision.map(|d| d.reason);
            let policy = policy.as_deref().unwrap_or("none: destination not in the workload set");
            // A flood of refused connections from one source writes one line per 10 s.
            let Some(more) = crate::loglimit::refusal(client.ip(), dst, policy) else { continue };
            warn!(
                src = %client,
                dst = %dst,
                dst_pod = pod.map(|w| w.key()).unwrap_or_default(),
                policy,
                "rejected: plaintext to STRICT port {}{more}",
                dst.port()
            );
        }
    })
    .await
}

/// A plaintext connection the kernel refused for a port that is not STRICT: the
/// AuthorizationPolicies refuse plaintext there. Counted and logged with the policy, as the
/// agent's own denials are; a source the policies would admit is refused all the same (the
/// kernel holds one verdict per port), and the line says so.
fn log_plaintext_denial(
    mesh: &Mesh,
    ps: &crate::policy::PolicySet,
    w: &Workload,
    client: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) {
    let conn = crate::authz::Conn { peer: None, src: client.ip(), dst: dst.ip(), port: dst.port() };
    let v = ps.authorize(w, &conn);
    mesh.stats.authz.record(&v, "plaintext");
    let (policy, what) = if v.allowed {
        (
            "none: fail closed".to_owned(),
            "plaintext refused: the AuthorizationPolicies of this port refuse plaintext from \
             other sources, and the kernel holds one verdict per port"
                .to_owned(),
        )
    } else {
        (v.policy_label(), format!("plaintext (no peer identity) {}", v.reason))
    };
    let Some(more) = crate::loglimit::refusal(client.ip(), dst, &policy) else { return };
    warn!(src = %client, dst = %dst, dst_pod = %w.key(), policy = %policy, "rejected: {what}{more}");
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
