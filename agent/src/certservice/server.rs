//! The certificate service's gRPC server: TLS 1.3 with a serving certificate it issues itself
//! (renewed as it ages), HTTP/2 by hyper, the `IstioCertificateService` by tonic's generated
//! code, and the decision on each request.
//!
//! Bounded for callers on the network: at most [`MAX_CONNECTIONS`] connections, and
//! [`MAX_CONNECTIONS_PER_IP`] from one address (more are closed on accept: one pod cannot take
//! every slot), [`HANDSHAKE_TIMEOUT`] to finish TLS, [`MAX_STREAMS`] requests at once and
//! [`CONNECTION_LIFETIME`] per connection, small HTTP/2 windows, [`super::MAX_MESSAGE_BYTES`]
//! per message. The token is checked on the request's headers, before its body is read: a
//! caller without one gets no buffer.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::authority::{Authority, Caller, Refusal};
use super::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use super::proto::{IstioCertificateRequest, IstioCertificateResponse};
use super::{IMPERSONATED_IDENTITY, MAX_MESSAGE_BYTES};
use crate::identity::{csr, CaSigner, SpiffeId, ALPN_H2};

pub const MAX_CONNECTIONS: usize = 8192;
/// A node's agent needs one or two; node proxies behind one address (NAT) a few more.
pub const MAX_CONNECTIONS_PER_IP: usize = 16;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_STREAMS: u32 = 16;
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// How long a connection may go without a request that passes the token check: one that
/// only holds a slot is closed.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection past its lifetime has to finish its requests.
const GRACE: Duration = Duration::from_secs(10);
/// Certificates one node may ask for per second by default (and as a burst, ten times that):
/// a node starting 100 pods at once is served, one hammering the service cannot starve the
/// rest.
pub const RATE_PER_SECOND: u32 = 20;
/// The serving certificate's lifetime (renewed at about half of it, capped by the CA's).
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// What the service decides with.
pub struct CertService {
    signer: Arc<CaSigner>,
    authority: Authority,
    trust_domain: String,
    max_ttl: Duration,
    /// The trust bundle, the last element of every answer (as istiod sends it).
    bundle_pem: String,
    rate: NodeRate,
    counters: super::monitor::Counters,
}

/// Callers with a token bucket before idle ones are dropped.
const MAX_RATE_BUCKETS: usize = 10_000;

/// A token bucket per caller (a node, or a service account).
struct NodeRate {
    per_second: u32,
    nodes: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl NodeRate {
    fn allow(&self, node: &str) -> bool {
        let rate = f64::from(self.per_second);
        let burst = rate * 10.0;
        let now = std::time::Instant::now();
        let mut m = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        // Callers are authenticated (a node, or a service account in Kubernetes mode), but a
        // tenant may make many accounts: past a bound, buckets that have refilled (callers
        // idle for a while) go; they would start full anyway.
        if m.len() >= MAX_RATE_BUCKETS {
            m.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * rate < burst
            });
        }
        let (tokens, last) = m.entry(node.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl CertService {
    pub fn new(
        signer: Arc<CaSigner>,
        authority: Authority,
        trust_domain: &str,
        max_ttl: Duration,
        rate_per_second: u32,
    ) -> CertService {
        let bundle_pem = signer.trust_bundle().certs().iter().map(pem).collect::<String>();
        CertService {
            signer,
            authority,
            trust_domain: trust_domain.to_owned(),
            max_ttl,
            bundle_pem,
            rate: NodeRate { per_second: rate_per_second.max(1), nodes: Default::default() },
            counters: Default::default(),
        }
    }

    /// Whether it can decide requests, or why not.
    pub fn ready(&self) -> Result<(), String> {
        self.authority.ready()
    }

    pub fn counters(&self) -> &super::monitor::Counters {
        &self.counters
    }

    /// Logs (rate-limited) and counts a refusal.
    fn refuse(&self, peer: Option<std::net::SocketAddr>, status: &Status) {
        self.counters.refused(status.code());
        refused(peer, status);
    }

    /// Who is calling, from the `authorization` header.
    async fn caller(&self, headers: &http::HeaderMap) -> Result<Caller, Status> {
        let token = bearer(headers)?;
        self.authority.caller(token).await.map_err(status_of)
    }

    /// The answer to one request from `caller`: a chain, or why not.
    fn decide(
        &self,
        caller: &Caller,
        req: &Request<IstioCertificateRequest>,
    ) -> Result<Vec<String>, Status> {
        let who = match caller {
            Caller::Node(node) => format!("node {node}"),
            Caller::Workload { namespace, service_account } => {
                format!("service account {namespace}/{service_account}")
            }
        };
        // Before any of the request's cost (verifying its CSR, signing). Callers are
        // authenticated: the buckets are one per node or service account.
        if !self.rate.allow(&who) {
            return Err(Status::resource_exhausted(format!(
                "{who} asks for more than {} certificates a second",
                self.rate.per_second
            )));
        }
        let body = req.get_ref();
        let checked = csr::check(body.csr.as_bytes(), &self.trust_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Checked by the CSR policy already; again here, where the grant is decided, because
        // the placement knows namespaces and service accounts, not trust domains.
        if checked.id.trust_domain() != self.trust_domain {
            return Err(Status::invalid_argument("the CSR's identity is of another trust domain"));
        }
        if let Some(asked) = impersonated(body)? {
            if asked != checked.id {
                return Err(Status::invalid_argument(format!(
                    "the CSR names {}, the request impersonates {asked}",
                    checked.id
                )));
            }
        }
        match caller {
            Caller::Node(node) => {
                // Never says where the identity does run: that is not the caller's to learn.
                if !self.authority.runs_on(node, &checked.id).map_err(status_of)? {
                    return Err(Status::permission_denied(format!(
                        "no pod with identity {} is on node {node}, the caller's",
                        checked.id
                    )));
                }
            }
            Caller::Workload { namespace, service_account } => {
                if checked.id.namespace() != namespace
                    || checked.id.service_account() != service_account
                {
                    return Err(Status::permission_denied(format!(
                        "{who} is no node agent: it may have its own identity only, not {}",
                        checked.id
                    )));
                }
            }
        }
        let ttl = match u64::try_from(body.validity_duration) {
            Ok(0) | Err(_) => self.max_ttl,
            Ok(secs) => Duration::from_secs(secs).min(self.max_ttl),
        };
        let chain = self.signer.sign_csr(&checked, ttl).map_err(|e| {
            // The detail (the CA's files) is the operator's, not the caller's.
            tracing::error!(identity = %checked.id, "signing: {e}");
            Status::internal("signing failed: see the certificate service's log")
        })?;
        self.counters.issued();
        info!(caller = %who, identity = %checked.id, ttl_s = ttl.as_secs(), "certificate issued");
        let mut out: Vec<String> = chain.iter().map(pem).collect();
        out.push(self.bundle_pem.clone());
        Ok(out)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = req.extensions().get::<Peer>().map(|p| p.0);
        // The gate put it there; a request that came around it is refused.
        let decided = match req.extensions().get::<Caller>() {
            Some(caller) => self.decide(caller, &req),
            None => Err(Status::unauthenticated("no authenticated caller")),
        };
        match decided {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(status) => {
                self.refuse(peer, &status);
                Err(status)
            }
        }
    }
}

fn pem(der: &rustls_pki_types::CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref()))
}

/// A refusal's log line, at most one per caller address and reason per window.
fn refused(peer: Option<std::net::SocketAddr>, status: &Status) {
    let src = peer.map_or_else(|| "-".to_owned(), |p| p.ip().to_string());
    // Messages may echo what the caller sent: the log line and the limiter's key get a
    // bounded prefix only.
    let message = bounded(status.message(), 240);
    let key = format!("{:?}: {}", status.code(), bounded(&message, 80));
    if let Some(more) = crate::loglimit::refusal(&src, "ca", key) {
        warn!(src, code = ?status.code(), "certificate refused: {message}{more}");
    }
}

/// At most `max` characters of `s`, marked when cut.
fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

fn status_of(r: Refusal) -> Status {
    match r {
        Refusal::Unauthenticated(m) => Status::unauthenticated(m),
        Refusal::PermissionDenied(m) => Status::permission_denied(m),
        Refusal::Unavailable(m) => Status::unavailable(m),
    }
}

/// The bearer token of `authorization`.
fn bearer(meta: &http::HeaderMap) -> Result<&str, Status> {
    let value = meta
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no authorization header (a bearer token)"))?;
    let text = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Ok(token.trim())
        }
        _ => Err(Status::unauthenticated("the authorization header is not `Bearer <token>`")),
    }
}

/// The identity of `ImpersonatedIdentity` in the request's metadata, if any.
fn impersonated(body: &IstioCertificateRequest) -> Result<Option<SpiffeId>, Status> {
    let Some(meta) = &body.metadata else { return Ok(None) };
    let Some(value) = meta.fields.get(IMPERSONATED_IDENTITY) else { return Ok(None) };
    let Some(prost_types::value::Kind::StringValue(s)) = &value.kind else {
        return Err(Status::invalid_argument(format!(
            "metadata {IMPERSONATED_IDENTITY}: not a string"
        )));
    };
    s.parse().map(Some).map_err(|e| {
        let shown = bounded(s, 120);
        Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY}: {shown:?}: {e}"))
    })
}

/// The service's own serving certificate, issued by its CA and renewed as it ages.
#[derive(Debug)]
pub struct ServingCert {
    signer: Arc<CaSigner>,
    names: Vec<String>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCert {
    pub fn new(
        signer: Arc<CaSigner>,
        names: Vec<String>,
    ) -> Result<ServingCert, crate::identity::IdentityError> {
        let current = signer.issue_serving(&names, SERVING_TTL)?;
        Ok(ServingCert { signer, names, current: RwLock::new(current) })
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let now = SystemTime::now();
        let read = || self.current.read().unwrap_or_else(|e| e.into_inner());
        if now >= read().1 {
            // One handshake renews; those meanwhile keep the current one (still valid).
            if let Ok(mut c) = self.current.try_write() {
                if now >= c.1 {
                    match self.signer.issue_serving(&self.names, SERVING_TTL) {
                        Ok(fresh) => *c = fresh,
                        Err(e) => {
                            warn!("renewing the serving certificate: {e}");
                            // Not again for every handshake: in a minute.
                            c.1 = now + Duration::from_secs(60);
                        }
                    }
                }
            }
        }
        Some(read().0.clone())
    }
}

/// TLS 1.3, HTTP/2 only, no client certificate (callers authenticate with their token).
pub fn tls_config(cert: Arc<ServingCert>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Serves `service` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    service: Arc<CertService>,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_ip = PerIp::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots
            .clone()
            .try_acquire_owned()
            .ok()
            .and_then(|global| per_ip.acquire(peer.ip()).map(|own| (global, own)))
        else {
            let why = "connection refused: too many open (in all, or from this address)";
            if let Some(more) = crate::loglimit::refusal(peer.ip(), "ca", why) {
                warn!(%peer, "{why}{more}");
            }
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let svc = IstioCertificateServiceServer::from_arc(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http.timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                // A request is a few KiB: no caller needs megabytes of window.
                .initial_stream_window_size(64 * 1024)
                .initial_connection_window_size(256 * 1024)
                .max_send_buf_size(64 * 1024)
                .max_header_list_size(16 * 1024)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let authed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let svc = Gate { inner: svc, peer, service, authed: authed.clone() };
            let conn = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            let mut conn = std::pin::pin!(conn);
            let unauthenticated = async {
                tokio::time::sleep(AUTH_DEADLINE).await;
                if authed.load(std::sync::atomic::Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            let ended = tokio::select! {
                r = conn.as_mut() => Some(r),
                () = tokio::time::sleep(CONNECTION_LIFETIME) => None,
                () = unauthenticated => {
                    return tracing::debug!(%peer, "closed: no authenticated request in {AUTH_DEADLINE:?}");
                }
            };
            let result = match ended {
                Some(r) => r,
                None => {
                    // GOAWAY: requests in flight finish, the client opens a new connection for
                    // the next; a peer that does not go is cut after a grace period.
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(GRACE, conn).await {
                        Ok(r) => r,
                        Err(_) => return tracing::debug!(%peer, "connection cut after its grace"),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

/// The caller's address, for the log.
#[derive(Clone, Copy)]
struct Peer(std::net::SocketAddr);

/// In front of the generated service: refuses a request whose token is not a node's on its
/// headers alone (its body is never read), and records the caller's address.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    peer: std::net::SocketAddr,
    service: Arc<CertService>,
    /// Set by the first request whose token passes: the connection may then stay.
    authed: Arc<std::sync::atomic::AtomicBool>,
}

type GateFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

impl<S, B> tower_service::Service<http::Request<B>> for Gate<S>
where
    B: Send + 'static,
    S: Clone + Send + 'static,
    S: tower_service::Service<
        http::Request<B>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = GateFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready service goes with this request; its clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (service, peer, authed) = (self.service.clone(), self.peer, self.authed.clone());
        Box::pin(async move {
            match service.caller(req.headers()).await {
                Err(status) => {
                    service.refuse(Some(peer), &status);
                    Ok(status.into_http())
                }
                Ok(caller) => {
                    authed.store(true, std::sync::atomic::Ordering::Relaxed);
                    req.extensions_mut().insert(caller);
                    req.extensions_mut().insert(Peer(peer));
                    inner.call(req).await
                }
            }
        })
    }
}

/// Open connections per caller address.
#[derive(Default, Clone)]
struct PerIp(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

/// One connection of an address, given back when dropped.
struct IpSlot {
    map: PerIp,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn acquire(&self, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot { map: self.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A PEM bundle's certificates, for the clients (and tests) that read the answer.
pub fn certs_of_pem(
    pem: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}
