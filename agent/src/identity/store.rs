//! The node's workload certificates, one per identity, and the driver that gets and renews
//! them.
//!
//! Pods want an identity ([`CertStore::want`]); pods of one namespace and service account on
//! this node share one key and one certificate, so the CA sees one request per identity, not
//! per pod. The driver ([`run_renewals`]) is the only caller of the CA: it asks for a missing
//! certificate at once and renews one at half-life, a few identities at a time, retrying
//! failures with backoff. Nothing else waits on the CA: a pod whose first certificate has not
//! come is enrolled all the same and its mesh connections wait a little, then fail closed.
//!
//! Readers (the tunnel, building TLS configs) take a read lock only long enough to clone an
//! `Arc`; certificates are made outside the lock and swapped in with a short write lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::ca::CertIssuer;
use super::cert::{fmt_time, WorkloadCert};
use super::spiffe::SpiffeId;
use super::IdentityError;

/// Longest the renewal driver sleeps before looking again; bounds the damage of a wall-clock
/// jump (renewal times are wall-clock, tokio sleeps are monotonic).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Requests to the CA in flight at once: a node starting with a hundred pods asks for their
/// certificates in waves rather than all at once (the CA limits each node's rate too).
const MAX_IN_FLIGHT: usize = 8;

/// What the admin API shows for one workload certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The store key, `name.namespace`.
    pub workload: String,
    pub identity: SpiffeId,
    /// Lower-case hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the driver will next try to renew (a retry time after a failure).
    pub next_renewal: SystemTime,
    /// Renewal attempts that failed since the last success.
    pub renewal_failures: u32,
    pub last_error: Option<String>,
    /// Which CA signed it.
    pub issued_by: String,
}

/// A workload whose first certificate has not come yet: it is enrolled, and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCert {
    pub workload: String,
    pub identity: SpiffeId,
    /// When the identity was first wanted.
    pub since: SystemTime,
    /// Failed requests so far.
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_attempt: SystemTime,
}

/// How the CA answered lately, for readiness and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaHealth {
    /// Set while the last answer was a failure: since when, and what.
    pub failing: Option<(SystemTime, String)>,
    pub requests_ok: u64,
    pub requests_failed: u64,
}

/// A request to make: the identity, and the certificate it replaces.
type Request = (SpiffeId, Option<Arc<WorkloadCert>>);

/// One identity's certificate (or the want of one) and its schedule.
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    /// Set after a failure: when to try again.
    retry_at: Option<SystemTime>,
    failures: u32,
    last_error: Option<String>,
    /// Workloads that use it; the slot goes with the last.
    users: usize,
    /// A request for it is out: the driver does not send another.
    in_flight: bool,
    since: SystemTime,
}

impl Slot {
    fn next_attempt(&self) -> SystemTime {
        match (&self.cert, self.retry_at) {
            (_, Some(at)) => at,
            (Some(cert), None) => cert.renew_at(),
            (None, None) => self.since,
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Workload (`name.namespace`) to the identity it wants.
    pods: HashMap<String, SpiffeId>,
    ids: HashMap<SpiffeId, Slot>,
    health: CaHealth,
}

impl Inner {
    fn release(&mut self, id: &SpiffeId) {
        if let Some(slot) = self.ids.get_mut(id) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                // Its key leaves memory once the last connection using it lets go.
                self.ids.remove(id);
            }
        }
    }
}

/// The certificates of the workloads on this node.
pub struct CertStore {
    inner: RwLock<Inner>,
    /// Wakes the driver when an identity is wanted or goes.
    changed: Notify,
    /// Bumped whenever a certificate comes or a request fails: waiting connections and the
    /// agent's readiness look again.
    news: watch::Sender<u64>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self { inner: RwLock::default(), changed: Notify::new(), news: watch::Sender::new(0) }
    }
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("workloads", &self.len()).finish()
    }
}

impl CertStore {
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock cannot leave the maps inconsistent in a way that matters
    // (at worst a slot with a wrong user count), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self) {
        self.news.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Says that `workload` holds `id` from now on (replacing another identity it held), and
    /// returns the certificate if the identity has one already. Otherwise the driver asks the
    /// CA for it.
    pub fn want(&self, workload: &str, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let mut inner = self.write();
        if inner.pods.get(workload) != Some(id) {
            if let Some(old) = inner.pods.insert(workload.to_owned(), id.clone()) {
                inner.release(&old);
            }
            let slot = inner.ids.entry(id.clone()).or_insert_with(|| Slot {
                cert: None,
                retry_at: None,
                failures: 0,
                last_error: None,
                users: 0,
                in_flight: false,
                since: SystemTime::now(),
            });
            slot.users += 1;
            self.changed.notify_one();
        }
        inner.ids.get(id).and_then(|s| s.cert.clone())
    }

    /// Sets the certificate of `workload` (and of its identity), replacing any previous one;
    /// returns the shared certificate now in the store.
    pub fn insert(
        &self,
        workload: impl Into<String>,
        cert: impl Into<Arc<WorkloadCert>>,
    ) -> Arc<WorkloadCert> {
        let workload = workload.into();
        let cert = cert.into();
        self.want(&workload, cert.spiffe_id());
        if let Some(slot) = self.write().ids.get_mut(cert.spiffe_id()) {
            slot.cert = Some(Arc::clone(&cert));
            slot.retry_at = None;
            slot.failures = 0;
            slot.last_error = None;
        }
        self.changed.notify_one();
        self.announce();
        cert
    }

    /// Forgets `workload`. Its identity's key material is freed with the last workload that
    /// holds it, as soon as the last connection using it lets go of its `Arc`. Returns whether
    /// there was an entry.
    pub fn remove(&self, workload: &str) -> bool {
        let mut inner = self.write();
        let Some(id) = inner.pods.remove(workload) else { return false };
        inner.release(&id);
        self.changed.notify_one();
        true
    }

    /// The current certificate of `workload`.
    pub fn get(&self, workload: &str) -> Option<Arc<WorkloadCert>> {
        let inner = self.read();
        let id = inner.pods.get(workload)?;
        inner.ids.get(id)?.cert.clone()
    }

    /// The certificate of `workload`, waiting at most `limit` for its first one to come (a
    /// connection opened just after the pod was enrolled). `None`: it did not come, or the
    /// workload is not (any more) in the store.
    pub async fn wait(&self, workload: &str, limit: Duration) -> Option<Arc<WorkloadCert>> {
        // Every connection asks: the common case takes the read lock once, nothing more.
        if let Some(cert) = self.get(workload) {
            return Some(cert);
        }
        let mut news = self.news.subscribe();
        let look = tokio::time::timeout(limit, async {
            loop {
                news.borrow_and_update();
                if let Some(cert) = self.get(workload) {
                    return Some(cert);
                }
                if !self.read().pods.contains_key(workload) {
                    return None;
                }
                if news.changed().await.is_err() {
                    return None;
                }
            }
        });
        look.await.ok().flatten()
    }

    /// A receiver that sees a change whenever a certificate comes or a request fails.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.news.subscribe()
    }

    /// Workloads in the store, with or without a certificate.
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().pods.is_empty()
    }

    /// Every workload with a certificate, sorted by workload, for the admin API.
    pub fn list(&self) -> Vec<CertInfo> {
        let inner = self.read();
        let mut infos: Vec<CertInfo> = inner
            .pods
            .iter()
            .filter_map(|(workload, id)| {
                let slot = inner.ids.get(id)?;
                let cert = slot.cert.as_ref()?;
                Some(CertInfo {
                    workload: workload.clone(),
                    identity: cert.spiffe_id().clone(),
                    serial: cert.serial().to_string(),
                    not_before: cert.not_before(),
                    not_after: cert.not_after(),
                    next_renewal: slot.next_attempt(),
                    renewal_failures: slot.failures,
                    last_error: slot.last_error.clone(),
                    issued_by: cert.issued_by().to_owned(),
                })
            })
            .collect();
        infos.sort_by(|a, b| a.workload.cmp(&b.workload));
        infos
    }

    /// Every workload still waiting for its first certificate, sorted by workload.
    pub fn pending(&self) -> Vec<PendingCert> {
        let inner = self.read();
        let mut out: Vec<PendingCert> = inner
            .pods
            .iter()
            .filter_map(|(workload, id)| {
                let slot = inner.ids.get(id)?;
                slot.cert.is_none().then(|| PendingCert {
                    workload: workload.clone(),
                    identity: id.clone(),
                    since: slot.since,
                    failures: slot.failures,
                    last_error: slot.last_error.clone(),
                    next_attempt: slot.next_attempt(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.workload.cmp(&b.workload));
        out
    }

    /// How the CA answered lately.
    pub fn health(&self) -> CaHealth {
        self.read().health.clone()
    }

    /// Up to `room` identities due at `now` (marked in flight, with the certificate they
    /// replace), and the earliest future attempt among the others.
    fn take_due(&self, now: SystemTime, room: usize) -> (Vec<Request>, Option<SystemTime>) {
        let mut inner = self.write();
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        // Identities without a certificate first: their pods are closed until it comes.
        let mut order: Vec<(&SpiffeId, &mut Slot)> =
            inner.ids.iter_mut().filter(|(_, s)| !s.in_flight).collect();
        order.sort_by_key(|(_, s)| (s.cert.is_some(), s.next_attempt()));
        for (id, slot) in order {
            let at = slot.next_attempt();
            if at <= now && due.len() < room {
                slot.in_flight = true;
                due.push((id.clone(), slot.cert.clone()));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    /// Applies the answer to a request for `id` made while it held `old`.
    fn complete(
        &self,
        id: &SpiffeId,
        old: Option<&Arc<WorkloadCert>>,
        result: Result<WorkloadCert, IdentityError>,
        backoff: &Backoff,
        issuer: &str,
    ) {
        let now = SystemTime::now();
        let mut inner = self.write();
        let users: Vec<String> =
            inner.pods.iter().filter(|(_, v)| *v == id).map(|(k, _)| k.clone()).collect();
        let ok = result.is_ok();
        if ok {
            inner.health.requests_ok += 1;
            if inner.health.failing.take().is_some() {
                tracing::info!(ca = issuer, "the certificate service answers again");
                // The CA is back: every identity waiting out a backoff asks again now.
                for slot in inner.ids.values_mut() {
                    if slot.retry_at.is_some() {
                        slot.retry_at = Some(now);
                    }
                }
            }
        } else {
            inner.health.requests_failed += 1;
        }
        let Some(slot) = inner.ids.get_mut(id) else {
            // Every workload of the identity left meanwhile: nothing to keep.
            drop(inner);
            self.announce();
            return;
        };
        slot.in_flight = false;
        let replaced_meanwhile = match (old, &slot.cert) {
            (Some(old), Some(cur)) => !Arc::ptr_eq(old, cur),
            (None, Some(_)) => true,
            _ => false,
        };
        if replaced_meanwhile {
            drop(inner);
            return;
        }
        match result {
            Ok(new) => {
                let new = Arc::new(new);
                slot.cert = Some(Arc::clone(&new));
                slot.failures = 0;
                slot.last_error = None;
                // A certificate that is due at once (tiny lifetime, CA about to expire) must
                // not make the driver spin asking again.
                slot.retry_at =
                    (new.renew_at() < now + backoff.initial).then_some(now + backoff.initial);
                drop(inner);
                match old {
                    None => tracing::info!(
                        identity = %id,
                        workloads = %users.join(","),
                        serial = new.serial(),
                        issued_by = new.issued_by(),
                        not_after = %fmt_time(new.not_after()),
                        renew_at = %fmt_time(new.renew_at()),
                        "got the workload certificate"
                    ),
                    Some(old) => tracing::info!(
                        identity = %id,
                        workloads = %users.join(","),
                        old_serial = old.serial(),
                        serial = new.serial(),
                        issued_by = new.issued_by(),
                        not_after = %fmt_time(new.not_after()),
                        renew_at = %fmt_time(new.renew_at()),
                        "renewed workload certificate"
                    ),
                }
            }
            Err(e) => {
                let error = e.to_string();
                slot.failures = slot.failures.saturating_add(1);
                let failures = slot.failures;
                let delay = backoff.delay(failures, old.is_some());
                slot.retry_at = Some(now + delay);
                slot.last_error = Some(error.clone());
                if inner.health.failing.is_none() {
                    inner.health.failing = Some((now, error.clone()));
                } else if let Some((_, last)) = inner.health.failing.as_mut() {
                    last.clone_from(&error);
                }
                drop(inner);
                let retry_in_ms = delay.as_millis() as u64;
                match old {
                    None => tracing::warn!(
                        identity = %id,
                        workloads = %users.join(","),
                        failures,
                        retry_in_ms,
                        error = %error,
                        "no certificate yet: these workloads' mesh connections fail closed"
                    ),
                    Some(old) if old.is_expired_at(now) => tracing::error!(
                        identity = %id,
                        serial = old.serial(),
                        expired_at = %fmt_time(old.not_after()),
                        failures,
                        retry_in_ms,
                        error = %error,
                        "certificate renewal failed and the current certificate has expired"
                    ),
                    Some(old) => tracing::warn!(
                        identity = %id,
                        serial = old.serial(),
                        not_after = %fmt_time(old.not_after()),
                        failures,
                        retry_in_ms,
                        error = %error,
                        "certificate renewal failed; keeping the current certificate"
                    ),
                }
            }
        }
        self.announce();
    }
}

/// Retry delays after failed requests: doubling from `initial`, capped at `max`, and at
/// `max_first` for an identity with no certificate yet (its pods are closed meanwhile).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) max_first: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_first: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    fn delay(&self, failures: u32, has_cert: bool) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let cap = if has_cert { self.max } else { self.max_first };
        self.initial.saturating_mul(1 << exponent).min(cap)
    }
}

/// Gets and renews the store's certificates forever: asks `issuer` at once for an identity
/// with none, and again at each certificate's renewal time, for lifetime `ttl`, at most
/// [`MAX_IN_FLIGHT`] at a time. A failure keeps the old certificate (if any) and retries with
/// exponential backoff (1 s up to 5 min; 30 s for a first certificate); the CA answering
/// again retries all at once. Spawn it as a task and abort the task to stop it.
pub async fn run_renewals(store: Arc<CertStore>, issuer: Arc<dyn CertIssuer>, ttl: Duration) {
    run_renewals_with(store, issuer, ttl, Backoff::default()).await
}

type Answer = (SpiffeId, Option<Arc<WorkloadCert>>, Result<WorkloadCert, IdentityError>);

pub(crate) async fn run_renewals_with(
    store: Arc<CertStore>,
    issuer: Arc<dyn CertIssuer>,
    ttl: Duration,
    backoff: Backoff,
) {
    let mut requests: JoinSet<Answer> = JoinSet::new();
    // What each request is for, so that one whose task panicked is still answered.
    let mut asked: HashMap<tokio::task::Id, (SpiffeId, Option<Arc<WorkloadCert>>)> = HashMap::new();
    loop {
        let now = SystemTime::now();
        let (due, next) = store.take_due(now, MAX_IN_FLIGHT - requests.len());
        for (id, old) in due {
            let issuer = Arc::clone(&issuer);
            let (task_id, task_old) = (id.clone(), old.clone());
            let task = requests.spawn(async move {
                let result = issuer.issue(&id, ttl).await;
                (id, old, result)
            });
            asked.insert(task.id(), (task_id, task_old));
        }
        let sleep_for = next
            .map(|at| at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            Some(done) = requests.join_next_with_id(), if !requests.is_empty() => match done {
                Ok((task, (id, old, result))) => {
                    asked.remove(&task);
                    store.complete(&id, old.as_ref(), result, &backoff, issuer.describe());
                }
                Err(e) => {
                    if let Some((id, old)) = asked.remove(&e.id()) {
                        let failed = IdentityError::Issue {
                            id: id.to_string(),
                            reason: format!("the request failed: {e}"),
                        };
                        store.complete(&id, old.as_ref(), Err(failed), &backoff, issuer.describe());
                    }
                }
            },
            _ = tokio::time::sleep(sleep_for), if requests.len() < MAX_IN_FLIGHT => {}
            // notify_one stores a permit, so a want made while we were scanning still
            // wakes us here.
            _ = store.changed.notified(), if requests.len() < MAX_IN_FLIGHT => {}
        }
    }
}

/// How many workloads wait for a first certificate, by how long, for readiness: `a.ns, b.ns`.
pub fn describe_pending(pending: &[PendingCert]) -> String {
    let mut by_error: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for p in pending {
        by_error
            .entry(p.last_error.clone().unwrap_or_else(|| "asking the CA".into()))
            .or_default()
            .push(&p.workload);
    }
    by_error
        .into_iter()
        .map(|(why, pods)| format!("{} ({why})", pods.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::super::ca::IssueFuture;
    use super::super::testutil::{id, new_ca};
    use super::super::CaSigner;
    use super::*;

    const WORKLOAD: &str = "web.default";

    /// Fails its first `fail_first` calls, then issues through the real CA.
    struct FlakyIssuer {
        ca: Arc<CaSigner>,
        fail_first: u32,
        attempts: AtomicU32,
    }

    impl CertIssuer for FlakyIssuer {
        fn issue<'a>(&'a self, id: &'a SpiffeId, ttl: Duration) -> IssueFuture<'a> {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(std::future::ready(if attempt <= self.fail_first {
                Err(IdentityError::Issue {
                    id: id.to_string(),
                    reason: "CA unavailable (test)".into(),
                })
            } else {
                self.ca.issue(id, ttl)
            }))
        }

        fn describe(&self) -> &str {
            "flaky test CA"
        }
    }

    const FAST: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(400),
        max_first: Duration::from_millis(200),
    };

    async fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(value) = check() {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    #[test]
    fn insert_get_list_remove() {
        let (_tmp, ca) = new_ca("cluster.local");
        let store = CertStore::new();
        assert!(store.is_empty());
        let cert = store.insert(
            WORKLOAD,
            ca.issue(&id("spiffe://cluster.local/ns/default/sa/web"), Duration::from_secs(3600))
                .unwrap(),
        );
        store.insert(
            "db.data",
            ca.issue(&id("spiffe://cluster.local/ns/data/sa/db"), Duration::from_secs(3600))
                .unwrap(),
        );
        assert!(Arc::ptr_eq(&store.get(WORKLOAD).unwrap(), &cert));
        assert!(store.get("nope.default").is_none());

        let list = store.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].workload, "db.data");
        let web = &list[1];
        assert_eq!(web.identity, id("spiffe://cluster.local/ns/default/sa/web"));
        assert_eq!(web.serial, cert.serial());
        assert_eq!(web.not_before, cert.not_before());
        assert_eq!(web.not_after, cert.not_after());
        assert_eq!(web.next_renewal, cert.renew_at());
        assert_eq!(web.renewal_failures, 0);

        // Removing drops the store's reference: with no connection holding the certificate,
        // the key material is freed.
        let weak = Arc::downgrade(&cert);
        drop(cert);
        assert!(store.remove(WORKLOAD));
        assert!(!store.remove(WORKLOAD));
        assert!(weak.upgrade().is_none(), "key material still referenced");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
            max_first: Duration::from_secs(3),
        };
        let delays: Vec<u64> = (1..=5).map(|n| b.delay(n, true).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(b.delay(u32::MAX, true), Duration::from_secs(5));
        // A pod without a first certificate is closed: it asks again sooner.
        let first: Vec<u64> = (1..=4).map(|n| b.delay(n, false).as_secs()).collect();
        assert_eq!(first, vec![1, 2, 3, 3]);
    }

    #[tokio::test]
    async fn renewal_swaps_in_a_new_certificate_before_expiry() {
        let (_tmp, ca) = new_ca("cluster.local");
        let ca = Arc::new(ca);
        let store = Arc::new(CertStore::new());
        let ttl = Duration::from_secs(2);
        let spiffe = id("spiffe://cluster.local/ns/default/sa/web");
        let first = store.insert(WORKLOAD, ca.issue(&spiffe, ttl).unwrap());
        let driver = tokio::spawn(run_renewals_with(Arc::clone(&store), ca.clone(), ttl, FAST));

        let renewed = wait_for("a renewal", Duration::from_secs(5), || {
            store.get(WORKLOAD).filter(|c| c.serial() != first.serial())
        })
        .await;
        assert!(
            SystemTime::now() < first.not_after(),
            "renewed only after the old certificate expired"
        );
        // X.509 times have one-second resolution: a renewal within the same second may tie.
        assert!(renewed.not_after() >= first.not_after());
        assert_eq!(renewed.spiffe_id(), &spiffe);

        // And again: the driver keeps going with the new certificate's schedule.
        let second = wait_for("a second renewal", Duration::from_secs(5), || {
            store.get(WORKLOAD).filter(|c| c.serial() != renewed.serial())
        })
        .await;
        assert!(second.not_after() >= renewed.not_after());
        driver.abort();
    }

    #[tokio::test]
    async fn failed_renewal_keeps_the_old_certificate_and_retries() {
        let (_tmp, ca) = new_ca("cluster.local");
        let ca = Arc::new(ca);
        let store = Arc::new(CertStore::new());
        let ttl = Duration::from_secs(2);
        let first = store.insert(
            WORKLOAD,
            ca.issue(&id("spiffe://cluster.local/ns/default/sa/web"), ttl).unwrap(),
        );
        let failing = Arc::new(FlakyIssuer {
            ca: ca.clone(),
            fail_first: u32::MAX,
            attempts: AtomicU32::new(0),
        });
        let driver =
            tokio::spawn(run_renewals_with(Arc::clone(&store), failing.clone(), ttl, FAST));

        wait_for("three failed attempts", Duration::from_secs(5), || {
            (failing.attempts.load(Ordering::SeqCst) >= 3).then_some(())
        })
        .await;
        let current = store.get(WORKLOAD).unwrap();
        assert!(Arc::ptr_eq(&current, &first), "old certificate was replaced");
        let info = &store.list()[0];
        assert!(info.renewal_failures >= 3, "{info:?}");
        assert!(
            info.last_error.as_deref().unwrap_or_default().contains("CA unavailable"),
            "{info:?}"
        );
        assert!(info.next_renewal > first.renew_at());
        driver.abort();
    }

    #[tokio::test]
    async fn renewal_recovers_after_failures() {
        let (_tmp, ca) = new_ca("cluster.local");
        let ca = Arc::new(ca);
        let store = Arc::new(CertStore::new());
        let ttl = Duration::from_secs(3);
        let first = store.insert(
            WORKLOAD,
            ca.issue(&id("spiffe://cluster.local/ns/default/sa/web"), ttl).unwrap(),
        );
        let flaky =
            Arc::new(FlakyIssuer { ca: ca.clone(), fail_first: 2, attempts: AtomicU32::new(0) });
        let driver = tokio::spawn(run_renewals_with(Arc::clone(&store), flaky.clone(), ttl, FAST));
        let renewed = wait_for("a renewal after two failures", Duration::from_secs(5), || {
            store.get(WORKLOAD).filter(|c| c.serial() != first.serial())
        })
        .await;
        assert_eq!(flaky.attempts.load(Ordering::SeqCst), 3);
        assert!(SystemTime::now() < first.not_after());
        let info = &store.list()[0];
        assert_eq!(info.serial, renewed.serial());
        assert_eq!(info.renewal_failures, 0);
        assert_eq!(info.last_error, None);
        driver.abort();
    }

    #[tokio::test]
    async fn the_driver_wakes_for_certificates_inserted_later() {
        let (_tmp, ca) = new_ca("cluster.local");
        let ca = Arc::new(ca);
        let store = Arc::new(CertStore::new());
        let ttl = Duration::from_secs(2);
        // Started on an empty store: it must not sleep through the insert.
        let driver = tokio::spawn(run_renewals_with(Arc::clone(&store), ca.clone(), ttl, FAST));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = store.insert(
            WORKLOAD,
            ca.issue(&id("spiffe://cluster.local/ns/default/sa/web"), ttl).unwrap(),
        );
        wait_for("a renewal", Duration::from_secs(5), || {
            store.get(WORKLOAD).filter(|c| c.serial() != first.serial())
        })
        .await;
        // A removed workload is not resurrected by the driver.
        assert!(store.remove(WORKLOAD));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(store.get(WORKLOAD).is_none());
        driver.abort();
    }

    /// Counts its requests, per identity.
    struct CountingIssuer {
        ca: Arc<CaSigner>,
        asked: std::sync::Mutex<Vec<String>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl CertIssuer for CountingIssuer {
        fn issue<'a>(&'a self, id: &'a SpiffeId, ttl: Duration) -> IssueFuture<'a> {
            self.asked.lock().unwrap().push(id.to_string());
            let fail = self.fail.load(Ordering::SeqCst);
            Box::pin(async move {
                // As over a network: the answer comes later.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if fail {
                    return Err(IdentityError::Issue {
                        id: id.to_string(),
                        reason: "connecting to the CA: refused (test)".into(),
                    });
                }
                self.ca.issue(id, ttl)
            })
        }

        fn describe(&self) -> &str {
            "counting test CA"
        }
    }

    fn counting(ca: CaSigner, fail: bool) -> Arc<CountingIssuer> {
        Arc::new(CountingIssuer {
            ca: Arc::new(ca),
            asked: Default::default(),
            fail: std::sync::atomic::AtomicBool::new(fail),
        })
    }

    #[tokio::test]
    async fn pods_of_one_identity_share_one_request_and_one_certificate() {
        let (_tmp, ca) = new_ca("cluster.local");
        let issuer = counting(ca, false);
        let store = Arc::new(CertStore::new());
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        assert!(
            store.want("web-1.default", &web).is_none(),
            "no certificate before the CA answers"
        );
        assert!(store.want("web-2.default", &web).is_none());
        let driver = tokio::spawn(run_renewals_with(
            Arc::clone(&store),
            issuer.clone(),
            Duration::from_secs(3600),
            FAST,
        ));
        let first = store.wait("web-1.default", Duration::from_secs(5)).await.expect("issued");
        let second = store.get("web-2.default").expect("the same identity's certificate");
        assert!(Arc::ptr_eq(&first, &second));
        assert!(first.issued_by().starts_with("node-local CA in "), "{}", first.issued_by());
        assert_eq!(
            *issuer.asked.lock().unwrap(),
            vec![web.to_string()],
            "one request per identity"
        );
        assert!(store.pending().is_empty());

        // The identity's key goes with its last workload.
        let weak = Arc::downgrade(&first);
        drop((first, second));
        assert!(store.remove("web-1.default"));
        assert!(store.get("web-2.default").is_some());
        assert!(store.remove("web-2.default"));
        assert!(weak.upgrade().is_none(), "key material still referenced");
        driver.abort();
    }

    #[tokio::test]
    async fn a_first_certificate_the_ca_refuses_is_pending_and_comes_when_it_answers() {
        let (_tmp, ca) = new_ca("cluster.local");
        let issuer = counting(ca, true);
        let store = Arc::new(CertStore::new());
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        store.want(WORKLOAD, &web);
        let driver = tokio::spawn(run_renewals_with(
            Arc::clone(&store),
            issuer.clone(),
            Duration::from_secs(3600),
            FAST,
        ));
        // A connection waiting for it gives up after its limit: closed, not plaintext.
        assert!(store.wait(WORKLOAD, Duration::from_millis(300)).await.is_none());
        let pending = wait_for("two failures", Duration::from_secs(5), || {
            store.pending().into_iter().find(|p| p.failures >= 2)
        })
        .await;
        assert_eq!(pending.identity, web);
        assert!(pending.last_error.as_deref().unwrap_or_default().contains("refused (test)"));
        let health = store.health();
        assert!(health.failing.is_some() && health.requests_failed >= 2, "{health:?}");
        assert!(describe_pending(&store.pending()).contains(WORKLOAD));

        issuer.fail.store(false, Ordering::SeqCst);
        let cert =
            store.wait(WORKLOAD, Duration::from_secs(5)).await.expect("issued once the CA answers");
        assert_eq!(cert.spiffe_id(), &web);
        assert!(store.pending().is_empty());
        let health = store.health();
        assert!(health.failing.is_none() && health.requests_ok == 1, "{health:?}");
        driver.abort();
    }

    #[tokio::test]
    async fn a_pod_that_changes_identity_gets_the_new_one_and_drops_the_old() {
        let (_tmp, ca) = new_ca("cluster.local");
        let issuer = counting(ca, false);
        let store = Arc::new(CertStore::new());
        let driver = tokio::spawn(run_renewals_with(
            Arc::clone(&store),
            issuer.clone(),
            Duration::from_secs(3600),
            FAST,
        ));
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        let api = id("spiffe://cluster.local/ns/default/sa/api");
        store.want(WORKLOAD, &web);
        let old = store.wait(WORKLOAD, Duration::from_secs(5)).await.unwrap();
        assert!(
            store.want(WORKLOAD, &api).is_none(),
            "the old identity's certificate is not the new one's"
        );
        assert!(store.get(WORKLOAD).is_none(), "no certificate of another identity meanwhile");
        let new = store.wait(WORKLOAD, Duration::from_secs(5)).await.unwrap();
        assert_eq!(new.spiffe_id(), &api);
        assert_eq!(old.spiffe_id(), &web);
        assert_eq!(store.len(), 1);
        driver.abort();
    }
}
