//! Kubernetes mode of the certificate service: who is calling, by a TokenReview of the bearer
//! token (audience `istio-ca`, as istiod asks), and which identities run on which node, from
//! a watch of the cluster's pods.
//!
//! A caller whose ServiceAccount is one of the trusted node agents' (`--trusted-node-accounts`)
//! stands for the node of the pod its token is bound to: the token must carry the pod's name
//! and uid (a projected token does), and that pod must exist with that uid (a token of a
//! deleted pod, or of a pod recreated under its name, stands for no node). Any other caller
//! is a workload and may have its own identity only.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use tracing::{error, info, warn};

use super::authority::{Caller, Refusal};
use crate::identity::SpiffeId;

/// The extra fields of a TokenReview's user that bind a token to a pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// How long a TokenReview's answer is reused: a node asks for a few certificates at once.
const REVIEW_TTL: Duration = Duration::from_secs(30);
/// Answers kept at most; past it the cache starts again (bounded memory under a token flood).
const MAX_REVIEWS: usize = 4096;
/// How long the API server may take to review a token.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Reviews in flight at once: a flood of made-up tokens (each one a review, as no cache
/// holds it) must not become a flood of the API server.
const MAX_REVIEWS_IN_FLIGHT: usize = 32;

#[derive(Debug, Clone)]
struct Reviewed {
    namespace: String,
    service_account: String,
    /// (name, uid) of the pod the token is bound to.
    pod: Option<(String, String)>,
}

struct PodInfo {
    uid: String,
    node: String,
    service_account: String,
}

/// The cluster's pods, as the service needs them.
#[derive(Default)]
struct Pods {
    synced: bool,
    by_name: HashMap<(String, String), PodInfo>,
    /// (node, namespace, service account) of scheduled pods, counted.
    placed: HashMap<(String, String, String), usize>,
}

impl Pods {
    fn remove(&mut self, key: &(String, String)) {
        if let Some(old) = self.by_name.remove(key) {
            let placed = (old.node, key.0.clone(), old.service_account);
            if let Some(n) = self.placed.get_mut(&placed) {
                *n -= 1;
                if *n == 0 {
                    self.placed.remove(&placed);
                }
            }
        }
    }

    fn apply(&mut self, pod: &Pod) {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else { return };
        let key = (ns.clone(), name.clone());
        self.remove(&key);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        // A pod that has ended runs nothing a certificate is for.
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return;
        }
        let spec = pod.spec.as_ref();
        let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        // A kubelet may create mirror (static) pods in any namespace, and only with no service
        // account: a compromised node must not place a namespace's `default` account on
        // itself that way. Such pods (and any naming no account) grant nothing.
        let mirror = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        let Some(service_account) =
            spec.and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty() && !mirror)
        else {
            return;
        };
        if !node.is_empty() {
            *self.placed.entry((node.clone(), ns.clone(), service_account.clone())).or_default() +=
                1;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.by_name.insert(key, PodInfo { uid, node, service_account });
    }
}

type Answer = (Instant, Result<Reviewed, Refusal>);

pub struct Cluster {
    client: kube::Client,
    audience: String,
    trusted: HashSet<(String, String)>,
    pods: Arc<RwLock<Pods>>,
    /// Review answers by the token's digest, with when they came.
    reviews: Mutex<HashMap<[u8; 32], Answer>>,
    in_flight: tokio::sync::Semaphore,
}

/// Parses `namespace/name` entries of `--trusted-node-accounts`.
pub fn parse_accounts(list: &[String]) -> Result<HashSet<(String, String)>, String> {
    list.iter()
        .map(|a| match a.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok((ns.to_owned(), sa.to_owned()))
            }
            _ => Err(format!("--trusted-node-accounts: {a:?} is not NAMESPACE/SERVICEACCOUNT")),
        })
        .collect()
}

impl Cluster {
    /// Starts the pod watch; requests are refused (`UNAVAILABLE`) until its first list is in.
    pub fn start(
        client: kube::Client,
        audience: String,
        trusted: HashSet<(String, String)>,
    ) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster {
            client: client.clone(),
            audience,
            trusted,
            pods: Default::default(),
            reviews: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        });
        tokio::spawn(watch_pods(Api::all(client), cluster.pods.clone()));
        cluster
    }

    /// Who holds `token`.
    pub async fn caller(&self, token: &str) -> Result<Caller, Refusal> {
        let reviewed = self.review(token).await?;
        let account = (reviewed.namespace.clone(), reviewed.service_account.clone());
        if !self.trusted.contains(&account) {
            return Ok(Caller::Workload {
                namespace: reviewed.namespace,
                service_account: reviewed.service_account,
            });
        }
        let Some((name, uid)) = reviewed.pod else {
            return Err(Refusal::PermissionDenied(format!(
                "the node agent account {}/{}'s token is bound to no pod: use a projected token",
                account.0, account.1
            )));
        };
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        if !pods.synced {
            return Err(Refusal::Unavailable(
                "the certificate service has not listed pods yet".into(),
            ));
        }
        match pods.by_name.get(&(account.0.clone(), name.clone())) {
            Some(p) if p.uid == uid && !p.node.is_empty() => Ok(Caller::Node(p.node.clone())),
            Some(p) if p.uid == uid => Err(Refusal::PermissionDenied(format!(
                "the token's pod {}/{name} is not scheduled to a node",
                account.0
            ))),
            _ => Err(Refusal::PermissionDenied(format!(
                "the token's pod {}/{name} (uid {uid}) does not exist: it was deleted or recreated",
                account.0
            ))),
        }
    }

    /// Ready once the pods are listed.
    pub fn ready(&self) -> Result<(), String> {
        match self.pods.read().unwrap_or_else(|e| e.into_inner()).synced {
            true => Ok(()),
            false => Err("the pods of the cluster are not listed yet".into()),
        }
    }

    /// Whether a pod of `id`'s namespace and service account is scheduled to `node`.
    pub fn runs_on(&self, node: &str, id: &SpiffeId) -> Result<bool, Refusal> {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        if !pods.synced {
            return Err(Refusal::Unavailable(
                "the certificate service has not listed pods yet".into(),
            ));
        }
        let key = (node.to_owned(), id.namespace().to_owned(), id.service_account().to_owned());
        Ok(pods.placed.contains_key(&key))
    }

    async fn review(&self, token: &str) -> Result<Reviewed, Refusal> {
        let digest = super::authority::digest(token);
        {
            let cache = self.reviews.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, answer)) = cache.get(&digest) {
                if at.elapsed() < REVIEW_TTL {
                    return answer.clone();
                }
            }
        }
        // A ServiceAccount token is a JWT: anything else costs the API server nothing.
        if !looks_like_jwt(token) {
            return Err(Refusal::Unauthenticated(
                "the bearer token is not a Kubernetes service account token (a JWT)".into(),
            ));
        }
        let answer = self.ask(token).await;
        // Only what the API server accepted is remembered: made-up tokens, however many,
        // never push an agent's answer out of the cache.
        if answer.is_ok() {
            let mut cache = self.reviews.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_REVIEWS {
                cache.clear();
            }
            cache.insert(digest, (Instant::now(), answer.clone()));
        }
        answer
    }

    async fn ask(&self, token: &str) -> Result<Reviewed, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let _slot = tokio::time::timeout(REVIEW_TIMEOUT, self.in_flight.acquire())
            .await
            .map_err(|_| Refusal::Unavailable("too many tokens under review: try again".into()))?
            .map_err(|_| Refusal::Unavailable("the service is stopping".into()))?;
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    Refusal::Unavailable("the API server did not review the token in time".into())
                })?
                .map_err(|e| {
                    error!("TokenReview: {e}");
                    Refusal::Unavailable(
                "the API server could not review the token (see the certificate service's log)"
                    .into(),
            )
                })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::Unauthenticated(format!(
                "the token is not valid for audience {}: {why}",
                self.audience
            )));
        }
        // An API server that reports audiences must have matched ours.
        if let Some(auds) = &status.audiences {
            if !auds.contains(&self.audience) {
                return Err(Refusal::Unauthenticated(format!(
                    "the token is not for audience {}",
                    self.audience
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(account) = username.strip_prefix("system:serviceaccount:") else {
            return Err(Refusal::Unauthenticated(format!(
                "the token is {username:?}'s, not a service account's"
            )));
        };
        let Some((namespace, service_account)) = account.split_once(':') else {
            return Err(Refusal::Unauthenticated(format!("malformed user name {username:?}")));
        };
        let extra = user.extra.unwrap_or_default();
        let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod = one(POD_NAME).zip(one(POD_UID));
        Ok(Reviewed {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod,
        })
    }
}

/// Three non-empty base64url parts, at most 16 KiB: the shape of every ServiceAccount token.
fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    token.len() <= 16 * 1024
        && parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Keeps the ConfigMap `namespace/name` holding the CA directory's trust bundle
/// (`root-cert.pem`, as Istio's `istio-ca-root-cert`), forever: written at start and again
/// whenever the file changes (a root rotation: the secret mounted with the new bundle), so
/// the agents, which mount the ConfigMap and never the secret, trust the new roots.
pub async fn publish_roots(
    client: kube::Client,
    bundle: std::path::PathBuf,
    namespace: String,
    name: String,
) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    loop {
        // Compared with what the ConfigMap holds, not with what was last written: a deleted
        // or edited ConfigMap is put back.
        let there = match tokio::time::timeout(REVIEW_TIMEOUT, api.get_opt(&name)).await {
            Ok(Ok(cm)) => cm.and_then(|c| c.data).and_then(|d| d.get("root-cert.pem").cloned()),
            _ => None,
        };
        match std::fs::read_to_string(&bundle) {
            Ok(pem) if there.as_deref() != Some(pem.as_str()) => {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    data: Some([("root-cert.pem".to_owned(), pem.clone())].into_iter().collect()),
                    ..Default::default()
                };
                let pp = PostParams::default();
                let write = async {
                    match api.create(&pp, &cm).await {
                        Err(kube::Error::Api(e)) if e.code == 409 => {
                            api.replace(&name, &pp, &cm).await.map(drop)
                        }
                        other => other.map(drop),
                    }
                };
                let done = tokio::time::timeout(REVIEW_TIMEOUT, write)
                    .await
                    .unwrap_or_else(|_| Err(kube::Error::Service("timed out".into())));
                match done {
                    Ok(()) => {
                        info!(configmap = %format!("{namespace}/{name}"), "trust bundle published")
                    }
                    Err(e) => {
                        warn!(configmap = %format!("{namespace}/{name}"), "publishing the trust bundle: {e}; retrying")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => warn!(file = %bundle.display(), "reading the trust bundle: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Keeps `pods` in step with the cluster's, forever; a watch error is logged and the watch
/// starts again (the last list stays in force meanwhile).
async fn watch_pods(api: Api<Pod>, pods: Arc<RwLock<Pods>>) {
    let mut pause = Duration::from_secs(1);
    loop {
        let events = watcher(api.clone(), watcher::Config::default());
        let mut events = std::pin::pin!(events);
        let mut relist: Option<Pods> = None;
        while let Some(item) = events.next().await {
            match item {
                Ok(watcher::Event::Init) => relist = Some(Pods::default()),
                Ok(watcher::Event::InitApply(p)) => {
                    if let Some(r) = relist.as_mut() {
                        r.apply(&p);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let mut fresh = relist.take().unwrap_or_default();
                    fresh.synced = true;
                    let n = fresh.by_name.len();
                    *pods.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                    pause = Duration::from_secs(1);
                    info!(pods = n, "pods listed");
                }
                Ok(watcher::Event::Apply(p)) => {
                    pods.write().unwrap_or_else(|e| e.into_inner()).apply(&p);
                }
                Ok(watcher::Event::Delete(p)) => {
                    if let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) {
                        let key = (ns.clone(), name.clone());
                        pods.write().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    }
                }
                Err(e) => {
                    warn!("watching pods: {e}; retrying (the last list stays in force)");
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str, node: &str, sa: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn the_index_places_scheduled_running_pods_and_forgets_ended_or_moved_ones() {
        let mut p = Pods::default();
        p.apply(&pod("shop", "web-1", "u1", "node1", "web", "Running"));
        p.apply(&pod("shop", "web-2", "u2", "node1", "web", "Pending"));
        let placed =
            |p: &Pods| p.placed.get(&("node1".into(), "shop".into(), "web".into())).copied();
        assert_eq!(placed(&p), Some(2));
        p.apply(&pod("shop", "web-2", "u2", "node1", "web", "Succeeded"));
        assert_eq!(placed(&p), Some(1), "an ended pod runs nothing");
        p.apply(&pod("shop", "web-1", "u1", "node2", "web", "Running"));
        assert_eq!(placed(&p), None, "moved away");
        p.remove(&("shop".into(), "web-1".into()));
        assert!(p.placed.is_empty() && p.by_name.is_empty());
    }

    #[test]
    fn mirror_pods_and_pods_without_an_account_place_no_identity() {
        let mut p = Pods::default();
        let mut mirror = pod("kube-system", "etcd-node1", "u9", "node1", "", "Running");
        p.apply(&mirror);
        assert!(p.placed.is_empty(), "an account-less pod would place `default`");
        mirror.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_owned(), "x".to_owned())].into());
        mirror.spec.as_mut().unwrap().service_account_name = Some("default".into());
        p.apply(&mirror);
        assert!(p.placed.is_empty(), "a mirror pod places nothing");
    }

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(looks_like_jwt("eyJhbGciOi.eyJpc3MiOi.c2lnbmF0dXJl"));
        for bad in ["", "forged-token", "a.b", "a..c", "a.b.c.d", "a.b.c d"] {
            assert!(!looks_like_jwt(bad), "{bad}");
        }
        assert!(!looks_like_jwt(&format!("a.{}.c", "b".repeat(17 * 1024))));
    }

    #[test]
    fn trusted_accounts_are_namespace_slash_name() {
        let ok = parse_accounts(&["mtls-system/mtls-agent".into()]).unwrap();
        assert!(ok.contains(&("mtls-system".into(), "mtls-agent".into())));
        for bad in ["mtls-agent", "/x", "a/", "a/b/c"] {
            assert!(parse_accounts(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
