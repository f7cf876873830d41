//! The manifests in deploy/ are valid Kubernetes objects, and what they tell the agent (flags,
//! ports, paths, permissions) is what the agent has: the container's arguments are parsed by
//! the agent's own command line, the probes hit its health endpoints, the mounts hold the
//! paths it is given, and the ClusterRole grants what its watchers read.

use std::{collections::BTreeMap, path::Path};

use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
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

/// The values the kubelet gives the downward-API variables, for a sample node.
fn sample_env(c: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let field = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        let value = match (field.map(|f| f.field_path.as_str()), &e.value) {
            (Some("spec.nodeName"), _) => "node-1".to_owned(),
            (Some("status.hostIP"), _) => "192.0.2.10".to_owned(),
            (Some("metadata.namespace"), _) => SAMPLE_NAMESPACE.to_owned(),
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
    match env.get("POD_NAMESPACE") {
        Some(ns) => std::env::set_var("POD_NAMESPACE", ns),
        None => std::env::remove_var("POD_NAMESPACE"),
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
    let (ca_mount, ca) = mount_of(&args.ca_dir);
    assert_eq!(ca_mount.mount_path, args.ca_dir.to_string_lossy());
    let secret = ca.secret.as_ref().and_then(|s| s.secret_name.as_deref());
    assert_eq!(secret, Some("cacerts"), "the CA comes from Istio's cacerts secret");
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
}

#[test]
fn the_peerauthentication_crd_serves_both_versions_the_agent_watches() {
    let crd: CustomResourceDefinition = manifest("crd-peerauthentication.yaml");
    let spec = &crd.spec;
    assert_eq!(spec.group, "security.istio.io");
    assert_eq!(spec.names.kind, "PeerAuthentication");
    assert_eq!(crd.metadata.name, Some(format!("{}.{}", spec.names.plural, spec.group)));
    let watched = mtls_agent::kubernetes::watch::watched_resources();
    assert!(watched.contains(&(spec.group.clone(), spec.names.plural.clone())));
    let served: Vec<&str> =
        spec.versions.iter().filter(|v| v.served).map(|v| v.name.as_str()).collect();
    assert_eq!(served, ["v1", "v1beta1"]);
    assert_eq!(spec.versions.iter().filter(|v| v.storage).count(), 1);
    for v in &spec.versions {
        let schema = v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
        let props = schema.and_then(|s| s.properties.as_ref()).expect("a schema");
        assert!(props.contains_key("spec"), "version {} has no spec schema", v.name);
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
