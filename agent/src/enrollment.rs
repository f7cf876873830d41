//! Pods of the node whose enrollment failed. Such a pod is kept closed (its inbound program
//! refuses plaintext, its outbound is captured), retried every couple of seconds, and reported:
//! `/config_dump`, `/check`, metrics, and a warning when the reason is new.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

use serde::Serialize;

/// The step of enrollment that failed (also the `reason` label of the failure counter, so the
/// label set stays small).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Opening the pod's network namespace: there is nothing to protect yet.
    Netns,
    /// Attaching the pod's inbound program.
    InboundProgram,
    /// Writing the pod's inbound rules.
    InboundRules,
    /// Capturing the pod's outbound connections.
    Capture,
    /// Issuing the pod's certificate.
    Certificate,
    /// Opening the agent's listeners in the pod.
    Listeners,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Netns => "netns",
            Step::InboundProgram => "inbound_program",
            Step::InboundRules => "inbound_rules",
            Step::Capture => "capture",
            Step::Certificate => "certificate",
            Step::Listeners => "listeners",
        }
    }
}

/// One pod that is not enrolled.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub pod: String,
    pub step: Step,
    pub reason: String,
    /// When the current run of failures began (RFC 3339).
    pub since: String,
    pub attempts: u64,
    /// Whether the pod is held closed (its inbound program and capture are in place), or
    /// there is nothing to hold (its network namespace could not be opened).
    pub fails_closed: bool,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<String, Failure>,
    /// Failed attempts per step, since the agent started.
    counts: BTreeMap<Step, u64>,
}

/// Shared between the agent's loop and the admin API.
#[derive(Clone, Default)]
pub struct Failures(Arc<Mutex<Inner>>);

impl Failures {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a failed attempt. Returns whether it is news worth a warning: the pod's first
    /// failure, or a different step or reason than the last one.
    pub fn record(&self, pod: &str, step: Step, reason: String, fails_closed: bool) -> bool {
        let mut inner = self.lock();
        *inner.counts.entry(step).or_default() += 1;
        match inner.pods.get_mut(pod) {
            Some(f) => {
                f.attempts += 1;
                f.fails_closed = fails_closed;
                let news = f.step != step || f.reason != reason;
                f.step = step;
                f.reason = reason;
                news
            }
            None => {
                let since = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
                let f =
                    Failure { pod: pod.to_owned(), step, reason, since, attempts: 1, fails_closed };
                inner.pods.insert(pod.to_owned(), f);
                true
            }
        }
    }

    /// The pod enrolled, or left the node: no longer failing. Returns its last failure.
    pub fn clear(&self, pod: &str) -> Option<Failure> {
        self.lock().pods.remove(pod)
    }

    /// Forgets every pod for which `keep` is false.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        self.lock().pods.retain(|k, _| keep(k));
    }

    pub fn get(&self, pod: &str) -> Option<Failure> {
        self.lock().pods.get(pod).cloned()
    }

    pub fn list(&self) -> Vec<Failure> {
        self.lock().pods.values().cloned().collect()
    }

    /// Failed attempts per step since start.
    pub fn counts(&self) -> Vec<(Step, u64)> {
        self.lock().counts.iter().map(|(s, n)| (*s, *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_news_once_then_when_its_reason_changes() {
        let f = Failures::default();
        assert!(f.record("a.ns", Step::Listeners, "in use".into(), true));
        assert!(!f.record("a.ns", Step::Listeners, "in use".into(), true));
        assert!(f.record("a.ns", Step::Listeners, "no memory".into(), true));
        assert!(f.record("a.ns", Step::Netns, "no memory".into(), false));
        let got = f.get("a.ns").unwrap();
        assert_eq!((got.attempts, got.step, got.fails_closed), (4, Step::Netns, false));
        assert_eq!(f.counts(), vec![(Step::Netns, 1), (Step::Listeners, 3)]);
        assert!(f.clear("a.ns").is_some());
        assert!(f.list().is_empty());
        // Counts stay: they are the metric's counter.
        assert_eq!(f.counts().len(), 2);
    }
}
