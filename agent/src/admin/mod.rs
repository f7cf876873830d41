//! Admin HTTP API (local only): what the agent knows and what it is carrying. It listens on a
//! unix socket per instance (mode 0600 in a 0700 directory, see `socket`), and on a loopback
//! TCP address only when asked for (`--admin`).
//!
//! - `GET /config_dump`: workloads, services and where each service port goes from this node
//!   (`serviceEndpoints`), policies, the effective mode of every pod of this node per port with
//!   the deciding policy, the certificates, and (Kubernetes mode) whether each pod of this
//!   node is in the mesh and why (`membership`);
//! - `GET /connections`: live and recently closed connections (JSON);
//! - `GET /workloads`: the workloads and services in force (JSON);
//! - `GET /certs`: the workload certificates (identity, serial, validity, next renewal);
//! - `GET /stats`: tunnel counters (handshakes, streams, failures);
//! - `GET /check?pod=NAME.NAMESPACE`: the pod's listeners and outbound destinations, each with
//!   its mTLS mode and the policy that decided; for a pod of this node that is not in the
//!   mesh, why not;
//! - `GET /debug/destinations?ips=A,B`: the pod known at each address (name, uid), the probe
//!   of whether a pod change is applied (see `destinations`);
//! - `GET /healthz` (or `/healthz/live`): liveness; `GET /healthz/ready`: readiness, as on the
//!   health address (the CLI asks it to pick the ready instance; `mtls-agent probe` asks it for
//!   the kubelet, see `probe`);
//! - `POST /logging?level=debug` (any `RUST_LOG`-style filter): change the log level at run time.
//!
//! Beside it, on their own addresses: `/metrics` (Prometheus) and `/healthz/ready` (readiness).

pub mod check;
pub mod client;
pub mod destinations;
pub mod metrics;
pub mod probe;
pub mod socket;

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::Semaphore,
};
use tracing::{debug, warn};

use crate::{
    capture::{EbpfStats, StatsReader},
    tunnel::Mesh,
};

/// Changes the log filter at run time; returns the error text for a bad filter.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub node: String,
    pub mesh: Arc<Mesh>,
    pub ebpf: Option<Arc<StatsReader>>,
    pub set_log_level: Option<SetLogLevel>,
    pub readiness: Readiness,
    /// Pods of this node whose enrollment failed (held closed, retried).
    pub enrollment: crate::enrollment::Failures,
    /// Kubernetes mode: whether each pod of this node is in the mesh, and why.
    pub membership: crate::kubernetes::membership::Registry,
    /// Kubernetes mode: whether each policy kind is served and answers (empty in file mode).
    pub policy_sources: crate::kubernetes::sources::Sources,
    /// Kubernetes mode on a node the agent refuses: why it captures nothing (`refused`).
    pub refusal: Option<Arc<crate::refused::Refusal>>,
}

/// Whether this instance serves: programs attached, first sync done, listeners up in the pods it
/// enrolled. What fails beside that (a pod not enrolled, a certificate, a policy source) is
/// named in the detail, never made unready: one tenant must not stall a rollout.
#[derive(Clone, Default)]
pub struct Readiness(Arc<std::sync::Mutex<(bool, String)>>);

impl Readiness {
    pub fn set(&self, ready: bool, detail: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (ready, detail);
    }

    pub fn get(&self) -> (bool, String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `/stats`: the tunnel's counters and the eBPF programs' own.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    #[serde(flatten)]
    tunnel: crate::tunnel::StatsSnapshot,
    ebpf: Option<EbpfStats>,
}

/// A workload certificate as the admin API shows it (never the key).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertView {
    workload: String,
    identity: String,
    /// `issued`, or `waiting` for the first certificate (the pod's mesh traffic is closed).
    state: &'static str,
    /// Empty while waiting.
    serial: String,
    not_before: Option<String>,
    not_after: Option<String>,
    /// The next request: a renewal, or the next try for a first certificate.
    next_renewal: String,
    renewal_failures: u32,
    last_error: Option<String>,
    /// Which CA signed it (while waiting: none yet).
    issued_by: Option<String>,
    /// While waiting: since when.
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting_since: Option<String>,
}

/// `/config_dump`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDump {
    node: String,
    trust_domain: String,
    workloads: crate::workloads::WorkloadSet,
    policies: Vec<crate::policy::PolicyRef>,
    effective: Vec<EffectivePolicy>,
    certificates: Vec<CertView>,
    /// Pods of this node that are not enrolled: why, since when, how many attempts.
    not_enrolled: Vec<crate::enrollment::Failure>,
    /// Kubernetes mode: every pod of this node, in the mesh or not, and why.
    membership: Vec<crate::kubernetes::membership::PodMembership>,
    /// Every service port and the endpoints a connection from this node goes to, mesh
    /// workloads (`pod`) or not.
    service_endpoints: Vec<RouteView>,
    /// Kubernetes mode: each policy kind, whether it is served and whether it answers.
    policy_sources: Vec<crate::kubernetes::sources::SourceView>,
    /// Why nothing on this node is captured, on a node the agent refuses.
    capture_refused: Option<String>,
}

/// A service port's route, with the mesh pod (`name.namespace`) at each endpoint, if any.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RouteView {
    service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    vip: Option<std::net::IpAddr>,
    port: u16,
    backends: Vec<BackendView>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    node_local: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BackendView {
    address: std::net::SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
}

/// The effective mode of one pod of this node: its default and every port with its own rule.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EffectivePolicy {
    pod: String,
    default: crate::policy::Decision,
    ports: Vec<PortDecision>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PortDecision {
    port: u16,
    #[serde(flatten)]
    decision: crate::policy::Decision,
}

fn config_dump(state: &AdminState) -> ConfigDump {
    let ws = state.mesh.workloads.borrow().clone();
    let ps = state.mesh.policies.borrow().clone();
    let effective = ws
        .on_node(&state.node)
        .map(|w| {
            let (default, ports) = ps.workload_modes(&ws, w);
            let mut ports: Vec<PortDecision> =
                ports.into_iter().map(|(port, decision)| PortDecision { port, decision }).collect();
            // Every port the workload serves through a service or is probed on gets its answer,
            // not only those a policy names.
            let served = check::service_target_ports(&ws, w);
            for port in served.into_iter().chain(w.probe_ports.iter().copied()) {
                if !ports.iter().any(|p| p.port == port) {
                    ports.push(PortDecision { port, decision: ps.decide(&ws, w, port) });
                }
            }
            ports.sort_by_key(|p| p.port);
            EffectivePolicy { pod: w.key(), default, ports }
        })
        .collect();
    ConfigDump {
        node: state.node.clone(),
        trust_domain: state.mesh.trust_domain.clone(),
        policies: ps.policies().cloned().collect(),
        workloads: (*ws).clone(),
        effective,
        certificates: certs(state),
        not_enrolled: state.enrollment.list(),
        membership: state.membership.list(),
        service_endpoints: state
            .mesh
            .services
            .table(&ws)
            .routes()
            .map(|r| RouteView {
                service: r.service.clone(),
                vip: r.vip,
                port: r.port,
                node_local: r.node_local,
                backends: r
                    .backends
                    .iter()
                    .map(|&address| BackendView {
                        address,
                        pod: ws.by_ip(address.ip()).map(|w| w.key()),
                    })
                    .collect(),
            })
            .collect(),
        policy_sources: state.policy_sources.list(),
        capture_refused: state.refusal.as_ref().map(|r| r.describe(&state.node)),
    }
}

fn certs(state: &AdminState) -> Vec<CertView> {
    let t = |s: std::time::SystemTime| humantime::format_rfc3339_seconds(s).to_string();
    let issued = state.mesh.certs.list().into_iter().map(|c| CertView {
        workload: c.workload,
        identity: c.identity.to_string(),
        state: "issued",
        serial: c.serial,
        not_before: Some(t(c.not_before)),
        not_after: Some(t(c.not_after)),
        next_renewal: t(c.next_renewal),
        renewal_failures: c.renewal_failures,
        last_error: c.last_error,
        issued_by: Some(c.issued_by),
        waiting_since: None,
    });
    let waiting = state.mesh.certs.pending().into_iter().map(|p| CertView {
        workload: p.workload,
        identity: p.identity.to_string(),
        state: "waiting",
        serial: String::new(),
        not_before: None,
        not_after: None,
        next_renewal: t(p.next_attempt),
        renewal_failures: p.failures,
        last_error: p.last_error,
        issued_by: None,
        waiting_since: Some(t(p.since)),
    });
    let mut all: Vec<CertView> = issued.chain(waiting).collect();
    all.sort_by(|a, b| a.workload.cmp(&b.workload));
    all
}

/// What the local servers listen on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Listener {
    /// The next connection and, for TCP, its peer (for the refusal log).
    async fn accept(&self) -> std::io::Result<(Box<dyn Io>, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Box::new(s), peer.ip().to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), "unix socket".to_owned()))
            }
        }
    }
}

/// Bounds of the admin, metrics and health servers: what 2,000 idle or slow clients can hold.
/// A scrape or a probe sends its headers at once; 5 s is plenty on a loaded node.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, however busy: bounds keep-alive connections that idle
/// between requests (scrapers reconnect; every answer is small and quick).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once per server; past it new ones are closed at once, counted.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one source address may hold at once on one server: a pod that reconnects in a
/// loop holds at most this many of the slots, and the kubelet's probe (from the node's
/// address) or Prometheus' scrape still finds one. A scraper or a probe needs one or two.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// No endpoint takes a body: larger requests get 413 and the connection is closed.
const MAX_BODY: u64 = 4096;
/// The smallest read buffer hyper accepts: it bounds the request head.
const MAX_HEAD: usize = 8192;

/// Serves the admin API.
pub async fn serve(listener: impl Into<Listener>, state: AdminState) {
    serve_with(listener.into(), "admin", state, route).await
}

/// Serves `/metrics`.
pub async fn serve_metrics(listener: impl Into<Listener>, state: AdminState) {
    serve_with(listener.into(), "metrics", state, |state, req| match req.uri().path() {
        "/metrics" => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(metrics::render(state))))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
    })
    .await
}

/// Serves `/healthz/ready`: 200 once this instance serves (see [`Readiness`]), 503 before.
pub async fn serve_health(listener: impl Into<Listener>, state: AdminState) {
    serve_with(listener.into(), "health", state, |state, req| match req.uri().path() {
        "/healthz/ready" => ready(state),
        "/healthz/live" | "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz/ready\n"),
    })
    .await
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    match state.readiness.get() {
        (true, detail) => text(StatusCode::OK, &format!("ready: {detail}\n")),
        (false, detail) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {detail}\n")),
    }
}

/// Counts a refused connection or request of a local server and logs it (rate-limited).
fn refused(state: &AdminState, server: &'static str, reason: &'static str, peer: &str) {
    state.mesh.stats.servers.count(server, reason);
    if let Some(more) = crate::loglimit::refusal(peer, server, reason) {
        let why = match reason {
            "connection_limit" => format!("{MAX_CONNECTIONS} connections already open"),
            "source_limit" => {
                format!("{MAX_CONNECTIONS_PER_SOURCE} connections from this address already open")
            }
            "header_timeout" => format!("request headers not complete within {HEADER_TIMEOUT:?}"),
            "body_too_large" => "a request with a body (none is accepted)".to_owned(),
            other => other.to_owned(),
        };
        warn!(server, src = peer, reason, "rejected: {server} connection: {why}{more}");
    }
}

async fn serve_with(
    listener: Listener,
    server: &'static str,
    state: AdminState,
    route: fn(&AdminState, Request<Incoming>) -> Response<Full<Bytes>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = Arc::new(crate::tunnel::limits::SourceCounts::new(MAX_CONNECTIONS_PER_SOURCE));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of fds or similar: back off instead of spinning.
                debug!(server, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Per source first: one source's flood then never takes the node-wide slots. The unix
        // socket (root only) has no source address, and the node's own 127.0.0.1 / ::1 (tools
        // run on the host; a pod never has that source here) no per-source bound.
        let source_slot = match peer.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_loopback() && (ip == std::net::Ipv4Addr::LOCALHOST || ip.is_ipv6()) => {
                None
            }
            Ok(ip) => match crate::tunnel::limits::SourceSlot::acquire(&per_source, ip) {
                Some(s) => Some(s),
                None => {
                    drop(stream);
                    refused(&state, server, "source_limit", &peer);
                    continue;
                }
            },
            Err(_) => None,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            refused(&state, server, "connection_limit", &peer);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slots = (slot, source_slot);
            let st = state.clone();
            let svc = service_fn(move |req| {
                let state = st.clone();
                async move { Ok::<_, Infallible>(bounded(&state, server, req, route)) }
            });
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_timeout() => refused(&state, server, "header_timeout", &peer),
                Ok(Err(e)) => debug!(server, "connection: {e}"),
                // Dropping the connection closes it.
                Err(_) => debug!(server, "connection closed after {CONNECTION_LIFETIME:?}"),
            }
        });
    }
}

/// Refuses requests with a body (none of ours takes one), then routes.
fn bounded(
    state: &AdminState,
    server: &'static str,
    req: Request<Incoming>,
    route: fn(&AdminState, Request<Incoming>) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    let length = req.headers().get(hyper::header::CONTENT_LENGTH);
    let length = length.and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = req.headers().contains_key(hyper::header::TRANSFER_ENCODING);
    if chunked || length.is_some_and(|n| n > MAX_BODY) {
        refused(state, server, "body_too_large", "local client");
        let mut r = text(StatusCode::PAYLOAD_TOO_LARGE, "request bodies are not accepted\n");
        r.headers_mut()
            .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
        return r;
    }
    route(state, req)
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/logging" && req.method() == Method::POST {
        return set_logging(state, req.uri().query().unwrap_or_default());
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET (and POST /logging)\n");
    }
    match req.uri().path() {
        "/config_dump" => json(&config_dump(state)),
        "/connections" => json(&state.mesh.conns.snapshot()),
        "/workloads" => json(&**state.mesh.workloads.borrow()),
        "/certs" => json(&certs(state)),
        "/stats" => {
            json(&Stats { tunnel: state.mesh.stats(), ebpf: state.ebpf.as_ref().map(|r| r.read()) })
        }
        "/check" if state.refusal.is_some() => {
            let why = state.refusal.as_ref().map(|r| r.describe(&state.node)).unwrap_or_default();
            text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n"))
        }
        "/check" => {
            let pod = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("pod="));
            match pod.map(|p| (p, check::check(state, p))) {
                Some((_, Some(report))) => json(&report),
                Some((p, None)) => text(
                    StatusCode::NOT_FOUND,
                    &format!("no workload {p} (expected NAME.NAMESPACE)\n"),
                ),
                None => text(StatusCode::BAD_REQUEST, "usage: /check?pod=NAME.NAMESPACE\n"),
            }
        }
        "/debug/destinations" => {
            let ws = state.mesh.workloads.borrow().clone();
            match destinations::lookup(&ws, req.uri().query().unwrap_or_default()) {
                Ok(found) => json(&found),
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            }
        }
        "/healthz" | "/healthz/live" => text(StatusCode::OK, "ok\n"),
        "/healthz/ready" => ready(state),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /config_dump, /connections, /workloads, /certs, /stats, /check?pod=, /healthz, /healthz/ready\n",
        ),
    }
}

fn set_logging(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    // Percent-decoded: a filter such as `info,mtls_agent_ebpf=debug` arrives encoded from
    // curl --data-urlencode and most HTTP clients.
    let level = form_urlencoded::parse(query.as_bytes())
        .find_map(|(k, v)| (k == "level").then_some(v.into_owned()));
    let Some(level) = level else {
        return text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=debug\n");
    };
    let level = level.as_str();
    let Some(set) = &state.set_log_level else {
        return text(StatusCode::NOT_IMPLEMENTED, "log level changes are not available\n");
    };
    match set(level) {
        Ok(()) => {
            tracing::info!(level, "log level changed");
            text(StatusCode::OK, &format!("log level: {level}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, &format!("invalid level {level:?}: {e}\n")),
    }
}

fn json<T: Serialize + ?Sized>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r
}
