//! Command line.

pub mod render;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mtls-agent",
    version,
    about = "eBPF-assisted, sidecar-less mTLS agent for Kubernetes nodes"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Certificate authority for workload identities (Istio plug-in CA layout).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Is this pod's traffic encrypted, and which policy decided? Its listeners and outbound
    /// destinations, like `istioctl experimental auth check`.
    Check {
        /// The pod, as NAME.NAMESPACE.
        pod: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Live and recent connections, with mode, identities and deciding policy.
    Connections {
        /// Only connections from or to this pod (NAME.NAMESPACE).
        #[arg(long)]
        pod: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The node's workload certificates.
    Certs {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The kubelet's exec probe of the agent instance of this container (the one whose process
    /// shares this process's cgroup), over its admin socket: exits 0 and prints its answer when
    /// it is ready (or live), 1 otherwise, and 1 when this container has no instance. Never
    /// answered by another instance on the node (two run side by side during a rollout).
    Probe {
        /// `ready`: the instance serves; `live`: it answers.
        #[arg(value_enum)]
        kind: crate::admin::probe::ProbeKind,
        /// Directory of the agent instances' admin sockets (default /run/mtls-agent/<node>;
        /// without `--node`, every node directory under /run/mtls-agent).
        #[arg(long)]
        admin_dir: Option<PathBuf>,
        /// The node whose socket directory to look in.
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
        /// Where this process's and the instances' cgroups are read (`self/cgroup`,
        /// `<pid>/cgroup`): the container's /proc, which shows the node's processes (hostPID).
        #[arg(long, default_value = "/proc")]
        proc_root: PathBuf,
    },
    /// mTLS policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Take a node out of the mesh: undo what the agent set up in its pods' namespaces and
    /// remove its pinned programs and maps. Until this runs, a node whose agent is gone keeps
    /// its pods failing closed. Idempotent: a second run says there is nothing left.
    Uninstall {
        /// The node whose pins to remove.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// bpffs directory (default /sys/fs/bpf/mtls-agent/<node>).
        #[arg(long)]
        bpffs: Option<PathBuf>,
        /// The node's /proc, to find pods' network namespaces (run with the host's PID
        /// namespace).
        #[arg(long, default_value = "/proc")]
        proc_root: PathBuf,
        /// Only check: succeed if nothing of the agent is pinned for the node, fail otherwise
        /// (the uninstall DaemonSet's readiness probe).
        #[arg(long, conflicts_with = "then_wait")]
        verify: bool,
        /// After uninstalling, stay running until SIGTERM (a DaemonSet pod that reports done
        /// through its readiness probe).
        #[arg(long)]
        then_wait: bool,
        /// Uninstall even though an agent instance of the node is running (it is refused
        /// otherwise: the agent would go on enrolling pods).
        #[arg(long)]
        force: bool,
    },
}

/// How the operator commands reach the agent and print. By default the admin socket of the
/// ready agent instance in the node's socket directory.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The agent's admin API over TCP (only if the agent runs with `--admin ADDR`).
    #[arg(long, conflicts_with_all = ["admin_socket", "admin_dir"])]
    pub admin: Option<SocketAddr>,
    /// The admin socket of one agent instance.
    #[arg(long, conflicts_with = "admin_dir")]
    pub admin_socket: Option<PathBuf>,
    /// Directory of the agent instances' admin sockets (default /run/mtls-agent/<node>; without
    /// `--node`, every node directory under /run/mtls-agent).
    #[arg(long)]
    pub admin_dir: Option<PathBuf>,
    /// The node whose agent to ask (its socket directory).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory and print, per workload and port, the effective mode, the
    /// deciding policy and every policy that was ignored and why. Exits non-zero on invalid input.
    Check {
        /// Policy directory.
        dir: PathBuf,
        /// Workloads file to resolve the policies against.
        #[arg(long)]
        workloads: PathBuf,
        /// Root namespace (mesh-wide PeerAuthentication and AuthorizationPolicy).
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
        /// With --to: judge one connection from this source, POD.NAMESPACE of the workloads
        /// file (mutual TLS with its identity) or an IP address (plaintext unless it is a
        /// workload's), instead of printing every workload.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// With --from: the destination, POD.NAMESPACE:PORT.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Trust domain of the principals (`TRUST_DOMAIN/ns/NS/sa/SA`).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Output format of the --from/--to answer.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new CA (ECDSA P-256) in Istio's plug-in layout: ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem. With --root-dir, a root there (root-cert.pem,
    /// root-key.pem: keep it offline) and an intermediate signed by it in --dir; with
    /// --sign-intermediate too, a new intermediate from the existing root of --root-dir.
    /// Alone, --dir gets a self-signed root that signs (development).
    Init {
        /// Directory to write the CA files into (created if missing; never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Directory of the root (written, or read with --sign-intermediate).
        #[arg(long)]
        root_dir: Option<PathBuf>,
        /// Sign a new intermediate with the existing root of --root-dir.
        #[arg(long, requires = "root_dir")]
        sign_intermediate: bool,
    },
    /// The certificate service: the only holder of the CA's key. Node agents (and Istio's
    /// node proxies) ask it for their pods' certificates over Istio's CA protocol (gRPC
    /// `IstioCertificateService/CreateCertificate` over TLS); it signs a pod's identity only
    /// for the agent of that pod's node.
    Serve(Box<CaServeArgs>),
}

#[derive(Debug, clap::Args)]
pub struct CaServeArgs {
    /// The CA directory (Istio plug-in CA layout, as `ca init` writes it).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Address of `/metrics` (issued, refused by code) and `/healthz/ready` (ready once it can
    /// decide: in Kubernetes mode, once the pods are listed).
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub monitoring: SocketAddr,
    /// DNS names the service's own certificate carries: the names clients dial (repeatable).
    #[arg(long = "server-name", default_value = "mtls-ca.mtls-system.svc")]
    pub server_names: Vec<String>,
    /// SPIFFE trust domain of the identities it signs.
    #[arg(long)]
    pub trust_domain: String,
    /// The longest lifetime of a certificate it issues (longer requests are cut to it).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: std::time::Duration,
    /// Certificates one node may ask for per second (bursts of ten times that); more are
    /// refused (RESOURCE_EXHAUSTED) and asked again by the agent.
    #[arg(long, default_value_t = crate::certservice::server::RATE_PER_SECOND)]
    pub node_rate: u32,
    /// File mode: the node agents' tokens (`nodes: [{node: NAME, token: SECRET}]`). Without
    /// it (and `--workloads`) the service runs in Kubernetes mode.
    #[arg(long, requires = "workloads")]
    pub node_tokens: Option<PathBuf>,
    /// File mode: which pods (namespace, service account) run on which node; re-read when it
    /// changes.
    #[arg(long, requires = "node_tokens")]
    pub workloads: Option<PathBuf>,
    /// Kubernetes mode: kubeconfig file for the API server (default: the in-cluster service
    /// account, else `KUBECONFIG` or ~/.kube/config).
    #[arg(long, conflicts_with = "node_tokens")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the node agents' ServiceAccounts (NAMESPACE/NAME, comma-separated or
    /// repeated). A token of one, bound to a pod, stands for that pod's node; any other
    /// caller gets only its own identity. Istio's `CA_TRUSTED_NODE_ACCOUNTS`.
    #[arg(long, value_delimiter = ',', default_value = "mtls-system/mtls-agent")]
    pub trusted_node_accounts: Vec<String>,
    /// Kubernetes mode: the ConfigMap (NAMESPACE/NAME, key `root-cert.pem`) the service keeps
    /// the trust bundle in, for the agents to mount; "" writes none.
    #[arg(long, default_value = "mtls-system/mtls-ca-root-cert")]
    pub root_configmap: String,
    /// Kubernetes mode: the audience callers' tokens must be for (TokenReview).
    #[arg(long, default_value = "istio-ca")]
    pub token_audience: String,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name: only pods with this `node` (Kubernetes: `spec.nodeName`) are enrolled.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// cgroup v2 directory that holds the node's pods (the capture programs attach here).
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Local workloads file (pods and services), watched for changes. Without it the agent
    /// runs in Kubernetes mode: pods, services and policies come from the API server.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    /// Kubernetes mode: kubeconfig file for the API server (default: the in-cluster service
    /// account, else `KUBECONFIG` or ~/.kube/config).
    #[arg(long, conflicts_with = "workloads")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the cgroup v2 root under which the kubelet's `kubepods` cgroups are;
    /// a pod's network namespace is found through a process in its cgroup.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Kubernetes mode: the node's /proc (the agent runs with the host's PID namespace).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Kubernetes mode: the agent's own namespace, never enrolled whatever its labels (the
    /// DaemonSet sets `POD_NAMESPACE` from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = kubernetes_default_namespace())]
    pub agent_namespace: String,
    /// Kubernetes mode: the CA's namespace, never enrolled whatever its labels (default: the
    /// agent's namespace).
    #[arg(long)]
    pub ca_namespace: Option<String>,
    /// Kubernetes mode: how often API discovery runs again to learn which Istio policy kinds
    /// the cluster serves (a CRD installed or removed later); also after a watch error.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub policy_discovery_interval: std::time::Duration,
    /// bpffs directory for this node's pinned programs and maps (default /sys/fs/bpf/mtls-agent/<node>).
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Admin API also over TCP, on this address: a loopback address only, and only when asked
    /// for, because anything on the node that reaches it (every host-network pod) may use it.
    /// By default the admin API is on a unix socket only (see --admin-dir).
    #[arg(long, value_parser = loopback_addr)]
    pub admin: Option<SocketAddr>,
    /// Directory of the admin sockets, one per agent instance (`admin-<pid>.sock`, mode 0600,
    /// the directory 0700); default /run/mtls-agent/<node>.
    #[arg(long)]
    pub admin_dir: Option<PathBuf>,
    /// Prometheus metrics address (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics: SocketAddr,
    /// Health address (`/healthz/ready`: ready once this instance serves; `/healthz/live`).
    /// Two instances of a rollout share it (SO_REUSEPORT), so either may answer: the kubelet
    /// probes each instance with `mtls-agent probe` instead.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub health: SocketAddr,
    /// The certificate service to get the pods' certificates from: `https://HOST[:PORT]`
    /// (port 15012 by default), `mtls-agent ca serve` or istiod
    /// (`https://istiod.istio-system.svc:15012`). Keys are made on this node and never leave it.
    #[arg(long, conflicts_with = "ca_dir", requires_all = ["ca_token_file", "ca_root"])]
    pub ca_address: Option<String>,
    /// The node's token for the certificate service (a projected ServiceAccount token with
    /// audience `istio-ca`, or the node's token of `ca serve --node-tokens`), read again for
    /// every request.
    #[arg(long, requires = "ca_address")]
    pub ca_token_file: Option<PathBuf>,
    /// The mesh's trust bundle (PEM roots, as Istio's `istio-ca-root-cert`): the certificate
    /// service's own certificate and every peer's must lead to one of them.
    #[arg(long, requires = "ca_address")]
    pub ca_root: Option<PathBuf>,
    /// The name the certificate service's certificate must carry, when it is not the host of
    /// `--ca-address` (as ztunnel's `ALT_CA_HOSTNAME`).
    #[arg(long, requires = "ca_address")]
    pub ca_server_name: Option<String>,
    /// For development and the demo only: a CA directory in Istio's plug-in CA layout
    /// (`mtls-agent ca init`) whose key signs this node's certificates. Whoever is root on the
    /// node can then mint any identity of the mesh; use `--ca-address` in production.
    #[arg(long, required_unless_present = "ca_address")]
    pub ca_dir: Option<PathBuf>,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Directory of mTLS policies (PeerAuthentication, v1alpha1 Policy/MeshPolicy YAML),
    /// watched for changes. Without it every pod is PERMISSIVE. Only with `--workloads`: in
    /// Kubernetes mode policies come from the API server.
    #[arg(long, requires = "workloads")]
    pub policies: Option<PathBuf>,
    /// Root namespace: a PeerAuthentication there without a selector is mesh-wide.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// This node's IP. Accepted for older manifests; it grants nothing any more (anything on the
    /// node can send from it): the probe exemption follows `--kubelet-cgroup`.
    #[arg(long)]
    pub node_ip: Option<std::net::IpAddr>,
    /// The kubelet's cgroup v2 directory (e.g. /sys/fs/cgroup/system.slice/kubelet.service):
    /// connections opened from there, and only those, reach STRICT pods' probePorts in
    /// plaintext, whatever source address the network plugin gives them. Must lie outside the
    /// pods' cgroup (`--cgroup`), neither containing it nor inside it.
    #[arg(long)]
    pub kubelet_cgroup: Option<PathBuf>,
    /// On SIGTERM, how long open connections may finish before the agent exits (a new instance
    /// started alongside takes the new ones).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Threads that carry connections (default 1). One thread hands no work between threads:
    /// on the 2-CPU bench it took a third of the context switches and of the round-trip time
    /// off, and moved more bytes, than two (README, Performance). More threads help a node
    /// whose agent needs more than one CPU for TLS handshakes.
    #[arg(long, env = "MTLS_AGENT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: Option<u16>,
    /// Lifetime of workload certificates (renewed at half-life), e.g. 24h, 90s.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: std::time::Duration,
    /// Kubernetes mode: the agent's own pod (downward API), for Events about the agent itself
    /// (a kernel it refuses).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Kubernetes mode: the uid of the agent's own pod (`kubectl describe pod` shows Events by it).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// For tests only, never in production (hidden): refuse kernels older than this (e.g.
    /// 99.0) so the refused-node path can be run on a kernel that has everything. Its refusal
    /// has its own reason, `min_kernel`, never taken for a node property in metrics.
    #[arg(long, hide = true, value_parser = crate::capture::probe::parse_min_kernel)]
    pub min_kernel: Option<(u32, u32)>,
}

fn kubernetes_default_namespace() -> &'static str {
    crate::kubernetes::membership::DEFAULT_AGENT_NAMESPACE
}

/// The default bpffs directory of a node. bpffs refuses names with a dot (EPERM), and node
/// names are DNS names (`ip-10-0-1-2.ec2.internal`), so dots become underscores: a character
/// no node name has, so two nodes never share a directory.
pub fn default_bpffs(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/mtls-agent").join(node.replace('.', "_"))
}

/// Parses `--admin`: a socket address on a loopback interface.
fn loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{e} (expected IP:PORT)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: the admin API is unauthenticated, so it listens \
             on 127.0.0.1 or ::1 only (use --metrics and --health for what others may read)"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let base = ["mtls-agent", "run", "--node", "n1", "--cgroup", "/cg", "--ca-dir", "/ca"];
        let argv = base.iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(a) => Ok(*a),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn without_workloads_the_agent_runs_in_kubernetes_mode() {
        let a = run_args(&[]).unwrap();
        assert_eq!(a.workloads, None);
        assert_eq!(a.kubeconfig, None);
        assert_eq!(a.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(a.proc_root, PathBuf::from("/proc"));
        assert_eq!((a.agent_namespace.as_str(), a.ca_namespace), ("mtls-system", None));
        let a = run_args(&["--kubeconfig", "/k", "--cgroup-root", "/r", "--proc-root", "/p"]);
        let a = a.unwrap();
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!((a.cgroup_root.to_str(), a.proc_root.to_str()), (Some("/r"), Some("/p")));
    }

    #[test]
    fn the_admin_api_listens_on_tcp_only_when_asked_and_on_loopback_only() {
        assert_eq!(run_args(&[]).unwrap().admin, None);
        assert_eq!(run_args(&["--admin", "[::1]:9"]).unwrap().admin, "[::1]:9".parse().ok());
        for outside in ["0.0.0.0:15000", "10.1.2.3:15000", "[::]:15000"] {
            let e = run_args(&["--admin", outside]).unwrap_err().to_string();
            assert!(e.contains("not a loopback address"), "{outside}: {e}");
        }
    }

    #[test]
    fn default_bpffs_directory_has_no_dot_for_dotted_node_names() {
        assert_eq!(default_bpffs("node1"), PathBuf::from("/sys/fs/bpf/mtls-agent/node1"));
        assert_eq!(
            default_bpffs("ip-10-0-1-2.ec2.internal"),
            PathBuf::from("/sys/fs/bpf/mtls-agent/ip-10-0-1-2_ec2_internal")
        );
    }

    #[test]
    fn file_mode_and_kubernetes_mode_flags_do_not_mix() {
        let e = run_args(&["--policies", "/p"]).unwrap_err();
        assert!(e.to_string().contains("--workloads"), "{e}");
        let e = run_args(&["--workloads", "/w", "--kubeconfig", "/k"]).unwrap_err();
        assert!(e.to_string().contains("--kubeconfig"), "{e}");
        let a = run_args(&["--workloads", "/w", "--policies", "/p"]).unwrap();
        assert_eq!(a.policies, Some(PathBuf::from("/p")));
    }
}
