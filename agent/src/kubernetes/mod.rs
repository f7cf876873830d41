//! Kubernetes mode: pods, services and policies come from the API server instead of
//! `workloads.yaml` and the policy directory, and a pod's network namespace is found through
//! its cgroup.

pub mod binding;
pub mod convert;
pub mod endpoints;
pub mod events;
pub mod incremental;
pub mod membership;
pub mod netns;
pub mod podview;
pub mod rbac;
pub mod sandbox;
pub mod sources;
pub mod thread;
pub mod watch;

use std::path::{Path, PathBuf};

pub use netns::{NetnsError, PodCgroups};
pub use watch::{start, start_with, Feed, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("no Kubernetes configuration (in-cluster, KUBECONFIG or ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("Kubernetes feed thread: {0}")]
    Runtime(String),
}

/// Where Kubernetes mode gets its facts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A kubeconfig file; without it, the in-cluster service account (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    pub cgroups: PodCgroups,
    /// Which namespaces are never enrolled (the node is filled in by the agent).
    pub membership: membership::Settings,
    /// How often API discovery of the policy kinds runs again (a CRD installed later).
    pub discovery_interval: std::time::Duration,
}

/// A client for the API server: from `kubeconfig` if given, else inferred.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeError::Kubeconfig { path: path.to_owned(), source };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}
