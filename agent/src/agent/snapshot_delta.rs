//! What changed between two workload sets, as far as this node's enrollment cares: a snapshot
//! that changes only remote pods (most of them, in a large cluster) needs no reconcile of the
//! node's pods and no rewrite of their rules.

use crate::workloads::WorkloadSet;

/// The cheap facts `apply_snapshot` decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delta {
    /// The pods of this node are the same, in the same order (never on the first snapshot).
    pub local_pods_same: bool,
    /// The services selecting each pod of this node are the same (they pick which v1alpha1
    /// policies apply to a pod; no other service changes a pod's rules). Asked of the node's
    /// pods only, not compared over the cluster's services: a rollout elsewhere changes
    /// EndpointSlices in every snapshot.
    pub services_same: bool,
}

impl Delta {
    pub(super) fn between(
        before: &WorkloadSet,
        now: &WorkloadSet,
        node: &str,
        first: bool,
    ) -> Delta {
        let local_pods_same = !first && before.on_node(node).eq(now.on_node(node));
        let services_same = local_pods_same
            && before
                .on_node(node)
                .zip(now.on_node(node))
                .all(|(a, b)| before.services_for(a).eq(now.services_for(b)));
        Delta { local_pods_same, services_same }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn set(extra: &str) -> WorkloadSet {
        let src = format!(
            "workloads:\n\
             - {{name: a, namespace: ns, ip: 10.0.0.1, node: n1, netns: /run/netns/a}}\n\
             - {{name: b, namespace: ns, ip: 10.0.0.2, node: n2}}\n{extra}"
        );
        WorkloadSet::parse(&src, Path::new("workloads.yaml")).unwrap()
    }

    #[test]
    fn a_remote_pod_change_leaves_the_node_as_it_was() {
        let before = set("");
        let remote = set("- {name: c, namespace: ns, ip: 10.0.0.3, node: n2}\n");
        let d = Delta::between(&before, &remote, "n1", false);
        assert_eq!(d, Delta { local_pods_same: true, services_same: true });
        // The same change seen from n2 is a change of its pods.
        assert!(!Delta::between(&before, &remote, "n2", false).local_pods_same);
    }

    #[test]
    fn a_local_pod_or_service_change_and_the_first_snapshot_are_changes() {
        let before = set("");
        let local =
            set("- {name: c, namespace: ns, ip: 10.0.0.3, node: n1, netns: /run/netns/c}\n");
        assert!(!Delta::between(&before, &local, "n1", false).local_pods_same);
        let relabelled = WorkloadSet::parse(
            "workloads:\n\
             - {name: a, namespace: ns, ip: 10.0.0.1, node: n1, netns: /run/netns/a, labels: {x: y}}\n\
             - {name: b, namespace: ns, ip: 10.0.0.2, node: n2}\n",
            Path::new("workloads.yaml"),
        )
        .unwrap();
        assert!(!Delta::between(&before, &relabelled, "n1", false).local_pods_same);
        let svc =
            set("services:\n- {name: s, namespace: ns, selector: {app: b}, ports: [{port: 80}]}\n");
        // A service of remote pods only: no rule of this node's pods changes.
        let d = Delta::between(&before, &svc, "n1", false);
        assert_eq!(d, Delta { local_pods_same: true, services_same: true });
        // One selecting a pod of the node (from seeing none, or a port changing) does.
        let local = |port: u16| {
            let src = format!(
                "workloads:\n\
                 - {{name: a, namespace: ns, ip: 10.0.0.1, node: n1, netns: /run/netns/a, labels: {{app: a}}}}\n\
                 - {{name: b, namespace: ns, ip: 10.0.0.2, node: n2}}\n\
                 services:\n- {{name: s, namespace: ns, selector: {{app: a}}, ports: [{{port: {port}}}]}}\n"
            );
            WorkloadSet::parse(&src, Path::new("workloads.yaml")).unwrap()
        };
        let unlabelled = WorkloadSet::parse(
            "workloads:\n\
             - {name: a, namespace: ns, ip: 10.0.0.1, node: n1, netns: /run/netns/a, labels: {app: a}}\n\
             - {name: b, namespace: ns, ip: 10.0.0.2, node: n2}\n",
            Path::new("workloads.yaml"),
        )
        .unwrap();
        let d = Delta::between(&unlabelled, &local(80), "n1", false);
        assert_eq!(d, Delta { local_pods_same: true, services_same: false });
        let d = Delta::between(&local(80), &local(81), "n1", false);
        assert_eq!(d, Delta { local_pods_same: true, services_same: false });
        let d = Delta::between(&local(80), &local(80), "n1", false);
        assert_eq!(d, Delta { local_pods_same: true, services_same: true });
        let d = Delta::between(&before, &before, "n1", true);
        assert_eq!(d, Delta { local_pods_same: false, services_same: false });
    }
}
