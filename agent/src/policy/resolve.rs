//! Decisions: which policy applies to a port of a workload, and why the
//! others did not.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{
    Decision, Ignored, LegacyPolicy, Level, Meta, Mode, PeerAuth, PolicyRef, PolicySet, PortSel,
    Warning, WorkloadReport,
};
use crate::workloads::{Service, ServicePort, Workload, WorkloadSet};

/// A policy of the set: index into `peer` or `legacy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Pid {
    Peer(usize),
    Legacy(usize),
}

/// The outcome for one port (or for the default).
pub(super) struct Slot {
    pub(super) decision: Decision,
    pub(super) decider: Option<Pid>,
    /// Policies considered here that lost to another, and why.
    pub(super) notes: Vec<(Pid, String)>,
    /// PeerAuthentications considered here whose mode is UNSET, and what that means: they
    /// do not lose, they defer.
    pub(super) unset: Vec<(Pid, String)>,
    /// The v1alpha1 policy that would decide here if no PeerAuthentication did.
    pub(super) overridden_legacy: Option<usize>,
}

/// Why `loser` does not count at `level`: `winner` is older (or sorts first).
pub(super) fn lost_to(winner: &Meta, loser: &Meta, level: &str) -> String {
    let w = &winner.r;
    match (&winner.created, &loser.created) {
        (Some(wc), Some(lc)) if (wc.secs, wc.nanos) == (lc.secs, lc.nanos) => format!(
            "policy {w} wins at {level} level (same creationTimestamp {}, and {} sorts first by name)",
            wc.text, w.name
        ),
        (Some(wc), Some(_)) => {
            format!("older policy {w} (created {}) wins at {level} level", wc.text)
        }
        (Some(wc), None) => format!(
            "older policy {w} (created {}) wins at {level} level; this one has no creationTimestamp",
            wc.text
        ),
        (None, _) => format!(
            "policy {w} wins at {level} level (neither has a creationTimestamp, and {} sorts first by name)",
            w.name
        ),
    }
}

/// Picks the oldest of `candidates`; the others with why they lost.
fn pick(mut candidates: Vec<(usize, &Meta)>, level: &str) -> (Option<usize>, Vec<(usize, String)>) {
    candidates.sort_by(|a, b| a.1.age_key().cmp(&b.1.age_key()));
    let mut it = candidates.into_iter();
    let Some((winner, winner_meta)) = it.next() else {
        return (None, Vec::new());
    };
    (Some(winner), it.map(|(i, m)| (i, lost_to(winner_meta, m, level))).collect())
}

fn selects(sel: &PortSel, sp: &ServicePort) -> bool {
    match sel {
        PortSel::Number(n) => sp.port == *n,
        PortSel::Name(name) => sp.name.as_deref() == Some(name.as_str()),
    }
}

/// `port 80 (http)` of a service.
fn service_port_text(sp: &ServicePort) -> String {
    match &sp.name {
        Some(name) => format!("port {} ({name})", sp.port),
        None => format!("port {}", sp.port),
    }
}

/// How a v1alpha1 policy matched a port.
#[derive(Clone, Copy)]
struct Cand<'a> {
    idx: usize,
    /// For service and service-port matches.
    service: Option<(&'a Service, &'a ServicePort)>,
}

/// Everything about one workload that does not depend on the port.
pub(super) struct Resolver<'a> {
    set: &'a PolicySet,
    w: &'a Workload,
    /// Services selecting the workload.
    services: Vec<&'a Service>,
    pa_mesh: Option<usize>,
    pa_ns: Option<usize>,
    pa_wl: Option<usize>,
    legacy_mesh: Option<usize>,
    legacy_ns: Option<usize>,
    /// Losers of the port-independent levels, and root-namespace selectors.
    fixed_notes: Vec<(Pid, String)>,
}

impl<'a> Resolver<'a> {
    pub(super) fn new(set: &'a PolicySet, ws: &'a WorkloadSet, w: &'a Workload) -> Self {
        let root = set.root.as_str();
        let mut fixed_notes = Vec::new();
        let (mut mesh, mut ns, mut wl) = (Vec::new(), Vec::new(), Vec::new());
        for (i, p) in set.peer.iter().enumerate() {
            let pns = p.namespace();
            if pns == root {
                if p.selector.is_empty() {
                    mesh.push((i, &p.meta));
                } else if p.selects(w) {
                    fixed_notes.push((
                        Pid::Peer(i),
                        format!("selector in the root namespace {root} is ignored"),
                    ));
                }
            } else if pns == w.namespace {
                if p.selector.is_empty() {
                    ns.push((i, &p.meta));
                } else if p.selects(w) {
                    wl.push((i, &p.meta));
                }
            }
        }
        let mut level = |cands, word| {
            let (winner, losers) = pick(cands, word);
            fixed_notes.extend(losers.into_iter().map(|(i, why)| (Pid::Peer(i), why)));
            winner
        };
        let pa_mesh = level(mesh, "mesh");
        let pa_ns = level(ns, "namespace");
        let pa_wl = level(wl, "workload");

        let (mut lmesh, mut lns) = (Vec::new(), Vec::new());
        for (i, p) in set.legacy.iter().enumerate() {
            if p.is_mesh() {
                lmesh.push((i, &p.meta));
            } else if p.targets.is_empty() && p.meta.r.namespace.as_deref() == Some(&w.namespace) {
                lns.push((i, &p.meta));
            }
        }
        let mut level = |cands, word| {
            let (winner, losers) = pick(cands, word);
            fixed_notes.extend(losers.into_iter().map(|(i, why)| (Pid::Legacy(i), why)));
            winner
        };
        let legacy_mesh = level(lmesh, "mesh");
        let legacy_ns = level(lns, "namespace");

        Resolver {
            set,
            w,
            services: ws.services_for(w).collect(),
            pa_mesh,
            pa_ns,
            pa_wl,
            legacy_mesh,
            legacy_ns,
            fixed_notes,
        }
    }

    fn peer(&self, i: usize) -> Option<&'a PeerAuth> {
        self.set.peer.get(i)
    }

    fn legacy(&self, i: usize) -> Option<&'a LegacyPolicy> {
        self.set.legacy.get(i)
    }

    fn policy_ref(&self, pid: Pid) -> Option<&'a PolicyRef> {
        match pid {
            Pid::Peer(i) => self.peer(i).map(|p| &p.meta.r),
            Pid::Legacy(i) => self.legacy(i).map(|p| &p.meta.r),
        }
    }

    /// v1alpha1 policies of the workload's namespace with targets.
    fn targeted(&self) -> impl Iterator<Item = (usize, &'a LegacyPolicy)> + '_ {
        let ns = self.w.namespace.as_str();
        self.set.legacy.iter().enumerate().filter(move |(_, p)| {
            !p.targets.is_empty() && p.meta.r.namespace.as_deref() == Some(ns)
        })
    }

    /// Every port some policy names for this workload, ascending.
    pub(super) fn ports(&self) -> Vec<u16> {
        let mut ports = BTreeSet::new();
        let root = self.set.root.as_str();
        for p in &self.set.peer {
            let pns = p.namespace();
            if pns != root && pns == self.w.namespace && !p.selector.is_empty() && p.selects(self.w)
            {
                ports.extend(p.ports.keys().copied());
            }
        }
        for (_, p) in self.targeted() {
            for t in &p.targets {
                for s in self.services.iter().filter(|s| s.name == t.service) {
                    for sp in &s.ports {
                        if t.ports.is_empty() || t.ports.iter().any(|sel| selects(sel, sp)) {
                            ports.insert(sp.target_port);
                        }
                    }
                }
            }
        }
        ports.into_iter().collect()
    }

    /// v1alpha1 matches for a workload port: (service+port, service).
    fn legacy_port_candidates(&self, port: u16) -> (Vec<Cand<'a>>, Vec<Cand<'a>>) {
        let (mut by_port, mut by_service) = (Vec::new(), Vec::new());
        for (idx, p) in self.targeted() {
            let (mut port_match, mut service_match) = (None, None);
            for t in &p.targets {
                for &s in self.services.iter().filter(|s| s.name == t.service) {
                    for sp in s.ports.iter().filter(|sp| sp.target_port == port) {
                        if t.ports.is_empty() {
                            service_match.get_or_insert(Cand { idx, service: Some((s, sp)) });
                        } else if t.ports.iter().any(|sel| selects(sel, sp)) {
                            port_match.get_or_insert(Cand { idx, service: Some((s, sp)) });
                        }
                    }
                }
            }
            if let Some(c) = port_match {
                by_port.push(c);
            } else if let Some(c) = service_match {
                by_service.push(c);
            }
        }
        (by_port, by_service)
    }

    /// `namespace-wide PeerAuthentication ns/name`, `port 8080 of PeerAuthentication ns/name`.
    fn describe_peer(&self, i: usize, level: Level, port: Option<u16>) -> String {
        let r = self.peer(i).map(|p| p.meta.r.to_string()).unwrap_or_default();
        match (level, port) {
            (Level::Mesh, _) => format!("mesh-wide PeerAuthentication {r}"),
            (Level::Namespace, _) => format!("namespace-wide PeerAuthentication {r}"),
            (Level::WorkloadPort, Some(port)) => format!("port {port} of PeerAuthentication {r}"),
            _ => format!("workload PeerAuthentication {r}"),
        }
    }

    fn describe_legacy(&self, c: &Cand<'_>, level: Level) -> String {
        let r = self.legacy(c.idx).map(|p| p.meta.r.to_string()).unwrap_or_default();
        match (level, c.service) {
            (Level::Mesh, _) => format!("MeshPolicy {r}"),
            (Level::ServicePort, Some((s, sp))) => format!(
                "Policy {r} targeting {} of service {}, i.e. pod port {}",
                service_port_text(sp),
                s.name,
                sp.target_port
            ),
            (Level::Service, Some((s, _))) => format!("Policy {r} targeting service {}", s.name),
            _ => format!("namespace-wide Policy {r}"),
        }
    }

    /// The decision for `port`, or for ports no policy names (`None`).
    pub(super) fn slot(&self, port: Option<u16>) -> Slot {
        let mut notes = self.fixed_notes.clone();

        // PeerAuthentication: mesh, then namespace, then workload; UNSET inherits.
        let levels = [
            (self.pa_mesh, Level::Mesh),
            (self.pa_ns, Level::Namespace),
            (self.pa_wl, Level::Workload),
        ];
        let mut pa: Option<(Mode, usize, Level)> = None;
        let mut inherited = Vec::new(); // UNSET policies below the decider
        let mut unset = Vec::new(); // every UNSET one, for "no policy" reasons
        for (idx, level) in levels {
            let Some((i, p)) = idx.and_then(|i| Some((i, self.peer(i)?))) else { continue };
            match p.mode {
                Some(mode) => {
                    pa = Some((mode, i, level));
                    inherited.clear();
                }
                None => {
                    let text = self.describe_peer(i, level, None);
                    if pa.is_some() {
                        inherited.push(text.clone());
                    }
                    unset.push(text);
                }
            }
        }
        if let (Some(port), Some(i)) = (port, self.pa_wl) {
            match self.peer(i).and_then(|p| p.ports.get(&port)) {
                Some(Some(mode)) => {
                    pa = Some((*mode, i, Level::WorkloadPort));
                    inherited.clear();
                }
                Some(None) => {
                    let text = self.describe_peer(i, Level::WorkloadPort, Some(port));
                    if pa.is_some() {
                        inherited.push(text.clone());
                    }
                    unset.push(text);
                }
                None => {}
            }
        }
        let pa_text = pa.map(|(_, i, level)| self.describe_peer(i, level, port));
        let mut unset_notes = Vec::new();
        for (idx, level) in levels {
            let Some((i, p)) = idx.and_then(|i| Some((i, self.peer(i)?))) else { continue };
            let (list, why) = match (p.mode, pa, &pa_text) {
                (_, Some((_, d, _)), _) if d == i => continue,
                (None, Some((_, _, dl)), Some(text)) if level > dl => {
                    (&mut unset_notes, format!("mtls mode UNSET: inherits from {text}"))
                }
                (None, Some(_), _) => (&mut unset_notes, "mtls mode UNSET".to_string()),
                (None, None, _) => (
                    &mut unset_notes,
                    "mtls mode UNSET, and no PeerAuthentication above it sets a mode".to_string(),
                ),
                (Some(_), _, Some(text)) => (&mut notes, format!("overridden by {text}")),
                (Some(_), _, None) => continue,
            };
            list.push((Pid::Peer(i), why));
        }

        // v1alpha1: service+port, service, namespace default, MeshPolicy.
        let mut buckets: Vec<(Level, Option<Cand<'a>>)> = Vec::new();
        if let Some(port) = port {
            let (by_port, by_service) = self.legacy_port_candidates(port);
            for (level, cands, word) in [
                (Level::ServicePort, by_port, "service port"),
                (Level::Service, by_service, "service"),
            ] {
                let metas =
                    cands.iter().filter_map(|c| Some((c.idx, &self.legacy(c.idx)?.meta))).collect();
                let (winner, losers) = pick(metas, word);
                notes.extend(losers.into_iter().map(|(i, why)| (Pid::Legacy(i), why)));
                buckets
                    .push((level, winner.and_then(|w| cands.iter().find(|c| c.idx == w).copied())));
            }
        }
        buckets.push((Level::Namespace, self.legacy_ns.map(|idx| Cand { idx, service: None })));
        buckets.push((Level::Mesh, self.legacy_mesh.map(|idx| Cand { idx, service: None })));
        let mut legacy: Option<(Cand<'a>, Level)> = None;
        let mut overridden_legacy = None;
        for (level, winner) in buckets {
            let Some(c) = winner else { continue };
            if let Some(text) = &pa_text {
                overridden_legacy.get_or_insert(c.idx);
                notes.push((
                    Pid::Legacy(c.idx),
                    format!("{text} applies, and PeerAuthentication takes precedence over v1alpha1 policies"),
                ));
            } else if let Some((d, dl)) = &legacy {
                notes.push((
                    Pid::Legacy(c.idx),
                    format!("overridden by {}", self.describe_legacy(d, *dl)),
                ));
            } else {
                legacy = Some((c, level));
            }
        }

        if let (Some((mode, i, level)), Some(text)) = (pa, &pa_text) {
            let mut reason = format!("{text} ({mode})");
            if !inherited.is_empty() {
                reason.push_str(&format!("; inherited through UNSET {}", inherited.join(", ")));
            }
            let decision = Decision {
                mode,
                decided_by: self.peer(i).map(|p| p.meta.r.clone()),
                level: Some(level),
                reason,
            };
            return Slot {
                decision,
                decider: Some(Pid::Peer(i)),
                notes,
                unset: unset_notes,
                overridden_legacy,
            };
        }
        if let Some((c, level, p)) = legacy.and_then(|(c, l)| Some((c, l, self.legacy(c.idx)?))) {
            let decision = Decision {
                mode: p.mode,
                decided_by: Some(p.meta.r.clone()),
                level: Some(level),
                reason: format!("{} ({})", self.describe_legacy(&c, level), p.mode_text()),
            };
            return Slot {
                decision,
                decider: Some(Pid::Legacy(c.idx)),
                notes,
                unset: unset_notes,
                overridden_legacy,
            };
        }
        Slot {
            decision: no_policy(&unset),
            decider: None,
            notes,
            unset: unset_notes,
            overridden_legacy,
        }
    }

    /// The full report for this workload.
    pub(super) fn report(&self) -> WorkloadReport {
        let default = self.slot(None);
        let ports: Vec<(u16, Slot)> =
            self.ports().into_iter().map(|p| (p, self.slot(Some(p)))).collect();
        let slots = || {
            std::iter::once(("default".to_string(), &default))
                .chain(ports.iter().map(|(p, s)| (format!("port {p}"), s)))
        };
        let decided: HashSet<Pid> = slots().filter_map(|(_, s)| s.decider).collect();
        let mut whys: BTreeMap<Pid, Vec<(String, String)>> = BTreeMap::new();
        for (label, slot) in slots() {
            // A policy that decides some slot is listed for the slots it lost; its UNSET
            // elsewhere defers rather than loses.
            let unset = slot.unset.iter().filter(|(pid, _)| !decided.contains(pid));
            for (pid, why) in slot.notes.iter().chain(unset) {
                whys.entry(*pid).or_default().push((label.clone(), why.clone()));
            }
        }
        // v1alpha1 policies naming this workload's services without matching any port.
        for (idx, p) in self.targeted() {
            let pid = Pid::Legacy(idx);
            if whys.contains_key(&pid) || decided.contains(&pid) {
                continue;
            }
            let unmatched = p.targets.iter().find_map(|t| {
                let s = self.services.iter().find(|s| s.name == t.service)?;
                let sels: Vec<String> = t.ports.iter().map(ToString::to_string).collect();
                Some(if s.ports.is_empty() {
                    format!("targets service {}, which has no ports", s.name)
                } else {
                    format!(
                        "targets port {} of service {}, which has no such port",
                        sels.join(", "),
                        s.name
                    )
                })
            });
            if let Some(why) = unmatched {
                whys.insert(pid, vec![("default".to_string(), why)]);
            }
        }
        let ignored = whys
            .into_iter()
            .filter_map(|(pid, list)| {
                let why = combine(list, decided.contains(&pid));
                Some(Ignored { policy: self.policy_ref(pid)?.clone(), why })
            })
            .collect();
        WorkloadReport {
            workload: self.w.key(),
            default: default.decision,
            ports: ports.into_iter().map(|(p, s)| (p, s.decision)).collect(),
            ignored,
        }
    }
}

fn no_policy(unset: &[String]) -> Decision {
    let reason = if unset.is_empty() {
        "no policy applies: PERMISSIVE by default".to_string()
    } else {
        format!("no policy sets a mode (UNSET: {}): PERMISSIVE by default", unset.join(", "))
    };
    Decision { mode: Mode::Permissive, decided_by: None, level: None, reason }
}

/// One reason if all slots agree, else `default: ...; port 8080: ...`. `partial`: the
/// policy decided other slots, so the slots it lost are always named.
fn combine(list: Vec<(String, String)>, partial: bool) -> String {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (label, why) in list {
        match groups.iter_mut().find(|(w, _)| *w == why) {
            Some((_, labels)) => {
                if !labels.contains(&label) {
                    labels.push(label);
                }
            }
            None => groups.push((why, vec![label])),
        }
    }
    if groups.len() == 1 && !partial {
        return groups.pop().map(|(why, _)| why).unwrap_or_default();
    }
    groups
        .into_iter()
        .map(|(why, labels)| format!("{}: {why}", labels.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// v1alpha1 targets that name missing services or service ports, then v1alpha1 policies
/// that a PeerAuthentication overrides.
pub(super) fn lint(set: &PolicySet, ws: &WorkloadSet) -> Vec<Warning> {
    let mut out = Vec::new();
    for p in &set.legacy {
        let Some(ns) = p.meta.r.namespace.as_deref() else { continue };
        for t in &p.targets {
            let warn = |message: String| Warning {
                file: p.meta.r.file.clone(),
                line: t.line,
                message: format!("Policy {}: {message}", p.meta.r),
            };
            let Some(s) = ws.services.iter().find(|s| s.namespace == ns && s.name == t.service)
            else {
                out.push(warn(format!(
                    "target service {} does not exist in namespace {ns}",
                    t.service
                )));
                continue;
            };
            for sel in &t.ports {
                if !s.ports.iter().any(|sp| selects(sel, sp)) {
                    out.push(warn(format!("port {sel} is not a port of service {}", s.name)));
                }
            }
            if !ws.workloads.iter().any(|w| s.selects(w)) {
                out.push(warn(format!("service {} selects no workloads", s.name)));
            }
        }
    }
    out.extend(overridden_by_peer(set, ws));
    out.extend(identity_deny_on_plaintext(set, ws));
    out
}

/// A DENY that matches only by identity does not refuse plaintext (it has none): on a pod that
/// accepts plaintext it leaves the door it means to close open, as Istio's documentation warns.
/// One warning per policy, naming the first such pod.
fn identity_deny_on_plaintext(set: &PolicySet, ws: &WorkloadSet) -> Vec<Warning> {
    let mut out = Vec::new();
    for p in set.authz.iter().filter(|p| p.action == crate::authz::Action::Deny) {
        if p.rules.is_empty() || !p.rules.iter().all(crate::authz::Rule::needs_identity) {
            continue;
        }
        let open = ws.workloads.iter().find(|w| {
            p.applies_to(&set.root, w) && {
                let (default, ports) = set.workload_modes(ws, w);
                default.mode != Mode::Strict || ports.iter().any(|(_, d)| d.mode != Mode::Strict)
            }
        });
        if let Some(w) = open {
            out.push(Warning {
                file: p.r.file.clone(),
                line: p.r.line,
                message: format!(
                    "AuthorizationPolicy {} denies only by peer identity, but {} accepts \
                     plaintext, which has none and is not denied by it: make it STRICT, or add \
                     a DENY with notPrincipals: [\"*\"]",
                    p.r,
                    w.key()
                ),
            });
        }
    }
    out
}

/// One warning per v1alpha1 policy and PeerAuthentication where the v1alpha1 policy would
/// decide some port of some workload but the PeerAuthentication decides instead: mixing the
/// APIs can quietly weaken a STRICT Policy (a mesh-wide PERMISSIVE PeerAuthentication wins).
fn overridden_by_peer(set: &PolicySet, ws: &WorkloadSet) -> Vec<Warning> {
    #[derive(Default)]
    struct Hits {
        workloads: Vec<String>,
        modes: BTreeSet<Mode>,
    }
    if set.legacy.is_empty() || set.peer.is_empty() {
        return Vec::new();
    }
    let mut hits: BTreeMap<(usize, usize), Hits> = BTreeMap::new();
    for w in &ws.workloads {
        let r = Resolver::new(set, ws, w);
        for port in std::iter::once(None).chain(r.ports().into_iter().map(Some)) {
            let slot = r.slot(port);
            let (Some(l), Some(Pid::Peer(p))) = (slot.overridden_legacy, slot.decider) else {
                continue;
            };
            let h = hits.entry((l, p)).or_default();
            let key = w.key();
            if h.workloads.last() != Some(&key) {
                h.workloads.push(key);
            }
            h.modes.insert(slot.decision.mode);
        }
    }
    hits.into_iter()
        .filter_map(|((l, p), h)| {
            let (l, p) = (set.legacy.get(l)?, set.peer.get(p)?);
            let modes: Vec<&str> = h.modes.iter().map(|m| m.as_str()).collect();
            Some(Warning {
                file: l.meta.r.file.clone(),
                line: l.meta.r.line,
                message: format!(
                    "{} ({}) is overridden by {} ({}, {}) for {}: a PeerAuthentication that \
                     sets a mode takes precedence over v1alpha1 policies",
                    l.meta.r.describe(),
                    l.mode_text(),
                    p.meta.r.describe(),
                    modes.join(", "),
                    p.meta.r.location(),
                    some_of(&h.workloads),
                ),
            })
        })
        .collect()
}

/// `a, b, c`, or `a, b, c and 7 more`.
fn some_of(names: &[String]) -> String {
    const SHOWN: usize = 3;
    let head = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(SHOWN) {
        0 => head,
        more => format!("{head} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::render_check;
    use crate::policy::testutil::{legacy, pa, set, workloads};
    use std::path::Path;
    use Level::*;
    use Mode::*;

    const WORKSHOP_STRICT: &str = r#"apiVersion: "authentication.istio.io/v1alpha1"
kind: "Policy"
metadata:
  name: "default"
  namespace: "hipster-app"
spec:
  peers:
  - mtls:
      mode: STRICT
"#;

    const WORKSHOP_PERMISSIVE: &str = r#"apiVersion: "authentication.istio.io/v1alpha1"
kind: "Policy"
metadata:
  name: "default"
  namespace: "hipster-app"
spec:
  peers:
  - mtls:
      mode: PERMISSIVE
"#;

    const T2020: Option<&str> = Some("2020-01-01T00:00:00Z");
    const T2021: Option<&str> = Some("2021-01-01T00:00:00Z");

    fn mode_spec(mode: &str) -> String {
        format!("  mtls:\n    mode: {mode}\n")
    }

    fn mesh_pa(mode: &str) -> String {
        pa("istio-system", "default", None, &mode_spec(mode))
    }

    fn ns_pa(mode: &str) -> String {
        pa("hipster-app", "default", None, &mode_spec(mode))
    }

    /// A workload PeerAuthentication for the frontend pods.
    fn fe_pa(name: &str, created: Option<&str>, extra: &str) -> String {
        pa(
            "hipster-app",
            name,
            created,
            &format!("  selector:\n    matchLabels:\n      app: frontend\n{extra}"),
        )
    }

    fn mesh_policy(peers: &str) -> String {
        legacy(None, "default", None, &format!("  peers: {peers}\n"))
    }

    fn ns_policy(peers: &str) -> String {
        legacy(Some("hipster-app"), "default", None, &format!("  peers: {peers}\n"))
    }

    fn target_policy(name: &str, created: Option<&str>, targets: &str, peers: &str) -> String {
        legacy(
            Some("hipster-app"),
            name,
            created,
            &format!("  targets: {targets}\n  peers: {peers}\n"),
        )
    }

    const STRICT_PEERS: &str = "[{mtls: {}}]";
    const PERMISSIVE_PEERS: &str = "[{mtls: {mode: PERMISSIVE}}]";
    const NO_PEERS: &str = "[]";

    /// (workload key, port or None for the default, mode, decided by, level)
    type Check = (&'static str, Option<u16>, Mode, Option<&'static str>, Option<Level>);

    struct Case {
        name: &'static str,
        policies: String,
        root: Option<&'static str>,
        checks: Vec<Check>,
    }

    fn case(name: &'static str, policies: String, checks: Vec<Check>) -> Case {
        Case { name, policies, root: None, checks }
    }

    fn cases() -> Vec<Case> {
        let fe = "frontend.hipster-app";
        vec![
            // --- no policy ---
            case("nothing", String::new(), vec![
                (fe, None, Permissive, None, None),
                (fe, Some(8080), Permissive, None, None),
            ]),
            // --- PeerAuthentication ---
            case("mesh only", mesh_pa("STRICT"), vec![
                (fe, None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
                (fe, Some(8080), Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
                ("web.other", None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
                ("istiod.istio-system", None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
            ]),
            case("namespace over mesh", mesh_pa("STRICT") + &ns_pa("PERMISSIVE"), vec![
                (fe, None, Permissive, Some("PeerAuthentication hipster-app/default"), Some(Namespace)),
                ("redis.hipster-app", Some(6379), Permissive, Some("PeerAuthentication hipster-app/default"), Some(Namespace)),
                ("web.other", None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
            ]),
            case("workload over namespace", mesh_pa("STRICT") + &ns_pa("PERMISSIVE") + &fe_pa("fe", None, &mode_spec("DISABLE")), vec![
                (fe, None, Disable, Some("PeerAuthentication hipster-app/fe"), Some(Workload)),
                (fe, Some(8080), Disable, Some("PeerAuthentication hipster-app/fe"), Some(Workload)),
                ("cart.hipster-app", None, Permissive, Some("PeerAuthentication hipster-app/default"), Some(Namespace)),
                // Same labels, other namespace: not selected.
                ("web.other", None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
            ]),
            case("portLevelMtls over workload", ns_pa("PERMISSIVE") + &fe_pa("fe", None, "  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    9090: {mode: PERMISSIVE}\n"), vec![
                (fe, None, Strict, Some("PeerAuthentication hipster-app/fe"), Some(Workload)),
                (fe, Some(8080), Disable, Some("PeerAuthentication hipster-app/fe"), Some(WorkloadPort)),
                (fe, Some(9090), Permissive, Some("PeerAuthentication hipster-app/fe"), Some(WorkloadPort)),
                (fe, Some(9091), Strict, Some("PeerAuthentication hipster-app/fe"), Some(Workload)),
            ]),
            case("portLevelMtls over namespace (workload UNSET)", ns_pa("STRICT") + &fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: DISABLE}\n"), vec![
                (fe, None, Strict, Some("PeerAuthentication hipster-app/default"), Some(Namespace)),
                (fe, Some(8080), Disable, Some("PeerAuthentication hipster-app/fe"), Some(WorkloadPort)),
            ]),
            case("UNSET workload inherits namespace", ns_pa("STRICT") + &fe_pa("fe", None, &mode_spec("UNSET")), vec![
                (fe, None, Strict, Some("PeerAuthentication hipster-app/default"), Some(Namespace)),
            ]),
            case("UNSET namespace inherits mesh", mesh_pa("DISABLE") + &pa("hipster-app", "default", None, "  mtls: {}\n"), vec![
                (fe, None, Disable, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
            ]),
            case("UNSET namespace and workload inherit mesh", mesh_pa("STRICT") + &ns_pa("UNSET") + &fe_pa("fe", None, ""), vec![
                (fe, None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
                (fe, Some(8080), Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
            ]),
            case("UNSET mesh alone is PERMISSIVE", mesh_pa("UNSET"), vec![
                (fe, None, Permissive, None, None),
            ]),
            case("UNSET everywhere is PERMISSIVE", mesh_pa("UNSET") + &ns_pa("UNSET") + &fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: UNSET}\n"), vec![
                (fe, None, Permissive, None, None),
                (fe, Some(8080), Permissive, None, None),
            ]),
            case("port-level UNSET takes the workload mode", ns_pa("PERMISSIVE") + &fe_pa("fe", None, "  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: UNSET}\n    9090: {}\n"), vec![
                (fe, Some(8080), Strict, Some("PeerAuthentication hipster-app/fe"), Some(Workload)),
                (fe, Some(9090), Strict, Some("PeerAuthentication hipster-app/fe"), Some(Workload)),
            ]),
            case("port-level UNSET under an UNSET workload takes the namespace mode", ns_pa("DISABLE") + &fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: UNSET}\n"), vec![
                (fe, Some(8080), Disable, Some("PeerAuthentication hipster-app/default"), Some(Namespace)),
            ]),
            case("oldest wins at mesh level",
                pa("istio-system", "a", T2021, &mode_spec("STRICT")) + &pa("istio-system", "b", T2020, &mode_spec("DISABLE")),
                vec![(fe, None, Disable, Some("PeerAuthentication istio-system/b"), Some(Mesh))]),
            case("oldest wins at namespace level, even if UNSET",
                mesh_pa("DISABLE") + &pa("hipster-app", "new", T2021, &mode_spec("STRICT")) + &pa("hipster-app", "old", T2020, &mode_spec("UNSET")),
                vec![(fe, None, Disable, Some("PeerAuthentication istio-system/default"), Some(Mesh))]),
            case("oldest wins at workload level, port rules included",
                fe_pa("old", T2020, &mode_spec("STRICT")) + &fe_pa("new", T2021, "  portLevelMtls:\n    8080: {mode: DISABLE}\n"),
                vec![
                    (fe, None, Strict, Some("PeerAuthentication hipster-app/old"), Some(Workload)),
                    (fe, Some(8080), Strict, Some("PeerAuthentication hipster-app/old"), Some(Workload)),
                ]),
            case("same timestamp: name decides",
                pa("hipster-app", "b", T2020, &mode_spec("STRICT")) + &pa("hipster-app", "a", T2020, &mode_spec("DISABLE")),
                vec![(fe, None, Disable, Some("PeerAuthentication hipster-app/a"), Some(Namespace))]),
            case("a timestamp is older than none",
                pa("hipster-app", "a", None, &mode_spec("DISABLE")) + &pa("hipster-app", "z", T2021, &mode_spec("STRICT")),
                vec![(fe, None, Strict, Some("PeerAuthentication hipster-app/z"), Some(Namespace))]),
            case("no timestamps: name decides",
                fe_pa("b", None, &mode_spec("STRICT")) + &fe_pa("a", None, &mode_spec("DISABLE")),
                vec![(fe, None, Disable, Some("PeerAuthentication hipster-app/a"), Some(Workload))]),
            case("timestamps compare as instants, not text",
                pa("hipster-app", "a", Some("2020-01-01T01:30:00+02:00"), &mode_spec("STRICT")) + &pa("hipster-app", "b", Some("2020-01-01T00:00:00Z"), &mode_spec("DISABLE")),
                vec![(fe, None, Strict, Some("PeerAuthentication hipster-app/a"), Some(Namespace))]),
            case("selector in the root namespace is ignored",
                mesh_pa("STRICT") + &pa("istio-system", "fe", None, "  selector: {matchLabels: {app: frontend}}\n  mtls: {mode: DISABLE}\n")
                    + &pa("istio-system", "istiod", None, "  selector: {matchLabels: {app: istiod}}\n  mtls: {mode: DISABLE}\n"),
                vec![
                    (fe, None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
                    ("istiod.istio-system", None, Strict, Some("PeerAuthentication istio-system/default"), Some(Mesh)),
                ]),
            case("all selector labels must match",
                pa("hipster-app", "v2", None, "  selector: {matchLabels: {app: cart, version: v2}}\n  mtls: {mode: STRICT}\n"),
                vec![
                    ("cart-2.hipster-app", None, Strict, Some("PeerAuthentication hipster-app/v2"), Some(Workload)),
                    ("cart.hipster-app", None, Permissive, None, None),
                ]),
            Case {
                name: "custom root namespace",
                policies: pa("mesh-root", "default", None, &mode_spec("STRICT")) + &mesh_pa("DISABLE"),
                root: Some("mesh-root"),
                checks: vec![
                    (fe, None, Strict, Some("PeerAuthentication mesh-root/default"), Some(Mesh)),
                    // istio-system is an ordinary namespace now.
                    ("istiod.istio-system", None, Disable, Some("PeerAuthentication istio-system/default"), Some(Namespace)),
                ],
            },
            // --- v1alpha1 ---
            case("workshop: namespace default STRICT", WORKSHOP_STRICT.to_string(), vec![
                (fe, None, Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                (fe, Some(8080), Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                ("redis.hipster-app", Some(6379), Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                ("web.other", None, Permissive, None, None),
            ]),
            case("workshop: namespace default PERMISSIVE", WORKSHOP_PERMISSIVE.to_string(), vec![
                (fe, None, Permissive, Some("Policy hipster-app/default"), Some(Namespace)),
            ]),
            case("mtls: {} and mtls: (null) are STRICT",
                ns_policy("[{mtls: {}}]") + &legacy(Some("other"), "default", None, "  peers:\n  - mtls:\n"),
                vec![
                    (fe, None, Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                    ("web.other", None, Strict, Some("Policy other/default"), Some(Namespace)),
                ]),
            case("no peers is DISABLE", ns_policy(NO_PEERS) + &legacy(Some("other"), "default", None, "  {}\n"), vec![
                (fe, None, Disable, Some("Policy hipster-app/default"), Some(Namespace)),
                ("web.other", None, Disable, Some("Policy other/default"), Some(Namespace)),
            ]),
            case("MeshPolicy", mesh_policy(STRICT_PEERS), vec![
                (fe, None, Strict, Some("MeshPolicy default"), Some(Mesh)),
                ("istiod.istio-system", None, Strict, Some("MeshPolicy default"), Some(Mesh)),
            ]),
            case("namespace Policy over MeshPolicy", mesh_policy(PERMISSIVE_PEERS) + &ns_policy(STRICT_PEERS), vec![
                (fe, None, Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                ("web.other", None, Permissive, Some("MeshPolicy default"), Some(Mesh)),
            ]),
            case("service target covers the service's target ports",
                ns_policy(STRICT_PEERS) + &target_policy("fe", None, "[{name: frontend}]", PERMISSIVE_PEERS),
                vec![
                    (fe, None, Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                    (fe, Some(8080), Permissive, Some("Policy hipster-app/fe"), Some(Service)),
                    (fe, Some(9090), Permissive, Some("Policy hipster-app/fe"), Some(Service)),
                    // A service port is not a pod port.
                    (fe, Some(80), Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                    (fe, Some(1234), Strict, Some("Policy hipster-app/default"), Some(Namespace)),
                    ("web.other", Some(8080), Permissive, None, None),
                ]),
            case("service port by number maps to targetPort",
                target_policy("fe", None, "[{name: frontend, ports: [{number: 80}]}]", NO_PEERS),
                vec![
                    (fe, Some(8080), Disable, Some("Policy hipster-app/fe"), Some(ServicePort)),
                    (fe, Some(80), Permissive, None, None),
                    (fe, Some(9090), Permissive, None, None),
                    (fe, None, Permissive, None, None),
                ]),
            case("service port by name maps to targetPort",
                target_policy("fe", None, "[{name: frontend, ports: [{name: grpc}]}]", STRICT_PEERS),
                vec![
                    (fe, Some(9090), Strict, Some("Policy hipster-app/fe"), Some(ServicePort)),
                    (fe, Some(8080), Permissive, None, None),
                ]),
            case("service+port > service > namespace > mesh",
                mesh_policy(STRICT_PEERS) + &ns_policy(PERMISSIVE_PEERS)
                    + &target_policy("svc", None, "[{name: frontend}]", NO_PEERS)
                    + &target_policy("port", None, "[{name: frontend, ports: [{number: 80}]}]", STRICT_PEERS),
                vec![
                    (fe, Some(8080), Strict, Some("Policy hipster-app/port"), Some(ServicePort)),
                    (fe, Some(9090), Disable, Some("Policy hipster-app/svc"), Some(Service)),
                    (fe, Some(1234), Permissive, Some("Policy hipster-app/default"), Some(Namespace)),
                    (fe, None, Permissive, Some("Policy hipster-app/default"), Some(Namespace)),
                    ("web.other", Some(8080), Strict, Some("MeshPolicy default"), Some(Mesh)),
                ]),
            case("oldest wins among service targets",
                target_policy("a", T2021, "[{name: frontend}]", STRICT_PEERS) + &target_policy("b", T2020, "[{name: frontend}]", PERMISSIVE_PEERS)
                    + &target_policy("c", None, "[{name: frontend, ports: [{number: 80}]}]", NO_PEERS) + &target_policy("d", T2021, "[{name: frontend, ports: [{name: http}]}]", STRICT_PEERS),
                vec![
                    (fe, Some(9090), Permissive, Some("Policy hipster-app/b"), Some(Service)),
                    (fe, Some(8080), Strict, Some("Policy hipster-app/d"), Some(ServicePort)),
                ]),
            case("a second service selecting the pod",
                target_policy("admin", None, "[{name: cart-v2, ports: [{name: admin}]}]", STRICT_PEERS),
                vec![
                    ("cart-2.hipster-app", Some(7070), Strict, Some("Policy hipster-app/admin"), Some(ServicePort)),
                    ("cart.hipster-app", Some(7070), Permissive, None, None),
                ]),
            case("unknown target port or service matches nothing",
                target_policy("x", None, "[{name: frontend, ports: [{number: 8080}, {name: metrics}]}, {name: nope}]", STRICT_PEERS),
                vec![(fe, Some(8080), Permissive, None, None), (fe, None, Permissive, None, None)]),
            case("fully qualified target name",
                target_policy("fqdn", None, "[{name: frontend.hipster-app.svc.cluster.local}]", STRICT_PEERS),
                vec![(fe, Some(8080), Strict, Some("Policy hipster-app/fqdn"), Some(Service))]),
            // --- both APIs ---
            case("PeerAuthentication at any level beats v1alpha1",
                ns_pa("STRICT") + &target_policy("fe", None, "[{name: frontend, ports: [{number: 80}]}]", NO_PEERS),
                vec![(fe, Some(8080), Strict, Some("PeerAuthentication hipster-app/default"), Some(Namespace))]),
            case("mesh PeerAuthentication beats a namespace Policy",
                mesh_pa("PERMISSIVE") + "---\n" + WORKSHOP_STRICT,
                vec![(fe, None, Permissive, Some("PeerAuthentication istio-system/default"), Some(Mesh))]),
            case("UNSET PeerAuthentication leaves v1alpha1 in charge",
                mesh_pa("UNSET") + &ns_pa("UNSET") + "---\n" + WORKSHOP_STRICT,
                vec![(fe, None, Strict, Some("Policy hipster-app/default"), Some(Namespace))]),
            case("port-level PeerAuthentication beside v1alpha1",
                fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: STRICT}\n    9090: {mode: UNSET}\n") + &ns_policy(NO_PEERS),
                vec![
                    (fe, Some(8080), Strict, Some("PeerAuthentication hipster-app/fe"), Some(WorkloadPort)),
                    (fe, Some(9090), Disable, Some("Policy hipster-app/default"), Some(Namespace)),
                    (fe, None, Disable, Some("Policy hipster-app/default"), Some(Namespace)),
                ]),
        ]
    }

    fn load(c: &Case) -> PolicySet {
        let s = set(&c.policies);
        match c.root {
            Some(root) => s.with_root_namespace(root),
            None => s,
        }
    }

    #[test]
    fn decisions() {
        let ws = workloads();
        let mut failures = Vec::new();
        for c in cases() {
            let s = load(&c);
            for (key, port, mode, by, level) in &c.checks {
                let Some(w) = ws.workloads.iter().find(|w| w.key() == *key) else {
                    panic!("{}: no workload {key}", c.name);
                };
                let d = match port {
                    Some(p) => s.decide(&ws, w, *p),
                    None => s.workload_modes(&ws, w).0,
                };
                let got = (d.mode, d.decided_by.as_ref().map(PolicyRef::describe), d.level);
                let want = (*mode, by.map(str::to_string), *level);
                if got != want {
                    failures.push(format!(
                        "{}: {key} port {port:?}: got {got:?} ({}), want {want:?}",
                        c.name, d.reason
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    /// workload_modes agrees with decide: the default holds for unnamed
    /// ports, and each listed port has its own decision.
    #[test]
    fn workload_modes_agree_with_decide() {
        let ws = workloads();
        for c in cases() {
            let s = load(&c);
            for w in &ws.workloads {
                let (default, ports) = s.workload_modes(&ws, w);
                assert_eq!(s.decide(&ws, w, 1), default, "{}: {}", c.name, w.key());
                for (p, d) in &ports {
                    assert_eq!(&s.decide(&ws, w, *p), d, "{}: {} port {p}", c.name, w.key());
                }
                let listed: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
                let mut sorted = listed.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(listed, sorted, "{}", c.name);
            }
        }
    }

    #[test]
    fn workload_modes_list_every_named_port() {
        let ws = workloads();
        let fe = ws.find("frontend", "hipster-app").unwrap();
        let cart2 = ws.find("cart-2", "hipster-app").unwrap();
        let ports = |s: &PolicySet, w| -> Vec<(u16, Mode)> {
            s.workload_modes(&ws, w).1.into_iter().map(|(p, d)| (p, d.mode)).collect()
        };
        let s = set(&(ns_pa("STRICT")
            + &fe_pa(
                "fe",
                None,
                "  portLevelMtls:\n    8080: {mode: STRICT}\n    15020: {mode: DISABLE}\n",
            )));
        assert_eq!(s.workload_modes(&ws, fe).0.mode, Strict);
        // 8080 equals the default but is listed all the same.
        assert_eq!(ports(&s, fe), [(8080, Strict), (15020, Disable)]);
        let s = set(&(ns_policy(STRICT_PEERS)
            + &target_policy("fe", None, "[{name: frontend}]", STRICT_PEERS)));
        assert_eq!(ports(&s, fe), [(8080, Strict), (9090, Strict)]);
        let s =
            set(&target_policy("fe", None, "[{name: frontend, ports: [{name: grpc}]}]", NO_PEERS));
        assert_eq!(ports(&s, fe), [(9090, Disable)]);
        assert_eq!(s.workload_modes(&ws, fe).0.mode, Permissive);
        let s = set(&(target_policy("c", None, "[{name: cart}]", STRICT_PEERS)
            + &target_policy("a", None, "[{name: cart-v2}]", NO_PEERS)));
        // 7070 via both services: cart is older by name, both service-level.
        assert_eq!(ports(&s, cart2), [(7070, Disable), (9101, Strict)]);
        // No policies: nothing listed.
        assert!(PolicySet::empty().workload_modes(&ws, fe).1.is_empty());
    }

    #[test]
    fn reasons_in_plain_words() {
        let ws = workloads();
        let fe = ws.find("frontend", "hipster-app").unwrap();
        let reason = |src: &str, port: u16| set(src).decide(&ws, fe, port).reason;
        assert_eq!(
            reason(&ns_pa("STRICT"), 1),
            "namespace-wide PeerAuthentication hipster-app/default (STRICT)"
        );
        assert_eq!(reason("", 1), "no policy applies: PERMISSIVE by default");
        assert_eq!(
            reason(&ns_pa("UNSET"), 1),
            "no policy sets a mode (UNSET: namespace-wide PeerAuthentication hipster-app/default): PERMISSIVE by default"
        );
        assert_eq!(
            reason(&(mesh_pa("STRICT") + &fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: UNSET}\n")), 8080),
            "mesh-wide PeerAuthentication istio-system/default (STRICT); inherited through UNSET \
             workload PeerAuthentication hipster-app/fe, port 8080 of PeerAuthentication hipster-app/fe"
        );
        assert_eq!(
            reason(&fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: DISABLE}\n"), 8080),
            "port 8080 of PeerAuthentication hipster-app/fe (DISABLE)"
        );
        assert_eq!(
            reason(WORKSHOP_STRICT, 8080),
            "namespace-wide Policy hipster-app/default (STRICT)"
        );
        assert_eq!(
            reason(&ns_policy(NO_PEERS), 1),
            "namespace-wide Policy hipster-app/default (DISABLE: no peers, plaintext only)"
        );
        assert_eq!(reason(&mesh_policy(PERMISSIVE_PEERS), 1), "MeshPolicy default (PERMISSIVE)");
        assert_eq!(
            reason(&target_policy("fe", None, "[{name: frontend, ports: [{number: 80}]}]", STRICT_PEERS), 8080),
            "Policy hipster-app/fe targeting port 80 (http) of service frontend, i.e. pod port 8080 (STRICT)"
        );
        assert_eq!(
            reason(&target_policy("fe", None, "[{name: frontend}]", STRICT_PEERS), 9090),
            "Policy hipster-app/fe targeting service frontend (STRICT)"
        );
    }

    #[test]
    fn report_lists_ignored_policies_and_why() {
        let ws = workloads();
        let src = mesh_pa("PERMISSIVE")
            + &pa("istio-system", "later-mesh", T2021, &mode_spec("STRICT"))
            + &pa(
                "istio-system",
                "root-selector",
                None,
                "  selector: {matchLabels: {app: frontend}}\n  mtls: {mode: DISABLE}\n",
            )
            + &pa("hipster-app", "ns-old", T2020, &mode_spec("UNSET"))
            + &pa("hipster-app", "ns-new", T2021, &mode_spec("DISABLE"))
            + &fe_pa(
                "fe",
                T2020,
                "  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n",
            )
            + &fe_pa("fe-b", T2020, &mode_spec("DISABLE"))
            + "---\n"
            + WORKSHOP_STRICT
            + &target_policy(
                "svc",
                None,
                "[{name: frontend, ports: [{number: 9999}]}]",
                STRICT_PEERS,
            );
        let s = set(&src);
        let reports = s.report(&ws);
        assert_eq!(reports.len(), ws.workloads.len());
        let r = &reports[0];
        assert_eq!(r.workload, "frontend.hipster-app");
        assert_eq!((r.default.mode, r.default.level), (Strict, Some(Workload)));
        let ports: Vec<_> = r.ports.iter().map(|(p, d)| (*p, d.mode, d.level)).collect();
        assert_eq!(ports, [(8080, Disable, Some(WorkloadPort))]);
        let ignored: Vec<(String, &str)> =
            r.ignored.iter().map(|i| (i.policy.describe(), i.why.as_str())).collect();
        let expected = [
            // A policy with a timestamp is older than one without.
            ("PeerAuthentication istio-system/default", "older policy istio-system/later-mesh (created 2021-01-01T00:00:00Z) wins at mesh level; this one has no creationTimestamp"),
            ("PeerAuthentication istio-system/later-mesh", "default: overridden by workload PeerAuthentication hipster-app/fe; port 8080: overridden by port 8080 of PeerAuthentication hipster-app/fe"),
            ("PeerAuthentication istio-system/root-selector", "selector in the root namespace istio-system is ignored"),
            ("PeerAuthentication hipster-app/ns-old", "mtls mode UNSET"),
            ("PeerAuthentication hipster-app/ns-new", "older policy hipster-app/ns-old (created 2020-01-01T00:00:00Z) wins at namespace level"),
            ("PeerAuthentication hipster-app/fe-b", "policy hipster-app/fe wins at workload level (same creationTimestamp 2020-01-01T00:00:00Z, and fe sorts first by name)"),
            ("Policy hipster-app/default", "default: workload PeerAuthentication hipster-app/fe applies, and PeerAuthentication takes precedence over v1alpha1 policies; port 8080: port 8080 of PeerAuthentication hipster-app/fe applies, and PeerAuthentication takes precedence over v1alpha1 policies"),
            ("Policy hipster-app/svc", "targets port 9999 of service frontend, which has no such port"),
        ];
        let got: Vec<(String, String)> =
            ignored.iter().map(|(a, b)| (a.clone(), b.to_string())).collect();
        let want: Vec<(String, String)> =
            expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(got, want);

        // v1alpha1 only: lower buckets are overridden, older wins in a bucket.
        let src = mesh_policy(STRICT_PEERS)
            + "---\n"
            + WORKSHOP_PERMISSIVE
            + &target_policy("a", T2021, "[{name: frontend}]", NO_PEERS)
            + &target_policy("b", T2020, "[{name: frontend}]", STRICT_PEERS);
        let r = &set(&src).report(&ws)[0];
        let ignored: Vec<(String, String)> =
            r.ignored.iter().map(|i| (i.policy.describe(), i.why.clone())).collect();
        assert_eq!(
            ignored,
            [
                (
                    "MeshPolicy default".to_string(),
                    "default: overridden by namespace-wide Policy hipster-app/default; \
                     port 8080, port 9090: overridden by Policy hipster-app/b targeting service frontend"
                        .to_string()
                ),
                // It decides the default; the ports it lost are listed.
                (
                    "Policy hipster-app/default".to_string(),
                    "port 8080, port 9090: overridden by Policy hipster-app/b targeting service frontend".to_string()
                ),
                ("Policy hipster-app/a".to_string(), "older policy hipster-app/b (created 2020-01-01T00:00:00Z) wins at service level".to_string()),
            ]
        );
        assert_eq!(r.default.decided_by.as_ref().map(|p| p.name.as_str()), Some("default"));
        let ports: Vec<_> = r
            .ports
            .iter()
            .map(|(p, d)| (*p, d.decided_by.as_ref().map(|r| r.name.clone())))
            .collect();
        assert_eq!(ports, [(8080, Some("b".to_string())), (9090, Some("b".to_string()))]);
    }

    #[test]
    fn warnings_follow_the_root_namespace() {
        let src = pa(
            "istio-system",
            "sel",
            None,
            "  selector: {matchLabels: {app: istiod}}\n  mtls: {mode: DISABLE}\n",
        ) + &pa("mesh-root", "a", T2020, "  {}\n")
            + &pa("mesh-root", "b", T2021, "  {}\n")
            + &pa(
                "mesh-root",
                "sel",
                None,
                "  selector: {matchLabels: {app: frontend}}\n  mtls: {mode: DISABLE}\n",
            )
            + &pa("ns", "a", None, "  {}\n")
            + &pa("ns", "b", None, "  {}\n");
        let default_root = [
            "p.yaml:2: PeerAuthentication istio-system/sel: selector in the root namespace istio-system is ignored (a root-namespace PeerAuthentication applies mesh-wide and must have no selector)",
            "p.yaml:20: namespace-wide PeerAuthentication mesh-root/b is ignored: older policy mesh-root/a (created 2020-01-01T00:00:00Z) wins at namespace level",
            "p.yaml:46: namespace-wide PeerAuthentication ns/b is ignored: policy ns/a wins at namespace level (neither has a creationTimestamp, and a sorts first by name)",
        ];
        let mesh_root = [
            "p.yaml:29: PeerAuthentication mesh-root/sel: selector in the root namespace mesh-root is ignored (a root-namespace PeerAuthentication applies mesh-wide and must have no selector)",
            "p.yaml:20: mesh-wide PeerAuthentication mesh-root/b is ignored: older policy mesh-root/a (created 2020-01-01T00:00:00Z) wins at mesh level",
            "p.yaml:46: namespace-wide PeerAuthentication ns/b is ignored: policy ns/a wins at namespace level (neither has a creationTimestamp, and a sorts first by name)",
        ];
        let text = |s: &PolicySet| -> Vec<String> {
            s.warnings().iter().map(ToString::to_string).collect()
        };
        let s = PolicySet::parse(&src, Path::new("p.yaml")).unwrap();
        assert_eq!(text(&s), default_root);
        assert_eq!(text(&s.with_root_namespace("mesh-root")), mesh_root);

        // Each loader takes the root namespace, so no caller sees the default root's warnings.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, &src).unwrap();
        let s = PolicySet::load_dir(dir.path(), "mesh-root").unwrap();
        assert_eq!(s.root_namespace(), "mesh-root");
        let want: Vec<String> =
            mesh_root.iter().map(|w| format!("{}/{w}", dir.path().display())).collect();
        assert_eq!(text(&s), want);
        let (s, errors) =
            PolicySet::from_documents([(src.as_str(), Path::new("p.yaml"))], "mesh-root");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(text(&s), mesh_root);

        // `policy check --root-namespace mesh-root`: the table applies istio-system/sel to the
        // pods it selects, and only mesh-root/sel is warned about and listed as ignored.
        let s = PolicySet::load_dir(dir.path(), "mesh-root").unwrap();
        let out = render_check(&s, &workloads());
        assert!(!out.contains("istio-system/sel: selector"), "{out}");
        assert!(out.contains("PeerAuthentication mesh-root/sel: selector in the root namespace mesh-root is ignored"), "{out}");
        assert!(out.contains("frontend.hipster-app: PeerAuthentication mesh-root/sel"), "{out}");
        let istiod = out.lines().find(|l| l.starts_with("istiod.istio-system")).unwrap_or_default();
        assert!(
            istiod.contains("DISABLE") && istiod.contains("istio-system/sel (workload)"),
            "{out}"
        );
    }

    /// A policy that decides some ports of a workload is still listed for the ports it lost.
    #[test]
    fn report_lists_the_ports_a_deciding_policy_lost() {
        let ws = workloads();
        let src = target_policy("svc", None, "[{name: frontend}]", PERMISSIVE_PEERS)
            + &target_policy(
                "port",
                None,
                "[{name: frontend, ports: [{number: 80}]}]",
                STRICT_PEERS,
            );
        let r = &set(&src).report(&ws)[0];
        let ports: Vec<_> = r
            .ports
            .iter()
            .map(|(p, d)| (*p, d.decided_by.as_ref().map(|r| r.name.clone())))
            .collect();
        assert_eq!(ports, [(8080, Some("port".to_string())), (9090, Some("svc".to_string()))]);
        let ignored: Vec<(String, String)> =
            r.ignored.iter().map(|i| (i.policy.describe(), i.why.clone())).collect();
        assert_eq!(
            ignored,
            [(
                "Policy hipster-app/svc".to_string(),
                "port 8080: overridden by Policy hipster-app/port targeting port 80 (http) of \
                 service frontend, i.e. pod port 8080"
                    .to_string()
            )]
        );
        // A workload PeerAuthentication that only sets ports defers (UNSET) elsewhere: it
        // lost nothing, so it is not listed.
        let src =
            ns_pa("STRICT") + &fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: DISABLE}\n");
        let r = &set(&src).report(&ws)[0];
        let ignored: Vec<String> = r.ignored.iter().map(|i| i.policy.describe()).collect();
        assert_eq!(ignored, ["PeerAuthentication hipster-app/default"]);
    }

    #[test]
    fn lint_warns_when_a_peer_authentication_overrides_a_v1alpha1_policy() {
        let ws = workloads();
        let lint = |src: &str| -> Vec<String> {
            set(src).lint(&ws).iter().map(ToString::to_string).collect()
        };
        // The trap: a mesh-wide PERMISSIVE default weakens the namespace's STRICT Policy.
        assert_eq!(
            lint(&(mesh_pa("PERMISSIVE") + "---\n" + WORKSHOP_STRICT)),
            ["policies/test.yaml:11: Policy hipster-app/default (STRICT) is overridden by \
              PeerAuthentication istio-system/default (PERMISSIVE, policies/test.yaml:2) for \
              frontend.hipster-app, cart.hipster-app, cart-2.hipster-app and 1 more: a \
              PeerAuthentication that sets a mode takes precedence over v1alpha1 policies"]
        );
        // Only where the v1alpha1 policy would have decided: one port of one workload here.
        assert_eq!(
            lint(
                &(fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: STRICT}\n")
                    + &ns_policy(NO_PEERS))
            ),
            ["policies/test.yaml:14: Policy hipster-app/default (DISABLE: no peers, plaintext \
              only) is overridden by PeerAuthentication hipster-app/fe (STRICT, \
              policies/test.yaml:2) for frontend.hipster-app: a PeerAuthentication that sets a \
              mode takes precedence over v1alpha1 policies"]
        );
        // UNSET overrides nothing; neither does a PeerAuthentication of another namespace.
        assert!(lint(&(mesh_pa("UNSET") + "---\n" + WORKSHOP_STRICT)).is_empty());
        assert!(lint(
            &(pa("other", "default", None, &mode_spec("DISABLE")) + "---\n" + WORKSHOP_STRICT)
        )
        .is_empty());
    }

    /// The files shipped in `policies/` resolve as their one-line comments say, alone and in
    /// the combinations an operator would use.
    #[test]
    fn shipped_policies_do_what_their_comments_say() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let readme = std::fs::read_to_string(shipped.join("README.md")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&shipped)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        names.sort();
        assert_eq!(names.len(), 6, "{names:?}");
        for name in &names {
            let text = std::fs::read_to_string(shipped.join(name)).unwrap();
            assert!(text.starts_with("# "), "{name}: starts with a one-line comment");
            assert!(readme.contains(&format!("`{name}`")), "{name} is described in README.md");
        }

        let ws = workloads();
        let load = |files: &[&str]| {
            let dir = tempfile::tempdir().unwrap();
            for f in files {
                std::fs::copy(shipped.join(f), dir.path().join(f)).unwrap();
            }
            PolicySet::load_dir(dir.path(), crate::policy::DEFAULT_ROOT_NAMESPACE)
        };
        const V1_STRICT: &str = "hipster-app-mtls.yaml";
        const V1_PERMISSIVE: &str = "hipster-app-mtls-permissive.yaml";
        const PA_STRICT: &str = "hipster-app-peerauthentication-strict.yaml";
        const PA_PERMISSIVE: &str = "hipster-app-peerauthentication-permissive.yaml";
        const MESH: &str = "mesh-default.yaml";
        // An AuthorizationPolicy: it never changes a mode (tested in authz and tests/authz.rs).
        const AUTHZ: &str = "hipster-app-authorizationpolicy.yaml";
        const NS_POLICY: Option<&str> = Some("Policy hipster-app/default");
        const NS_PA: Option<&str> = Some("PeerAuthentication hipster-app/default");
        const MESH_PA: Option<&str> = Some("PeerAuthentication istio-system/default");
        // (files, (mode, decided by) in hipster-app, the same elsewhere, v1alpha1 overridden)
        type Row = (
            &'static [&'static str],
            (Mode, Option<&'static str>),
            (Mode, Option<&'static str>),
            bool,
        );
        let rows: [Row; 10] = [
            (&[V1_STRICT], (Strict, NS_POLICY), (Permissive, None), false),
            (&[V1_PERMISSIVE], (Permissive, NS_POLICY), (Permissive, None), false),
            (&[PA_STRICT], (Strict, NS_PA), (Permissive, None), false),
            (&[PA_PERMISSIVE], (Permissive, NS_PA), (Permissive, None), false),
            (&[MESH], (Permissive, MESH_PA), (Permissive, MESH_PA), false),
            (&[MESH, PA_STRICT], (Strict, NS_PA), (Permissive, MESH_PA), false),
            (&[MESH, PA_PERMISSIVE], (Permissive, NS_PA), (Permissive, MESH_PA), false),
            (&[MESH, PA_STRICT, AUTHZ], (Strict, NS_PA), (Permissive, MESH_PA), false),
            // Migrating: the PeerAuthentication takes over from the v1alpha1 Policy.
            (&[V1_STRICT, PA_STRICT], (Strict, NS_PA), (Permissive, None), true),
            // Mixing APIs: the mesh-wide PeerAuthentication wins over the namespace's STRICT
            // v1alpha1 Policy, with a warning.
            (&[MESH, V1_STRICT], (Permissive, MESH_PA), (Permissive, MESH_PA), true),
        ];
        for (files, in_app, elsewhere, overridden) in rows {
            let s = load(files).unwrap_or_else(|e| panic!("{files:?}: {e}"));
            assert!(s.warnings().is_empty(), "{files:?}: {:?}", s.warnings());
            for w in &ws.workloads {
                let want = if w.namespace == "hipster-app" { in_app } else { elsewhere };
                for port in [None, Some(8080)] {
                    let d = match port {
                        Some(p) => s.decide(&ws, w, p),
                        None => s.workload_modes(&ws, w).0,
                    };
                    let got = (d.mode, d.decided_by.as_ref().map(PolicyRef::describe));
                    assert_eq!(got, (want.0, want.1.map(str::to_string)), "{files:?}: {}", w.key());
                }
            }
            let lint = s.lint(&ws);
            if overridden {
                assert_eq!(lint.len(), 1, "{files:?}: {lint:?}");
                assert!(
                    lint[0].message.starts_with(
                        "Policy hipster-app/default (STRICT) is overridden by PeerAuthentication"
                    ),
                    "{lint:?}"
                );
            } else {
                assert!(lint.is_empty(), "{files:?}: {lint:?}");
            }
        }
        // Each pair of variants is one object: applying both is a mistake, and rejected.
        for pair in [[V1_STRICT, V1_PERMISSIVE], [PA_STRICT, PA_PERMISSIVE]] {
            let e = load(&pair).unwrap_err().to_string();
            assert!(e.contains("duplicate"), "{pair:?}: {e}");
        }
    }

    #[test]
    fn lint_reports_missing_services_and_ports() {
        let ws = workloads();
        let s = set(&target_policy(
            "x",
            None,
            "\n  - name: frontend\n    ports: [{number: 8080}, {name: http}]\n  - name: nope",
            STRICT_PEERS,
        ));
        let w: Vec<String> = s.lint(&ws).iter().map(ToString::to_string).collect();
        assert_eq!(
            w,
            [
                "policies/test.yaml:9: Policy hipster-app/x: port 8080 is not a port of service frontend",
                "policies/test.yaml:11: Policy hipster-app/x: target service nope does not exist in namespace hipster-app",
            ]
        );
    }

    #[test]
    fn decisions_serialize_as_camel_case_json() {
        let ws = workloads();
        let s = set(&(fe_pa("fe", None, "  portLevelMtls:\n    8080: {mode: DISABLE}\n")
            + "---\n"
            + WORKSHOP_STRICT));
        let reports = s.report(&ws);
        let json = serde_json::to_value(&reports[0]).unwrap();
        assert_eq!(json["workload"], "frontend.hipster-app");
        assert_eq!(json["default"]["mode"], "STRICT");
        assert_eq!(json["default"]["level"], "namespace");
        assert_eq!(json["default"]["decidedBy"]["kind"], "Policy");
        assert_eq!(json["default"]["decidedBy"]["namespace"], "hipster-app");
        assert_eq!(json["default"]["decidedBy"]["file"], "policies/test.yaml");
        assert_eq!(json["ports"][0]["port"], 8080);
        assert_eq!(json["ports"][0]["mode"], "DISABLE");
        assert_eq!(json["ports"][0]["level"], "workloadPort");
        // The namespace Policy decides the default but loses port 8080: listed for that port.
        assert_eq!(json["ignored"][0]["policy"]["name"], "default");
        assert_eq!(
            json["ignored"][0]["why"],
            "port 8080: port 8080 of PeerAuthentication hipster-app/fe applies, and \
             PeerAuthentication takes precedence over v1alpha1 policies"
        );
        let none =
            serde_json::to_value(PolicySet::empty().decide(&ws, &ws.workloads[0], 80)).unwrap();
        assert!(none["decidedBy"].is_null() && none["level"].is_null());
        assert_eq!(Level::WorkloadPort.to_string(), "workload port");
        assert_eq!(Level::ServicePort.to_string(), "service port");
        assert_eq!(Mode::Disable.to_string(), "DISABLE");
    }
}
