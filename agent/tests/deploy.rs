//! The manifests in deploy/ are valid Kubernetes objects, and what they tell the agent (flags,
//! ports, paths, permissions) is what the agent has: the container's arguments are parsed by
//! the agent's own command line, the probes hit its health endpoints, the mounts hold the
//! paths it is given, and the ClusterRole grants what its watchers read.

use std::{collections::BTreeMap, path::Path};

use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount,
        },
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use mtls_agent::cli::{default_bpffs, Cli, Command, RunArgs};

fn manifest<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn agent_container(spec: &PodSpec) -> &Container {
    spec.containers.iter().find(|c| c.name == "agent").expect("container agent")
}

/// The namespace the sample pod runs in.
const SAMPLE_NAMESPACE: &str = "sample-mtls-ns";
/// The sample pod's name and uid.
const SAMPLE_POD: &str = "mtls-agent-x7k2p";
const SAMPLE_UID: &str = "6f1c2d3e-0000-4000-8000-000000000001";

/// The values the kubelet gives the downward-API variables, for a sample node.
fn sample_env(c: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let field = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        // A ConfigMap key comes from the ConfigMap in deploy/, which must have it.
        if let Some(k) = e.value_from.as_ref().and_then(|v| v.config_map_key_ref.as_ref()) {
            let cm: ConfigMap = manifest("configmap.yaml");
            assert_eq!(cm.metadata.name.as_deref(), Some(k.name.as_str()), "env {}", e.name);
            let value = cm.data.unwrap_or_default().get(&k.key).cloned();
            let value = value
                .unwrap_or_else(|| panic!("env {}: no key {} in configmap.yaml", e.name, k.key));
            env.insert(e.name.clone(), value);
            continue;
        }
        let value = match (field.map(|f| f.field_path.as_str()), &e.value) {
            (Some("spec.nodeName"), _) => "node-1".to_owned(),
            (Some("status.hostIP"), _) => "192.0.2.10".to_owned(),
            (Some("metadata.namespace"), _) => SAMPLE_NAMESPACE.to_owned(),
            (Some("metadata.name"), _) => SAMPLE_POD.to_owned(),
            (Some("metadata.uid"), _) => SAMPLE_UID.to_owned(),
            (Some(other), _) => panic!("env {}: unexpected fieldRef {other}", e.name),
            (None, Some(v)) => v.clone(),
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), value);
    }
    env
}

/// The container's arguments as the kubelet expands them (`$(VAR)`), parsed by the agent's
/// own command line with the container's environment.
fn parsed_args(c: &Container) -> RunArgs {
    let env = sample_env(c);
    let expand =
        |arg: &String| env.iter().fold(arg.clone(), |a, (k, v)| a.replace(&format!("$({k})"), v));
    let mut argv = vec!["mtls-agent".to_owned()];
    argv.extend(c.args.iter().flatten().map(expand));
    assert!(!argv.iter().any(|a| a.contains("$(")), "unexpanded variable in {argv:?}");
    // --node comes from NODE_NAME, as in the pod.
    let node = env.get("NODE_NAME").expect("NODE_NAME in the container's env");
    // Only the test of the DaemonSet parses arguments in this binary, so nothing races on it.
    std::env::set_var("NODE_NAME", node);
    for var in ["POD_NAMESPACE", "POD_NAME", "POD_UID"] {
        match env.get(var) {
            Some(v) => std::env::set_var(var, v),
            None => std::env::remove_var(var),
        }
    }
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    match cli.command {
        Command::Run(args) => *args,
        other => panic!("not `run`: {other:?}"),
    }
}

/// An exec probe's command, parsed by the agent's own command line with the container's
/// environment (exec probes expand no `$(VAR)`, but the process gets the container's env).
fn exec_probe(c: &Container, p: Option<&k8s_openapi::api::core::v1::Probe>) -> Command {
    let exec = p.and_then(|p| p.exec.as_ref()).expect("an exec probe");
    let argv = exec.command.clone().unwrap_or_default();
    assert_eq!(argv.first().map(String::as_str), Some("/usr/local/bin/mtls-agent"), "{argv:?}");
    assert!(!argv.iter().any(|a| a.contains("$(")), "exec probes expand no variables: {argv:?}");
    let env = sample_env(c);
    std::env::set_var("NODE_NAME", env.get("NODE_NAME").expect("NODE_NAME"));
    Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command
}

#[test]
fn the_daemonset_runs_the_agent_in_kubernetes_mode_with_what_it_needs() {
    let ds: DaemonSet = manifest("daemonset.yaml");
    let spec = ds.spec.as_ref().expect("spec");
    let strategy = spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
    let strategy = strategy.expect("rollingUpdate");
    assert_eq!(strategy.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(strategy.max_surge, Some(IntOrString::Int(1)));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    let c = agent_container(pod);
    let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
    assert_eq!(privileged, Some(true));

    let args = parsed_args(c);
    assert_eq!(args.workloads, None, "Kubernetes mode is `run` without --workloads");
    assert_eq!(args.node, "node-1");
    // The agent's own namespace (never enrolled) is the one it runs in, from the downward API.
    assert_eq!(args.agent_namespace, SAMPLE_NAMESPACE);
    // Events about the agent itself (a node it refuses) go on its own pod.
    assert_eq!(args.pod_name.as_deref(), Some(SAMPLE_POD));
    assert_eq!(args.pod_uid.as_deref(), Some(SAMPLE_UID));
    assert_eq!(args.min_kernel, None, "--min-kernel is for tests only");
    // Probes are admitted by who opened them (`--kubelet-cgroup`), never by source address.
    assert_eq!(
        args.node_ip, None,
        "--node-ip grants nothing any more: the DaemonSet must not pass it"
    );

    // Probes: exec `mtls-agent probe`, which asks this container's own instance over its
    // admin socket in the node's directory (where the agent puts it), never a TCP port that
    // the old and the new instance of a surge share.
    use mtls_agent::admin::probe::ProbeKind;
    for (probe, want) in [
        (c.readiness_probe.as_ref(), ProbeKind::Ready),
        (c.liveness_probe.as_ref(), ProbeKind::Live),
    ] {
        let Command::Probe { kind, admin_dir, node, proc_root } = exec_probe(c, probe) else {
            panic!("not `mtls-agent probe`: {probe:?}")
        };
        assert_eq!(kind, want);
        let probe_dir = admin_dir
            .unwrap_or_else(|| mtls_agent::admin::socket::default_dir(&node.expect("node")));
        let agent_dir = args
            .admin_dir
            .clone()
            .unwrap_or_else(|| mtls_agent::admin::socket::default_dir(&args.node));
        assert_eq!(probe_dir, agent_dir, "the probe looks where the agent's sockets are");
        // The container's own /proc shows the agent's process (hostPID).
        assert_eq!(proc_root, Path::new("/proc"));
        assert!(pod.host_pid == Some(true), "the probe must see the agent's pid");
    }
    // A hostNetwork pod's container ports are host ports: with any, the new pod of a surge
    // cannot be scheduled beside the old one and the rollout stalls on every node.
    let declared: Vec<_> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .collect();
    assert!(declared.is_empty(), "a hostNetwork pod declares ports (host ports): {declared:?}");
    let annotations = spec.template.metadata.as_ref().and_then(|m| m.annotations.clone());
    let scrape_port = annotations.unwrap_or_default().get("prometheus.io/port").cloned();
    assert_eq!(scrape_port, Some(args.metrics.port().to_string()));
    // The kubelet waits for the drain.
    let grace = pod.termination_grace_period_seconds.expect("terminationGracePeriodSeconds");
    assert!(grace as u64 > args.drain_timeout.as_secs(), "grace {grace}s <= drain timeout");

    // Every path the agent is given is inside a mount of the right kind.
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> =
        pod.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    let mount_of = |path: &Path| {
        let mounts = c.volume_mounts.iter().flatten();
        let m = mounts
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{} is not mounted", path.display()));
        (m, volumes[m.name.as_str()])
    };
    let host_path = |path: &Path| {
        let (m, v) = mount_of(path);
        let hp = v.host_path.as_ref().unwrap_or_else(|| panic!("{} is not a hostPath", m.name));
        let inside = path.strip_prefix(&m.mount_path).expect("under the mount");
        Path::new(&hp.path).join(inside)
    };
    assert_eq!(host_path(&args.cgroup), Path::new("/sys/fs/cgroup"));
    assert_eq!(host_path(&args.cgroup_root), Path::new("/sys/fs/cgroup"));
    assert_eq!(host_path(&args.proc_root), Path::new("/proc"));
    let bpffs = args.bpffs.clone().unwrap_or_else(|| default_bpffs(&args.node));
    assert!(host_path(&bpffs).starts_with("/sys/fs/bpf"), "{}", bpffs.display());
    let (bpf_mount, _) = mount_of(&bpffs);
    // Pins made in the container must land in the host's bpffs.
    assert_eq!(bpf_mount.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(host_path(Path::new("/var/run/netns")), Path::new("/var/run/netns"));

    // No CA key on the nodes: certificates come from the certificate service, with a token
    // bound to the pod for the audience istio-ca, verified against the bundle it publishes.
    assert_eq!(args.ca_dir, None, "the DaemonSet must not sign with a CA key on the node");
    for v in pod.volumes.iter().flatten() {
        assert!(v.secret.is_none(), "the DaemonSet mounts a secret: {}", v.name);
        let projected = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        assert!(projected.clone().all(|s| s.secret.is_none()), "a projected secret: {}", v.name);
    }
    let address = args.ca_address.as_deref().expect("--ca-address");
    let service: Service = manifest("ca-service.yaml");
    let port = service.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p.first());
    assert_eq!(
        address,
        format!(
            "https://{}.{}.svc:{}",
            service.metadata.name.as_deref().unwrap_or_default(),
            service.metadata.namespace.as_deref().unwrap_or_default(),
            port.map(|p| p.port).unwrap_or_default()
        ),
        "the agents ask the CA's Service"
    );
    let token = args.ca_token_file.as_deref().expect("--ca-token-file");
    let (m, v) = mount_of(token);
    let inside = token.strip_prefix(&m.mount_path).expect("under the mount");
    let sources = v.projected.as_ref().map(|p| p.sources.clone().unwrap_or_default());
    let sat = sources
        .unwrap_or_default()
        .into_iter()
        .find_map(|s| s.service_account_token)
        .expect("a projected service account token");
    assert_eq!(Path::new(&sat.path), inside);
    assert_eq!(
        sat.audience.as_deref(),
        Some("istio-ca"),
        "the audience istiod and ca serve ask for"
    );
    let root = args.ca_root.as_deref().expect("--ca-root");
    let (m, v) = mount_of(root);
    let cm = v.config_map.as_ref().expect("the trust bundle from a ConfigMap");
    assert_eq!(root.strip_prefix(&m.mount_path).ok(), Some(Path::new("root-cert.pem")));
    let ca = ca_serve_args();
    assert_eq!(
        Some(format!("mtls-system/{}", cm.name)),
        Some(ca.root_configmap.clone()),
        "the ConfigMap the certificate service writes"
    );
    assert!(
        ca.server_names.iter().any(|n| address.contains(&format!("//{n}:"))),
        "{:?}",
        ca.server_names
    );
}

/// The certificate service's arguments, expanded and parsed by the agent's command line.
fn ca_serve_args() -> mtls_agent::cli::CaServeArgs {
    let d: Deployment = manifest("ca-deployment.yaml");
    let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let c = pod.containers.iter().find(|c| c.name == "ca").expect("container ca");
    let env = sample_env(c);
    let expand =
        |arg: &String| env.iter().fold(arg.clone(), |a, (k, v)| a.replace(&format!("$({k})"), v));
    let mut argv = vec!["mtls-agent".to_owned()];
    argv.extend(c.args.iter().flatten().map(expand));
    match Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command {
        Command::Ca { command: mtls_agent::cli::CaCommand::Serve(args) } => *args,
        other => panic!("not `ca serve`: {other:?}"),
    }
}

#[test]
fn the_certificate_service_runs_twice_in_kubernetes_mode_and_alone_holds_the_key() {
    let d: Deployment = manifest("ca-deployment.yaml");
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pdb: PodDisruptionBudget = manifest("ca-pdb.yaml");
    let pdb_spec = pdb.spec.as_ref().expect("pdb spec");
    assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
    assert_eq!(pdb_spec.selector.as_ref(), Some(&spec.selector), "the PDB covers the replicas");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let args = ca_serve_args();
    assert_eq!(
        (args.node_tokens.as_ref(), args.workloads.as_ref()),
        (None, None),
        "Kubernetes mode"
    );
    assert_eq!(args.trusted_node_accounts, ["mtls-system/mtls-agent"]);
    let ds_account = {
        let ds: DaemonSet = manifest("daemonset.yaml");
        let sa = ds.spec.and_then(|s| s.template.spec).and_then(|p| p.service_account_name);
        format!("mtls-system/{}", sa.unwrap_or_default())
    };
    assert_eq!(args.trusted_node_accounts, [ds_account], "the agents' account is the trusted one");
    assert_eq!(args.token_audience, "istio-ca");
    // The key: the cacerts secret, mounted where --ca-dir points.
    let c = pod.containers.iter().find(|c| c.name == "ca").expect("container ca");
    let m = c.volume_mounts.iter().flatten().find(|m| args.ca_dir.starts_with(&m.mount_path));
    let m = m.expect("--ca-dir is mounted");
    let v = pod.volumes.iter().flatten().find(|v| v.name == m.name).expect("its volume");
    assert_eq!(v.secret.as_ref().and_then(|s| s.secret_name.as_deref()), Some("cacerts"));
    // Readiness asks the service whether it can decide, where it answers.
    let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("httpGet");
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, IntOrString::Int(i32::from(args.monitoring.port())));
    // The Service sends 15012 to where it listens.
    let service: Service = manifest("ca-service.yaml");
    let port = service.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    assert_eq!(
        port.first().and_then(|p| p.target_port.clone()),
        Some(IntOrString::Int(i32::from(args.listen.port())))
    );
    assert_eq!(service.spec.and_then(|s| s.selector), spec.selector.match_labels);
    // Its RBAC: review tokens, read pods, write its ConfigMap; the agents read no secret.
    let role: ClusterRole = manifest("ca-clusterrole.yaml");
    let rules = role.rules.unwrap_or_default();
    let grants = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    assert!(grants("authentication.k8s.io", "tokenreviews", "create"));
    assert!(grants("", "pods", "watch") && grants("", "pods", "list"));
    let ns_role: Role = manifest("ca-role.yaml");
    let r = ns_role.rules.unwrap_or_default();
    for verb in ["create", "get", "update"] {
        assert!(
            r.iter().any(|r| r.resources.iter().flatten().any(|x| x == "configmaps")
                && r.verbs.iter().any(|v| v == verb)),
            "{verb}"
        );
    }
    // Reading and changing: its own ConfigMap only.
    let configmap = args.root_configmap.split_once('/').map(|(_, n)| n.to_owned());
    for rule in r.iter().filter(|r| r.verbs.iter().any(|v| v == "get" || v == "update")) {
        let names = rule.resource_names.clone().unwrap_or_default();
        assert_eq!(names, configmap.clone().into_iter().collect::<Vec<_>>(), "{rule:?}");
    }
    let agent: ClusterRole = manifest("clusterrole.yaml");
    assert!(
        !agent.rules.unwrap_or_default().iter().any(|r| r
            .resources
            .iter()
            .flatten()
            .any(|x| x == "secrets" || x == "*")),
        "the agent may not read secrets"
    );
}

#[test]
fn the_service_account_may_read_what_the_watchers_watch() {
    let ds: DaemonSet = manifest("daemonset.yaml");
    let sa: ServiceAccount = manifest("serviceaccount.yaml");
    let ns: Namespace = manifest("namespace.yaml");
    let role: ClusterRole = manifest("clusterrole.yaml");
    let binding: ClusterRoleBinding = manifest("clusterrolebinding.yaml");

    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    assert_eq!(sa.metadata.namespace, ns.metadata.name);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = binding.subjects.iter().flatten().find(|s| s.kind == "ServiceAccount");
    let subject = subject.expect("a ServiceAccount subject");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);

    for (group, resource) in mtls_agent::kubernetes::watch::watched_resources() {
        for verb in ["get", "list", "watch"] {
            let granted = role.rules.iter().flatten().any(|r| {
                r.api_groups.iter().flatten().any(|g| *g == group)
                    && r.resources.iter().flatten().any(|x| *x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            });
            assert!(granted, "ClusterRole does not grant {verb} on {resource} in {group:?}");
        }
    }
    // Exactly what the agent uses, no more: every (group, resource, verb) the rules grant is
    // one it needs, and the reverse; no wildcard, no resourceNames, no non-resource URLs.
    let mut granted = Vec::new();
    for r in role.rules.iter().flatten() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none(), "{r:?}");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert!(![g, res, v].iter().any(|x| x.contains('*')), "a wildcard: {r:?}");
                    granted.push((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    granted.sort();
    let required: Vec<(String, String, String)> = mtls_agent::kubernetes::rbac::required()
        .into_iter()
        .map(|(g, r, v)| (g, r, v.to_owned()))
        .collect();
    assert_eq!(granted, required, "the ClusterRole grants other than what the agent uses");
    // AuthorizationPolicy is watched (L4 authorization).
    assert!(granted.contains(&(
        "security.istio.io".into(),
        "authorizationpolicies".into(),
        "watch".into()
    )));
}

#[test]
fn the_istio_crds_serve_both_versions_the_agent_watches() {
    for (file, kind) in [
        ("crd-peerauthentication.yaml", "PeerAuthentication"),
        ("crd-authorizationpolicy.yaml", "AuthorizationPolicy"),
    ] {
        let crd: CustomResourceDefinition = manifest(file);
        let spec = &crd.spec;
        assert_eq!(spec.group, "security.istio.io");
        assert_eq!(spec.names.kind, kind);
        assert_eq!(crd.metadata.name, Some(format!("{}.{}", spec.names.plural, spec.group)));
        let watched = mtls_agent::kubernetes::watch::watched_resources();
        assert!(watched.contains(&(spec.group.clone(), spec.names.plural.clone())), "{file}");
        let served: Vec<&str> =
            spec.versions.iter().filter(|v| v.served).map(|v| v.name.as_str()).collect();
        assert_eq!(served, ["v1", "v1beta1"], "{file}");
        assert_eq!(spec.versions.iter().filter(|v| v.storage).count(), 1, "{file}");
        for v in &spec.versions {
            let schema = v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
            let props = schema.and_then(|s| s.properties.as_ref()).expect("a schema");
            assert!(props.contains_key("spec"), "{file}: version {} has no spec schema", v.name);
        }
    }
}

#[test]
fn the_image_runs_the_agent() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).expect("deploy/Dockerfile");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "a multi-stage build");
    assert!(text.contains("cargo xtask build-ebpf"), "the eBPF object is built as xtask does");
    assert!(text.contains(r#"ENTRYPOINT ["/usr/local/bin/mtls-agent"]"#));
}

#[test]
fn the_uninstall_daemonset_uninstalls_every_node_and_reports_done() {
    let ds: DaemonSet = manifest("uninstall.yaml");
    let agent: DaemonSet = manifest("daemonset.yaml");
    assert_eq!(ds.metadata.namespace, agent.metadata.namespace);
    let spec = ds.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    // Every node the agent ran on: the same tolerations, the host's processes.
    let agent_pod = agent.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("agent");
    assert_eq!(pod.tolerations, agent_pod.tolerations);
    assert_eq!(pod.host_pid, Some(true));
    let c = pod.containers.iter().find(|c| c.name == "uninstall").expect("container uninstall");
    assert_eq!(c.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    assert_eq!(c.image, agent_container(agent_pod).image);

    let env = sample_env(c);
    let expand =
        |arg: &String| env.iter().fold(arg.clone(), |a, (k, v)| a.replace(&format!("$({k})"), v));
    let mut argv = vec!["mtls-agent".to_owned()];
    argv.extend(c.args.iter().flatten().map(expand));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Uninstall { node, bpffs, proc_root, verify, then_wait, force } = cli.command
    else {
        panic!("not `uninstall`: {argv:?}")
    };
    assert_eq!(node, "node-1");
    assert!(then_wait && !verify, "it stays running after the work, reporting done by readiness");
    assert!(!force, "a running agent must make it fail (and retry), not be pulled from under");
    // The probe checks that nothing is left; its --node comes from the container's NODE_NAME
    // (exec probes expand no variables).
    assert_eq!(env.get("NODE_NAME").map(String::as_str), Some("node-1"));
    let probe = c.readiness_probe.as_ref().and_then(|p| p.exec.as_ref()).expect("exec probe");
    let probe_argv = probe.command.clone().unwrap_or_default();
    assert_eq!(probe_argv.first().map(String::as_str), Some("/usr/local/bin/mtls-agent"));
    let probe_argv: Vec<String> = probe_argv.into_iter().chain(["--node=node-1".into()]).collect();
    let probe_cli =
        Cli::try_parse_from(&probe_argv).unwrap_or_else(|e| panic!("{probe_argv:?}: {e}"));
    assert!(matches!(probe_cli.command, Command::Uninstall { verify: true, bpffs: None, .. }));

    // It reaches the same pins and processes as the agent.
    let host_of = |path: &Path| {
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{} is not mounted", path.display()));
        let v = pod.volumes.iter().flatten().find(|v| v.name == m.name).expect("volume");
        let hp = v.host_path.as_ref().expect("hostPath");
        (Path::new(&hp.path).join(path.strip_prefix(&m.mount_path).expect("under")), m.clone())
    };
    let bpffs = bpffs.unwrap_or_else(|| default_bpffs(&node));
    let (host_bpffs, m) = host_of(&bpffs);
    assert!(host_bpffs.starts_with("/sys/fs/bpf"), "{}", host_bpffs.display());
    assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(host_of(&proc_root).0, Path::new("/proc"));
}

/// Every manifest in deploy/ (one object per file) parses as the typed object of its kind, so
/// a misspelt field or a wrong type fails here rather than at `kubectl apply`.
#[test]
fn every_manifest_parses_as_its_kind() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("deploy/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut kinds = Vec::new();
    for name in &files {
        let v: serde_yaml::Value = manifest(name);
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        // Unknown fields are an error: the typed structs would drop them silently.
        let strict = |kind: &str| {
            let typed: serde_json::Value = match kind {
                "Namespace" => serde_json::to_value(manifest::<Namespace>(name)),
                "ConfigMap" => serde_json::to_value(manifest::<ConfigMap>(name)),
                "ServiceAccount" => serde_json::to_value(manifest::<ServiceAccount>(name)),
                "ClusterRole" => serde_json::to_value(manifest::<ClusterRole>(name)),
                "ClusterRoleBinding" => serde_json::to_value(manifest::<ClusterRoleBinding>(name)),
                "DaemonSet" => serde_json::to_value(manifest::<DaemonSet>(name)),
                "Deployment" => serde_json::to_value(manifest::<Deployment>(name)),
                "Service" => serde_json::to_value(manifest::<Service>(name)),
                "PodDisruptionBudget" => {
                    serde_json::to_value(manifest::<PodDisruptionBudget>(name))
                }
                "Role" => serde_json::to_value(manifest::<Role>(name)),
                "RoleBinding" => serde_json::to_value(manifest::<RoleBinding>(name)),
                "ResourceQuota" => serde_json::to_value(manifest::<ResourceQuota>(name)),
                "NetworkPolicy" => serde_json::to_value(manifest::<NetworkPolicy>(name)),
                "CustomResourceDefinition" => {
                    serde_json::to_value(manifest::<CustomResourceDefinition>(name))
                }
                other => panic!("{name}: a kind this test does not know: {other:?}"),
            }
            .expect("serialises");
            let raw: serde_json::Value =
                serde_json::to_value(&v).unwrap_or_else(|e| panic!("{name}: {e}"));
            if let Some(path) = dropped(&raw, &typed, String::new()) {
                panic!("{name}: {path} is not a field of {kind}");
            }
        };
        strict(&kind);
        kinds.push(kind);
    }
    for want in [
        "Namespace",
        "ConfigMap",
        "ResourceQuota",
        "DaemonSet",
        "NetworkPolicy",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.iter().any(|k| k == want), "no {want} in deploy/: {files:?}");
    }
}

/// The first key of `raw` that the typed round trip `typed` lost (an unknown field).
fn dropped(raw: &serde_json::Value, typed: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value::{Array, Object};
    match (raw, typed) {
        (Object(r), Object(t)) => r.iter().find_map(|(k, v)| match t.get(k) {
            Some(tv) => dropped(v, tv, format!("{at}.{k}")),
            // An empty value may be left out by the typed side.
            None if v.is_null() || v == &serde_json::json!({}) || v == &serde_json::json!([]) => {
                None
            }
            None => Some(format!("{at}.{k}")),
        }),
        (Array(r), Array(t)) => {
            r.iter().zip(t).enumerate().find_map(|(i, (r, t))| dropped(r, t, format!("{at}[{i}]")))
        }
        _ => None,
    }
}

#[test]
fn the_agent_namespace_admits_privileged_pods() {
    let ns: Namespace = manifest("namespace.yaml");
    let labels = ns.metadata.labels.unwrap_or_default();
    // Pod Security admission: a cluster defaulting to baseline or restricted refuses
    // privileged, hostNetwork, hostPID pods unless their namespace says privileged.
    for mode in ["enforce", "audit", "warn"] {
        let key = format!("pod-security.kubernetes.io/{mode}");
        assert_eq!(labels.get(&key).map(String::as_str), Some("privileged"), "{key}");
    }
    // Never in the mesh itself.
    assert!(!labels.contains_key(mtls_agent::kubernetes::membership::DATAPLANE_MODE));
}

#[test]
fn both_daemonsets_run_on_linux_at_node_critical_priority_from_a_qualified_image() {
    let quota: ResourceQuota = manifest("resourcequota.yaml");
    for file in ["daemonset.yaml", "uninstall.yaml"] {
        let ds: DaemonSet = manifest(file);
        let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
        let selector = pod.node_selector.clone().unwrap_or_default();
        assert_eq!(selector.get("kubernetes.io/os").map(String::as_str), Some("linux"), "{file}");
        assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{file}");

        // The image: registry host, repository, and this version's tag (never latest, never
        // a bare name that each node's runtime resolves its own way).
        for c in &pod.containers {
            let image = c.image.as_deref().expect("image");
            let (repo, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{file}: {image}"));
            let host = repo.split('/').next().unwrap_or_default();
            assert!(host.contains('.') && repo.matches('/').count() >= 2, "{file}: {image}");
            assert_eq!(tag, env!("CARGO_PKG_VERSION"), "{file}: {image}");
            assert!(repo.ends_with("/mtls-agent"), "{file}: {image}");
        }

        // GKE admits system-node-critical outside kube-system only with a quota scoped to
        // it in the pod's namespace: this one, covering the class.
        assert_eq!(quota.metadata.namespace, ds.metadata.namespace, "{file}");
        let scope = quota.spec.as_ref().and_then(|s| s.scope_selector.as_ref());
        let exprs = scope.and_then(|s| s.match_expressions.clone()).unwrap_or_default();
        let covered = exprs.iter().any(|e| {
            e.scope_name == "PriorityClass"
                && e.operator == "In"
                && e.values.iter().flatten().any(|v| Some(v) == pod.priority_class_name.as_ref())
        });
        assert!(covered, "{file}: the quota does not cover its priority class: {exprs:?}");
    }
    // The quota is there for admission only: a cap a cluster can reach would silently leave
    // new nodes without an agent. 1M is beyond any cluster (GKE's 65k nodes, surged, plus the
    // uninstall DaemonSet's pods).
    let hard = quota.spec.and_then(|s| s.hard).unwrap_or_default();
    let pods = hard.get("pods").expect("hard.pods").0.clone();
    let (digits, scale) = match pods.chars().last() {
        Some('k') => (&pods[..pods.len() - 1], 1_000),
        Some('M') => (&pods[..pods.len() - 1], 1_000_000),
        _ => (pods.as_str(), 1),
    };
    let n = digits.parse::<u64>().expect("a number") * scale;
    assert!(n >= 1_000_000, "{n} pods: a cap a cluster can reach (new nodes get no agent)");
}

#[test]
fn the_trust_domain_is_the_configmaps_and_passed_explicitly() {
    let ds: DaemonSet = manifest("daemonset.yaml");
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let c = agent_container(pod);
    // Given on the command line, not left to the flag's default.
    let given = c.args.iter().flatten().filter(|a| a.starts_with("--trust-domain")).count();
    assert_eq!(given, 1, "--trust-domain is not passed: {:?}", c.args);
    let cm: ConfigMap = manifest("configmap.yaml");
    assert_eq!(cm.metadata.namespace, ds.metadata.namespace);
    let from_cm = cm.data.unwrap_or_default().get("trustDomain").cloned().expect("trustDomain");
    let args = parsed_args(c);
    assert_eq!(args.trust_domain, from_cm);
    mtls_agent::identity::validate_trust_domain(&args.trust_domain).expect("a valid trust domain");
    // The pod must not start without it.
    let env = c.env.iter().flatten().find(|e| e.name == "TRUST_DOMAIN").expect("TRUST_DOMAIN");
    let key = env.value_from.as_ref().and_then(|v| v.config_map_key_ref.as_ref()).expect("ref");
    assert_ne!(key.optional, Some(true), "an optional trust domain falls back to nothing");
}

#[test]
fn the_image_builds_for_amd64_and_arm64() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).expect("deploy/Dockerfile");
    // Backslash continuations make one instruction.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<&str> =
        joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let stages: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    // The build stage runs on the builder's platform and cross-compiles; the runtime stage is
    // the target platform's (no --platform), so buildx pulls its base for each architecture.
    assert!(stages[0].contains("--platform=$BUILDPLATFORM"), "{}", stages[0]);
    let last = stages.last().expect("a runtime stage");
    assert!(!last.contains("--platform"), "{last}");
    let build: Vec<&&str> = instructions
        .iter()
        .skip_while(|l| !l.starts_with("FROM "))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .collect();
    assert!(build.contains(&&"ARG TARGETARCH"), "ARG TARGETARCH in the build stage");
    let all = build.iter().map(|l| **l).collect::<Vec<_>>().join("\n");
    for (arch, target) in
        [("amd64", "x86_64-unknown-linux-gnu"), ("arm64", "aarch64-unknown-linux-gnu")]
    {
        let mapped = all.lines().any(|l| l.contains(&format!("{arch})")) && l.contains(target));
        assert!(mapped, "TARGETARCH {arch} is not mapped to {target}");
        let linker = format!("CARGO_TARGET_{}_LINKER", target.to_uppercase().replace('-', "_"));
        assert!(all.contains(&linker), "no cross linker for {target} ({linker})");
    }
    assert!(all.contains("cargo xtask build-ebpf"), "the eBPF object is built as xtask does");
    assert!(all.contains("cargo build --release --locked -p mtls-agent --target"));
    assert!(text.contains(r#"ENTRYPOINT ["/usr/local/bin/mtls-agent"]"#));
}

/// The README's NetworkPolicy (deploy/networkpolicy-example.yaml): meshed pods reach each
/// other's tunnel port, which is what the agent dials.
#[test]
fn the_example_network_policy_opens_the_tunnel_port_between_meshed_pods() {
    let np: NetworkPolicy = manifest("networkpolicy-example.yaml");
    let spec = np.spec.expect("spec");
    assert_eq!(spec.pod_selector.unwrap_or_default(), Default::default(), "every pod");
    let types = spec.policy_types.clone().unwrap_or_default();
    assert!(types.contains(&"Ingress".into()) && types.contains(&"Egress".into()), "{types:?}");
    let hbone = i32::from(mtls_agent::tunnel::hbone::HBONE_PORT);
    let meshed = |peers: &[k8s_openapi::api::networking::v1::NetworkPolicyPeer]| {
        peers.iter().any(|p| {
            let labels = p.namespace_selector.as_ref().and_then(|s| s.match_labels.clone());
            labels.unwrap_or_default().get(mtls_agent::kubernetes::membership::DATAPLANE_MODE)
                == Some(&"ambient".to_owned())
        })
    };
    let opens = |ports: &[k8s_openapi::api::networking::v1::NetworkPolicyPort]| {
        ports.iter().any(|p| {
            p.port == Some(IntOrString::Int(hbone)) && p.protocol.as_deref() == Some("TCP")
        })
    };
    let ingress = spec.ingress.unwrap_or_default();
    assert!(ingress.iter().any(|r| meshed(r.from.as_deref().unwrap_or_default())
        && opens(r.ports.as_deref().unwrap_or_default())));
    let egress = spec.egress.unwrap_or_default();
    assert!(egress.iter().any(|r| meshed(r.to.as_deref().unwrap_or_default())
        && opens(r.ports.as_deref().unwrap_or_default())));
}

/// The README gives the same NetworkPolicy as deploy/networkpolicy-example.yaml.
#[test]
fn the_readme_gives_the_example_network_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.contains("kind: NetworkPolicy"))
        .expect("a NetworkPolicy YAML block in README.md");
    // The block is indented under its list item.
    let indent = block.lines().map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    let text: String = block.lines().map(|l| format!("{}\n", &l[indent.min(l.len())..])).collect();
    let readme_np: NetworkPolicy = serde_yaml::from_str(&text).expect("the README's YAML parses");
    let file_np: NetworkPolicy = manifest("networkpolicy-example.yaml");
    assert_eq!(readme_np, file_np);
}
