//! Who is calling and which identities its node runs: [`Authority`], in file mode (this
//! machine, the demo, the tests) or Kubernetes mode ([`super::cluster`], which asks the API
//! server the same two questions).
//!
//! File mode:
//! - The node tokens file: each node agent's bearer token and the node it stands for. Kept as
//!   SHA-256 digests and looked up by digest, so comparing a guess takes no time that depends
//!   on how much of it was right.
//! - `workloads.yaml`: which pods (namespace, service account) are scheduled to which node,
//!   re-read when the file changes. A version that cannot be read signs nothing until it is
//!   fixed (fail closed: the last good one may grant a pod that has moved away); the
//!   certificates already issued keep working meanwhile.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Deserialize;

use crate::identity::SpiffeId;
use crate::workloads::WorkloadSet;

/// Tokens shorter than this are refused when the file is read: a guessable token would be
/// every identity of its node.
pub const MIN_TOKEN_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    nodes: Vec<NodeToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeToken {
    node: String,
    token: String,
}

/// The node agents' tokens.
pub struct NodeTokens {
    by_digest: HashMap<[u8; 32], String>,
}

pub(crate) fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl NodeTokens {
    /// Reads `path`: `nodes: [{node: NAME, token: SECRET}, ...]`.
    pub fn load(path: &Path) -> Result<NodeTokens, AuthorityError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthorityError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<NodeTokens, AuthorityError> {
        let invalid = |message: String| AuthorityError::Invalid { path: path.into(), message };
        let file: TokensFile = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut by_digest = HashMap::new();
        for (i, n) in file.nodes.into_iter().enumerate() {
            if n.node.is_empty() {
                return Err(invalid(format!("nodes[{i}].node: must not be empty")));
            }
            if let Some(bad) = n.token.chars().find(|c| !c.is_ascii_graphic()) {
                return Err(invalid(format!(
                    "nodes[{i}].token: has {bad:?}: only visible ASCII (node {})",
                    n.node
                )));
            }
            if n.token.chars().count() < MIN_TOKEN_CHARS {
                return Err(invalid(format!(
                    "nodes[{i}].token: shorter than {MIN_TOKEN_CHARS} characters (node {})",
                    n.node
                )));
            }
            if let Some(other) = by_digest.insert(digest(&n.token), n.node.clone()) {
                return Err(invalid(format!(
                    "nodes[{i}].token: the same token as node {other}'s (node {})",
                    n.node
                )));
            }
        }
        Ok(NodeTokens { by_digest })
    }

    /// The node whose agent holds `token`.
    pub fn node_of(&self, token: &str) -> Option<&str> {
        self.by_digest.get(&digest(token)).map(String::as_str)
    }
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node agent, for the pods of this node.
    Node(String),
    /// Anything else with a ServiceAccount token: its own identity only.
    Workload { namespace: String, service_account: String },
}

/// Why a caller is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Where callers and placements come from.
pub enum Authority {
    Files { tokens: NodeTokens, placement: Placement },
    Cluster(std::sync::Arc<super::cluster::Cluster>),
}

impl Authority {
    /// Who holds `token`.
    pub async fn caller(&self, token: &str) -> Result<Caller, Refusal> {
        match self {
            Authority::Files { tokens, .. } => {
                tokens.node_of(token).map(|n| Caller::Node(n.to_owned())).ok_or_else(|| {
                    Refusal::Unauthenticated("the bearer token is not a node agent's".into())
                })
            }
            Authority::Cluster(c) => c.caller(token).await,
        }
    }

    /// Whether requests can be decided, or why not.
    pub fn ready(&self) -> Result<(), String> {
        match self {
            Authority::Files { .. } => Ok(()),
            Authority::Cluster(c) => c.ready(),
        }
    }

    /// Whether a pod with identity `id` (its namespace and service account) is on `node`.
    pub fn runs_on(&self, node: &str, id: &SpiffeId) -> Result<bool, Refusal> {
        match self {
            Authority::Files { placement, .. } => placement.runs_on(node, id).map_err(|_| {
                Refusal::Unavailable(
                    "the certificate service cannot read where pods run (see its log)".into(),
                )
            }),
            Authority::Cluster(c) => c.runs_on(node, id),
        }
    }
}

/// (node, namespace, service account) of every pod.
type Placed = HashSet<(String, String, String)>;

/// Which identities run on which node, from `workloads.yaml`.
pub struct Placement {
    path: PathBuf,
    /// The file's time when read, and what it said (or why it could not be read).
    state: Mutex<(Option<SystemTime>, Result<Placed, String>)>,
}

fn placed(path: &Path) -> Result<(Option<SystemTime>, Placed), AuthorityError> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path)
        .map_err(|source| AuthorityError::Read { path: path.into(), source })?;
    let set = WorkloadSet::parse(&text, path)
        .map_err(|e| AuthorityError::Invalid { path: path.into(), message: e.to_string() })?;
    let placed = set
        .workloads
        .iter()
        .map(|w| (w.node.to_string(), w.namespace.to_string(), w.service_account.to_string()))
        .collect();
    Ok((modified, placed))
}

impl Placement {
    /// Reads `path` (a `workloads.yaml`); an error here stops the service from starting.
    pub fn load(path: &Path) -> Result<Placement, AuthorityError> {
        let (modified, placed) = placed(path)?;
        Ok(Placement { path: path.into(), state: Mutex::new((modified, Ok(placed))) })
    }

    /// Whether a pod with identity `id` (its namespace and service account) is on `node`;
    /// an error while the file cannot be read.
    pub fn runs_on(&self, node: &str, id: &SpiffeId) -> Result<bool, AuthorityError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified != state.0 {
            *state = match placed(&self.path) {
                Ok((m, p)) => (m, Ok(p)),
                Err(e) => {
                    tracing::error!("{e}: no certificate is signed until it is fixed");
                    (modified, Err(e.to_string()))
                }
            };
        }
        match &state.1 {
            Ok(placed) => {
                let key =
                    (node.to_owned(), id.namespace().to_owned(), id.service_account().to_owned());
                Ok(placed.contains(&key))
            }
            Err(message) => {
                Err(AuthorityError::Invalid { path: self.path.clone(), message: message.clone() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "node1-0123456789abcdef0123456789abcdef";
    const T2: &str = "node2-0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_name_their_node_and_weak_or_shared_ones_are_refused() {
        let p = Path::new("tokens.yaml");
        let t = NodeTokens::parse(
            &format!("nodes:\n- {{node: node1, token: {T1}}}\n- {{node: node2, token: {T2}}}\n"),
            p,
        )
        .unwrap();
        assert_eq!(t.node_of(T1), Some("node1"));
        assert_eq!(t.node_of(T2), Some("node2"));
        assert_eq!(t.node_of(&T1[..T1.len() - 1]), None);
        assert_eq!(t.node_of(""), None);
        let err = |text: &str| NodeTokens::parse(text, p).err().map(|e| e.to_string());
        assert_eq!(
            err("nodes:\n- {node: n1, token: short}\n").as_deref(),
            Some("tokens.yaml: nodes[0].token: shorter than 32 characters (node n1)")
        );
        assert_eq!(
            err(&format!("nodes:\n- {{node: a, token: {T1}}}\n- {{node: b, token: {T1}}}\n"))
                .as_deref(),
            Some("tokens.yaml: nodes[1].token: the same token as node a's (node b)")
        );
        assert!(err("nodes:\n- {node: a, tokn: x}\n").is_some_and(|e| e.contains("tokn")));
        // A token that could never be sent as a header, or that trimming would change.
        assert_eq!(
            err(&format!("nodes:\n- {{node: n1, token: \"{T1} \"}}\n")).as_deref(),
            Some("tokens.yaml: nodes[0].token: has ' ': only visible ASCII (node n1)")
        );
    }

    #[test]
    fn placement_follows_the_file_and_grants_nothing_while_it_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workloads.yaml");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        write("workloads:\n- {name: a, namespace: shop, serviceAccount: web, ip: 10.0.0.1, node: node1}\n");
        let p = Placement::load(&path).unwrap();
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let on = |node: &str| p.runs_on(node, &web).ok();
        assert_eq!(on("node1"), Some(true));
        assert_eq!(on("node2"), Some(false), "another node's pod");
        // The pod moves to node2 (the file's time must change for it to be read again).
        std::thread::sleep(std::time::Duration::from_millis(20));
        write("workloads:\n- {name: a, namespace: shop, serviceAccount: web, ip: 10.0.0.1, node: node2}\n");
        assert_eq!((on("node2"), on("node1")), (Some(true), Some(false)));
        std::thread::sleep(std::time::Duration::from_millis(20));
        write("workloads: [\n");
        assert_eq!(on("node2"), None, "a broken file grants nothing");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(on("node2"), None, "nor does a missing one");
    }
}
