//! What the agent's ClusterRole must grant, and nothing more: the watched kinds (read), the
//! Events it posts (create), and what open issues add. `deploy/clusterrole.yaml` is checked
//! against it (agent/tests/deploy.rs), both ways.

/// One permission: API group (`""` for the core group), resource, verb.
pub type Permission = (String, String, &'static str);

/// Every permission the agent uses, sorted. API discovery (`/apis`) is a non-resource URL that
/// every authenticated client may read (the built-in `system:discovery` role): no rule.
pub fn required() -> Vec<Permission> {
    let reads = super::watch::watched_resources();
    let mut v: Vec<Permission> = reads
        .into_iter()
        .flat_map(|(g, r)| {
            ["get", "list", "watch"].map(move |verb| (g.clone(), r.clone(), verb)).into_iter()
        })
        .collect();
    // Events on pods of the node, on the agent's own pod and on its Node (`events`).
    v.push((String::new(), "events".into(), "create"));
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_get_list_watch_and_events_are_only_created() {
        let p = required();
        let events: Vec<_> = p.iter().filter(|(_, r, _)| r == "events").collect();
        assert_eq!(events, [&(String::new(), "events".to_owned(), "create")]);
        for verb in ["get", "list", "watch"] {
            assert!(p.contains(&("".into(), "pods".into(), verb)));
            assert!(p.contains(&(
                "security.istio.io".into(),
                "authorizationpolicies".into(),
                verb
            )));
        }
        assert!(!p.iter().any(|(_, _, v)| matches!(*v, "update" | "patch" | "delete")));
    }
}
