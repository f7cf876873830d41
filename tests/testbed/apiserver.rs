//! A scripted stand-in for the Kubernetes API server, for the agent's Kubernetes mode.
//!
//! There is no API server on this machine (nor a cluster to reach), so this mock answers the
//! two requests the agent's watchers make, from state the test sets: a **list** of a
//! collection (`GET <path>`, one page) and a **watch** (`GET <path>?watch=true&resourceVersion=R`,
//! newline-delimited JSON events: every change after `R`, then live ones). The test changes
//! objects ([`ApiServer::apply`], [`ApiServer::delete`]) and breaks watches the ways a real
//! server does: the stream ends ([`ApiServer::end_watches`]) or the resource version expires
//! (`410 Gone`, [`ApiServer::expire`]). Lists can be held back ([`ApiServer::hold_lists`]) to
//! look at the agent in the middle of a relist. Collections not registered with
//! [`ApiServer::serve`] answer 404, like a kind whose CRD is not installed.
//!
//! Lists are paginated as a real server's are (`limit` and `continue`, with
//! `metadata.continue` and `remainingItemCount`; a continue token from before an expiry is
//! `410 Gone`; [`ApiServer::max_page`] caps pages), `fieldSelector` (`a.b=v`, `a.b!=v`) is
//! honoured by lists and watches (an object moving into or out of a watch's selection is
//! ADDED or DELETED for it), and watches with `allowWatchBookmarks=true` get a BOOKMARK with
//! the latest version every second ([`ApiServer::bookmark_every`]).
//!
//! API discovery (`GET /apis`, `GET /apis/<group>/<version>`) is answered from the served
//! collections under `/apis/`: a kind is served once [`ApiServer::serve`] (or `apply`) made its
//! collection, as when its CRD is installed. [`ApiServer::fail`] makes a served collection
//! answer an error status (403 as with a missing RBAC rule, 500) to lists and watches while
//! discovery still lists it.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{channel::Channel, BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Collection paths of the kinds the agent watches.
pub const PODS: &str = "/api/v1/pods";
pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINTSLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const PEERAUTHENTICATIONS_V1: &str = "/apis/security.istio.io/v1/peerauthentications";
pub const PEERAUTHENTICATIONS_V1BETA1: &str = "/apis/security.istio.io/v1beta1/peerauthentications";
pub const AUTHORIZATIONPOLICIES_V1: &str = "/apis/security.istio.io/v1/authorizationpolicies";
pub const AUTHORIZATIONPOLICIES_V1BETA1: &str =
    "/apis/security.istio.io/v1beta1/authorizationpolicies";
pub const POLICIES: &str = "/apis/authentication.istio.io/v1alpha1/policies";
pub const MESHPOLICIES: &str = "/apis/authentication.istio.io/v1alpha1/meshpolicies";
/// Where token reviews are posted (the certificate service's Kubernetes mode).
pub const TOKENREVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) of every change.
    log: Vec<(u64, &'static str, Value)>,
    /// The object each logged change replaced (by log index), for field-selected watches.
    replaced: BTreeMap<usize, Value>,
    /// Watches from before this version get `410 Gone`.
    expired_before: u64,
    lists: usize,
    watches: Vec<Watch>,
}

/// An open watch: where its events go, and which objects it selects.
struct Watch {
    id: u64,
    tx: mpsc::UnboundedSender<Bytes>,
    fields: Vec<FieldTerm>,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: BTreeMap<String, Collection>,
    hold_lists: bool,
    /// Collections that answer this status to lists and watches ([`ApiServer::fail`]).
    failing: BTreeMap<String, u16>,
    /// Requests per path, served or not ([`ApiServer::requests`]).
    requests: BTreeMap<String, usize>,
    /// Every request's path and (decoded) query, in order ([`ApiServer::requests_with_query`]).
    queries: Vec<(String, BTreeMap<String, String>)>,
    /// The most items a list page holds, whatever the client's `limit` ([`ApiServer::max_page`]).
    max_page: Option<usize>,
    /// How often watches that allow them get a BOOKMARK ([`ApiServer::bookmark_every`]).
    bookmark_every: Option<Duration>,
    /// Bookmarks sent, per path.
    bookmarks: BTreeMap<String, usize>,
    next_watch: u64,
    /// What a TokenReview of each token says ([`ApiServer::script_token`]): its audiences and
    /// its user (name and extra). Any other token is not authenticated.
    tokens: BTreeMap<String, (Vec<String>, Value)>,
    /// Tokens a review refuses with this error ([`ApiServer::script_refused_token`]).
    refused_tokens: BTreeMap<String, String>,
}

/// The mock server; it stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 (an ephemeral port), serving from its own thread.
    pub fn start() -> Result<ApiServer> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("bind mock API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        // Like a real server, bookmarks now and then to watches that allow them.
        let state = Arc::new(Mutex::new(State {
            bookmark_every: Some(Duration::from_secs(1)),
            ..State::default()
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("mock-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return eprintln!("mock API server: runtime: {e}"),
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                    tokio::select! {
                        _ = accept_loop(listener, shared) => {}
                        _ = stopped => {}
                    }
                });
            })
            .context("spawn mock API server thread")?;
        Ok(ApiServer { addr, state, stop: Some(stop), thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server (no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: {}\n\
             users:\n- name: mock\n  user: {{}}\ncontexts:\n- name: mock\n  context:\n    \
             cluster: mock\n    user: mock\ncurrent-context: mock\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `token` a ServiceAccount token of `namespace/account` for `audience`, bound to
    /// `pod` (name, uid) if given, as a projected token is.
    pub fn script_token(
        &self,
        token: &str,
        audience: &str,
        namespace: &str,
        account: &str,
        pod: Option<(&str, &str)>,
    ) {
        let mut extra = serde_json::Map::new();
        if let Some((name, uid)) = pod {
            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([name]));
            extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
        }
        let user = json!({
            "username": format!("system:serviceaccount:{namespace}:{account}"),
            "extra": extra,
        });
        self.lock().tokens.insert(token.to_owned(), (vec![audience.to_owned()], user));
    }

    /// Makes a review of `token` refuse it with `error`, as a real server does an expired one
    /// (`[invalid bearer token, service account token has expired]`).
    pub fn script_refused_token(&self, token: &str, error: &str) {
        self.lock().refused_tokens.insert(token.to_owned(), error.to_owned());
    }

    /// Serves `path` (an empty collection to start with).
    pub fn serve(&self, path: &str) {
        self.lock().collections.entry(path.to_owned()).or_default();
    }

    /// The objects of the collection at `path` (e.g. what a client created with POST).
    pub fn objects(&self, path: &str) -> Vec<Value> {
        self.lock()
            .collections
            .get(path)
            .map(|c| c.objects.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates or replaces an object (by namespace and name) and tells the watches.
    pub fn apply(&self, path: &str, mut object: Value) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = st.collections.entry(path.to_owned()).or_default();
        let key = key_of(&object);
        let old = c.objects.insert(key, object.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        if let Some(old) = &old {
            c.replaced.insert(c.log.len(), old.clone());
        }
        c.log.push((rv, kind, object.clone()));
        c.broadcast_change(kind, old.as_ref(), &object);
    }

    /// Deletes an object and tells the watches; false if there was none.
    pub fn delete(&self, path: &str, namespace: Option<&str>, name: &str) -> bool {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.entry(path.to_owned()).or_default();
        let key = format!("{}/{name}", namespace.unwrap_or_default());
        let Some(mut object) = c.objects.remove(&key) else { return false };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.log.push((rv, "DELETED", object.clone()));
        c.broadcast("DELETED", &object);
        true
    }

    /// Ends every open watch of `path` (the client re-watches from its last version).
    pub fn end_watches(&self, path: &str) {
        if let Some(c) = self.lock().collections.get_mut(path) {
            c.watches.clear();
        }
    }

    /// Expires every version of `path` seen so far: open watches get a `410 Gone` error event
    /// and end, and re-watching from an old version fails the same way, so the client must
    /// list again.
    pub fn expire(&self, path: &str) {
        let mut st = self.lock();
        // A list now answers with this version, from which watching works again.
        let rv = st.rv;
        if let Some(c) = st.collections.get_mut(path) {
            c.expired_before = rv;
            c.log.clear();
            c.replaced.clear();
            for w in c.watches.drain(..) {
                let _ = w.tx.send(gone());
            }
        }
    }

    /// While held, list requests wait (watches are answered).
    pub fn hold_lists(&self, hold: bool) {
        self.lock().hold_lists = hold;
    }

    /// How many list requests of `path` have been answered or are held.
    pub fn lists(&self, path: &str) -> usize {
        self.lock().collections.get(path).map_or(0, |c| c.lists)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Collection {
    fn broadcast(&mut self, kind: &'static str, object: &Value) {
        self.broadcast_change(kind, None, object);
    }

    /// Tells each watch the change as it sees it through its field selector: an object that
    /// comes into its selection is ADDED, one that leaves it DELETED, as a real server does.
    fn broadcast_change(&mut self, kind: &'static str, old: Option<&Value>, object: &Value) {
        self.watches.retain(|w| match as_selected(&w.fields, kind, old, object) {
            Some(kind) => w.tx.send(event(kind, object)).is_ok(),
            None => !w.tx.is_closed(),
        });
    }
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    )
}

fn event(kind: &str, object: &Value) -> Bytes {
    // Written around the object, not through a copy of it in a new value: a burst sends
    // thousands of 6 KB pods.
    Bytes::from(format!("{{\"type\":{},\"object\":{object}}}\n", json!(kind)))
}

fn gone() -> Bytes {
    event(
        "ERROR",
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}),
    )
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn full(status: u16, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut()
        .insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn not_found(path: &str) -> Response<Body> {
    full(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("the server could not find the requested resource ({path})"),
               "reason": "NotFound", "code": 404}),
    )
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    *lock().requests.entry(path.clone()).or_default() += 1;
    lock().queries.push((path.clone(), query.clone()));
    let discovered = discovery(&lock(), &path);
    if let Some(r) = discovered {
        return Ok(r);
    }
    if path == TOKENREVIEWS && req.method() == hyper::Method::POST {
        let Ok(body) = req.into_body().collect().await else { return Ok(full(400, json!({}))) };
        let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return Ok(full(400, json!({})));
        };
        let status = token_review(&lock(), &review);
        let mut answer = review;
        answer["status"] = status;
        return Ok(full(201, answer));
    }
    let failing = lock().failing.get(&path).copied();
    if let Some(code) = failing {
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        let mut st = lock();
        if let (false, Some(c)) = (watch, st.collections.get_mut(&path)) {
            c.lists += 1;
        }
        return Ok(failure(code, &path));
    }
    // Creation (the agent posts Events): stored in the collection at `path`, if served.
    if req.method() == hyper::Method::POST {
        let Ok(body) = req.into_body().collect().await else { return Ok(full(400, json!({}))) };
        let Ok(mut object) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return Ok(full(400, json!({})));
        };
        let mut st = lock();
        st.rv += 1;
        let rv = st.rv;
        let Some(c) = st.collections.get_mut(&path) else { return Ok(not_found(&path)) };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.objects.insert(key_of(&object), object.clone());
        c.log.push((rv, "ADDED", object.clone()));
        c.broadcast("ADDED", &object);
        return Ok(full(201, object));
    }
    if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let Ok(fields) = field_selector(&query) else {
            return Ok(full(400, json!({"kind": "Status", "code": 400, "reason": "BadRequest"})));
        };
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id;
        let every;
        {
            let mut st = lock();
            st.next_watch += 1;
            id = st.next_watch;
            every = st.bookmark_every;
            let Some(c) = st.collections.get_mut(&path) else { return Ok(not_found(&path)) };
            if from < c.expired_before {
                let _ = tx.send(gone());
            } else {
                for (i, (rv, kind, object)) in c.log.iter().enumerate() {
                    let old = c.replaced.get(&i);
                    if let (true, Some(kind)) =
                        (*rv > from, as_selected(&fields, kind, old, object))
                    {
                        let _ = tx.send(event(kind, object));
                    }
                }
                c.watches.push(Watch { id, tx, fields });
            }
        }
        if let (true, Some(every)) = (bookmarks, every) {
            tokio::spawn(send_bookmarks(state.clone(), path.clone(), id, every));
        }
        let (mut body_tx, body) = Channel::<Bytes, Infallible>::new(16);
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if body_tx.send_data(line).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(body.boxed());
        r.headers_mut()
            .insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
        return Ok(r);
    }
    {
        let mut st = lock();
        let Some(c) = st.collections.get_mut(&path) else { return Ok(not_found(&path)) };
        c.lists += 1;
    }
    while lock().hold_lists {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = lock();
    let Some(c) = st.collections.get(&path) else { return Ok(not_found(&path)) };
    let Ok(fields) = field_selector(&query) else {
        return Ok(full(400, json!({"kind": "Status", "code": 400, "reason": "BadRequest"})));
    };
    // A continued list goes on after the last key of the page before, at the version the
    // list started at; a token from before an expiry is gone, as a real server's compacted
    // version is.
    let (list_rv, after) = match query.get("continue").filter(|t| !t.is_empty()) {
        None => (st.rv, None),
        Some(token) => {
            match token.split_once(':').and_then(|(rv, k)| Some((rv.parse().ok()?, k))) {
                Some((rv, _)) if rv < c.expired_before => return Ok(expired_continue()),
                Some((rv, key)) => (rv, Some(key.to_owned())),
                None => return Ok(full(400, json!({"kind": "Status", "code": 400}))),
            }
        }
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let page = match (limit, st.max_page) {
        (Some(l), Some(m)) => Some(l.min(m)),
        (l, m) => l.or(m),
    };
    let selected = c
        .objects
        .iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k.as_str() > a.as_str()))
        .filter(|(_, o)| selects(&fields, o));
    let all: Vec<(&String, &Value)> = selected.collect();
    let n = page.map_or(all.len(), |p| p.min(all.len()));
    let items: Vec<&Value> = all[..n].iter().map(|(_, o)| *o).collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if n < all.len() {
        metadata["continue"] = json!(format!("{list_rv}:{}", all[n - 1].0));
        metadata["remainingItemCount"] = json!(all.len() - n);
    }
    Ok(full(200, json!({"apiVersion": "v1", "kind": "List", "metadata": metadata, "items": items})))
}

/// Namespaces (cluster-scoped: their objects have no namespace). A Kubernetes-mode agent needs
/// them served: their `istio.io/dataplane-mode` label puts their pods in the mesh.
pub const NAMESPACES: &str = "/api/v1/namespaces";

/// A Namespace object; `ambient` labels it `istio.io/dataplane-mode=ambient`, which puts its
/// pods in the mesh.
pub fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"kubernetes.io/metadata.name": name, "istio.io/dataplane-mode": "ambient"})
    } else {
        json!({"kubernetes.io/metadata.name": name})
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

/// The path Events of `namespace` are posted to.
/// The status a real API server gives a review: authenticated with the audiences asked for
/// that the token has, or not, with the error it words.
fn token_review(st: &State, review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if let Some(error) = st.refused_tokens.get(token) {
        return json!({"authenticated": false, "error": error, "user": {}});
    }
    let Some((audiences, user)) = st.tokens.get(token) else {
        return json!({"authenticated": false, "error": "[invalid bearer token, token lookup failed]", "user": {}});
    };
    let both: Vec<&String> = audiences.iter().filter(|a| asked.contains(a)).collect();
    if !asked.is_empty() && both.is_empty() {
        return json!({"authenticated": false, "user": {},
            "error": format!("[invalid bearer token, token audiences {audiences:?} is invalid for the target audiences {asked:?}]")});
    }
    json!({"authenticated": true, "user": user, "audiences": both})
}

pub fn events_path(namespace: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/events")
}

impl ApiServer {
    /// Makes the collection at `path` answer `code` (403, 500, ...) to lists and watches, or
    /// answer again with `None`. Open watches go on, as a real server's do when RBAC changes:
    /// end or expire them to make clients meet the error. Discovery still lists the kind: it
    /// is served, it fails. Failed lists count in [`ApiServer::lists`].
    pub fn fail(&self, path: &str, code: Option<u16>) {
        let mut st = self.lock();
        match code {
            Some(c) => st.failing.insert(path.to_owned(), c),
            None => st.failing.remove(path),
        };
    }
}

impl ApiServer {
    /// How many requests `path` got (lists, watches, creations), whether it is served or not.
    pub fn requests(&self, path: &str) -> usize {
        self.lock().requests.get(path).copied().unwrap_or_default()
    }
}

/// The served collections under `/apis/` as (group, version, plural).
fn served_group_resources(st: &State) -> Vec<(String, String, String)> {
    st.collections
        .keys()
        .filter_map(|p| {
            let rest = p.strip_prefix("/apis/")?;
            let mut it = rest.split('/');
            let (g, v, plural) = (it.next()?, it.next()?, it.next()?);
            it.next().is_none().then(|| (g.to_owned(), v.to_owned(), plural.to_owned()))
        })
        .collect()
}

/// The kind of a plural, for discovery answers.
fn kind_of(plural: &str) -> String {
    match plural {
        "peerauthentications" => "PeerAuthentication".into(),
        "policies" => "Policy".into(),
        "authorizationpolicies" => "AuthorizationPolicy".into(),
        "meshpolicies" => "MeshPolicy".into(),
        "endpointslices" => "EndpointSlice".into(),
        other => {
            let singular = other.strip_suffix('s').unwrap_or(other);
            let mut c = singular.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
        }
    }
}

/// `GET /apis` (APIGroupList) and `GET /apis/<group>/<version>` (APIResourceList), from the
/// served collections; `None` for any other path.
fn discovery(st: &State, path: &str) -> Option<Response<Body>> {
    let served = served_group_resources(st);
    if path == "/apis" {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (g, v, _) in &served {
            let vs = groups.entry(g).or_default();
            if !vs.contains(&v.as_str()) {
                vs.push(v);
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(g, vs)| {
                let versions: Vec<Value> = vs
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                    .collect();
                json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
            })
            .collect();
        return Some(full(
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
        ));
    }
    let rest = path.strip_prefix("/apis/")?;
    let (g, v) = rest.split_once('/')?;
    if v.contains('/') {
        return None;
    }
    let resources: Vec<Value> = served
        .iter()
        .filter(|(sg, sv, _)| sg == g && sv == v)
        .map(|(_, _, plural)| {
            json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind_of(plural),
                   "verbs": ["get", "list", "watch"]})
        })
        .collect();
    if resources.is_empty() {
        return Some(not_found(path));
    }
    Some(full(
        200,
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{g}/{v}"),
               "resources": resources}),
    ))
}

/// The Status a failing collection answers.
fn failure(code: u16, path: &str) -> Response<Body> {
    let reason = match code {
        403 => "Forbidden",
        404 => "NotFound",
        _ => "InternalError",
    };
    let message = match code {
        403 => format!(
            "system:serviceaccount:mtls-system:mtls-agent cannot list resource at {path}: forbidden"
        ),
        _ => format!("the server failed to answer for {path}"),
    };
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// One term of a field selector: `path=value` (also `==`) or `path!=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    path: Vec<String>,
    value: String,
    equal: bool,
}

/// The `fieldSelector` of a request (terms joined by `,`); an error for a term that is neither.
fn field_selector(query: &BTreeMap<String, String>) -> Result<Vec<FieldTerm>, ()> {
    let Some(sel) = query.get("fieldSelector").filter(|s| !s.is_empty()) else { return Ok(vec![]) };
    sel.split(',')
        .map(|term| {
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, v, true)
            } else {
                return Err(());
            };
            let path = path.trim().split('.').map(str::to_owned).collect();
            Ok(FieldTerm { path, value: value.trim().to_owned(), equal })
        })
        .collect()
}

/// Whether the object is selected (a missing field is the empty string, as in the real one).
fn selects(fields: &[FieldTerm], object: &Value) -> bool {
    fields.iter().all(|t| {
        let v = t.path.iter().fold(object, |o, p| &o[p.as_str()]);
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        (v == t.value) == t.equal
    })
}

/// The event a watch with `fields` gets for a change, if any.
fn as_selected(
    fields: &[FieldTerm],
    kind: &'static str,
    old: Option<&Value>,
    object: &Value,
) -> Option<&'static str> {
    if fields.is_empty() {
        return Some(kind);
    }
    let now = kind != "DELETED" && selects(fields, object);
    let before = match kind {
        "DELETED" => selects(fields, object),
        _ => old.is_some_and(|o| selects(fields, o)),
    };
    match (before, now) {
        (false, true) => Some("ADDED"),
        (true, false) => Some("DELETED"),
        (true, true) => Some(kind),
        (false, false) => None,
    }
}

/// Percent-decodes a query component (`+` is a space).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Status of a list continued with a token whose version is gone.
fn expired_continue() -> Response<Body> {
    full(
        410,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "The provided continue parameter is too old to display a consistent \
                           list result. You can start a new list without the continue parameter.",
               "reason": "Expired", "code": 410}),
    )
}

/// Sends the watch `id` of `path` a BOOKMARK with the latest version every `every`, while it
/// is open (through its own channel, after every event up to that version).
async fn send_bookmarks(state: Arc<Mutex<State>>, path: String, id: u64, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let rv = st.rv;
        let Some(c) = st.collections.get_mut(&path) else { return };
        let Some(w) = c.watches.iter().find(|w| w.id == id) else { return };
        let kind = kind_of(path.rsplit('/').next().unwrap_or_default());
        let mark = json!({"kind": kind, "apiVersion": "v1",
                          "metadata": {"resourceVersion": rv.to_string()}});
        if w.tx.send(event("BOOKMARK", &mark)).is_err() {
            return;
        }
        *st.bookmarks.entry(path.clone()).or_default() += 1;
    }
}

impl ApiServer {
    /// Every request of `path` so far, with its decoded query (`limit`, `continue`,
    /// `fieldSelector`, `watch`, `resourceVersion`, `allowWatchBookmarks`, ...).
    pub fn requests_with_query(&self, path: &str) -> Vec<BTreeMap<String, String>> {
        let st = self.lock();
        st.queries.iter().filter(|(p, _)| p == path).map(|(_, q)| q.clone()).collect()
    }

    /// Lists answer at most `n` items a page (with a `continue` token for the rest), whatever
    /// the client asked; `None`: the client's `limit` alone.
    pub fn max_page(&self, n: Option<usize>) {
        self.lock().max_page = n;
    }

    /// Watches that allow bookmarks get one every `every` (`None`: never).
    pub fn bookmark_every(&self, every: Option<Duration>) {
        self.lock().bookmark_every = every;
    }

    /// How many BOOKMARK events the watches of `path` were sent.
    pub fn bookmarks(&self, path: &str) -> usize {
        self.lock().bookmarks.get(path).copied().unwrap_or_default()
    }
}

impl ApiServer {
    /// Compacts `path`'s history as etcd does: watching from a version before now is `410
    /// Gone` (so is continuing a list begun before), while open watches go on. A client that
    /// kept its version current (bookmarks) re-watches; one that did not must list again.
    pub fn compact(&self, path: &str) {
        let mut st = self.lock();
        let rv = st.rv;
        if let Some(c) = st.collections.get_mut(path) {
            c.expired_before = rv;
            c.log.clear();
            c.replaced.clear();
        }
    }
}

impl ApiServer {
    /// Loads many objects at once (a scale bench's cluster): each gets its own resource
    /// version as with [`ApiServer::apply`], but no watch is told and no change is logged,
    /// so call it before the client lists (its watches start from the list's version); a
    /// 150,000-pod cluster then costs one copy of each object here, not two plus an event.
    pub fn apply_many(&self, path: &str, objects: impl IntoIterator<Item = Value>) {
        let mut st = self.lock();
        let mut rv = st.rv;
        let c = st.collections.entry(path.to_owned()).or_default();
        for mut object in objects {
            rv += 1;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.objects.insert(key_of(&object), object);
        }
        st.rv = rv;
    }

    /// How many objects the collection at `path` holds.
    pub fn count(&self, path: &str) -> usize {
        self.lock().collections.get(path).map_or(0, |c| c.objects.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(node: &str) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"nodeName": node}})
    }

    #[test]
    fn a_selected_watch_sees_objects_enter_and_leave_its_selection() {
        let q: BTreeMap<String, String> =
            [("fieldSelector".to_owned(), decode("spec.nodeName%3Dn1"))].into();
        let f = field_selector(&q).unwrap();
        // Bound to the node: ADDED for this watch, whatever the change was.
        assert_eq!(as_selected(&f, "MODIFIED", Some(&on("")), &on("n1")), Some("ADDED"));
        assert_eq!(as_selected(&f, "MODIFIED", Some(&on("n1")), &on("n1")), Some("MODIFIED"));
        assert_eq!(as_selected(&f, "MODIFIED", Some(&on("n1")), &on("n2")), Some("DELETED"));
        assert_eq!(as_selected(&f, "ADDED", None, &on("n2")), None);
        assert_eq!(as_selected(&f, "DELETED", None, &on("n1")), Some("DELETED"));
        assert_eq!(as_selected(&[], "ADDED", None, &on("n2")), Some("ADDED"));
        let not: BTreeMap<String, String> =
            [("fieldSelector".to_owned(), "spec.nodeName!=n1".to_owned())].into();
        assert!(selects(&field_selector(&not).unwrap(), &on("n2")));
        let bad: BTreeMap<String, String> =
            [("fieldSelector".to_owned(), "spec.nodeName".to_owned())].into();
        assert!(field_selector(&bad).is_err());
        assert_eq!(decode("a%2Cb+c%zz%4"), "a,b c%zz%4");
    }
}
