//! The agent's record of every connection it carries: live ones and a bounded history of
//! closed ones, for the admin API and the per-connection log line.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

use serde::{Serialize, Serializer};

pub use super::hbone::LiveBytes;

/// How many closed connections are kept for inspection.
const HISTORY: usize = 4096;
/// How many closed plaintext connections that the kernel reported (accepted by a pod's app, not
/// carried by the agent) are kept, apart: frequent probes must not push the agent's own
/// connections out of the history.
const PLAINTEXT_HISTORY: usize = 1024;
/// The mode of those records.
pub const MODE_PLAINTEXT_SEEN: &str = "plaintext";

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One connection as the operator sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRecord {
    pub id: u64,
    pub direction: Direction,
    /// `name.namespace` of the pod that opened the connection.
    pub source_pod: Option<String>,
    pub source: SocketAddr,
    /// Where the application connected to (pod IP or service VIP).
    pub original_destination: SocketAddr,
    /// The endpoint actually dialled (a VIP resolved to a pod).
    pub destination: SocketAddr,
    pub destination_pod: Option<String>,
    /// `mTLS` (HBONE over mutual TLS) or `passthrough` (plain TCP).
    pub mode: String,
    /// SPIFFE id of this side (the local pod's certificate), when in mTLS.
    pub local_identity: Option<String>,
    /// SPIFFE id the other side proved in the handshake.
    pub peer_identity: Option<String>,
    /// TLS version and cipher suite, or `PLAINTEXT`.
    pub tls: String,
    /// The policy that decided the destination port's mode, in words.
    pub policy: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub started_at: SystemTime,
    /// Source -> destination; counted as the bytes flow, final once closed.
    pub bytes_sent: u64,
    /// Destination -> source.
    pub bytes_received: u64,
    /// How long a live connection has been open (snapshots only).
    pub age_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    pub open: bool,
    pub error: Option<String>,
}

/// Running totals per (direction, mode), for metrics.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub opened: u64,
    pub closed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

struct Live {
    rec: ConnectionRecord,
    started: Instant,
    bytes: Arc<LiveBytes>,
}

#[derive(Default)]
struct Inner {
    live: BTreeMap<u64, Live>,
    closed: VecDeque<ConnectionRecord>,
    closed_plaintext: VecDeque<ConnectionRecord>,
    totals: BTreeMap<(Direction, String), Totals>,
}

/// Shared table of connections; cheap to clone.
#[derive(Clone, Default)]
pub struct ConnectionTable {
    next_id: Arc<AtomicU64>,
    inner: Arc<Mutex<Inner>>,
}

impl ConnectionTable {
    /// Registers a new live connection; returns its id and the counters its relay adds to.
    pub fn open(&self, mut rec: ConnectionRecord) -> (u64, Arc<LiveBytes>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        rec.id = id;
        rec.open = true;
        let bytes = Arc::new(LiveBytes::default());
        let mut inner = self.lock();
        inner.totals.entry((rec.direction.clone(), rec.mode.clone())).or_default().opened += 1;
        inner.live.insert(id, Live { rec, started: Instant::now(), bytes: bytes.clone() });
        (id, bytes)
    }

    /// Sets what is learnt only once the connection is up (the negotiated TLS parameters).
    pub fn set_tls(&self, id: u64, tls: &str) {
        if let Some(live) = self.lock().live.get_mut(&id) {
            tls.clone_into(&mut live.rec.tls);
        }
    }

    /// Moves a connection to the history with its final counters; returns the final record.
    pub fn close(
        &self,
        id: u64,
        sent: u64,
        received: u64,
        error: Option<String>,
    ) -> Option<ConnectionRecord> {
        let mut inner = self.lock();
        let Live { mut rec, started, .. } = inner.live.remove(&id)?;
        rec.open = false;
        rec.bytes_sent = sent;
        rec.bytes_received = received;
        rec.duration_ms = Some(started.elapsed().as_millis() as u64);
        rec.error = error;
        let t = inner.totals.entry((rec.direction.clone(), rec.mode.clone())).or_default();
        t.closed += 1;
        t.bytes_sent += sent;
        t.bytes_received += received;
        let (history, limit) = if rec.mode == MODE_PLAINTEXT_SEEN {
            (&mut inner.closed_plaintext, PLAINTEXT_HISTORY)
        } else {
            (&mut inner.closed, HISTORY)
        };
        if history.len() == limit {
            history.pop_front();
        }
        history.push_back(rec.clone());
        Some(rec)
    }

    /// Live connections first, then closed ones, each in the order they were opened.
    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .live
            .values()
            .map(|l| {
                let mut r = l.rec.clone();
                (r.bytes_sent, r.bytes_received) = l.bytes.get();
                r.age_ms = Some(l.started.elapsed().as_millis() as u64);
                r
            })
            .collect();
        let first_closed = out.len();
        out.extend(inner.closed.iter().cloned());
        out.extend(inner.closed_plaintext.iter().cloned());
        // Ids grow as connections open.
        out[first_closed..].sort_by_key(|r| r.id);
        out
    }

    /// Totals per (direction, mode) since the agent started.
    pub fn totals(&self) -> Vec<(Direction, String, Totals)> {
        self.lock().totals.iter().map(|((d, m), t)| (d.clone(), m.clone(), *t)).collect()
    }

    pub fn live_count(&self) -> usize {
        self.lock().live.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (single inserts/removes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> ConnectionRecord {
        ConnectionRecord {
            id: 0,
            direction: Direction::Outbound,
            source_pod: Some("a.ns".into()),
            source: "127.0.0.1:40000".parse().unwrap(),
            original_destination: "10.0.0.2:80".parse().unwrap(),
            destination: "10.0.0.2:80".parse().unwrap(),
            destination_pod: None,
            mode: "passthrough".into(),
            local_identity: None,
            peer_identity: None,
            tls: "PLAINTEXT".into(),
            policy: None,
            started_at: SystemTime::now(),
            bytes_sent: 0,
            bytes_received: 0,
            age_ms: None,
            duration_ms: None,
            open: false,
            error: None,
        }
    }

    #[test]
    fn open_then_close_moves_to_history_with_counters() {
        let t = ConnectionTable::default();
        let (id, live) = t.open(rec());
        assert_eq!(t.live_count(), 1);
        live.sent.fetch_add(3, Ordering::Relaxed);
        live.received.fetch_add(4, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let snap = &t.snapshot()[0];
        assert!(snap.open);
        assert_eq!((snap.bytes_sent, snap.bytes_received), (3, 4), "live bytes are visible");
        assert!(snap.age_ms.is_some_and(|a| a >= 5), "{snap:?}");
        let json = serde_json::to_value(snap).unwrap();
        let started = json["startedAt"].as_str().unwrap_or_default();
        assert!(humantime::parse_rfc3339(started).is_ok(), "{json}");
        t.set_tls(id, "TLSv1.3 TLS13_AES_256_GCM_SHA384");
        assert_eq!(t.snapshot()[0].tls, "TLSv1.3 TLS13_AES_256_GCM_SHA384");
        let closed = t.close(id, 5, 7, None).unwrap();
        assert_eq!((closed.bytes_sent, closed.bytes_received, closed.open), (5, 7, false));
        assert_eq!(t.live_count(), 0);
        assert_eq!(t.snapshot().len(), 1);
        assert!(t.close(id, 0, 0, None).is_none(), "closing twice is a no-op");
    }

    #[test]
    fn history_is_bounded() {
        let t = ConnectionTable::default();
        for _ in 0..HISTORY + 10 {
            let (id, _) = t.open(rec());
            t.close(id, 0, 0, None);
        }
        let snap = t.snapshot();
        assert_eq!(snap.len(), HISTORY);
        assert_eq!(snap[0].id, 11, "oldest entries are dropped first");
    }

    #[test]
    fn reported_plaintext_has_its_own_history_and_cannot_push_tunnels_out() {
        let t = ConnectionTable::default();
        let (tunnel, _) = t.open(rec());
        t.close(tunnel, 1, 1, None);
        for _ in 0..HISTORY + 10 {
            let (id, _) = t.open(ConnectionRecord { mode: MODE_PLAINTEXT_SEEN.into(), ..rec() });
            t.close(id, 0, 0, None);
        }
        let snap = t.snapshot();
        assert_eq!(snap.len(), 1 + PLAINTEXT_HISTORY);
        assert_eq!(snap[0].id, tunnel, "kept, and first: closed records are in opening order");
        assert!(snap.windows(2).all(|w| w[0].id < w[1].id));
    }
}
