//! The certificate service's own endpoint (`--monitoring`, istiod's port 15014 by default):
//! `/metrics`, certificates issued and requests refused by gRPC code, and `/healthz/ready`,
//! ready once it can decide (in Kubernetes mode: once the pods are listed).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::server::CertService;

/// At most this many scrapers and probes at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// What the service counts.
#[derive(Default)]
pub struct Counters {
    issued: AtomicU64,
    /// Refusals by gRPC code (a bounded set: the messages, which name the reason, are logged).
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    pub fn issued(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, code: tonic::Code) {
        let mut m = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(code_name(code)).or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, ready: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP mtls_ca_certificates_issued_total Certificates signed.");
        let _ = writeln!(out, "# TYPE mtls_ca_certificates_issued_total counter");
        let _ = writeln!(
            out,
            "mtls_ca_certificates_issued_total {}",
            self.issued.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mtls_ca_requests_refused_total Requests refused, by gRPC status code (the log names each reason)."
        );
        let _ = writeln!(out, "# TYPE mtls_ca_requests_refused_total counter");
        for (code, n) in self.refused.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "mtls_ca_requests_refused_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP mtls_ca_ready 1 once the service can decide requests.");
        let _ = writeln!(out, "# TYPE mtls_ca_ready gauge");
        let _ = writeln!(out, "mtls_ca_ready {}", u8::from(ready));
        out
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `/metrics` and `/healthz/ready` until the task is dropped.
pub async fn serve(listener: TcpListener, service: Arc<CertService>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(answer(&service, req.uri().path())) }
            });
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(16 * 1024);
            let conn = b.serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

fn answer(service: &CertService, path: &str) -> Response<Full<Bytes>> {
    let ready = service.ready();
    let (status, body) = match path {
        "/metrics" => (StatusCode::OK, service.counters().render(ready.is_ok())),
        "/healthz/ready" => match ready {
            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/healthz/live" => (StatusCode::OK, "ok\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "not found: try /metrics, /healthz/ready\n".to_owned()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
