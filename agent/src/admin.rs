//! Admin HTTP API (local only): what the agent knows and what it is carrying.
//!
//! - `GET /connections`: live and recently closed connections (JSON);
//! - `GET /workloads`: the workloads and services in force (JSON);
//! - `GET /certs`: the workload certificates (identity, serial, validity, next renewal);
//! - `GET /stats`: tunnel counters (handshakes, streams, failures);
//! - `GET /healthz`: liveness.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::tunnel::Mesh;

#[derive(Clone)]
pub struct AdminState {
    pub node: String,
    pub mesh: Arc<Mesh>,
}

/// A workload certificate as the admin API shows it (never the key).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertView {
    workload: String,
    identity: String,
    serial: String,
    not_before: String,
    not_after: String,
    next_renewal: String,
    renewal_failures: u32,
    last_error: Option<String>,
}

fn certs(state: &AdminState) -> Vec<CertView> {
    let t = |s: std::time::SystemTime| humantime::format_rfc3339_seconds(s).to_string();
    state
        .mesh
        .certs
        .list()
        .into_iter()
        .map(|c| CertView {
            workload: c.workload,
            identity: c.identity.to_string(),
            serial: c.serial,
            not_before: t(c.not_before),
            not_after: t(c.not_after),
            next_renewal: t(c.next_renewal),
            renewal_failures: c.renewal_failures,
            last_error: c.last_error,
        })
        .collect()
}

pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/connections" => json(&state.mesh.conns.snapshot()),
        "/workloads" => json(&**state.mesh.workloads.borrow()),
        "/certs" => json(&certs(state)),
        "/stats" => json(&state.mesh.stats()),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /connections, /workloads, /certs, /stats, /healthz\n",
        ),
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
