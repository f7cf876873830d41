//! A node the agent refuses: its kernel lacks a feature the programs need, or it has no cgroup
//! v2 hierarchy (a cgroup v1-only node). In file mode the agent exits with the reason. In
//! Kubernetes mode a DaemonSet pod that exits is restarted forever (CrashLoopBackOff), which
//! says nothing useful and, with `maxUnavailable: 0`, stalls every rollout on that node; so the
//! agent stays up instead and:
//! - captures nothing and enrolls nothing (no program is loaded, nothing is pinned, no pod is
//!   watched);
//! - says why: a Warning Event on its own pod and on the Node, the metric
//!   `mtls_agent_capture_refused{node,reason} 1`, and the body of its readiness probe,
//!   `/config_dump` (`captureRefused`) and `/check`; the Events are retried until accepted and
//!   posted again every 30 minutes (Events expire after an hour);
//! - is Ready only where nothing served before it: readiness means "this instance serves", and
//!   on a node no agent ever served, serving is saying why nothing is captured (a failed probe
//!   would stall the rollout on a node no rollout can fix). Where another instance served (its
//!   pins are there, or its admin socket is live), it is NOT ready: during a surge rollout the
//!   kubelet would otherwise delete the working agent and the node would lose its mesh, so the
//!   rollout stops at this node and the old agent keeps serving.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    admin,
    agent::{bind_shared, AgentConfig, Source},
    capture::{cgroup2::Cgroup2Error, probe::MissingFeature},
    identity::{CertStore, TrustBundle},
    kubernetes::{self, events},
    policy::PolicySet,
    tunnel::{hbone, ConnectionTable, Mesh},
    workloads::WorkloadSet,
};

/// The Event's reason, on the agent's pod and on the Node.
pub const CAPTURE_REFUSED: &str = "MeshCaptureRefused";

/// Why the agent captures nothing on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Kernel(#[from] MissingFeature),
    #[error(transparent)]
    Cgroup(#[from] Cgroup2Error),
    /// `--min-kernel` (tests only) refused this kernel: its own reason, so that metrics never
    /// take it for a kernel that lacks a feature.
    #[error(transparent)]
    MinKernel(MissingFeature),
}

impl Refusal {
    /// The metric's `reason` label: one of a few fixed words.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Kernel(_) => "kernel",
            Refusal::Cgroup(_) => "cgroup_v1",
            Refusal::MinKernel(_) => "min_kernel",
        }
    }

    /// Whether it is a property of the node (stay up and say so), not a wrong argument.
    pub fn is_node_property(&self) -> bool {
        // A --min-kernel refusal plays a refused node (for the tests of that mode).
        matches!(
            self,
            Refusal::Kernel(_) | Refusal::MinKernel(_) | Refusal::Cgroup(Cgroup2Error::NoV2 { .. })
        )
    }

    /// What every report of it says (Event, probe body, check).
    pub fn describe(&self, node: &str) -> String {
        format!(
            "mtls-agent captures nothing on node {node}: {self}; no pod of this node is \
             enrolled, their connections go without the mesh (STRICT peers refuse their \
             plaintext)"
        )
    }
}

/// The agent's own pod, for its Event.
#[derive(Debug, Clone)]
pub struct OwnPod {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
}

/// Serves the refusal until SIGINT or SIGTERM (Kubernetes mode).
pub async fn run(cfg: AgentConfig, refusal: Refusal, own: Option<OwnPod>) -> anyhow::Result<()> {
    let detail = refusal.describe(&cfg.node);
    // Pins of an earlier instance (an agent version this kernel could run) hold its pods
    // closed until uninstalled: say so rather than leave them to be found.
    let leftover = cfg.bpffs.read_dir().is_ok_and(|mut d| d.next().is_some());
    let detail = if leftover {
        format!(
            "{detail}; an earlier instance's programs stay pinned in {} and hold the pods it \
             enrolled closed until `mtls-agent uninstall`",
            cfg.bpffs.display()
        )
    } else {
        detail
    };
    let others = live_other_instances(&cfg.admin_dir);
    error!(reason = refusal.reason(), "{detail}; staying up (Kubernetes mode) to say so");

    if let Source::Kubernetes(k) = &cfg.source {
        match kubernetes::client(k.kubeconfig.as_deref()).await {
            Ok(client) => {
                tokio::spawn(announce(client, cfg.node.clone(), own, detail.clone()));
            }
            Err(e) => error!("no Events about the refusal: {e}"),
        }
    }

    let readiness = admin::Readiness::default();
    match served_before(leftover, &others) {
        None => readiness.set(true, format!("capture refused: {detail}")),
        Some(why) => {
            error!("not ready: {why}; the rollout stops at this node");
            readiness.set(
                false,
                format!(
                    "capture refused: {detail}; {why}: not ready, so that a rollout does not \
                     replace the serving agent with this one"
                ),
            );
        }
    }
    let state = admin::AdminState {
        node: cfg.node.clone(),
        mesh: Arc::new(empty_mesh(&cfg)),
        ebpf: None,
        set_log_level: cfg.set_log_level.clone(),
        readiness,
        enrollment: Default::default(),
        membership: Default::default(),
        policy_sources: Default::default(),
        refusal: Some(Arc::new(refusal)),
    };
    let (_admin_socket, admin_unix) = admin::socket::AdminSocket::bind(&cfg.admin_dir)?;
    info!(socket = %_admin_socket.path().display(), "admin API listening");
    if let Some(addr) = cfg.admin {
        let l = bind_shared(addr).with_context(|| format!("binding the admin API on {addr}"))?;
        tokio::spawn(admin::serve(l, state.clone()));
    }
    let metrics = bind_shared(cfg.metrics)
        .with_context(|| format!("binding the metrics endpoint on {}", cfg.metrics))?;
    let health = bind_shared(cfg.health)
        .with_context(|| format!("binding the health endpoint on {}", cfg.health))?;
    tokio::spawn(admin::serve_metrics(metrics, state.clone()));
    tokio::spawn(admin::serve_health(health, state.clone()));
    tokio::spawn(admin::serve(admin::Listener::Unix(admin_unix), state));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: exiting (nothing was captured)"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting (nothing was captured)"),
    }
    Ok(())
}

/// The pids of other agent instances with a live admin socket in `dir` (a serving agent
/// beside this one during a surge rollout).
fn live_other_instances(dir: &std::path::Path) -> Vec<u32> {
    let own = std::process::id();
    let Ok(sockets) = admin::socket::discover(dir) else { return Vec::new() };
    sockets
        .iter()
        .filter_map(|s| admin::socket::socket_pid(s))
        .filter(|&pid| pid != own && std::path::Path::new("/proc").join(pid.to_string()).exists())
        .collect()
}

/// Why this refused instance must not be Ready: another instance served on this node.
fn served_before(leftover_pins: bool, others: &[u32]) -> Option<String> {
    match (leftover_pins, others) {
        (false, []) => None,
        (_, [_, ..]) => Some(format!(
            "another agent instance serves on this node (pid {})",
            others.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        )),
        (true, []) => Some("an earlier instance served on this node (its pins are there)".into()),
    }
}

/// First wait before posting a refused Event again; doubled up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often the Events are posted again while refused: Events expire after an hour (the API
/// server's default `--event-ttl`), and a refusal must not go quiet.
const REPOST: Duration = Duration::from_secs(30 * 60);

/// The wait after a failed attempt that waited `last` (none yet: `None`).
fn next_retry(last: Option<Duration>) -> Duration {
    last.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))
}

/// Posts the Warning Events: on the agent's pod (`kubectl describe pod`, the DaemonSet's
/// owner looks there) and on the Node (`kubectl describe node`, the node's owner looks there);
/// each retried with backoff until the API server accepts it, and all posted again every
/// [`REPOST`] while the agent runs.
async fn announce(client: kube::Client, node: String, own: Option<OwnPod>, message: String) {
    if own.is_none() {
        tracing::warn!("no POD_NAME (--pod-name): the refusal's Event goes on the Node only");
    }
    loop {
        let (mut on_pod, mut on_node) = (own.is_none(), false);
        let mut wait = None;
        while !(on_pod && on_node) {
            if let (false, Some(own)) = (on_pod, &own) {
                let pod = events::PodRef {
                    name: own.name.clone(),
                    namespace: own.namespace.clone(),
                    uid: own.uid.clone(),
                };
                on_pod = events::post(
                    client.clone(),
                    pod,
                    "Warning",
                    CAPTURE_REFUSED,
                    message.clone(),
                    node.clone(),
                )
                .await;
            }
            if !on_node {
                on_node = events::post_on_node(
                    client.clone(),
                    "Warning",
                    CAPTURE_REFUSED,
                    message.clone(),
                    node.clone(),
                )
                .await;
            }
            if !(on_pod && on_node) {
                let w = next_retry(wait);
                tracing::debug!(retry_in = ?w, "the refusal's Events are not all accepted yet");
                tokio::time::sleep(w).await;
                wait = Some(w);
            }
        }
        tokio::time::sleep(REPOST).await;
    }
}

/// A mesh with nothing in it: no workload, no certificate, trusting no root. The admin
/// servers read it; nothing listens that could use it.
fn empty_mesh(cfg: &AgentConfig) -> Mesh {
    let (_, workloads) = watch::channel(Arc::new(WorkloadSet::default()));
    let (_, policies) = watch::channel(Arc::new(PolicySet::empty()));
    Mesh {
        trust_domain: cfg.trust_domain.clone(),
        trust: Arc::new(crate::identity::SharedTrust::new(TrustBundle::trusting_nothing())),
        certs: Arc::new(CertStore::new()),
        pool: hbone::Pool::new(hbone::PoolConfig::default()),
        conns: ConnectionTable::default(),
        drain: Default::default(),
        workloads,
        services: crate::services::ServiceCache::new(&cfg.node),
        policies,
        stats: Default::default(),
        netns: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_where_nothing_served() {
        assert_eq!(served_before(false, &[]), None);
        let pins = served_before(true, &[]).unwrap_or_default();
        assert!(pins.contains("pins"), "{pins}");
        let live = served_before(true, &[41, 42]).unwrap_or_default();
        assert!(live.contains("pid 41, 42"), "{live}");
    }

    #[test]
    fn a_min_kernel_refusal_has_its_own_reason() {
        let m = MissingFeature { kernel: "6.18.0".into(), feature: "x", min: "99.0".into() };
        assert_eq!(Refusal::MinKernel(m.clone()).reason(), "min_kernel");
        assert_eq!(Refusal::Kernel(m).reason(), "kernel");
    }

    #[test]
    fn event_retries_back_off_to_a_minute_and_reposts_come_before_events_expire() {
        let mut wait = None;
        let waits: Vec<u64> = (0..9)
            .map(|_| {
                let w = next_retry(wait);
                wait = Some(w);
                w.as_secs()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(REPOST < Duration::from_secs(3600));
    }
}
