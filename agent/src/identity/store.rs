//! The node's workload certificates and their renewal.
//!
//! Readers (the tunnel, building TLS configs) take a read lock only long enough to clone an
//! `Arc`; certificates are issued outside the lock and swapped in with a short write lock, so
//! nobody ever waits for a signature.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::ca::CertIssuer;
use super::cert::{fmt_time, WorkloadCert};
use super::spiffe::SpiffeId;

/// Longest the renewal driver sleeps before looking again; bounds the damage of a wall-clock
/// jump (renewal times are wall-clock, tokio sleeps are monotonic).
const MAX_SLEEP: Duration = Duration::from_secs(60);

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
}

struct Entry {
    cert: Arc<WorkloadCert>,
    /// Set after a failed renewal: when to try again.
    retry_at: Option<SystemTime>,
    failures: u32,
    last_error: Option<String>,
}

impl Entry {
    fn new(cert: Arc<WorkloadCert>) -> Self {
        Self { cert, retry_at: None, failures: 0, last_error: None }
    }

    fn next_attempt(&self) -> SystemTime {
        self.retry_at.unwrap_or_else(|| self.cert.renew_at())
    }
}

/// The current certificate of every workload on this node, keyed by `name.namespace`.
#[derive(Default)]
pub struct CertStore {
    entries: RwLock<HashMap<String, Entry>>,
    /// Wakes the renewal driver when the set of certificates changes.
    changed: Notify,
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

    // A panic while holding the lock cannot leave the map half-updated (every update is a
    // single insert or remove), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the certificate of `workload`, replacing any previous one; returns the shared
    /// certificate now in the store.
    pub fn insert(
        &self,
        workload: impl Into<String>,
        cert: impl Into<Arc<WorkloadCert>>,
    ) -> Arc<WorkloadCert> {
        let cert = cert.into();
        self.write().insert(workload.into(), Entry::new(Arc::clone(&cert)));
        self.changed.notify_one();
        cert
    }

    /// Forgets `workload`. Its key material is freed as soon as the last connection using
    /// it lets go of its `Arc`. Returns whether there was an entry.
    pub fn remove(&self, workload: &str) -> bool {
        let removed = self.write().remove(workload).is_some();
        if removed {
            self.changed.notify_one();
        }
        removed
    }

    /// The current certificate of `workload`.
    pub fn get(&self, workload: &str) -> Option<Arc<WorkloadCert>> {
        self.read().get(workload).map(|e| Arc::clone(&e.cert))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Every certificate, sorted by workload, for the admin API.
    pub fn list(&self) -> Vec<CertInfo> {
        let mut infos: Vec<CertInfo> = self
            .read()
            .iter()
            .map(|(workload, entry)| CertInfo {
                workload: workload.clone(),
                identity: entry.cert.spiffe_id().clone(),
                serial: entry.cert.serial().to_string(),
                not_before: entry.cert.not_before(),
                not_after: entry.cert.not_after(),
                next_renewal: entry.next_attempt(),
                renewal_failures: entry.failures,
                last_error: entry.last_error.clone(),
            })
            .collect();
        infos.sort_by(|a, b| a.workload.cmp(&b.workload));
        infos
    }

    /// The entries due at `now`, and the earliest future attempt among the others.
    fn due(&self, now: SystemTime) -> (Vec<(String, Arc<WorkloadCert>)>, Option<SystemTime>) {
        let entries = self.read();
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for (workload, entry) in entries.iter() {
            let at = entry.next_attempt();
            if at <= now {
                due.push((workload.clone(), Arc::clone(&entry.cert)));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    /// Swaps in `new` if `workload` still holds `old` (it may have been removed or replaced
    /// while we were signing). Returns the new certificate if it was swapped in.
    fn complete_renewal(
        &self,
        workload: &str,
        old: &Arc<WorkloadCert>,
        new: WorkloadCert,
        earliest_next: SystemTime,
    ) -> Option<Arc<WorkloadCert>> {
        let mut entries = self.write();
        let entry = entries.get_mut(workload)?;
        if !Arc::ptr_eq(&entry.cert, old) {
            return None;
        }
        let new = Arc::new(new);
        *entry = Entry::new(Arc::clone(&new));
        // A certificate that is due at once (tiny lifetime, CA about to expire) must not
        // make the driver spin re-issuing it.
        if new.renew_at() < earliest_next {
            entry.retry_at = Some(earliest_next);
        }
        Some(new)
    }

    /// Records a failed renewal (the old certificate stays) and schedules the retry.
    fn record_failure(
        &self,
        workload: &str,
        old: &Arc<WorkloadCert>,
        error: String,
        backoff: &Backoff,
        now: SystemTime,
    ) -> Option<(u32, Duration)> {
        let mut entries = self.write();
        let entry = entries.get_mut(workload)?;
        if !Arc::ptr_eq(&entry.cert, old) {
            return None;
        }
        entry.failures = entry.failures.saturating_add(1);
        let delay = backoff.delay(entry.failures);
        entry.retry_at = Some(now + delay);
        entry.last_error = Some(error);
        Some((entry.failures, delay))
    }
}

/// Retry delays after failed renewals: doubling from `initial`, capped at `max`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), max: Duration::from_secs(300) }
    }
}

impl Backoff {
    fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << exponent).min(self.max)
    }
}

/// Renews the store's certificates forever: sleeps until the earliest renewal time, re-issues
/// through `signer` with lifetime `ttl`, and swaps the new certificate in. A failure keeps the
/// old certificate and retries with exponential backoff (1 s up to 5 min). Spawn it as a task
/// and abort the task to stop it.
pub async fn run_renewals(store: Arc<CertStore>, signer: Arc<dyn CertIssuer>, ttl: Duration) {
    run_renewals_with(store, signer, ttl, Backoff::default()).await
}

pub(crate) async fn run_renewals_with(
    store: Arc<CertStore>,
    signer: Arc<dyn CertIssuer>,
    ttl: Duration,
    backoff: Backoff,
) {
    loop {
        let now = SystemTime::now();
        let (due, next) = store.due(now);
        for (workload, old) in &due {
            renew_one(&store, signer.as_ref(), ttl, &backoff, workload, old, now);
        }
        if !due.is_empty() {
            // Renewed or rescheduled: look again for the new earliest time.
            continue;
        }
        let sleep_for = next
            .map(|at| at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(sleep_for) => {}
            // notify_one stores a permit, so an insert made while we were scanning still
            // wakes us here.
            _ = store.changed.notified() => {}
        }
    }
}

fn renew_one(
    store: &CertStore,
    signer: &dyn CertIssuer,
    ttl: Duration,
    backoff: &Backoff,
    workload: &str,
    old: &Arc<WorkloadCert>,
    now: SystemTime,
) {
    let identity = old.spiffe_id();
    match signer.issue(identity, ttl) {
        Ok(new) => {
            if let Some(new) = store.complete_renewal(workload, old, new, now + backoff.initial) {
                tracing::info!(
                    workload,
                    identity = %identity,
                    old_serial = old.serial(),
                    serial = new.serial(),
                    not_after = %fmt_time(new.not_after()),
                    renew_at = %fmt_time(new.renew_at()),
                    "renewed workload certificate"
                );
            }
        }
        Err(e) => {
            let error = e.to_string();
            let Some((failures, retry_in)) =
                store.record_failure(workload, old, error.clone(), backoff, now)
            else {
                return;
            };
            if old.is_expired_at(now) {
                tracing::error!(
                    workload,
                    identity = %identity,
                    serial = old.serial(),
                    expired_at = %fmt_time(old.not_after()),
                    failures,
                    retry_in_ms = retry_in.as_millis() as u64,
                    error = %error,
                    "certificate renewal failed and the current certificate has expired"
                );
            } else {
                tracing::warn!(
                    workload,
                    identity = %identity,
                    serial = old.serial(),
                    not_after = %fmt_time(old.not_after()),
                    failures,
                    retry_in_ms = retry_in.as_millis() as u64,
                    error = %error,
                    "certificate renewal failed; keeping the current certificate"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::super::testutil::{id, new_ca};
    use super::super::{CaSigner, IdentityError};
    use super::*;

    const WORKLOAD: &str = "web.default";

    /// Fails its first `fail_first` calls, then issues through the real CA.
    struct FlakyIssuer {
        ca: Arc<CaSigner>,
        fail_first: u32,
        attempts: AtomicU32,
    }

    impl CertIssuer for FlakyIssuer {
        fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if attempt <= self.fail_first {
                return Err(IdentityError::Issue {
                    id: id.to_string(),
                    reason: "CA unavailable (test)".into(),
                });
            }
            self.ca.issue(id, ttl)
        }
    }

    const FAST: Backoff =
        Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(400) };

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
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(5) };
        let delays: Vec<u64> = (1..=5).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
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
}
