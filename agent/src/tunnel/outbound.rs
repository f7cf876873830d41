//! Outbound: serves a pod's `127.0.0.1:15001` capture listener. For every captured connection
//! it recovers the original destination from `ORIG_DST`, resolves a service VIP to an endpoint,
//! dials the destination from inside the source pod's network namespace and relays both ways.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::connections::{ConnectionRecord, ConnectionTable, Direction};
use crate::{capture::OrigDstMap, inpod::PodNetns, workloads::WorkloadSet};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RELAY_BUFFER: usize = 64 * 1024;

/// What an outbound listener of one pod needs.
pub struct OutboundContext {
    /// `name.namespace` of the pod.
    pub pod: String,
    pub netns: PodNetns,
    pub orig_dst: Arc<OrigDstMap>,
    pub workloads: watch::Receiver<Arc<WorkloadSet>>,
    pub conns: ConnectionTable,
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
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: SocketAddr },
}

/// Resolves the application's destination: a service VIP and port becomes one of the service's
/// endpoints (`port` -> `targetPort`); a pod IP stays as it is.
pub fn route(ws: &WorkloadSet, orig: SocketAddr, rr: &AtomicUsize) -> Result<Route, RouteError> {
    if let Some((endpoints, target_port)) = ws.resolve_vip(orig.ip(), orig.port()) {
        if endpoints.is_empty() {
            return Err(RouteError::NoEndpoints { service: orig });
        }
        let pick = endpoints[rr.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        return Ok(Route {
            dst: SocketAddr::new(pick.ip, target_port),
            dst_pod: Some(pick.key()),
        });
    }
    Ok(Route {
        dst: orig,
        dst_pod: ws.by_ip(orig.ip()).map(|w| w.key()),
    })
}

/// Accepts captured connections until the listener is dropped (the task is aborted).
pub async fn serve(listener: TcpListener, ctx: Arc<OutboundContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { handle(ctx, stream, peer).await });
            }
            Err(e) => {
                // Out of fds or similar: back off instead of spinning.
                warn!(pod = %ctx.pod, "accept on outbound listener: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(ctx: Arc<OutboundContext>, mut client: TcpStream, peer: SocketAddr) {
    let Some(orig) = ctx.orig_dst.lookup(ctx.netns.cookie(), peer) else {
        // Not a captured connection (someone dialled 15001 directly): nothing to relay to.
        warn!(pod = %ctx.pod, client = %peer, "rejected: no original destination recorded for this connection");
        return;
    };
    let ws = ctx.workloads.borrow().clone();
    let route = match route(&ws, orig, &ctx.next_endpoint) {
        Ok(r) => r,
        Err(e) => {
            warn!(pod = %ctx.pod, client = %peer, original_dst = %orig, "rejected: {e}");
            return;
        }
    };
    let rec = ConnectionRecord {
        id: 0,
        direction: Direction::Outbound,
        source_pod: Some(ctx.pod.clone()),
        source: peer,
        original_destination: orig,
        destination: route.dst,
        destination_pod: route.dst_pod.clone(),
        mode: "passthrough".into(),
        started_at: SystemTime::now(),
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: None,
        open: true,
        error: None,
    };
    let id = ctx.conns.open(rec);
    let result = relay(&ctx, &mut client, route.dst).await;
    let (sent, received, error) = match result {
        Ok((s, r)) => (s, r, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    if let Some(done) = ctx.conns.close(id, sent, received, error.clone()) {
        info!(
            src_pod = %ctx.pod,
            src = %peer,
            original_dst = %orig,
            dst = %route.dst,
            dst_pod = route.dst_pod.as_deref().unwrap_or("-"),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = done.duration_ms.unwrap_or_default(),
            error = error.as_deref().unwrap_or("-"),
            "connection closed"
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("creating the upstream socket: {0}")]
    Socket(#[from] crate::inpod::InpodError),
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("relaying: {0}")]
    Relay(std::io::Error),
    #[error("in-pod worker: {0}")]
    Join(#[from] tokio::task::JoinError),
}

async fn relay(
    ctx: &OutboundContext,
    client: &mut TcpStream,
    dst: SocketAddr,
) -> Result<(u64, u64), RelayError> {
    let netns = ctx.netns.clone();
    let socket = tokio::task::spawn_blocking(move || netns.dial_socket(dst)).await??;
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            // Tell the client the truth quickly: a reset, as if it had dialled directly.
            let _ = socket2::SockRef::from(&*client).set_linger(Some(Duration::ZERO));
            return Err(RelayError::Connect { dst, source });
        }
        Err(_) => return Err(RelayError::ConnectTimeout(dst)),
    };
    debug!(pod = %ctx.pod, %dst, "upstream connected");
    let res =
        tokio::io::copy_bidirectional_with_sizes(client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER)
            .await
            .map_err(RelayError::Relay);
    let _ = upstream.shutdown().await;
    res
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

    #[test]
    fn vip_resolves_round_robin_to_same_namespace_endpoints_and_target_port() {
        let ws = set();
        let rr = AtomicUsize::new(0);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let picks: Vec<_> = (0..4).map(|_| route(&ws, vip, &rr).unwrap()).collect();
        let dsts: Vec<String> = picks.iter().map(|r| r.dst.to_string()).collect();
        assert_eq!(
            dsts,
            [
                "10.0.0.2:8080",
                "10.0.0.3:8080",
                "10.0.0.2:8080",
                "10.0.0.3:8080"
            ]
        );
        assert_eq!(picks[0].dst_pod.as_deref(), Some("a.ns"));
    }

    #[test]
    fn pod_ip_passes_through_and_names_the_pod() {
        let ws = set();
        let r = route(&ws, "10.0.0.4:9000".parse().unwrap(), &AtomicUsize::new(0)).unwrap();
        assert_eq!(r.dst, "10.0.0.4:9000".parse().unwrap());
        assert_eq!(r.dst_pod.as_deref(), Some("c.other"));
        let outside = route(&ws, "192.0.2.1:443".parse().unwrap(), &AtomicUsize::new(0)).unwrap();
        assert_eq!(outside.dst_pod, None);
    }

    #[test]
    fn service_without_endpoints_is_an_error() {
        let ws = set();
        let vip: SocketAddr = "10.96.0.11:80".parse().unwrap();
        assert_eq!(
            route(&ws, vip, &AtomicUsize::new(0)),
            Err(RouteError::NoEndpoints { service: vip })
        );
    }
}
