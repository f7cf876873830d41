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
pub mod outbound;

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

pub use connections::{ConnectionRecord, ConnectionTable};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    identity::{CertStore, SpiffeId, TrustBundle},
    workloads::WorkloadSet,
};

/// Pooled HBONE connections are shared per (source identity, destination identity, destination
/// IP): a stream never rides a connection authenticated as someone else.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub dst_ip: IpAddr,
}

/// What every listener of the node shares.
pub struct Mesh {
    pub trust_domain: String,
    pub trust: Arc<TrustBundle>,
    pub certs: Arc<CertStore>,
    pub pool: hbone::Pool<PoolKey>,
    pub conns: ConnectionTable,
    pub workloads: watch::Receiver<Arc<WorkloadSet>>,
    pub stats: TunnelStats,
}

impl Mesh {
    /// The SPIFFE id of a workload of this mesh.
    pub fn identity_of(&self, w: &crate::workloads::Workload) -> Option<SpiffeId> {
        SpiffeId::new(&self.trust_domain, &w.namespace, &w.service_account).ok()
    }
}

/// Counters not kept elsewhere (the pool counts client handshakes itself).
#[derive(Default)]
pub struct TunnelStats {
    pub inbound_handshakes: AtomicU64,
    pub inbound_handshake_failures: AtomicU64,
    pub inbound_refused_streams: AtomicU64,
    pub outbound_failures: AtomicU64,
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
