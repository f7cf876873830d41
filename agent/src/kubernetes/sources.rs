//! Where the mTLS policies come from, and whether each source answers.
//!
//! The Istio policy kinds are custom resources: a cluster serves some of them, or none. API
//! discovery (`/apis`, `/apis/<group>/<version>`) says which, at start and again every
//! `interval` and after a watch error, so a CRD installed or removed later is noticed. A kind
//! that is not served is legitimately empty and is not watched. A kind that is served but
//! cannot be read (403: RBAC) or fails (5xx, unreachable) is an error, never "no policies": its
//! last complete list stays in force, the failure is logged once per change, counted, and shown
//! by `check`, `/config_dump` and readiness, and the kind is listed again until it answers.
//! Before its first complete list the agent has no snapshot, so it enrolls nothing and is
//! not ready: a broken RBAC stops a rollout instead of opening the mesh.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use kube::{
    core::{ApiResource, DynamicObject},
    discovery::Discovery,
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use serde::Serialize;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tracing::{error, info};

use super::watch::{Cache, Objects, Slot};

/// How often discovery runs again by default: a CRD installed later is watched within it.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(60);
/// Pause before a failing kind is listed again (doubling up to the maximum).
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Discovery after a watch error waits this long at least: errors of several kinds at once
/// make one discovery, not one each.
const REDISCOVER_AFTER_ERROR: Duration = Duration::from_secs(1);

/// What is known of one policy kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Discovery has not answered yet.
    Discovering,
    /// The cluster does not serve it (no CRD): it holds no policies.
    NotServed,
    /// Served; its first list is under way.
    Listing,
    /// Served and read.
    Ok,
    /// Served but failing (403, 5xx, unreachable): its last complete list, if any, is in force.
    Failing,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Discovering => "discovering",
            SourceState::NotServed => "not_served",
            SourceState::Listing => "listing",
            SourceState::Ok => "ok",
            SourceState::Failing => "failing",
        }
    }
}

/// One policy kind as `/config_dump` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    /// `plural.group/version`, e.g. `peerauthentications.security.istio.io/v1`.
    pub kind: String,
    pub state: SourceState,
    /// Whether a complete list of it is in force (while failing: the last one).
    pub listed: bool,
    /// The error class (`forbidden`, `not_found`, `server_error`, `unreachable`, ...).
    pub reason: Option<String>,
    pub error: Option<String>,
    /// Since when it is in this state (RFC 3339).
    pub since: String,
}

struct Entry {
    state: SourceState,
    listed: bool,
    reason: Option<&'static str>,
    error: Option<String>,
    since: SystemTime,
}

#[derive(Default)]
struct Inner {
    kinds: BTreeMap<String, Entry>,
    /// Why the last discovery failed, while it fails.
    discovery_error: Option<String>,
    /// Failed lists and watches per (kind, reason), since the agent started.
    errors: BTreeMap<(String, &'static str), u64>,
}

/// The policy sources' states, shared by the watchers, the agent and the admin API. Empty in
/// file mode.
#[derive(Clone, Default)]
pub struct Sources(Arc<Mutex<Inner>>);

impl Sources {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, kind: &str) {
        let entry = Entry {
            state: SourceState::Discovering,
            listed: false,
            reason: None,
            error: None,
            since: SystemTime::now(),
        };
        self.lock().kinds.insert(kind.to_owned(), entry);
    }

    /// Moves `kind` to `state`; true if the state or the error class changed (news to log).
    fn set(&self, kind: &str, state: SourceState, failure: Option<(&'static str, String)>) -> bool {
        let mut inner = self.lock();
        let (reason, error) = match failure {
            Some((r, e)) => (Some(r), Some(e)),
            None => (None, None),
        };
        if let Some(r) = reason {
            *inner.errors.entry((kind.to_owned(), r)).or_default() += 1;
        }
        let Some(e) = inner.kinds.get_mut(kind) else { return false };
        let news = e.state != state || e.reason != reason;
        if news {
            e.since = SystemTime::now();
        }
        e.state = state;
        e.reason = reason;
        e.error = error;
        if state == SourceState::NotServed {
            e.listed = false;
        }
        news
    }

    fn listed(&self, kind: &str) {
        if let Some(e) = self.lock().kinds.get_mut(kind) {
            e.listed = true;
        }
    }

    /// Records a discovery result; true if it is news (it began or stopped failing).
    fn discovery(&self, error: Option<String>) -> bool {
        let mut inner = self.lock();
        let news = inner.discovery_error.is_some() != error.is_some();
        inner.discovery_error = error;
        news
    }

    /// Every kind, for `/config_dump`.
    pub fn list(&self) -> Vec<SourceView> {
        let t = |s: SystemTime| humantime::format_rfc3339_seconds(s).to_string();
        self.lock()
            .kinds
            .iter()
            .map(|(kind, e)| SourceView {
                kind: kind.clone(),
                state: e.state,
                listed: e.listed,
                reason: e.reason.map(str::to_owned),
                error: e.error.clone(),
                since: t(e.since),
            })
            .collect()
    }

    /// What fails now, one line each: discovery, and every served kind that cannot be read
    /// (with whether its last list is still in force). Empty when all is well.
    pub fn failing(&self) -> Vec<String> {
        let inner = self.lock();
        let mut out = Vec::new();
        if let Some(e) = &inner.discovery_error {
            out.push(format!("API discovery of the policy kinds fails: {e}"));
        }
        for (kind, e) in &inner.kinds {
            if e.state == SourceState::Failing {
                let kept = if e.listed {
                    "its last known policies stay in force"
                } else {
                    "none known yet"
                };
                out.push(format!(
                    "policy source {kind} fails ({}: {}); {kept}",
                    e.reason.unwrap_or("error"),
                    e.error.as_deref().unwrap_or_default()
                ));
            }
        }
        out
    }

    /// Why there is no first snapshot yet, as far as the policy sources are concerned.
    pub fn waiting_for(&self) -> Option<String> {
        let inner = self.lock();
        let mut out = Vec::new();
        if let Some(e) = &inner.discovery_error {
            out.push(format!("API discovery of the policy kinds fails: {e}"));
        }
        for (kind, e) in inner.kinds.iter().filter(|(_, e)| !e.listed) {
            match e.state {
                SourceState::Failing => out.push(format!(
                    "policy source {kind} fails ({}: {}), so no pod is enrolled",
                    e.reason.unwrap_or("error"),
                    e.error.as_deref().unwrap_or_default()
                )),
                SourceState::Listing => out.push(format!("listing policy source {kind}")),
                SourceState::Discovering if inner.discovery_error.is_none() => {
                    out.push(format!("discovering whether {kind} is served"))
                }
                _ => {}
            }
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    /// Failed lists and watches per (kind, reason).
    pub fn error_counts(&self) -> Vec<(String, &'static str, u64)> {
        self.lock().errors.iter().map(|((k, r), n)| (k.clone(), *r, *n)).collect()
    }

    /// (kind, state) of every kind.
    pub fn states(&self) -> Vec<(String, SourceState)> {
        self.lock().kinds.iter().map(|(k, e)| (k.clone(), e.state)).collect()
    }
}

/// The name a kind goes by in logs, metrics and the admin API.
pub fn kind_id(ar: &ApiResource) -> String {
    format!("{}.{}/{}", ar.plural, ar.group, ar.version)
}

/// The class of an API error: the `reason` label, kept to a small set.
fn reason_of(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(r) => match r.code {
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            429 => "throttled",
            500..=599 => "server_error",
            _ => "api_error",
        },
        kube::Error::SerdeError(_) => "bad_response",
        _ => "unreachable",
    }
}

fn watch_failure(e: &watcher::Error) -> Option<(&'static str, String)> {
    match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => Some((reason_of(k), k.to_string())),
        // An expired version: the watcher lists again by itself; not a failure of the source.
        watcher::Error::WatchError(r) if r.code == 410 => None,
        watcher::Error::WatchError(r) => {
            Some((reason_of(&kube::Error::Api(r.clone())), format!("{}: {}", r.code, r.message)))
        }
        watcher::Error::NoResourceVersion => Some(("bad_response", e.to_string())),
    }
}

/// The policy kinds' caches and the task that keeps them: discovery plus one watcher per
/// served kind. Each slot is `None` until the kind is known to be not served (then empty) or
/// has been listed completely.
pub(super) struct Started {
    pub slots: Vec<(ApiResource, Slot<DynamicObject>)>,
    pub task: JoinHandle<()>,
    pub sources: Sources,
}

pub(super) fn start(
    client: Client,
    kinds: Vec<ApiResource>,
    interval: Duration,
    notify: &Arc<Notify>,
) -> Started {
    let sources = Sources::default();
    let mut slots = Vec::new();
    let mut senders = Vec::new();
    for ar in kinds {
        sources.register(&kind_id(&ar));
        let (tx, rx) = watch::channel(None);
        slots.push((ar.clone(), rx));
        senders.push((ar, tx));
    }
    let task = tokio::spawn(supervise(client, senders, sources.clone(), interval, notify.clone()));
    Started { slots, task, sources }
}

/// The watchers of the served kinds, stopped when dropped (with the supervising task).
struct Watchers(Vec<Option<JoinHandle<()>>>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in self.0.iter().flatten() {
            t.abort();
        }
    }
}

type Sender = watch::Sender<Option<Objects<DynamicObject>>>;

async fn supervise(
    client: Client,
    kinds: Vec<(ApiResource, Sender)>,
    sources: Sources,
    interval: Duration,
    notify: Arc<Notify>,
) {
    let rediscover = Arc::new(Notify::new());
    let mut watchers = Watchers(kinds.iter().map(|_| None).collect());
    let groups: BTreeSet<&str> = kinds.iter().map(|(ar, _)| ar.group.as_str()).collect();
    let groups: Vec<&str> = groups.into_iter().collect();
    loop {
        match served(&client, &groups).await {
            Ok(served) => {
                if sources.discovery(None) {
                    info!("API discovery of the policy kinds answers again");
                }
                for (i, (ar, tx)) in kinds.iter().enumerate() {
                    let id = kind_id(ar);
                    let key = (ar.group.clone(), ar.version.clone(), ar.plural.clone());
                    if served.contains(&key) {
                        if watchers.0[i].is_none() {
                            info!(resource = %id, "served: watching it");
                            sources.set(&id, SourceState::Listing, None);
                            let api = Api::<DynamicObject>::all_with(client.clone(), ar);
                            watchers.0[i] = Some(tokio::spawn(watch_kind(
                                api,
                                id,
                                tx.clone(),
                                sources.clone(),
                                notify.clone(),
                                rediscover.clone(),
                            )));
                        }
                        continue;
                    }
                    let was_watched = watchers.0[i].take().map(|t| t.abort()).is_some();
                    if sources.set(&id, SourceState::NotServed, None) {
                        if was_watched {
                            info!(resource = %id, "no longer served (CRD removed): it holds no policies");
                        } else {
                            info!(resource = %id, "not served (no CRD): it holds no policies");
                        }
                    }
                    if tx.borrow().as_ref().is_none_or(|o| !o.is_empty()) {
                        tx.send_replace(Some(Arc::default()));
                        notify.notify_one();
                    }
                }
            }
            // What was discovered before stays: its watchers keep running.
            Err(e) => {
                if sources.discovery(Some(e.to_string())) {
                    error!("API discovery of the policy kinds fails: {e}; keeping what is known, retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = rediscover.notified() => tokio::time::sleep(REDISCOVER_AFTER_ERROR).await,
        }
    }
}

/// The served (group, version, plural) of `groups`.
async fn served(
    client: &Client,
    groups: &[&str],
) -> Result<BTreeSet<(String, String, String)>, kube::Error> {
    let d = Discovery::new(client.clone()).filter(groups).run().await?;
    let mut out = BTreeSet::new();
    for g in d.groups() {
        for v in g.versions() {
            for (ar, _) in g.versioned_resources(v) {
                out.insert((ar.group, ar.version, ar.plural));
            }
        }
    }
    Ok(out)
}

/// Watches one served kind. An error of the source ends the watch: after a pause a fresh list
/// starts, and only a complete list says the source answers again (a watch that starts says
/// nothing about whether the kind can be listed). The cache, and so the last complete list,
/// survives.
async fn watch_kind(
    api: Api<DynamicObject>,
    id: String,
    tx: Sender,
    sources: Sources,
    notify: Arc<Notify>,
    rediscover: Arc<Notify>,
) {
    let mut cache = Cache::new();
    let mut pause = RETRY_MIN;
    loop {
        let events = watcher(api.clone(), watcher::Config::default())
            .modify(|o: &mut DynamicObject| o.meta_mut().managed_fields = None);
        let mut events = std::pin::pin!(events);
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => {
                    let complete = matches!(event, watcher::Event::InitDone);
                    if cache.apply(event) {
                        tx.send_replace(Some(Arc::new(cache.live.clone())));
                        notify.notify_one();
                    }
                    if complete {
                        sources.listed(&id);
                        pause = RETRY_MIN;
                        if sources.set(&id, SourceState::Ok, None) {
                            info!(resource = %id, policies = cache.live.len(), "policy source read");
                        }
                    }
                }
                Err(e) => {
                    let Some(failure) = watch_failure(&e) else { continue };
                    let (reason, text) = failure.clone();
                    if sources.set(&id, SourceState::Failing, Some(failure)) {
                        error!(
                            resource = %id,
                            reason,
                            "policy source fails: {text}; its last known policies stay in force (none before its first list: nothing is enrolled); retrying"
                        );
                    }
                    rediscover.notify_one();
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(kube::core::ErrorResponse {
            status: "Failure".into(),
            message: format!("code {code}"),
            reason: String::new(),
            code,
        })
    }

    #[test]
    fn a_forbidden_or_missing_served_kind_is_a_failure_and_an_expired_version_is_not() {
        let f = watch_failure(&watcher::Error::InitialListFailed(api_error(403)));
        assert_eq!(f.map(|f| f.0), Some("forbidden"));
        let f = watch_failure(&watcher::Error::WatchStartFailed(api_error(404)));
        assert_eq!(f.map(|f| f.0), Some("not_found"));
        let f = watch_failure(&watcher::Error::InitialListFailed(api_error(503)));
        assert_eq!(f.map(|f| f.0), Some("server_error"));
        let gone = kube::core::ErrorResponse {
            status: "Failure".into(),
            message: "too old".into(),
            reason: "Expired".into(),
            code: 410,
        };
        assert_eq!(watch_failure(&watcher::Error::WatchError(gone)), None);
    }

    #[test]
    fn a_failure_is_news_once_and_readiness_names_the_kind_until_it_is_listed() {
        let s = Sources::default();
        let kind = "peerauthentications.security.istio.io/v1";
        s.register(kind);
        s.register("policies.authentication.istio.io/v1alpha1");
        assert!(s.set("policies.authentication.istio.io/v1alpha1", SourceState::NotServed, None));
        assert!(s.set(kind, SourceState::Listing, None));
        let forbidden = || Some(("forbidden", "403 Forbidden: cannot list".to_owned()));
        assert!(s.set(kind, SourceState::Failing, forbidden()));
        assert!(
            !s.set(kind, SourceState::Failing, forbidden()),
            "the same failure again is not news"
        );
        let w = s.waiting_for().expect("waiting");
        assert!(w.contains(kind) && w.contains("forbidden"), "{w}");
        assert!(!w.contains("policies.authentication"), "a kind not served holds nothing up: {w}");
        assert_eq!(s.error_counts(), [(kind.to_owned(), "forbidden", 2)]);
        // Listed: nothing holds the first sync back any more.
        s.listed(kind);
        assert!(s.set(kind, SourceState::Ok, None));
        assert_eq!(s.waiting_for(), None);
        assert!(s.failing().is_empty());
        // Failing after a good list: named, with its last list in force.
        s.set(kind, SourceState::Failing, forbidden());
        let f = s.failing();
        assert!(f.len() == 1 && f[0].contains("stay in force"), "{f:?}");
        assert_eq!(s.waiting_for(), None);
    }

    #[test]
    fn a_failing_discovery_is_named_until_it_answers() {
        let s = Sources::default();
        s.register("peerauthentications.security.istio.io/v1");
        assert!(s.discovery(Some("connection refused".into())));
        assert!(!s.discovery(Some("connection refused".into())));
        assert!(s.waiting_for().is_some_and(|w| w.contains("discovery")));
        assert!(s.discovery(None));
        assert!(s.failing().is_empty());
    }
}
