//! Pool of client HBONE connections, shared per caller-defined key (e.g. source identity,
//! destination identity, destination IP), so a new application connection normally costs a
//! `CONNECT` round trip on an existing connection rather than a TCP + TLS + HTTP/2 handshake.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures_util::future::poll_fn;
use h2::{
    client::{Connection, SendRequest},
    Ping, PingPong, Reason,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{watch, Notify},
};
use tracing::{debug, warn};

use super::{
    client::{client_builder, open},
    stream::HboneStream,
    ClientConfig, ConnectError, HboneError,
};

/// Settings of a [`Pool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub client: ClientConfig,
    /// Streams per connection before another connection is opened for the same key (lowered to
    /// the server's SETTINGS_MAX_CONCURRENT_STREAMS if that is smaller).
    pub max_streams_per_connection: u32,
    /// A connection without streams for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// Bound on waiting for the answer to a `CONNECT` (the server dials before answering).
    pub open_timeout: Duration,
    /// PING a pooled connection this often to find peers that vanished without a FIN (node
    /// reboot) before a tunnel is sent into them; `None` disables.
    pub keepalive_interval: Option<Duration>,
    /// A PING not answered within this closes the connection.
    pub keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            client: ClientConfig::default(),
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(120),
            open_timeout: Duration::from_secs(15),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// The client certificate a connection is opened with (see [`Pool::stream_as`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Identifies the certificate (its serial).
    pub serial: String,
    /// End of the certificate's validity.
    pub not_after: SystemTime,
}

/// What `connect` learned about a new transport, kept with the pooled connection.
#[derive(Debug, Clone, Default)]
pub struct TransportInfo {
    /// End of validity of the server's certificate, if known: the connection retires then.
    pub server_not_after: Option<SystemTime>,
    /// A description its tunnels report (e.g. TLS version and cipher suite).
    pub label: Option<Arc<str>>,
}

/// Counters of a [`Pool`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections established (successful handshakes) since the pool was created.
    pub connections_created: u64,
    /// Connection attempts that failed (transport or HTTP/2 handshake).
    pub connect_failures: u64,
    /// Tunnels opened (`CONNECT` answered 200).
    pub streams_opened: u64,
    /// Connections that stopped taking streams because a certificate of their handshake was
    /// renewed or expired (they close once their tunnels end).
    pub connections_retired: u64,
    /// Connections currently in the pool.
    pub live_connections: usize,
    /// Tunnels currently open through pooled connections.
    pub active_streams: usize,
}

/// HTTP/2 connections keyed by `K`. Cheap to clone; clones share the connections.
///
/// Connections are closed when idle for [`PoolConfig::idle_timeout`], when a keepalive PING goes
/// unanswered, or once the pool is dropped and their last tunnel ended.
pub struct Pool<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct Inner<K> {
    cfg: PoolConfig,
    keys: Mutex<HashMap<K, Entry>>,
    next_id: AtomicU64,
    connections_created: AtomicU64,
    connect_failures: AtomicU64,
    streams_opened: AtomicU64,
    connections_retired: AtomicU64,
}

type Outcome = Option<Result<(), ConnectError>>;

#[derive(Default)]
struct Entry {
    conns: Vec<Pooled>,
    /// The one connection attempt in flight for this key; others wait for its outcome.
    connecting: Option<(u64, watch::Receiver<Outcome>)>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.connecting.is_none()
    }
}

struct Pooled {
    shared: Arc<ConnShared>,
    /// The pool's handle; the connection closes (GOAWAY) once this is dropped and no tunnel
    /// is left.
    send: SendRequest<Bytes>,
}

/// What a pooled connection's tunnels and its driver task share.
pub(crate) struct ConnShared {
    id: u64,
    /// The client certificate of the handshake, if the caller named one.
    credential: Option<Credential>,
    /// The earliest end of validity of the certificates of the handshake (either side).
    expires: Option<SystemTime>,
    /// What the caller said about the transport (e.g. its TLS version and cipher suite).
    label: Option<Arc<str>>,
    active: AtomicUsize,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
    /// Wakes the driver when the last tunnel ends, to start the idle clock.
    became_idle: Notify,
}

impl ConnShared {
    fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }

    /// Whether a caller holding `current` may open a stream here: the connection was opened
    /// with that same certificate and no certificate of its handshake has expired.
    fn takes_streams_for(&self, current: Option<&Credential>, now: SystemTime) -> bool {
        !self.expired(now) && self.credential.as_ref() == current
    }

    /// Whether the connection must take no more streams from anyone: a certificate of its
    /// handshake expired, or the client's certificate was replaced by a newer one (a caller
    /// that still holds an older one only skips it).
    fn is_stale(&self, current: Option<&Credential>, now: SystemTime) -> bool {
        let superseded = match (&self.credential, current) {
            (Some(mine), Some(cur)) => mine.serial != cur.serial && cur.not_after > mine.not_after,
            _ => false,
        };
        superseded || self.expired(now)
    }
}

/// A reserved stream on a pooled connection, released when the tunnel is dropped.
pub(crate) struct StreamSlot {
    conn: Arc<ConnShared>,
}

impl StreamSlot {
    pub(crate) fn label(&self) -> Option<&str> {
        self.conn.label.as_deref()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        *lock(&self.conn.idle_since) = Instant::now();
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.became_idle.notify_one();
        }
    }
}

/// A poisoned lock only means another thread panicked; the maps stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Step {
    Reuse(SendRequest<Bytes>, StreamSlot),
    Wait(watch::Receiver<Outcome>),
    Lead(u64, watch::Sender<Outcome>),
}

impl<K> Pool<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                connections_created: AtomicU64::new(0),
                connect_failures: AtomicU64::new(0),
                streams_opened: AtomicU64::new(0),
                connections_retired: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> PoolStats {
        let keys = lock(&self.inner.keys);
        let conns = keys.values().flat_map(|e| e.conns.iter());
        let (live, active) = conns
            .filter(|c| !c.shared.closed.load(Ordering::Acquire))
            .fold((0, 0), |(l, a), c| (l + 1, a + c.shared.active.load(Ordering::Acquire)));
        PoolStats {
            connections_created: self.inner.connections_created.load(Ordering::Relaxed),
            connect_failures: self.inner.connect_failures.load(Ordering::Relaxed),
            streams_opened: self.inner.streams_opened.load(Ordering::Relaxed),
            connections_retired: self.inner.connections_retired.load(Ordering::Relaxed),
            live_connections: live,
            active_streams: active,
        }
    }

    /// Opens a tunnel to `target` over a connection for `key`.
    ///
    /// Reuses a live connection of the key that has a free stream; otherwise establishes one
    /// through `connect` (which returns the transport, normally TLS already done) — unless
    /// another caller is already establishing one for the key, in which case this waits for
    /// that attempt and shares its outcome. A pooled connection that turns out to be dead is
    /// dropped and the tunnel retried once on a new one; so is a tunnel the peer refused
    /// unprocessed because it is draining (GOAWAY or `REFUSED_STREAM`), even on a connection
    /// made for this call: that happens when the peer's agent is handing over.
    pub async fn stream<S, E, C, Fut>(
        &self,
        key: K,
        target: SocketAddr,
        connect: C,
    ) -> Result<HboneStream, HboneError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        C: Fn() -> Fut,
        Fut: Future<Output = Result<S, E>>,
    {
        let connect = || {
            let transport = connect();
            async move { transport.await.map(|io| (io, TransportInfo::default())) }
        };
        self.stream_as(key, None, target, connect).await
    }

    /// Like [`Pool::stream`], for connections authenticated with certificates: `credential` is
    /// the caller's current client certificate, and `connect` also returns what it learned of
    /// the transport (the end of validity of the server's certificate, a label every tunnel on
    /// it reports through [`HboneStream::connection_label`]). A connection takes new tunnels
    /// only from callers holding the certificate it was opened with, and only until either
    /// side's certificate expires; once the client's certificate is renewed or one expires it
    /// is retired: its open tunnels finish undisturbed, then it closes, and new tunnels get a
    /// fresh handshake.
    pub async fn stream_as<S, E, C, Fut>(
        &self,
        key: K,
        credential: Option<Credential>,
        target: SocketAddr,
        connect: C,
    ) -> Result<HboneStream, HboneError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        C: Fn() -> Fut,
        Fut: Future<Output = Result<(S, TransportInfo), E>>,
    {
        let credential = credential.as_ref();
        let mut retried = false;
        loop {
            let (mut send, slot, fresh) = self.checkout(&key, credential, &connect).await?;
            let conn = slot.conn.clone();
            let timeout = self.inner.cfg.open_timeout;
            let err = match tokio::time::timeout(timeout, open(&mut send, target, Some(slot))).await
            {
                Ok(Ok(stream)) => {
                    self.inner.streams_opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                Ok(Err(e)) => e,
                Err(_) => return Err(HboneError::OpenTimeout { target, timeout }),
            };
            let HboneError::H2(h2e) = &err else {
                return Err(err);
            };
            let conn_dead = h2e.is_io() || h2e.is_go_away() || conn.closed.load(Ordering::Acquire);
            if conn_dead {
                // Later callers must not pick it either; the driver removes it when it ends.
                conn.closed.store(true, Ordering::Release);
            }
            let refused = h2e.reason() == Some(Reason::REFUSED_STREAM);
            // No byte was sent on a tunnel without a 200, so retrying cannot duplicate data. A
            // fresh connection that broke is reported: retrying would just hammer the peer.
            let draining = refused || h2e.is_go_away();
            if (draining || (conn_dead && !fresh)) && !retried {
                debug!(conn = conn.id, %target, "pooled HBONE connection unusable ({h2e}), retrying");
                retried = true;
                continue;
            }
            return Err(err);
        }
    }

    /// A connection with a free stream for `key`, reserved for the caller. The bool says whether
    /// it was established for this call.
    async fn checkout<S, E, C, Fut>(
        &self,
        key: &K,
        credential: Option<&Credential>,
        connect: &C,
    ) -> Result<(SendRequest<Bytes>, StreamSlot, bool), HboneError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        C: Fn() -> Fut,
        Fut: Future<Output = Result<(S, TransportInfo), E>>,
    {
        loop {
            match self.step(key, credential, SystemTime::now()) {
                Step::Reuse(send, slot) => return Ok((send, slot, false)),
                Step::Lead(id, done) => {
                    let (send, slot) = self.lead(key, id, done, credential, connect).await?;
                    return Ok((send, slot, true));
                }
                Step::Wait(mut done) => {
                    // Another caller is establishing a connection for this key: share it
                    // instead of opening one more (no handshake stampede).
                    let outcome = match done.wait_for(Option::is_some).await {
                        Ok(outcome) => outcome.clone(),
                        // That caller went away mid-attempt: try again, possibly leading.
                        Err(_) => None,
                    };
                    if let Some(Err(e)) = outcome {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    fn step(&self, key: &K, credential: Option<&Credential>, now: SystemTime) -> Step {
        let mut keys = lock(&self.inner.keys);
        let entry = keys.entry(key.clone()).or_default();
        entry.conns.retain(|c| {
            if c.shared.closed.load(Ordering::Acquire) {
                return false;
            }
            if c.shared.is_stale(credential, now) {
                // Dropping the pool's handle lets the connection close after its last tunnel.
                self.inner.connections_retired.fetch_add(1, Ordering::Relaxed);
                debug!(conn = c.shared.id, "HBONE connection retired: a certificate of its handshake was renewed or expired");
                return false;
            }
            true
        });
        let cap = self.inner.cfg.max_streams_per_connection.max(1) as usize;
        for c in &entry.conns {
            if !c.shared.takes_streams_for(credential, now) {
                continue;
            }
            let limit = cap.min(c.send.current_max_send_streams());
            // Reserved under the map lock, so idle expiry (also under it) never races a reuse.
            if c.shared.active.load(Ordering::Acquire) < limit {
                c.shared.active.fetch_add(1, Ordering::AcqRel);
                return Step::Reuse(c.send.clone(), StreamSlot { conn: c.shared.clone() });
            }
        }
        if let Some((_, done)) = &entry.connecting {
            return Step::Wait(done.clone());
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        entry.connecting = Some((id, rx));
        Step::Lead(id, tx)
    }

    async fn lead<S, E, C, Fut>(
        &self,
        key: &K,
        id: u64,
        done: watch::Sender<Outcome>,
        credential: Option<&Credential>,
        connect: &C,
    ) -> Result<(SendRequest<Bytes>, StreamSlot), HboneError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        C: Fn() -> Fut,
        Fut: Future<Output = Result<(S, TransportInfo), E>>,
    {
        // If this future is dropped mid-attempt the guard clears the marker, then drops the
        // sender, which wakes the waiters so one of them takes over.
        let mut guard = LeadGuard { inner: &self.inner, key, id, done: Some(done) };
        let result = establish(&self.inner.cfg.client, connect).await;

        let mut keys = lock(&self.inner.keys);
        let entry = keys.entry(key.clone()).or_default();
        if entry.connecting.as_ref().map(|(i, _)| *i) == Some(id) {
            entry.connecting = None;
        }
        let done = guard.done.take();
        match result {
            Ok((send, conn, info)) => {
                let expires = [credential.map(|c| c.not_after), info.server_not_after]
                    .into_iter()
                    .flatten()
                    .min();
                let shared = Arc::new(ConnShared {
                    id,
                    credential: credential.cloned(),
                    expires,
                    label: info.label,
                    // The leader's own stream.
                    active: AtomicUsize::new(1),
                    closed: AtomicBool::new(false),
                    idle_since: Mutex::new(Instant::now()),
                    became_idle: Notify::new(),
                });
                entry.conns.push(Pooled { shared: shared.clone(), send: send.clone() });
                drop(keys);
                self.inner.connections_created.fetch_add(1, Ordering::Relaxed);
                debug!(conn = id, "HBONE connection established");
                let cfg = &self.inner.cfg;
                tokio::spawn(drive(
                    conn,
                    shared.clone(),
                    Arc::downgrade(&self.inner),
                    key.clone(),
                    cfg.idle_timeout,
                    cfg.keepalive_interval.map(|i| (i, cfg.keepalive_timeout)),
                ));
                if let Some(done) = done {
                    let _ = done.send(Some(Ok(())));
                }
                Ok((send, StreamSlot { conn: shared }))
            }
            Err(e) => {
                if entry.is_empty() {
                    keys.remove(key);
                }
                drop(keys);
                self.inner.connect_failures.fetch_add(1, Ordering::Relaxed);
                debug!(conn = id, "HBONE connection failed: {e}");
                if let Some(done) = done {
                    let _ = done.send(Some(Err(e.clone())));
                }
                Err(e.into())
            }
        }
    }
}

struct LeadGuard<'a, K: Hash + Eq> {
    inner: &'a Inner<K>,
    key: &'a K,
    id: u64,
    done: Option<watch::Sender<Outcome>>,
}

impl<K: Hash + Eq> Drop for LeadGuard<'_, K> {
    fn drop(&mut self) {
        if self.done.is_none() {
            return;
        }
        let mut keys = lock(&self.inner.keys);
        if let Some(entry) = keys.get_mut(self.key) {
            if entry.connecting.as_ref().map(|(i, _)| *i) == Some(self.id) {
                entry.connecting = None;
            }
            if entry.is_empty() {
                keys.remove(self.key);
            }
        }
        // `done` is dropped after this, with the marker already gone.
    }
}

/// The HTTP/2 connection, and what `connect` learned of its transport.
type Established<S> = (SendRequest<Bytes>, Connection<S, Bytes>, TransportInfo);

async fn establish<S, E, C, Fut>(
    cfg: &ClientConfig,
    connect: C,
) -> Result<Established<S>, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    C: FnOnce() -> Fut,
    Fut: Future<Output = Result<(S, TransportInfo), E>>,
{
    let (io, info) = connect().await.map_err(|e| ConnectError::Transport(Arc::from(e.into())))?;
    match tokio::time::timeout(cfg.handshake_timeout, client_builder(cfg).handshake(io)).await {
        Ok(Ok((send, conn))) => Ok((send, conn, info)),
        Ok(Err(e)) => Err(ConnectError::Handshake(Arc::new(e))),
        Err(_) => Err(ConnectError::Timeout(cfg.handshake_timeout)),
    }
}

/// After idle expiry the connection only has to send GOAWAY and close; don't wait forever.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Drives one pooled connection: HTTP/2 I/O, keepalive, idle expiry; removes the connection
/// from the pool when it ends.
async fn drive<K, S>(
    mut conn: Connection<S, Bytes>,
    shared: Arc<ConnShared>,
    pool: Weak<Inner<K>>,
    key: K,
    idle_timeout: Duration,
    keepalive: Option<(Duration, Duration)>,
) where
    K: Hash + Eq + Send + Sync + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let keepalive = keepalive_loop(conn.ping_pong(), keepalive);
    tokio::pin!(keepalive);
    let mut pooled = true;
    let mut close_by: Option<tokio::time::Instant> = None;
    loop {
        // `None` while tunnels are open (or for an idle timeout too large to represent).
        let idle_deadline = (pooled && shared.active.load(Ordering::Acquire) == 0)
            .then(|| lock(&shared.idle_since).checked_add(idle_timeout))
            .flatten();
        tokio::select! {
            biased;
            result = &mut conn => {
                match result {
                    Ok(()) => debug!(conn = shared.id, "HBONE connection closed"),
                    Err(e) => debug!(conn = shared.id, "HBONE connection failed: {e}"),
                }
                break;
            }
            failure = &mut keepalive => {
                warn!(conn = shared.id, "HBONE keepalive failed, closing the connection: {failure}");
                break;
            }
            _ = sleep_until_opt(idle_deadline.map(tokio::time::Instant::from_std)), if idle_deadline.is_some() => {
                match expire(&pool, &key, &shared, idle_timeout) {
                    Expiry::Busy => {}
                    Expiry::Expired => {
                        debug!(conn = shared.id, "HBONE connection idle, closing");
                        pooled = false;
                        close_by = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
                    Expiry::Unpooled => pooled = false,
                }
            }
            _ = shared.became_idle.notified(), if pooled => {}
            _ = sleep_until_opt(close_by), if close_by.is_some() => {
                debug!(conn = shared.id, "HBONE connection did not close in time, dropping it");
                break;
            }
        }
    }
    shared.closed.store(true, Ordering::Release);
    if let Some(inner) = pool.upgrade() {
        let mut keys = lock(&inner.keys);
        if let Some(entry) = keys.get_mut(&key) {
            entry.conns.retain(|c| c.shared.id != shared.id);
            if entry.is_empty() {
                keys.remove(&key);
            }
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Expiry {
    /// In use again, or not idle long enough.
    Busy,
    /// Removed from the pool: the connection closes now that its handle is gone.
    Expired,
    /// The pool or the entry is gone: nothing to expire, the connection closes on its own.
    Unpooled,
}

fn expire<K: Hash + Eq>(
    pool: &Weak<Inner<K>>,
    key: &K,
    shared: &ConnShared,
    idle_timeout: Duration,
) -> Expiry {
    let Some(inner) = pool.upgrade() else {
        return Expiry::Unpooled;
    };
    let mut keys = lock(&inner.keys);
    let Some(entry) = keys.get_mut(key) else {
        return Expiry::Unpooled;
    };
    if !entry.conns.iter().any(|c| c.shared.id == shared.id) {
        return Expiry::Unpooled;
    }
    // Checked under the map lock, where reuse reserves streams.
    if shared.active.load(Ordering::Acquire) != 0
        || lock(&shared.idle_since).elapsed() < idle_timeout
    {
        return Expiry::Busy;
    }
    entry.conns.retain(|c| c.shared.id != shared.id);
    if entry.is_empty() {
        keys.remove(key);
    }
    Expiry::Expired
}

/// Returns (with the reason) only when the peer stopped answering PINGs.
async fn keepalive_loop(ping_pong: Option<PingPong>, cfg: Option<(Duration, Duration)>) -> String {
    let (Some(mut ping_pong), Some((interval, timeout))) = (ping_pong, cfg) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = ping_pong.send_ping(Ping::opaque()) {
            return format!("sending PING: {e}");
        }
        match tokio::time::timeout(timeout, poll_fn(|cx| ping_pong.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("waiting for PONG: {e}"),
            Err(_) => return format!("no PONG within {timeout:?}"),
        }
    }
}
