//! Bounds on concurrent TLS handshakes on the tunnel port: per destination pod and per source
//! address, so that one source's half-open handshakes cannot take every slot of a pod, and one
//! pod's attackers cannot take the node's.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};

/// Concurrent handshakes to one pod. A pooled mesh needs few (one per source pod and peer
/// identity, then streams share the connection); this leaves room for a burst of new peers.
pub const PER_POD: usize = 128;
/// Concurrent handshakes from one source address, over all pods of the node. A source pod's
/// agent dials one pooled connection per destination pod and identity, rarely more at once.
pub const PER_SOURCE: usize = 32;

/// Why a handshake was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{PER_POD} TLS handshakes to this pod are already in progress")]
    Pod,
    #[error("{PER_SOURCE} TLS handshakes from this source are already in progress")]
    Source,
}

impl LimitError {
    /// The metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            LimitError::Pod => "handshake_limit_pod",
            LimitError::Source => "handshake_limit_source",
        }
    }
}

/// Handshakes in progress by source address.
#[derive(Debug, Default)]
pub struct SourceCounts {
    max: usize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl SourceCounts {
    pub fn new(max: usize) -> Self {
        Self { max, by_ip: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self, ip: IpAddr) -> bool {
        let mut m = self.lock();
        let n = m.entry(ip).or_default();
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut m = self.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            // Only sources with handshakes in progress stay in the map: it is bounded by them.
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// The node's per-source counts (shared by every pod's tunnel listener).
pub fn sources() -> &'static Arc<SourceCounts> {
    static SOURCES: OnceLock<Arc<SourceCounts>> = OnceLock::new();
    SOURCES.get_or_init(|| Arc::new(SourceCounts::new(PER_SOURCE)))
}

/// One slot of a [`SourceCounts`], held until it drops: the local HTTP servers count their
/// connections per source address with it.
#[derive(Debug)]
pub struct SourceSlot {
    sources: Arc<SourceCounts>,
    ip: IpAddr,
}

impl SourceSlot {
    /// A slot for one more connection from `ip`, or `None` when `ip` holds its maximum.
    pub fn acquire(sources: &Arc<SourceCounts>, ip: IpAddr) -> Option<SourceSlot> {
        sources.acquire(ip).then(|| SourceSlot { sources: sources.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.sources.release(self.ip);
    }
}

/// One pod's count of handshakes in progress.
#[derive(Debug)]
pub struct PodCount {
    max: usize,
    n: Arc<AtomicUsize>,
}

impl PodCount {
    pub fn new(max: usize) -> Self {
        Self { max, n: Arc::default() }
    }

    /// A slot for one handshake from `ip`, held until the slot drops.
    pub fn acquire(
        &self,
        sources: &Arc<SourceCounts>,
        ip: IpAddr,
    ) -> Result<HandshakeSlot, LimitError> {
        let taken = self
            .n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        if taken.is_err() {
            return Err(LimitError::Pod);
        }
        if !sources.acquire(ip) {
            self.n.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Source);
        }
        Ok(HandshakeSlot { pod: self.n.clone(), sources: sources.clone(), ip })
    }
}

/// A handshake in progress; frees its slots on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    pod: Arc<AtomicUsize>,
    sources: Arc<SourceCounts>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.pod.fetch_sub(1, Ordering::AcqRel);
        self.sources.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_slot_bounds_one_address_and_frees_on_drop() {
        let sources = Arc::new(SourceCounts::new(2));
        let a1 = SourceSlot::acquire(&sources, ip("127.0.0.2")).unwrap();
        let _a2 = SourceSlot::acquire(&sources, ip("127.0.0.2")).unwrap();
        assert!(SourceSlot::acquire(&sources, ip("127.0.0.2")).is_none());
        // Another address is not held back by the first one's flood.
        assert!(SourceSlot::acquire(&sources, ip("127.0.0.1")).is_some());
        drop(a1);
        assert!(SourceSlot::acquire(&sources, ip("127.0.0.2")).is_some());
    }

    #[test]
    fn one_source_cannot_take_a_pods_every_slot() {
        let sources = Arc::new(SourceCounts::new(2));
        let pod = PodCount::new(3);
        let a1 = pod.acquire(&sources, ip("10.0.0.1")).unwrap();
        let _a2 = pod.acquire(&sources, ip("10.0.0.1")).unwrap();
        assert_eq!(pod.acquire(&sources, ip("10.0.0.1")).unwrap_err(), LimitError::Source);
        // Another source still gets in.
        let b1 = pod.acquire(&sources, ip("10.0.0.2")).unwrap();
        assert_eq!(pod.acquire(&sources, ip("10.0.0.3")).unwrap_err(), LimitError::Pod);
        drop(a1);
        drop(b1);
        let _c = pod.acquire(&sources, ip("10.0.0.3")).unwrap();
        assert_eq!(sources.lock().len(), 2, "released sources leave the map");
    }

    #[test]
    fn pods_do_not_share_their_slots() {
        let sources = Arc::new(SourceCounts::new(10));
        let (p1, p2) = (PodCount::new(1), PodCount::new(1));
        let _x = p1.acquire(&sources, ip("10.0.0.1")).unwrap();
        assert_eq!(p1.acquire(&sources, ip("10.0.0.2")).unwrap_err(), LimitError::Pod);
        assert!(p2.acquire(&sources, ip("10.0.0.2")).is_ok());
    }
}
