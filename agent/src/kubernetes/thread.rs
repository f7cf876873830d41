//! The feed on a thread of its own: the watchers and the builder run on their own tokio
//! runtime, so listing, decoding and building never take turns with the data plane on the
//! agent's runtime. Snapshots reach the agent through the feed's `watch` channels, which work
//! across runtimes; dropping the [`Feed`] stops the thread and waits for it.

use std::{path::PathBuf, time::Duration};

use tokio::sync::oneshot;
use tracing::{error, warn};

use super::{membership, watch::Feed, KubeError};

/// What the feed thread runs.
pub struct FeedSettings {
    pub kubeconfig: Option<PathBuf>,
    pub root_namespace: String,
    pub membership: membership::Settings,
    pub discovery_interval: Duration,
}

/// Starts the feed on a thread of its own, with a client made there (a `kube::Client` keeps
/// its connection tasks on the runtime it is made on).
pub async fn start_on_thread(settings: FeedSettings) -> Result<Feed, KubeError> {
    let (ready_tx, ready) = oneshot::channel::<Result<Feed, KubeError>>();
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("kube-feed".into())
        .spawn(move || {
            run_as_batch();
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(KubeError::Runtime(e.to_string())));
                    return;
                }
            };
            rt.block_on(async move {
                let client = match super::client(settings.kubeconfig.as_deref()).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let feed = super::watch::start_with(
                    client,
                    &settings.root_namespace,
                    settings.membership,
                    settings.discovery_interval,
                );
                // The agent's copy: the channels and the sources, not the tasks.
                if ready_tx.send(Ok(feed.handle())).is_err() {
                    return;
                }
                // Until the agent's copy is dropped (or the agent is gone).
                let _ = stopped.await;
                drop(feed);
            });
        })
        .map_err(|e| KubeError::Runtime(e.to_string()))?;
    match ready.await {
        Ok(Ok(feed)) => Ok(feed.on_thread(stop, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            error!("the Kubernetes feed thread ended before it started");
            let _ = thread.join();
            Err(KubeError::Runtime("the feed thread ended before it started".into()))
        }
    }
}

/// Puts this thread (and the threads it starts) under `SCHED_BATCH`, on Linux a per-thread
/// attribute. The feed and the data plane share the node's CPUs: during a rollout's burst,
/// decoding events and building snapshots can take a whole core. A batch thread keeps its
/// fair share of the CPU but never preempts a thread that wakes up, so a connection's
/// wake-up on the data plane does not wait behind a snapshot build. A lower priority (nice)
/// was tried: +10 starved the feed (a burst's changes were applied only after the burst) and
/// +5 still put event -> enforced p99 at 5 s. So was pacing the builds (waiting as long as the
/// last one took): less CPU for the feed, but every event waited for it.
fn run_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with this thread's id and a valid parameter only changes
    // this thread's scheduling policy.
    let rc = unsafe { libc::sched_setscheduler(libc::gettid(), libc::SCHED_BATCH, &param) };
    if rc != 0 {
        warn!(
            "the feed thread keeps the data plane's scheduling: sched_setscheduler: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feed on its thread, pointed at an API server at `server` (none need listen).
    async fn feed_at(dir: &std::path::Path, server: &str) -> Feed {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
                 http://{server}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  \
                 context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
            ),
        )
        .unwrap();
        start_on_thread(FeedSettings {
            kubeconfig: Some(kubeconfig),
            root_namespace: "istio-system".into(),
            membership: membership::Settings::default(),
            discovery_interval: Duration::from_secs(60),
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn dropping_the_feed_ends_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens there: the watchers keep retrying until stopped.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let feed = feed_at(dir.path(), &addr.to_string()).await;
        let alive = feed.thread_alive();
        assert_eq!(alive, Some(true));
        let rx = feed.subscribe();
        drop(feed);
        // The builder (on the thread) is gone with its runtime: its sender is dropped.
        assert!(rx.has_changed().is_err(), "the feed's tasks outlived the Feed");
    }

    /// The scheduling policy of this process's thread named `name`, from /proc.
    fn policy_of(name: &str) -> Option<i32> {
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // After the command's closing parenthesis: state is field 3, policy field 41.
                let rest = &stat[stat.rfind(')')? + 2..];
                return rest.split_whitespace().nth(38)?.parse().ok();
            }
        }
        None
    }

    #[tokio::test]
    async fn the_feed_thread_never_preempts_the_data_plane() {
        let dir = tempfile::tempdir().unwrap();
        let feed = feed_at(dir.path(), "127.0.0.1:9").await;
        assert_eq!(policy_of("kube-feed"), Some(libc::SCHED_BATCH));
        // The caller's thread (the data plane) keeps its own.
        // SAFETY: asks the calling thread's policy.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        assert_eq!(feed.thread_alive(), Some(true));
    }

    #[tokio::test]
    async fn a_bad_kubeconfig_is_an_error_and_no_thread_stays() {
        let err = start_on_thread(FeedSettings {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            root_namespace: "istio-system".into(),
            membership: membership::Settings::default(),
            discovery_interval: Duration::from_secs(60),
        })
        .await
        .err()
        .map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("/nonexistent/kubeconfig")), "{err:?}");
    }
}
