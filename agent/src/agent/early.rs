//! Kubernetes mode, before and beside a pod's full enrollment: pods known from their binding
//! to this node are held closed at their cgroup as soon as it appears (`connect()` from it is
//! refused while its namespace is not enrolled), enrolled before their IP reaches the API
//! (outbound capture, certificate and outbound listeners: an init container's first
//! connection is carried), and re-enrolled when their sandbox is recreated.
//!
//! The hold stays for as long as the pod is bound here: the programs look at it only for
//! namespaces that are not enrolled, so an enrolled pod pays nothing, while a process of the
//! pod in another namespace (a recreated sandbox before its re-enrollment, Docker-in-Docker)
//! is refused rather than let out uncaptured.
//!
//! Inbound is closed the same way: until a held pod is enrolled, the namespaces of its
//! processes get its inbound program with no rules (nothing from outside the pod gets in).
//! Holds and closures start before the first full sync, from the bound pods the feed
//! publishes while the snapshot is held back; enrollment waits for that sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use tracing::{debug, info, warn};

use super::{Agent, Source, Tasks};
use crate::{
    identity::SpiffeId,
    inpod::{PodNetns, Registration},
    kubernetes::{
        self,
        binding::{self, BoundPod},
        netns::open_netns_id,
        sandbox,
    },
};

/// How often the cgroups of bound pods not held yet are looked for: the kubelet creates the
/// pod's cgroup before its sandbox and init containers, so the hold must come at once.
pub(super) const HOLD_POLL: Duration = Duration::from_millis(10);
/// Polls between attempts to enroll held pods early (their sandbox may not exist yet).
const EARLY_EVERY: u32 = 5;
/// Failed early attempts made at the polling pace before backing off.
const EARLY_FAST_TRIES: u32 = 100;
/// The longest wait between early attempts for one pod.
const EARLY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most network namespaces of one held pod closed to inbound traffic (its sandbox's, plus
/// those of Docker-in-Docker or a sandboxing browser): bounded work per tenant.
const MAX_CLOSED_PER_POD: usize = 16;
/// Closing rounds between looks for closed namespaces that are gone.
const DEAD_EVERY: u32 = 20;

/// A pod enrolled before its IP is known: outbound capture and listeners.
pub(super) struct EarlyPod {
    pub uid: String,
    pub netns: PodNetns,
    _tasks: Tasks,
    _netns_entry: Registration,
}

/// What the agent knows of the pods bound to its node.
#[derive(Default)]
pub(super) struct Bound {
    /// The local pods to enroll, by uid, from the last snapshot.
    pods: BTreeMap<String, BoundPod>,
    /// Pod cgroups held closed: uid -> cgroup id (its directory's inode).
    held: BTreeMap<String, u64>,
    /// Pods enrolled before their IP, by key.
    pub early: BTreeMap<String, EarlyPod>,
    /// Per held uid not enrolled yet: the namespaces of its processes closed to inbound
    /// traffic (an inbound program with no rules), netns id -> cookie. Until the pod is
    /// enrolled its app is not reachable in plaintext from the network; an enrollment in
    /// one of them takes it over, the others go with the pod.
    closed: BTreeMap<String, BTreeMap<(u64, u64), u64>>,
    /// Whether a full snapshot was taken: before that, pods are held and closed, never
    /// enrolled (the policies are not known).
    synced: bool,
    /// Uids found to run in their own kernel: never held nor enrolled.
    own_kernel: BTreeSet<String>,
    /// The kubelet's top cgroup directories, looked up again on every retry.
    tops: Vec<PathBuf>,
    /// The last reason logged per uid for a failed early enrollment.
    logged: BTreeMap<String, String>,
    /// Per uid: failed early attempts so far and when the next is due (a pod whose sandbox
    /// is slow to come is looked at less and less often, up to every [`EARLY_BACKOFF_MAX`]).
    backoff: BTreeMap<String, (u32, std::time::Instant)>,
    polls: u32,
}

impl Bound {
    /// The uid of the pod bound to this node with `key` (`name.namespace`), IP or not.
    pub fn uid_of(&self, key: &str) -> Option<&str> {
        self.pods.values().find(|p| p.key() == key).map(|p| p.uid.as_str())
    }

    /// The runtime class of the pod with `uid`, when it gives the pod its own kernel.
    pub fn own_kernel_runtime(&self, uid: &str) -> Option<&str> {
        let rc = self.pods.get(uid)?.runtime_class.as_deref()?;
        sandbox::own_kernel_runtime(rc).then_some(rc)
    }
}

impl Agent {
    fn pod_cgroups(&self) -> Option<kubernetes::PodCgroups> {
        match &self.cfg.source {
            Source::Kubernetes(k) => Some(k.cgroups.clone()),
            Source::Files { .. } => None,
        }
    }

    /// Takes the bound pods of a snapshot: holds and early-enrolls new ones, releases those
    /// that are gone. The first snapshot also lifts the holds a previous instance left for
    /// pods that are gone.
    pub(super) fn take_bound(&mut self, s: &kubernetes::Snapshot, first: bool) {
        self.bound.synced = true;
        self.take_bound_pods(&s.bound, first);
    }

    /// Before the first full sync (a policy kind that cannot be read holds it back): the
    /// bound pods from the pods and namespaces watches alone, held and closed, not enrolled.
    pub(super) fn take_bound_before_sync(&mut self, bound: &[BoundPod]) {
        if !self.bound.synced {
            self.take_bound_pods(bound, false);
        }
    }

    fn take_bound_pods(&mut self, bound: &[BoundPod], first: bool) {
        let Some(cgroups) = self.pod_cgroups() else { return };
        let node = self.cfg.node.clone();
        let pods: BTreeMap<String, BoundPod> = binding::local_pods_to_enroll(bound, &node)
            .map(|p| (p.uid.clone(), p.clone()))
            .collect();
        for (uid, p) in &pods {
            if let Some(rc) =
                p.runtime_class.as_deref().filter(|rc| sandbox::own_kernel_runtime(rc))
            {
                if self.bound.own_kernel.insert(uid.clone()) {
                    warn!(pod = %p.key(), runtime_class = rc, "not capturable: the runtime class gives the pod its own kernel; never held nor enrolled");
                }
            }
        }
        for (uid, p) in &pods {
            if !self.bound.pods.contains_key(uid) && !self.bound.own_kernel.contains(uid) {
                info!(pod = %p.key(), uid, "pod bound to this node: held closed from its cgroup's creation until enrolled");
            }
        }
        self.bound.pods = pods;
        // Looked up again on every retry (`check_sandboxes`); here only until found.
        if self.bound.tops.is_empty() {
            self.bound.tops = cgroups.top_dirs();
        }
        let gone: Vec<String> = self
            .bound
            .early
            .iter()
            .filter(|(_, e)| !self.bound.pods.contains_key(&e.uid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.release_early(&key, "the pod is gone");
        }
        let gone: Vec<(String, u64)> = self
            .bound
            .held
            .iter()
            .filter(|(uid, _)| !self.bound.pods.contains_key(*uid))
            .map(|(u, c)| (u.clone(), *c))
            .collect();
        let gone_closed: Vec<String> = self
            .bound
            .closed
            .keys()
            .filter(|uid| !self.bound.pods.contains_key(*uid))
            .cloned()
            .collect();
        let ours: BTreeSet<u64> = self.enrolled_cookies().into_iter().collect();
        for uid in gone_closed {
            for cookie in self.bound.closed.remove(&uid).unwrap_or_default().into_values() {
                if !ours.contains(&cookie) {
                    self.release_cookie(cookie);
                    info!(uid, cookie, "reopened a namespace closed for a pod that is gone");
                }
            }
        }
        for (uid, cgroup) in gone {
            self.bound.held.remove(&uid);
            self.bound.logged.remove(&uid);
            if let Err(e) = self.capture.unhold(cgroup) {
                warn!(uid, cgroup, "lifting a hold: {e}");
            }
        }
        let live = &self.bound.pods;
        self.bound.own_kernel.retain(|u| live.contains_key(u));
        self.bound.backoff.retain(|u, _| live.contains_key(u));
        self.bound.logged.retain(|u, _| live.contains_key(u));
        self.poll_holds(true);
        if first {
            let ours: BTreeSet<u64> = self.bound.held.values().copied().collect();
            for cgroup in self.capture.held_cgroups() {
                if !ours.contains(&cgroup) {
                    info!(cgroup, "lifting a hold a previous instance left for a pod that is gone");
                    if let Err(e) = self.capture.unhold(cgroup) {
                        warn!(cgroup, "lifting a hold: {e}");
                    }
                }
            }
        }
    }

    /// Holds the cgroups of bound pods that appeared since the last poll, and now and then
    /// (or at once, `enroll_now`) tries to enroll held pods that are not enrolled yet.
    pub(super) fn poll_holds(&mut self, enroll_now: bool) {
        let Some(cgroups) = self.pod_cgroups() else { return };
        let mut new = false;
        let waiting: Vec<(String, String)> = self
            .bound
            .pods
            .values()
            .filter(|p| !self.bound.held.contains_key(&p.uid))
            .filter(|p| !self.bound.own_kernel.contains(&p.uid))
            .map(|p| (p.uid.clone(), p.key()))
            .collect();
        for (uid, key) in waiting {
            let Ok(dir) = cgroups.pod_dir_in(&uid, &self.bound.tops) else { continue };
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            // A cgroup v2 id is its directory's inode.
            let id = meta.ino();
            match self.capture.hold(id) {
                Ok(()) => {
                    info!(pod = %key, cgroup = %dir.display(), id, "pod cgroup held closed until the pod is enrolled");
                    self.bound.held.insert(uid, id);
                    new = true;
                }
                Err(e) => warn!(pod = %key, "holding the pod's cgroup: {e}"),
            }
        }
        self.bound.polls = self.bound.polls.wrapping_add(1);
        if new || enroll_now || self.bound.polls.is_multiple_of(EARLY_EVERY) {
            // Before the first full sync nothing is enrolled (the policies are not known).
            if self.bound.synced {
                self.enroll_early();
            }
            self.close_inbound();
        }
    }

    /// Closes to inbound traffic the namespaces of held pods that are not enrolled: an
    /// inbound program with no rules refuses every connection from outside the pod, so a
    /// pod whose sandbox cannot be told yet (no single pause process, no IP), or whose
    /// sandbox was recreated, is not reachable in plaintext meanwhile.
    fn close_inbound(&mut self) {
        let Some(cgroups) = self.pod_cgroups() else { return };
        let ours: BTreeSet<u64> = self.enrolled_cookies().into_iter().collect();
        let linked: BTreeSet<u64> = self.capture.inbound_link_cookies().into_iter().collect();
        let mut changed = false;
        // Detached since (released by an enrollment of the same namespace, which took it
        // over): forgotten here, so a namespace still in use is closed again below. One
        // enrolled (by this pod or another) stays known, so it is not opened again.
        for closed in self.bound.closed.values_mut() {
            let before = closed.len();
            closed.retain(|_, c| linked.contains(c));
            changed |= closed.len() != before;
        }
        // Namespaces gone with their processes: looked for about once a second (each look
        // reads the pinned links).
        let look = self.bound.polls.is_multiple_of(EARLY_EVERY * DEAD_EVERY);
        let dead: Vec<(String, (u64, u64), u64)> = self
            .bound
            .closed
            .iter()
            .filter(|_| look)
            .flat_map(|(u, m)| m.iter().map(move |(id, c)| (u.clone(), *id, *c)))
            .filter(|(_, _, c)| self.capture.netns_alive(*c) == Some(false))
            .collect();
        for (uid, id, cookie) in dead {
            self.capture.detach_inbound(cookie);
            if let Some(m) = self.bound.closed.get_mut(&uid) {
                m.remove(&id);
            }
            changed = true;
        }
        // Held pods not enrolled, at once; enrolled ones about once a second (a recreated
        // sandbox before `check_sandboxes` releases the old one, Docker-in-Docker), their
        // enrolled namespace left out.
        let todo: Vec<(BoundPod, Option<(u64, u64)>)> = self
            .bound
            .pods
            .values()
            .filter(|p| self.bound.held.contains_key(&p.uid))
            .filter(|p| !self.bound.own_kernel.contains(&p.uid))
            .filter_map(|p| {
                let key = p.key();
                let enrolled = self
                    .pods
                    .get(&key)
                    .map(|e| &e.netns)
                    .or_else(|| self.bound.early.get(&key).map(|e| &e.netns));
                match enrolled {
                    None => Some((p.clone(), None)),
                    Some(ns) if look => Some((p.clone(), Some(open_netns_id(ns)?))),
                    Some(_) => None,
                }
            })
            .collect();
        for (p, enrolled_in) in todo {
            let closed = self.bound.closed.get(&p.uid).cloned().unwrap_or_default();
            let room = MAX_CLOSED_PER_POD.saturating_sub(closed.len());
            if room == 0 {
                continue;
            }
            let mut skip: BTreeSet<(u64, u64)> = closed.keys().copied().collect();
            skip.extend(enrolled_in);
            let found = match cgroups.open_namespaces(&p.uid, &skip, room) {
                Ok(f) => f,
                Err(e) => {
                    debug!(pod = %p.key(), "looking for the held pod's namespaces: {e}");
                    continue;
                }
            };
            for (chosen, netns) in found {
                let cookie = netns.cookie();
                // Enrolled (or held in) already by this instance: closed by its enrollment.
                if !ours.contains(&cookie) {
                    if let Err(e) = self.capture.attach_inbound(&netns) {
                        warn!(pod = %p.key(), cookie, "closing a held pod's namespace to inbound traffic: {e}");
                        continue;
                    }
                    info!(pod = %p.key(), pid = chosen.pid, cookie, "held pod's namespace closed to inbound traffic until the pod is enrolled");
                }
                self.bound.closed.entry(p.uid.clone()).or_default().insert(chosen.netns, cookie);
                changed = true;
            }
        }
        if changed {
            self.save_owners();
        }
    }

    /// The cookies of the namespaces closed for held pods, with the pod each is for.
    pub(super) fn closed_owners(&self) -> Vec<(u64, crate::owners::Owner)> {
        let mut v = Vec::new();
        for (uid, m) in &self.bound.closed {
            let Some(p) = self.bound.pods.get(uid) else { continue };
            for c in m.values() {
                v.push((*c, crate::owners::Owner { pod: p.key(), uid: Some(uid.clone()) }));
            }
        }
        v
    }

    /// Cookies of the namespaces closed for held pods.
    pub(super) fn closed_cookies(&self) -> Vec<u64> {
        self.bound.closed.values().flat_map(|m| m.values().copied()).collect()
    }

    /// Whether the first full snapshot was taken (always, outside Kubernetes mode).
    pub(super) fn bound_synced(&self) -> bool {
        self.bound.synced || self.pod_cgroups().is_none()
    }

    /// Enrolls the held pods that are neither enrolled nor workloads yet (no IP in the API).
    fn enroll_early(&mut self) {
        let Some(cgroups) = self.pod_cgroups() else { return };
        let ws = self.workloads_tx.borrow().clone();
        let node = self.cfg.node.clone();
        let workloads: BTreeSet<String> = ws.on_node(&node).map(|w| w.key()).collect();
        let now = std::time::Instant::now();
        let todo: Vec<BoundPod> = self
            .bound
            .pods
            .values()
            .filter(|p| self.bound.held.contains_key(&p.uid))
            .filter(|p| !self.bound.own_kernel.contains(&p.uid))
            .filter(|p| self.bound.backoff.get(&p.uid).is_none_or(|(_, due)| *due <= now))
            .filter(|p| {
                let key = p.key();
                !workloads.contains(&key)
                    && !self.pods.contains_key(&key)
                    && !self.bound.early.contains_key(&key)
            })
            .cloned()
            .collect();
        for p in todo {
            let key = p.key();
            match self.enroll_early_pod(&cgroups, &p) {
                Ok(early) => {
                    info!(pod = %key, cookie = early.netns.cookie(), "enrolled before its IP is known: outbound captured, inbound tunnel once the IP arrives");
                    self.bound.logged.remove(&p.uid);
                    self.bound.backoff.remove(&p.uid);
                    self.bound.early.insert(key, early);
                }
                Err(e) => {
                    let tries = self.bound.backoff.get(&p.uid).map_or(0, |(n, _)| *n) + 1;
                    let wait =
                        if tries < EARLY_FAST_TRIES { Duration::ZERO } else { EARLY_BACKOFF_MAX };
                    self.bound.backoff.insert(p.uid.clone(), (tries, now + wait));
                    let reason = crate::error_text(&e);
                    // A VMM or runsc process in the pod is reported, but only the pod's
                    // runtimeClassName (the operator's, not the tenant's choice) lifts the hold:
                    // a tenant renaming a process must not take its pod out of the mesh.
                    if self.bound.logged.get(&p.uid) != Some(&reason) {
                        info!(pod = %key, "not enrolled yet (held closed): {reason}");
                        self.bound.logged.insert(p.uid.clone(), reason);
                    } else {
                        debug!(pod = %key, "not enrolled yet: {reason}");
                    }
                }
            }
        }
    }

    /// Capture, certificate and outbound listeners of a pod without an IP. Undone on failure
    /// (its hold keeps it closed).
    fn enroll_early_pod(
        &mut self,
        cgroups: &kubernetes::PodCgroups,
        p: &BoundPod,
    ) -> anyhow::Result<EarlyPod> {
        let netns = cgroups.open_sandbox(&p.uid, &p.ips)?;
        let cookie = netns.cookie();
        let key = p.key();
        let result = (|| -> anyhow::Result<Tasks> {
            // No rules yet: every connection into the pod from outside is refused.
            self.capture.attach_inbound(&netns)?;
            // As in a full enrollment: whether the agent turns tcp_migrate_req on is recorded
            // with the pod's entry, so `mtls-agent uninstall` turns it off again.
            let migration = netns.listener_migration();
            let flags = match migration {
                Ok(false) => crate::capture::POD_SET_MIGRATE_REQ,
                _ => 0,
            };
            self.capture.enroll_with_flags(cookie, flags)?;
            let enabled = match migration {
                Ok(false) => netns.enable_listener_migration(),
                other => other.map(|_| ()),
            };
            if let Err(e) = enabled {
                debug!(pod = %key, "tcp_migrate_req unavailable: {e}");
            }
            let id = SpiffeId::new(&self.cfg.trust_domain, &p.namespace, &p.service_account)?;
            self.want_certificate(&key, &id)?;
            let mut tasks = Tasks::default();
            self.start_outbound(&key, &netns, &mut tasks)?;
            Ok(tasks)
        })();
        match result {
            Ok(tasks) => {
                let _netns_entry = self.mesh.netns.register(key, &netns);
                Ok(EarlyPod { uid: p.uid.clone(), netns, _tasks: tasks, _netns_entry })
            }
            // Whatever is in place stays (its inbound program refuses everything, capture
            // refuses its connect()s: closed, never open), and so does what a previous instance
            // pinned for this namespace: kept for the pod until it is enrolled or gone.
            Err(e) => {
                let owner = crate::owners::Owner { pod: key, uid: Some(p.uid.clone()) };
                self.kept.insert(cookie, Some(owner));
                Err(e)
            }
        }
    }

    fn release_early(&mut self, key: &str, why: &str) {
        if let Some(e) = self.bound.early.remove(key) {
            let cookie = e.netns.cookie();
            drop(e);
            self.release_cookie(cookie);
            if !self.pods.contains_key(key) {
                self.mesh.certs.remove(key);
            }
            info!(pod = %key, cookie, "released ({why})");
        }
    }

    /// The network namespace of a Kubernetes pod being enrolled: not for a pod whose runtime
    /// gives it its own kernel; the one it was enrolled in early if that holds its IPs, else
    /// its sandbox's.
    pub(super) fn kube_netns(
        &mut self,
        uid: &str,
        ips: &[std::net::IpAddr],
        early: Option<&PodNetns>,
    ) -> anyhow::Result<PodNetns> {
        let cgroups = self.pod_cgroups().context("not in Kubernetes mode")?;
        if let Some(rc) = self.bound.own_kernel_runtime(uid) {
            anyhow::bail!(
                "not capturable: runtimeClassName {rc:?} runs the pod in its own kernel \
                 (Kata, gVisor, Firecracker): its traffic never passes this node's kernel \
                 sockets, so it is not in the mesh"
            );
        }
        if let Some(ns) = early {
            let held = ns.run(|| Ok(sandbox::addresses(Path::new("/proc/thread-self/net"))));
            if held.is_ok_and(|a| ips.iter().all(|ip| a.contains(ip))) {
                return Ok(ns.clone());
            }
            warn!(uid, "the namespace enrolled before the IP was known does not hold the pod's IPs: looking again");
        }
        match cgroups.open_sandbox(uid, ips) {
            Ok(ns) => Ok(ns),
            // Processes that look like a VMM or runsc fail enrollment (reported as not
            // capturable) and leave the pod held closed: a process name is the tenant's to
            // choose, so only the runtimeClassName (above) takes a pod out.
            Err(e) => Err(e.into()),
        }
    }

    /// Releases the namespace of pods whose sandbox was recreated (same pod, a new namespace):
    /// they are enrolled again in the new one by the next reconcile or early enrollment.
    pub(super) fn check_sandboxes(&mut self) {
        let Some(cgroups) = self.pod_cgroups() else { return };
        self.bound.tops = cgroups.top_dirs();
        let mut recreated = Vec::new();
        for (key, p) in &self.pods {
            let (Some(uid), None) = (&p.workload.uid, &p.workload.netns) else { continue };
            if let Ok(chosen) = cgroups.sandbox(uid, &p.workload.ips) {
                if open_netns_id(&p.netns).is_some_and(|id| id != chosen.netns) {
                    recreated.push((key.clone(), false));
                }
            }
        }
        for (key, e) in &self.bound.early {
            let ips = self.bound.pods.get(&e.uid).map(|p| p.ips.clone()).unwrap_or_default();
            if let Ok(chosen) = cgroups.sandbox(&e.uid, &ips) {
                if open_netns_id(&e.netns).is_some_and(|id| id != chosen.netns) {
                    recreated.push((key.clone(), true));
                }
            }
        }
        for (key, early) in recreated {
            if early {
                self.release_early(&key, "its sandbox was recreated: a new network namespace");
            } else if let Some(pod) = self.pods.remove(&key) {
                let cookie = pod.netns.cookie();
                drop(pod);
                self.release_cookie(cookie);
                info!(pod = %key, cookie, "sandbox recreated: released its old network namespace; enrolling the new one");
            }
        }
    }

    /// Cookies of the pods enrolled early (kept by a reconcile at start).
    pub(super) fn early_cookies(&self) -> Vec<u64> {
        self.bound.early.values().map(|e| e.netns.cookie()).collect()
    }
}
