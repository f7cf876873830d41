//! Outbound: serves a pod's `127.0.0.1:15001` capture listener. For every captured connection
//! it recovers the original destination from `ORIG_DST`, resolves a service VIP to an endpoint,
//! dials the destination from inside the source pod's network namespace and relays both ways.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{
    connections::{ConnectionRecord, Direction, LiveBytes},
    hbone::{self, HBONE_PORT},
    Mesh, PoolKey, OUTBOUND,
};
use crate::{
    capture::OrigDstMap,
    identity::{self, SpiffeId, WorkloadCert},
    inpod::PodNetns,
    policy::Mode,
    services::ServiceTable,
    workloads::WorkloadSet,
};

/// The `tls` of a connection carried as plain TCP.
const PLAINTEXT: &str = "PLAINTEXT";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Per direction and connection: large enough for bulk transfer, small enough that 1,000 open
/// connections stay well under 100 MiB.
const RELAY_BUFFER: usize = 32 * 1024;

/// What an outbound listener of one pod needs.
pub struct OutboundContext {
    /// `name.namespace` of the pod.
    pub pod: String,
    pub netns: PodNetns,
    pub orig_dst: Arc<OrigDstMap>,
    pub mesh: Arc<Mesh>,
    /// Round-robin position over service endpoints.
    pub next_endpoint: Arc<AtomicUsize>,
}

/// Where a captured connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: SocketAddr,
    pub dst_pod: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// Refused, as kube-proxy refuses it.
    #[error("service {service} ({vip}) has no usable endpoints")]
    NoEndpoints { service: String, vip: SocketAddr },
    /// `internalTrafficPolicy: Local` and no usable endpoint on this node: refused (kube-proxy
    /// drops it).
    #[error(
        "service {service} ({vip}) has no usable endpoints on this node \
         (internalTrafficPolicy: Local)"
    )]
    NoLocalEndpoints { service: String, vip: SocketAddr },
}

impl RouteError {
    /// The rejection counter's reason.
    fn reason(&self) -> &'static str {
        match self {
            RouteError::NoEndpoints { .. } => "no_endpoints",
            RouteError::NoLocalEndpoints { .. } => "no_local_endpoints",
        }
    }
}

/// Resolves the application's destination: a service VIP and port becomes one of the service's
/// usable endpoints, round robin; any other address (a pod, or a VIP the agent does not know)
/// stays as it is, so the node's own service load balancing applies to it.
pub fn route(
    ws: &WorkloadSet,
    services: &ServiceTable,
    orig: SocketAddr,
    rr: &AtomicUsize,
) -> Result<Route, RouteError> {
    if let Some(vip) = services.get(orig) {
        if vip.backends.is_empty() {
            let service = vip.service.clone();
            return Err(if vip.node_local {
                RouteError::NoLocalEndpoints { service, vip: orig }
            } else {
                RouteError::NoEndpoints { service, vip: orig }
            });
        }
        let pick = vip.backends[rr.fetch_add(1, Ordering::Relaxed) % vip.backends.len()];
        return Ok(Route { dst: pick, dst_pod: ws.by_ip(pick.ip()).map(|w| w.key()) });
    }
    Ok(Route { dst: orig, dst_pod: ws.by_ip(orig.ip()).map(|w| w.key()) })
}

/// Accepts captured connections until the listener is dropped (the task is aborted).
pub async fn serve(listener: TcpListener, ctx: Arc<OutboundContext>) {
    let pod = ctx.pod.clone();
    let drain = ctx.mesh.drain.clone();
    super::accept_loop(listener, &pod, &drain, move |stream, peer| {
        handle(ctx.clone(), stream, peer)
    })
    .await
}

/// How a connection is carried.
enum Carry {
    /// HBONE over mutual TLS, from this pod's identity to the destination's.
    Mtls {
        cert: Arc<WorkloadCert>,
        expected: SpiffeId,
        /// The destination pod's primary address, where its agent's tunnel listener is: the
        /// app may have dialled any of the pod's addresses.
        tunnel_ip: IpAddr,
    },
    Plaintext,
}

/// The `policy=` of refusals that are no policy's decision.
const BY_CAPTURE: &str = "none: capture check";
const BY_ROUTING: &str = "none: service routing";
const BY_IDENTITY: &str = "none: identity check (this pod has no certificate)";
/// The `policy=` of a connection relayed in plaintext because its destination is not a mesh
/// workload.
pub const OUTSIDE_MESH: &str = "none: destination outside the mesh";

async fn handle(ctx: Arc<OutboundContext>, mut client: TcpStream, peer: SocketAddr) {
    let Some(orig) = ctx.orig_dst.lookup(ctx.netns.cookie(), peer) else {
        // Not a captured connection (someone dialled 15001 directly): nothing to relay to.
        warn!(
            src = %peer,
            src_pod = %ctx.pod,
            dst = "unknown",
            policy = BY_CAPTURE,
            "rejected: no original destination recorded for this connection"
        );
        return;
    };
    let ws = ctx.mesh.workloads.borrow().clone();
    let services = ctx.mesh.services.table(&ws);
    let route = match route(&ws, &services, orig, &ctx.next_endpoint) {
        Ok(r) => r,
        Err(e) => {
            ctx.mesh.stats.rejections.count(OUTBOUND, e.reason());
            warn!(src = %peer, src_pod = %ctx.pod, dst = %orig, policy = BY_ROUTING, "rejected: {e}");
            return;
        }
    };
    // Tunnel iff the destination is a workload of the mesh whose mode for this port is not
    // DISABLE.
    let ps = ctx.mesh.policies.borrow().clone();
    let dst_workload = ws.by_ip(route.dst.ip());
    let decision = dst_workload.map(|w| ps.decide(&ws, w, route.dst.port()));
    let expected = match (dst_workload, &decision) {
        (Some(w), Some(d)) if d.mode != Mode::Disable => ctx.mesh.identity_of(w).map(|e| (e, w.ip)),
        _ => None,
    };
    let carry = match expected {
        Some((expected, tunnel_ip)) => {
            match ctx.mesh.certs.wait(&ctx.pod, super::FIRST_CERT_WAIT).await {
                Some(cert) => Carry::Mtls { cert, expected, tunnel_ip },
                None => {
                    ctx.mesh.stats.rejections.count(OUTBOUND, "no_certificate");
                    warn!(
                        src = %peer,
                        src_pod = %ctx.pod,
                        original_dst = %orig,
                        dst = %route.dst,
                        policy = BY_IDENTITY,
                        "rejected: this pod has no certificate to tunnel with"
                    );
                    return;
                }
            }
        }
        None => Carry::Plaintext,
    };
    // A destination that is no mesh workload (an endpoint outside the mesh, a VIP the agent
    // does not know) is relayed in plaintext, and the record says why.
    let policy = Some(decision.map_or_else(|| OUTSIDE_MESH.to_owned(), |d| d.reason));
    let (mode, local_identity, peer_identity, tls) = match &carry {
        Carry::Mtls { cert, expected, .. } => (
            "mTLS",
            Some(cert.spiffe_id().to_string()),
            Some(expected.to_string()),
            // Until the tunnel is up: then the pooled connection's negotiated parameters.
            "TLS (connecting)".to_owned(),
        ),
        Carry::Plaintext => ("passthrough", None, None, PLAINTEXT.to_owned()),
    };
    let rec = ConnectionRecord {
        id: 0,
        direction: Direction::Outbound,
        source_pod: Some(ctx.pod.clone()),
        source: peer,
        original_destination: orig,
        destination: route.dst,
        destination_pod: route.dst_pod.clone(),
        mode: mode.into(),
        local_identity,
        peer_identity: peer_identity.clone(),
        tls,
        policy: policy.clone(),
        started_at: SystemTime::now(),
        bytes_sent: 0,
        bytes_received: 0,
        age_ms: None,
        duration_ms: None,
        open: true,
        error: None,
    };
    let (id, live) = ctx.mesh.conns.open(rec);
    let result = match carry {
        Carry::Mtls { cert, expected, tunnel_ip } => {
            let tunnel = SocketAddr::new(tunnel_ip, HBONE_PORT);
            relay_mtls(&ctx, id, &mut client, (route.dst, tunnel), cert, expected, &live).await
        }
        Carry::Plaintext => relay_plain(&ctx, &mut client, route.dst, &live).await,
    };
    let policy = policy.as_deref().unwrap_or(OUTSIDE_MESH);
    let (sent, received, error) = match result {
        Ok(t) => {
            if t.error.is_some() {
                // The tunnel broke midway: a reset tells the app its data may be lost, where a
                // FIN would pass a truncated reply off as complete.
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            }
            (t.sent, t.received, t.error)
        }
        Err(e) => {
            ctx.mesh.stats.outbound_failures.fetch_add(1, Ordering::Relaxed);
            match e.tls_failure() {
                Some(reason) => ctx.mesh.stats.tls_failures.count(OUTBOUND, reason),
                None => ctx.mesh.stats.rejections.count(OUTBOUND, e.reason()),
            }
            // Tell the app at once, as a refused dial would: a reset, not a hang.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            // The one line for this connection: the rejection replaces the closing line.
            ctx.mesh.conns.close(id, 0, 0, Some(e.to_string()));
            warn!(
                src = %peer,
                src_pod = %ctx.pod,
                original_dst = %orig,
                dst = %route.dst,
                dst_pod = route.dst_pod.as_deref().unwrap_or("-"),
                mode,
                peer_identity = peer_identity.as_deref().unwrap_or("-"),
                policy,
                "rejected: {e}"
            );
            return;
        }
    };
    if let Some(done) = ctx.mesh.conns.close(id, sent, received, error.clone()) {
        info!(
            src_pod = %ctx.pod,
            src = %peer,
            original_dst = %orig,
            dst = %route.dst,
            dst_pod = route.dst_pod.as_deref().unwrap_or("-"),
            mode,
            peer_identity = peer_identity.as_deref().unwrap_or("-"),
            policy,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = done.duration_ms.unwrap_or_default(),
            error = error.as_deref().unwrap_or("-"),
            "connection closed"
        );
    }
}

/// Byte counts of a finished relay; `error` when it ended abnormally after it started.
struct Transfer {
    sent: u64,
    received: u64,
    error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum OutboundError {
    #[error("creating the upstream socket: {0}")]
    Socket(#[from] crate::inpod::InpodError),
    #[error("connecting to {dst}: {source}")]
    Connect { dst: SocketAddr, source: std::io::Error },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("TLS to {dst}: {reason}")]
    Tls { dst: SocketAddr, reason: String, code: &'static str },
    #[error("TLS to {0}: handshake timed out")]
    TlsTimeout(SocketAddr),
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("HBONE tunnel: {0}")]
    Hbone(#[from] hbone::HboneError),
}

impl OutboundError {
    /// The error of the pool's connection attempt when that is what failed.
    fn cause(&self) -> &OutboundError {
        match self {
            OutboundError::Hbone(hbone::HboneError::Connect(hbone::ConnectError::Transport(e))) => {
                e.downcast_ref::<OutboundError>().unwrap_or(self)
            }
            _ => self,
        }
    }

    /// A short label for metrics.
    fn reason(&self) -> &'static str {
        match self.cause() {
            OutboundError::Socket(_) => "internal",
            OutboundError::Connect { .. } => "connect_failed",
            OutboundError::ConnectTimeout(_) => "connect_timeout",
            OutboundError::Tls { code, .. } => code,
            OutboundError::TlsTimeout(_) => "timeout",
            OutboundError::Identity(_) => "identity",
            OutboundError::Hbone(hbone::HboneError::Connect(_)) => "hbone_connect",
            OutboundError::Hbone(hbone::HboneError::Refused { .. }) => "hbone_refused",
            OutboundError::Hbone(_) => "hbone",
        }
    }

    /// The reason label when the TLS handshake is what failed.
    fn tls_failure(&self) -> Option<&'static str> {
        matches!(self.cause(), OutboundError::Tls { .. } | OutboundError::TlsTimeout(_))
            .then(|| self.reason())
    }
}

/// A TCP connection to `dst` from inside the pod (marked, so capture leaves it alone).
async fn dial_from_pod(netns: &PodNetns, dst: SocketAddr) -> Result<TcpStream, OutboundError> {
    let socket = netns.dial_socket(dst).await?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(OutboundError::Connect { dst, source }),
        Err(_) => Err(OutboundError::ConnectTimeout(dst)),
    }
}

/// A stream that adds every byte read from it to a live counter.
struct CountReads<'a, S> {
    inner: &'a mut S,
    n: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.n.fetch_add(read as u64, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

async fn relay_plain(
    ctx: &OutboundContext,
    client: &mut TcpStream,
    dst: SocketAddr,
    live: &LiveBytes,
) -> Result<Transfer, OutboundError> {
    let mut upstream = dial_from_pod(&ctx.netns, dst).await?;
    debug!(pod = %ctx.pod, %dst, "upstream connected (plaintext)");
    let res = tokio::io::copy_bidirectional_with_sizes(
        &mut CountReads { inner: client, n: &live.sent },
        &mut CountReads { inner: &mut upstream, n: &live.received },
        RELAY_BUFFER,
        RELAY_BUFFER,
    )
    .await;
    let _ = upstream.shutdown().await;
    Ok(match res {
        Ok((sent, received)) => Transfer { sent, received, error: None },
        // copy_bidirectional has no counts on error; the live ones say what was read.
        Err(e) => {
            let (sent, received) = live.get();
            Transfer { sent, received, error: Some(e.to_string()) }
        }
    })
}

async fn relay_mtls(
    ctx: &OutboundContext,
    id: u64,
    client: &mut TcpStream,
    (dst, tunnel): (SocketAddr, SocketAddr),
    cert: Arc<WorkloadCert>,
    expected: SpiffeId,
    live: &LiveBytes,
) -> Result<Transfer, OutboundError> {
    let key = PoolKey {
        src_netns: ctx.netns.cookie(),
        src: cert.spiffe_id().clone(),
        dst: expected.clone(),
        dst_ip: tunnel.ip(),
    };
    let netns = ctx.netns.clone();
    let trust = ctx.mesh.trust.get();
    let connect = || async {
        let tcp = dial_from_pod(&netns, tunnel).await?;
        let cfg = identity::client_config(&cert, &trust, &expected)?;
        // The verifier checks the SPIFFE id, never a DNS name; the name only fills the API.
        let name = ServerName::IpAddress(dst.ip().into());
        match tokio::time::timeout(
            TLS_HANDSHAKE_TIMEOUT,
            TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(tls)) => {
                // The pool stops using the connection once the server's certificate expires.
                let server_not_after = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(identity::serial_and_not_after)
                    .map(|(_, not_after)| not_after);
                let label: Arc<str> = super::tls_description(tls.get_ref().1).into();
                Ok((tls, hbone::TransportInfo { server_not_after, label: Some(label) }))
            }
            Ok(Err(e)) => Err(OutboundError::Tls {
                dst: tunnel,
                reason: identity::describe_io_error(&e),
                code: identity::io_error_reason(&e),
            }),
            Err(_) => Err(OutboundError::TlsTimeout(tunnel)),
        }
    };
    // New tunnels go to connections made with this pod's current certificate only.
    let credential =
        hbone::Credential { serial: cert.serial().to_owned(), not_after: cert.not_after() };
    let mut tunnel = ctx.mesh.pool.stream_as(key, Some(credential), dst, connect).await?;
    debug!(pod = %ctx.pod, %dst, "HBONE stream open");
    ctx.mesh.conns.set_tls(id, tunnel.connection_label().unwrap_or("TLS"));
    let r =
        hbone::relay_counted(&mut tunnel, client, RELAY_BUFFER, &live.received, &live.sent).await;
    Ok(Transfer {
        sent: r.to_tunnel,
        received: r.from_tunnel,
        error: r.error.map(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> WorkloadSet {
        WorkloadSet::parse(
            r#"
workloads:
- {name: a, namespace: ns, labels: {app: web}, ip: 10.0.0.2, node: n1}
- {name: b, namespace: ns, labels: {app: web}, ip: 10.0.0.3, node: n2}
- {name: c, namespace: other, labels: {app: web}, ip: 10.0.0.4, node: n1}
services:
- {name: web, namespace: ns, vip: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
- {name: empty, namespace: ns, vip: 10.96.0.11, selector: {app: none}, ports: [{port: 80}]}
"#,
            std::path::Path::new("w.yaml"),
        )
        .unwrap()
    }

    fn table(ws: &WorkloadSet) -> ServiceTable {
        ServiceTable::build(ws, "n1")
    }

    #[test]
    fn vip_resolves_round_robin_to_same_namespace_endpoints_and_target_port() {
        let ws = set();
        let t = table(&ws);
        let rr = AtomicUsize::new(0);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let picks: Vec<_> = (0..4).map(|_| route(&ws, &t, vip, &rr).unwrap()).collect();
        let dsts: Vec<String> = picks.iter().map(|r| r.dst.to_string()).collect();
        assert_eq!(dsts, ["10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);
        assert_eq!(picks[0].dst_pod.as_deref(), Some("a.ns"));
    }

    #[test]
    fn pod_ip_passes_through_and_names_the_pod() {
        let ws = set();
        let t = table(&ws);
        let r = route(&ws, &t, "10.0.0.4:9000".parse().unwrap(), &AtomicUsize::new(0)).unwrap();
        assert_eq!(r.dst, "10.0.0.4:9000".parse().unwrap());
        assert_eq!(r.dst_pod.as_deref(), Some("c.other"));
        let outside =
            route(&ws, &t, "192.0.2.1:443".parse().unwrap(), &AtomicUsize::new(0)).unwrap();
        assert_eq!(outside.dst_pod, None);
    }

    #[test]
    fn an_unknown_vip_or_port_is_relayed_unchanged() {
        let ws = set();
        let t = table(&ws);
        for dst in ["10.96.0.99:80", "10.96.0.10:81"] {
            let dst: SocketAddr = dst.parse().unwrap();
            let r = route(&ws, &t, dst, &AtomicUsize::new(0)).unwrap();
            assert_eq!(r, Route { dst, dst_pod: None });
        }
    }

    #[test]
    fn slice_endpoints_outside_the_mesh_are_routed_without_a_pod() {
        let mut ws = set();
        std::sync::Arc::make_mut(&mut ws.services[1]).endpoints =
            Some(vec![crate::workloads::SliceEndpoint {
                service_port: 80,
                address: "192.0.2.7".parse().unwrap(),
                port: 6443,
                node_name: None,
                ready: true,
                serving: true,
                terminating: false,
            }]);
        let t = table(&ws);
        let r = route(&ws, &t, "10.96.0.11:80".parse().unwrap(), &AtomicUsize::new(0)).unwrap();
        assert_eq!(r, Route { dst: "192.0.2.7:6443".parse().unwrap(), dst_pod: None });
    }

    #[test]
    fn service_without_endpoints_is_an_error() {
        let ws = set();
        let vip: SocketAddr = "10.96.0.11:80".parse().unwrap();
        let e = route(&ws, &table(&ws), vip, &AtomicUsize::new(0)).unwrap_err();
        assert_eq!(e, RouteError::NoEndpoints { service: "empty.ns".into(), vip });
        assert_eq!(e.to_string(), "service empty.ns (10.96.0.11:80) has no usable endpoints");
    }
}
