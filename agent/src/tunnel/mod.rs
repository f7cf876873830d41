//! Tunnel: carries captured connections to their destination.
//!
//! - `outbound`: a pod's captured connections (its `127.0.0.1:15001` listener). To a mesh
//!   workload they go in HBONE over mutual TLS to the destination's `podIP:15008`; to anything
//!   else, as plain TCP.
//! - `inbound`: a pod's `podIP:15008` listener: terminates mutual TLS, checks the peer, serves
//!   HBONE and relays each stream to the app port inside the pod.
//! - `hbone`: the HTTP/2 CONNECT protocol itself and the connection pool.

pub mod connections;
pub mod hbone;
pub mod inbound;
pub mod limits;
pub mod outbound;

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

pub use connections::{ConnectionRecord, ConnectionTable};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    identity::{CertStore, SharedTrust, SpiffeId},
    policy::PolicySet,
    workloads::WorkloadSet,
};

/// Accepts connections on one of a pod's listeners until the task is aborted, handling each in
/// its own task, counted by `drain` from the moment it is accepted.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    pod: &str,
    drain: &Drain,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let task = drain.track();
                let fut = handle(stream, peer);
                tokio::spawn(async move {
                    fut.await;
                    drop(task);
                });
            }
            Err(e) => {
                // Out of fds or similar: back off instead of spinning.
                tracing::warn!(pod, "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a handover waits for: every accepted connection's task, from accept to its last byte
/// (an inbound HBONE connection counts until its HTTP/2 connection has closed). `start` asks the
/// long-lived ones to wind down: HBONE servers send GOAWAY so peers open new tunnels elsewhere.
#[derive(Clone)]
pub struct Drain {
    draining: Arc<watch::Sender<bool>>,
    tasks: Arc<AtomicUsize>,
}

/// One accepted connection's task; counted while alive.
pub struct DrainTask(Arc<AtomicUsize>);

impl Drop for DrainTask {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain { draining: Arc::new(watch::channel(false).0), tasks: Arc::default() }
    }
}

impl Drain {
    pub fn track(&self) -> DrainTask {
        self.tasks.fetch_add(1, Ordering::AcqRel);
        DrainTask(self.tasks.clone())
    }

    /// Tasks accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.tasks.load(Ordering::Acquire)
    }

    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Completes once [`Drain::start`] has been called.
    pub fn started(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            // Err only if the sender is gone, i.e. the agent is exiting anyway.
            let _ = rx.wait_for(|d| *d).await;
        }
    }
}

/// Pooled HBONE connections are shared per (source pod, source identity, destination identity,
/// destination IP): a stream never rides a connection authenticated as someone else, nor one
/// dialled from another pod's namespace (another source IP), even of the same service account.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    /// Cookie of the source pod's network namespace, which the connection is dialled from.
    pub src_netns: u64,
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub dst_ip: IpAddr,
}

/// What every listener of the node shares.
/// How long a connection of a pod waits for the pod's first certificate (asked for when the
/// pod was enrolled) before it is refused: closed, never plaintext.
pub const FIRST_CERT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Mesh {
    pub trust_domain: String,
    /// The roots peers' chains must lead to (replaced on a root rotation).
    pub trust: Arc<SharedTrust>,
    pub certs: Arc<CertStore>,
    pub pool: hbone::Pool<PoolKey>,
    pub conns: ConnectionTable,
    pub drain: Drain,
    pub workloads: watch::Receiver<Arc<WorkloadSet>>,
    /// Where each service VIP goes from this node, built once per workload set.
    pub services: crate::services::ServiceCache,
    pub policies: watch::Receiver<Arc<PolicySet>>,
    pub stats: TunnelStats,
    /// The enrolled pods' network namespaces (for `check`'s UDP listeners).
    pub netns: crate::inpod::EnrolledNetns,
}

impl Mesh {
    /// The SPIFFE id of a workload of this mesh.
    pub fn identity_of(&self, w: &crate::workloads::Workload) -> Option<SpiffeId> {
        SpiffeId::new(&self.trust_domain, &w.namespace, &w.service_account).ok()
    }
}

/// The direction label of a counter.
pub const INBOUND: &str = "inbound";
pub const OUTBOUND: &str = "outbound";

/// Counts by (direction, reason). Both are static strings, so the label set stays bounded
/// whatever the traffic (never an address or a port).
#[derive(Default)]
pub struct ReasonCounts(
    std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
);

impl ReasonCounts {
    pub fn count(&self, direction: &'static str, reason: &'static str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((direction, reason)).or_default() += 1;
    }

    /// (direction, reason, count), sorted.
    pub fn get(&self) -> Vec<(&'static str, &'static str, u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|((d, r), n)| (*d, *r, *n)).collect()
    }
}

/// Authorization outcomes by (deciding policy, `mtls`/`plaintext`, verdict). Policy names are
/// bounded by the policies the operator wrote; past [`AuthzCounts::MAX_KEYS`] keys the rest
/// count under policy `_other`, so a churn of policy names cannot grow memory without bound.
#[derive(Default)]
pub struct AuthzCounts(std::sync::Mutex<std::collections::BTreeMap<AuthzKey, u64>>);

/// (policy, mode, verdict): verdict is `denied`, `allowed` or `audited`.
pub type AuthzKey = (String, &'static str, &'static str);

impl AuthzCounts {
    pub const MAX_KEYS: usize = 1024;

    /// Counts a denial (by its policy, or `default-deny`) and every AUDIT match; allowed
    /// connections are not counted here (the connection counters have them).
    pub fn record(&self, v: &crate::authz::Verdict, mode: &'static str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut add = |policy: String, verdict: &'static str| {
            let full = m.len() >= Self::MAX_KEYS;
            let key = (policy, mode, verdict);
            let key =
                if full && !m.contains_key(&key) { ("_other".into(), mode, verdict) } else { key };
            *m.entry(key).or_default() += 1;
        };
        if !v.allowed {
            add(v.policy_label(), "denied");
        }
        for a in &v.audited {
            add(a.policy.to_string(), "audited");
        }
    }

    pub fn get(&self) -> Vec<(AuthzKey, u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, n)| (k.clone(), *n)).collect()
    }
}

/// Counters not kept elsewhere (the pool counts client handshakes itself).
#[derive(Default)]
pub struct TunnelStats {
    pub inbound_handshakes: AtomicU64,
    pub inbound_handshake_failures: AtomicU64,
    pub inbound_refused_streams: AtomicU64,
    /// Plaintext refused by a STRICT port in the kernel (and logged by the agent).
    pub inbound_plaintext_rejected: AtomicU64,
    pub outbound_failures: AtomicU64,
    /// Failed TLS handshakes by direction and reason (`not_tls`, `unknown_ca`, ...).
    pub tls_failures: ReasonCounts,
    /// Other refusals by direction and reason: HBONE requests (`hbone:...`), outbound dials.
    pub rejections: ReasonCounts,
    /// Refusals of the agent's own HTTP servers by server (`admin`, `metrics`, `health`) and
    /// reason (`connection_limit`, `header_timeout`, `body_too_large`).
    pub servers: ReasonCounts,
    /// L4 authorization: denials and AUDIT matches by policy.
    pub authz: AuthzCounts,
}

/// The negotiated TLS version and cipher suite, one format for both directions:
/// `TLSv1.3 TLS13_AES_256_GCM_SHA384`.
pub fn tls_description(s: &rustls::CommonState) -> String {
    let version = match s.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_owned(),
    };
    match s.negotiated_cipher_suite() {
        Some(c) => format!("{version} {:?}", c.suite()),
        None => version,
    }
}

/// A snapshot of the counters for the admin API.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Client-side TLS handshakes (new pooled HBONE connections).
    pub outbound_handshakes: u64,
    pub outbound_connect_failures: u64,
    pub outbound_streams: u64,
    pub outbound_live_connections: u64,
    pub outbound_failures: u64,
    pub inbound_handshakes: u64,
    pub inbound_handshake_failures: u64,
    pub inbound_refused_streams: u64,
}

impl Mesh {
    pub fn stats(&self) -> StatsSnapshot {
        let p = self.pool.stats();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            outbound_handshakes: p.connections_created,
            outbound_connect_failures: p.connect_failures,
            outbound_streams: p.streams_opened,
            outbound_live_connections: p.live_connections as u64,
            outbound_failures: get(&self.stats.outbound_failures),
            inbound_handshakes: get(&self.stats.inbound_handshakes),
            inbound_handshake_failures: get(&self.stats.inbound_handshake_failures),
            inbound_refused_streams: get(&self.stats.inbound_refused_streams),
        }
    }
}
