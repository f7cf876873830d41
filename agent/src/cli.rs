//! Command line.

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
    Run(RunArgs),
    /// Certificate authority for workload identities (Istio plug-in CA layout).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Remove a node's pinned programs and maps, so no pod stays captured (fail-closed) after
    /// the agent is removed.
    Uninstall {
        /// The node whose pins to remove.
        #[arg(long)]
        node: String,
        /// bpffs directory (default /sys/fs/bpf/mtls-agent/<node>).
        #[arg(long)]
        bpffs: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new root CA (ECDSA P-256): ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem.
    Init {
        /// Directory to write the CA files into (created if missing; never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name: only pods with this `node` are enrolled.
    #[arg(long)]
    pub node: String,
    /// cgroup v2 directory that holds the node's pods (the capture programs attach here).
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Local workloads file (pods and services), watched for changes.
    #[arg(long)]
    pub workloads: PathBuf,
    /// bpffs directory for this node's pinned programs and maps (default /sys/fs/bpf/mtls-agent/<node>).
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Admin API address (local only).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// CA directory in Istio's plug-in CA layout (`mtls-agent ca init` makes one). The agent
    /// signs its pods' workload certificates with it and trusts the roots in root-cert.pem.
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates (renewed at half-life), e.g. 24h, 90s.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: std::time::Duration,
}

/// The default bpffs directory of a node.
pub fn default_bpffs(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/mtls-agent").join(node)
}
