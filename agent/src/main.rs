use std::io::IsTerminal;

use clap::Parser;
use mtls_agent::{
    agent::{self, AgentConfig},
    capture,
    cli::{default_bpffs, CaCommand, Cli, Command, LogFormat},
    identity,
};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let cfg = AgentConfig {
                bpffs: args.bpffs.unwrap_or_else(|| default_bpffs(&args.node)),
                node: args.node,
                cgroup: args.cgroup,
                workloads: args.workloads,
                admin: args.admin,
                ca_dir: args.ca_dir,
                trust_domain: args.trust_domain,
                cert_ttl: args.cert_ttl,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::run(cfg))
        }
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => {
            let ca = identity::init_ca(&dir, &trust_domain)?;
            eprintln!(
                "mtls-agent: wrote a new root CA for trust domain {trust_domain} in {} (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)",
                ca.dir().display()
            );
            Ok(())
        }
        Command::Uninstall { node, bpffs } => {
            let dir = bpffs.unwrap_or_else(|| default_bpffs(&node));
            capture::unpin_all(&dir)
                .map_err(|e| anyhow::anyhow!("removing pins under {}: {e}", dir.display()))?;
            eprintln!(
                "mtls-agent: removed the pinned programs and maps under {}",
                dir.display()
            );
            Ok(())
        }
    }
}
