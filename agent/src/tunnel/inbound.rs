//! Inbound: serves a pod's `podIP:15008` listener. Terminates mutual TLS with the pod's own
//! certificate (the client must present a certificate that chains to the trust bundle and
//! carries a SPIFFE id of this trust domain), then serves HBONE: each `CONNECT podIP:port` is
//! relayed to that port inside the pod's network namespace.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, SystemTime},
};

use mtls_agent_ebpf::OUTBOUND_PORT;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    connections::{ConnectionRecord, Direction},
    hbone::{self, Accepted, Refusal, HBONE_PORT},
    limits::{self, PodCount},
    Mesh, INBOUND,
};
use crate::{identity, inpod::PodNetns};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `policy=` of refusals that are no policy's decision.
const BY_TLS: &str =
    "none: identity check (the tunnel port accepts only mutual TLS from this mesh)";
const BY_HBONE: &str = "none: HBONE protocol check";
const BY_TARGET: &str = "none: tunnel target check";
const BY_LIMIT: &str = "none: handshake limit (per source address and per pod)";

/// Binds `socket` to `ip` without reserving a port (`IP_BIND_ADDRESS_NO_PORT`: the port is
/// picked at connect time, per destination, as for an unbound socket).
fn bind_source(socket: &tokio::net::TcpSocket, ip: IpAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(SocketAddr::new(ip, 0))
}

/// What the inbound listener of one pod needs.
/// (certificate serial, trust bundle version).
type BuiltFor = (String, u64);

pub struct InboundContext {
    /// `name.namespace` of the pod.
    pub pod: String,
    pub pod_ip: IpAddr,
    pub netns: PodNetns,
    pub mesh: Arc<Mesh>,
    /// The TLS configuration for the pod's current certificate, rebuilt when it is renewed.
    /// The config last built, and for which certificate serial and trust bundle version.
    tls: Mutex<Option<(BuiltFor, Arc<rustls::ServerConfig>)>>,
    /// TLS handshakes in progress to this pod.
    handshakes: PodCount,
}

impl InboundContext {
    pub fn new(pod: String, pod_ip: IpAddr, netns: PodNetns, mesh: Arc<Mesh>) -> InboundContext {
        InboundContext {
            pod,
            pod_ip,
            netns,
            mesh,
            tls: Mutex::new(None),
            handshakes: PodCount::new(limits::PER_POD),
        }
    }

    /// Writes a refusal's line, at most once per 10 s for the same source address, destination
    /// and reason (the metrics label: the policy of these refusals is always the same check).
    fn refused(
        &self,
        peer: SocketAddr,
        dst: SocketAddr,
        policy: &str,
        reason: &str,
        what: std::fmt::Arguments<'_>,
    ) {
        if let Some(more) = crate::loglimit::refusal(peer.ip(), dst, reason) {
            warn!(src = %peer, %dst, dst_pod = %self.pod, policy, "rejected: {what}{more}");
        }
    }

    /// The pod's tunnel port: the destination of refusals made before a target is known.
    fn tunnel_addr(&self) -> SocketAddr {
        SocketAddr::new(self.pod_ip, HBONE_PORT)
    }

    /// This pod in the current workload set: by name and address, so an address already
    /// given to another pod never lends this listener that pod's policy.
    fn this_pod<'a>(
        &self,
        ws: &'a crate::workloads::WorkloadSet,
    ) -> Option<&'a crate::workloads::Workload> {
        ws.by_ip(self.pod_ip).filter(|w| w.key() == self.pod)
    }

    /// The deciding policy of the pod's `port`, in words.
    fn policy_for(&self, port: u16) -> String {
        let ws = self.mesh.workloads.borrow().clone();
        match self.this_pod(&ws) {
            Some(w) => self.mesh.policies.borrow().decide(&ws, w, port).reason,
            None => "none: the pod is no longer in the workload set".to_owned(),
        }
    }

    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let cert = self.mesh.certs.get(&self.pod).ok_or("this pod has no certificate")?;
        let (version, trust) = self.mesh.trust.current();
        let key = (cert.serial().to_owned(), version);
        let mut cached = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_for, cfg)) = cached.as_ref() {
            if *built_for == key {
                return Ok(cfg.clone());
            }
        }
        let cfg = identity::server_config(&cert, &trust, &self.mesh.trust_domain)
            .map_err(|e| e.to_string())?;
        *cached = Some((key, cfg.clone()));
        Ok(cfg)
    }
}

/// Accepts tunnel connections until the listener is dropped (the task is aborted).
pub async fn serve(listener: TcpListener, ctx: Arc<InboundContext>) {
    let pod = ctx.pod.clone();
    let drain = ctx.mesh.drain.clone();
    super::accept_loop(listener, &pod, &drain, move |stream, peer| {
        handle(ctx.clone(), stream, peer)
    })
    .await
}

async fn handle(ctx: Arc<InboundContext>, tcp: TcpStream, peer: SocketAddr) {
    let stats = &ctx.mesh.stats;
    let dst = ctx.tunnel_addr();
    // Past the caps the connection is closed before any TLS work: a flood of half-open
    // handshakes from one source, or to one pod, leaves the others their slots.
    let slot = match ctx.handshakes.acquire(limits::sources(), peer.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            stats.rejections.count(INBOUND, e.reason());
            ctx.refused(peer, dst, BY_LIMIT, e.reason(), format_args!("{e}"));
            return;
        }
    };
    // A pod enrolled a moment ago may still be waiting for its first certificate.
    ctx.mesh.certs.wait(&ctx.pod, super::FIRST_CERT_WAIT).await;
    let cfg = match ctx.server_config() {
        Ok(c) => c,
        Err(e) => {
            stats.rejections.count(INBOUND, "no_certificate");
            ctx.refused(peer, dst, BY_TLS, "no_certificate", format_args!("{e}"));
            return;
        }
    };
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, TlsAcceptor::from(cfg).accept(tcp))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            stats.inbound_handshake_failures.fetch_add(1, Ordering::Relaxed);
            let reason = identity::io_error_reason(&e);
            stats.tls_failures.count(INBOUND, reason);
            let e = identity::describe_io_error(&e);
            ctx.refused(peer, dst, BY_TLS, reason, format_args!("TLS handshake failed: {e}"));
            return;
        }
        Err(_) => {
            stats.inbound_handshake_failures.fetch_add(1, Ordering::Relaxed);
            stats.tls_failures.count(INBOUND, "timeout");
            ctx.refused(
                peer,
                dst,
                BY_TLS,
                "timeout",
                format_args!("TLS handshake failed: timed out after {TLS_HANDSHAKE_TIMEOUT:?}"),
            );
            return;
        }
    };
    drop(slot);
    let (_, session) = tls.get_ref();
    let peer_id = match identity::peer_identity(session.peer_certificates().unwrap_or_default()) {
        Ok(id) => id.to_string(),
        Err(e) => {
            // The verifier already insisted on one SPIFFE id; this is a belt-and-braces check.
            stats.inbound_handshake_failures.fetch_add(1, Ordering::Relaxed);
            stats.tls_failures.count(INBOUND, "peer_identity");
            ctx.refused(peer, dst, BY_TLS, "peer_identity", format_args!("{e}"));
            return;
        }
    };
    let tls_desc = super::tls_description(session);
    stats.inbound_handshakes.fetch_add(1, Ordering::Relaxed);
    // The serial shows which of the peer's certificates (before or after a renewal) it used.
    let (peer_serial, peer_not_after) = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(identity::serial_and_not_after)
        .unwrap_or((String::new(), SystemTime::UNIX_EPOCH));
    debug!(pod = %ctx.pod, src = %peer, peer_identity = %peer_id, peer_serial = %peer_serial, "mTLS established");

    let hctx = ctx.clone();
    let handler = move |target: SocketAddr| {
        let ctx = hctx.clone();
        let peer_id = peer_id.clone();
        let tls_desc = tls_desc.clone();
        async move {
            // The handshake checked the certificate once; a connection outlives it, so every
            // new stream checks that it has not expired since (the pool retires such
            // connections on its side, a hostile peer would not).
            if SystemTime::now() >= peer_not_after {
                ctx.mesh.stats.inbound_refused_streams.fetch_add(1, Ordering::Relaxed);
                ctx.mesh.stats.rejections.count(INBOUND, "peer_cert_expired");
                let when = humantime::format_rfc3339_seconds(peer_not_after);
                ctx.refused(
                    peer,
                    target,
                    BY_TLS,
                    "peer_cert_expired",
                    format_args!("the peer's certificate expired at {when}"),
                );
                return Err(Refusal::forbidden("peer certificate expired"));
            }
            open_stream(ctx, peer, peer_id, tls_desc, target).await
        }
    };
    // Refusals made by the HBONE layer itself (not CONNECT, bad :authority, oversized headers,
    // no request in time, floods) are as visible as refused targets.
    let rctx = ctx.clone();
    let on_refusal: hbone::OnRefusal = Arc::new(move |reason: &'static str, detail: String| {
        rctx.mesh.stats.rejections.count(INBOUND, reason);
        if let Some(more) = crate::loglimit::refusal(peer.ip(), dst, reason) {
            warn!(src = %peer, %dst, dst_pod = %rctx.pod, policy = BY_HBONE, reason, "rejected: {detail}{more}");
        }
    });
    let done = hbone::serve_connection_with_shutdown(
        tls,
        &hbone::ServerConfig::default(),
        handler,
        ctx.mesh.drain.started(),
        on_refusal,
    )
    .await;
    if let Err(e) = done {
        debug!(pod = %ctx.pod, src = %peer, "HBONE connection ended: {e}");
    }
}

/// Checks one CONNECT and dials its target inside the pod.
async fn open_stream(
    ctx: Arc<InboundContext>,
    peer: SocketAddr,
    peer_id: String,
    tls_desc: String,
    target: SocketAddr,
) -> Result<Accepted<TcpStream>, Refusal> {
    // The one line for a refused tunnel request.
    let log_refusal = |policy: &dyn std::fmt::Display, what: std::fmt::Arguments<'_>| {
        let policy = policy.to_string();
        let Some(more) = crate::loglimit::refusal(peer.ip(), target, &policy) else { return };
        warn!(
            src = %peer,
            peer_identity = %peer_id,
            dst = %target,
            dst_pod = %ctx.pod,
            policy = %policy,
            "rejected: {what}{more}"
        );
    };
    let refuse = |reason: String| {
        ctx.mesh.stats.inbound_refused_streams.fetch_add(1, Ordering::Relaxed);
        ctx.mesh.stats.rejections.count(INBOUND, "hbone:target_refused");
        log_refusal(&BY_TARGET, format_args!("{reason}"));
        Refusal::forbidden(reason)
    };
    // Any address of the pod (a second one, IPv6), as the workload set lists them now.
    let ws = ctx.mesh.workloads.borrow().clone();
    let ours = ctx.this_pod(&ws).is_some_and(|w| w.has_ip(target.ip()));
    if !ours {
        return Err(refuse(format!("{target} is not an address of pod {}", ctx.pod)));
    }
    // The tunnel leads to the app, never back into the agent's own in-pod listeners.
    if target.port() == HBONE_PORT || target.port() == OUTBOUND_PORT {
        return Err(refuse(format!("port {} is reserved for the agent", target.port())));
    }
    // L4 authorization, before a byte reaches the app: the peer's certificate, the address the
    // tunnel came from (the client pod's) and the CONNECT target.
    let authz_peer = crate::authz::Peer::from_spiffe(&peer_id);
    let verdict = {
        let policies = ctx.mesh.policies.borrow().clone();
        let Some(w) = ctx.this_pod(&ws) else {
            return Err(refuse(format!("pod {} is no longer in the workload set", ctx.pod)));
        };
        let conn = crate::authz::Conn {
            peer: authz_peer.as_ref(),
            src: peer.ip(),
            dst: target.ip(),
            port: target.port(),
        };
        policies.authorize(w, &conn)
    };
    ctx.mesh.stats.authz.record(&verdict, "mtls");
    for audit in &verdict.audited {
        info!(src = %peer, peer_identity = %peer_id, dst = %target, dst_pod = %ctx.pod,
            policy = %audit.policy, "audited by {audit}");
    }
    if !verdict.allowed {
        ctx.mesh.stats.inbound_refused_streams.fetch_add(1, Ordering::Relaxed);
        ctx.mesh.stats.rejections.count(INBOUND, "authz_denied");
        log_refusal(&verdict.policy_label(), format_args!("{}", verdict.reason));
        return Err(Refusal::forbidden(verdict.reason));
    }
    let policy = ctx.policy_for(target.port());
    let unreachable = |reason: String| {
        ctx.mesh.stats.rejections.count(INBOUND, "app_unreachable");
        log_refusal(&policy, format_args!("the app does not answer: {reason}"));
        Refusal::unavailable(reason)
    };
    let socket = match ctx.netns.dial_socket(target).await {
        Ok(s) => s,
        Err(e) => return Err(unreachable(e.to_string())),
    };
    // From the target address itself, so the pod's inbound program sees the pod talking to
    // itself (it cannot know the pod's other addresses); the primary one is the kernel's
    // choice already.
    if target.ip() != ctx.pod_ip {
        if let Err(e) = bind_source(&socket, target.ip()) {
            return Err(unreachable(format!("binding to {}: {e}", target.ip())));
        }
    }
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(format!("connecting to {target}: {e}"))),
        Err(_) => return Err(unreachable(format!("connecting to {target}: timed out"))),
    };
    let ws = ctx.mesh.workloads.borrow().clone();
    let rec = ConnectionRecord {
        id: 0,
        direction: Direction::Inbound,
        source_pod: ws.by_ip(peer.ip()).map(|w| w.key()),
        source: peer,
        original_destination: target,
        destination: target,
        destination_pod: Some(ctx.pod.clone()),
        mode: "mTLS".into(),
        local_identity: ctx.mesh.certs.get(&ctx.pod).map(|c| c.spiffe_id().to_string()),
        peer_identity: Some(peer_id.clone()),
        tls: tls_desc,
        policy: Some(policy),
        started_at: SystemTime::now(),
        bytes_sent: 0,
        bytes_received: 0,
        age_ms: None,
        duration_ms: None,
        open: true,
        error: None,
    };
    let (id, live) = ctx.mesh.conns.open(rec);
    let conns = ctx.mesh.conns.clone();
    let pod = ctx.pod.clone();
    // As for outbound records: "sent" is source -> destination (peer -> app).
    Ok(Accepted::new(upstream).counting(live).on_close(move |s| {
        let error = s.error.map(|e| e.to_string());
        if let Some(done) =
            conns.close(id, s.bytes_to_upstream, s.bytes_from_upstream, error.clone())
        {
            info!(
                dst_pod = %pod,
                src = %peer,
                peer_identity = %peer_id,
                dst = %target,
                mode = "mTLS",
                bytes_sent = s.bytes_to_upstream,
                bytes_received = s.bytes_from_upstream,
                duration_ms = done.duration_ms.unwrap_or_default(),
                error = error.as_deref().unwrap_or("-"),
                "inbound connection closed"
            );
        }
    }))
}
