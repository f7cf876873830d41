use std::{io::IsTerminal, sync::Arc};

use clap::Parser;
use mtls_agent::{
    admin::{self, SetLogLevel},
    agent::{self, AgentConfig, Source},
    capture,
    cli::{default_bpffs, CaCommand, Cli, Command, LogFormat, PolicyCommand},
    cli::{render, ClientArgs, Output},
    identity, kubernetes, policy,
    refused::{self, Refusal},
    workloads,
};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The filter sits behind a reload handle so the admin API can change the level.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => registry.with(fmt.with_ansi(std::io::stderr().is_terminal())).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    let set_log_level: SetLogLevel = Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    });
    match run(cli, set_log_level) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-agent: {}", mtls_agent::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, set_log_level: SetLogLevel) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(mut args) => {
            // Refuse at once, before reading any configuration, on a node we cannot serve (its
            // kernel, no cgroup v2): in file mode by exiting, in Kubernetes mode by staying up
            // to say why without capturing anything (`refused`).
            let kubernetes_mode = args.workloads.is_none();
            let refusal = match capture::probe::probe_with(args.min_kernel) {
                Err(capture::probe::ProbeError::Missing(missing)) => Some(Refusal::from(missing)),
                Err(capture::probe::ProbeError::MinKernel(m)) => Some(Refusal::MinKernel(m)),
                // Denied bpf() is this container's privileges, never the node's: exit.
                Err(denied) => return Err(denied.into()),
                Ok(()) => resolve_cgroups(&mut args, kubernetes_mode).err().map(Refusal::from),
            };
            if let Some(r) = &refusal {
                if !kubernetes_mode || !r.is_node_property() {
                    return Err(r.clone().into());
                }
            }
            let own_pod = args.pod_name.clone().map(|name| refused::OwnPod {
                name,
                namespace: args.agent_namespace.clone(),
                uid: args.pod_uid.clone(),
            });
            let source = match args.workloads {
                Some(workloads) => Source::Files { workloads, policies: args.policies },
                None => Source::Kubernetes(kubernetes::Settings {
                    kubeconfig: args.kubeconfig,
                    cgroups: kubernetes::PodCgroups::new(args.cgroup_root, args.proc_root),
                    membership: kubernetes::membership::Settings {
                        ca_namespace: args
                            .ca_namespace
                            .unwrap_or_else(|| args.agent_namespace.clone()),
                        agent_namespace: args.agent_namespace,
                        node: Some(args.node.clone()),
                    },
                    discovery_interval: args.policy_discovery_interval,
                }),
            };
            let cfg = AgentConfig {
                bpffs: args.bpffs.unwrap_or_else(|| default_bpffs(&args.node)),
                admin_dir: args.admin_dir.unwrap_or_else(|| admin::socket::default_dir(&args.node)),
                node: args.node,
                cgroup: args.cgroup,
                source,
                admin: args.admin,
                ca: match (args.ca_address, args.ca_dir) {
                    (Some(address), _) => agent::CaSource::Service {
                        address,
                        // clap requires both with --ca-address.
                        token_file: args.ca_token_file.unwrap_or_default(),
                        root: args.ca_root.unwrap_or_default(),
                        server_name: args.ca_server_name,
                    },
                    (None, dir) => agent::CaSource::Dir(dir.unwrap_or_default()),
                },
                trust_domain: args.trust_domain,
                cert_ttl: args.cert_ttl,
                root_namespace: args.root_namespace,
                node_ip: args.node_ip,
                kubelet_cgroup: args.kubelet_cgroup,
                metrics: args.metrics,
                health: args.health,
                set_log_level: Some(set_log_level),
                drain_timeout: args.drain_timeout,
            };
            raise_open_files_limit();
            let workers = args.worker_threads.map_or(1, usize::from);
            let rt = if workers == 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .enable_all()
                    .build()?
            };
            match refusal {
                Some(r) => rt.block_on(refused::run(cfg, r, own_pod)),
                None => rt.block_on(agent::run(cfg)),
            }
        }
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain, root_dir, sign_intermediate },
        } => {
            let (ca, what) = match (root_dir, sign_intermediate) {
                (None, _) => (identity::init_ca(&dir, &trust_domain)?, "a new root CA".to_owned()),
                (Some(root), false) => (
                    identity::init_root_and_intermediate(&root, &dir, &trust_domain)?,
                    format!(
                        "an intermediate CA signed by a new root in {} (root-cert.pem, root-key.pem: keep that directory offline)",
                        root.display()
                    ),
                ),
                (Some(root), true) => (
                    identity::sign_intermediate(&root, &dir, &trust_domain)?,
                    format!("a new intermediate CA signed by the root in {}", root.display()),
                ),
            };
            eprintln!(
                "mtls-agent: wrote {what} for trust domain {trust_domain} in {} (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)",
                ca.dir().display()
            );
            Ok(())
        }
        Command::Ca { command: CaCommand::Serve(args) } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(ca_serve(*args))
        }
        Command::Policy {
            command:
                PolicyCommand::Check { dir, workloads, root_namespace, from, to, trust_domain, output },
        } => {
            let text = std::fs::read_to_string(&workloads)
                .map_err(|e| anyhow::anyhow!("{}: {e}", workloads.display()))?;
            let ws = workloads::WorkloadSet::parse(&text, &workloads)?;
            let ps = policy::PolicySet::load_dir(&dir, &root_namespace)?;
            let (Some(from), Some(to)) = (from, to) else {
                print!("{}", policy::render_check(&ps, &ws));
                return Ok(());
            };
            let answer = mtls_agent::authz::query::check(&ps, &ws, &trust_domain, &from, &to)?;
            match output {
                Output::Table => print!("{}", mtls_agent::authz::query::render(&answer)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&answer)?),
            }
            Ok(())
        }
        Command::Check { pod, client } => {
            if !pod.contains('.') {
                anyhow::bail!("pod must be NAME.NAMESPACE, got {pod:?}");
            }
            let body = admin::client::get(&endpoint(&client)?, &format!("/check?pod={pod}"))?;
            print_answer(&body, client.output, render::check)
        }
        Command::Connections { pod, client } => {
            let body = admin::client::get(&endpoint(&client)?, "/connections")?;
            let mut v: serde_json::Value = serde_json::from_str(&body)?;
            if let (Some(pod), Some(list)) = (pod, v.as_array_mut()) {
                list.retain(|c| {
                    c["sourcePod"] == pod.as_str() || c["destinationPod"] == pod.as_str()
                });
            }
            print_answer(&v.to_string(), client.output, render::connections)
        }
        Command::Certs { client } => {
            let body = admin::client::get(&endpoint(&client)?, "/certs")?;
            print_answer(&body, client.output, render::certs)
        }
        Command::Probe { kind, admin_dir, node, proc_root } => {
            let dirs = admin_dirs(admin_dir.as_ref(), node.as_ref())?;
            let body = admin::probe::probe(&dirs, &proc_root, kind)?;
            print!("{body}");
            Ok(())
        }
        Command::Uninstall { node, bpffs, proc_root, verify, then_wait, force } => {
            let dir = bpffs.unwrap_or_else(|| default_bpffs(&node));
            if verify {
                anyhow::ensure!(
                    !dir.exists(),
                    "node {node} is not uninstalled: pins remain under {}",
                    dir.display()
                );
                println!("mtls-agent: node {node}: nothing of the agent is pinned");
                return Ok(());
            }
            let report = mtls_agent::uninstall::uninstall(&dir, &proc_root, force)?;
            for line in report.lines() {
                println!("mtls-agent: node {node}: {line}");
            }
            println!(
                "mtls-agent: node {node}: uninstall complete; its pods connect directly, without the agent"
            );
            if then_wait {
                wait_for_termination()?;
            }
            Ok(())
        }
    }
}

/// The cgroup v2 directories the cgroup arguments stand for (on a hybrid node, below
/// `unified`); `--cgroup-root` only matters in Kubernetes mode.
fn resolve_cgroups(
    args: &mut mtls_agent::cli::RunArgs,
    kubernetes_mode: bool,
) -> Result<(), capture::cgroup2::Cgroup2Error> {
    use capture::cgroup2::resolve;
    args.cgroup = resolve("--cgroup", &args.cgroup)?;
    if kubernetes_mode {
        args.cgroup_root = resolve("--cgroup-root", &args.cgroup_root)?;
    }
    if let Some(k) = &args.kubelet_cgroup {
        args.kubelet_cgroup = Some(resolve("--kubelet-cgroup", k)?);
    }
    Ok(())
}

/// Where the operator commands find the admin API: `--admin`, `--admin-socket`, else the ready
/// instance's socket in the node's directory (or, without a node, in every node's).
fn endpoint(c: &ClientArgs) -> anyhow::Result<admin::client::Endpoint> {
    use admin::client::Endpoint;
    if let Some(addr) = c.admin {
        return Ok(Endpoint::Tcp(addr));
    }
    if let Some(p) = &c.admin_socket {
        return Ok(Endpoint::Unix(p.clone()));
    }
    Ok(admin::client::find(&admin_dirs(c.admin_dir.as_ref(), c.node.as_ref())?)?)
}

/// The socket directories to look in: the one given, else the node's, else every node's.
fn admin_dirs(
    admin_dir: Option<&std::path::PathBuf>,
    node: Option<&String>,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let dirs = match (admin_dir, node) {
        (Some(d), _) => vec![d.clone()],
        (None, Some(node)) => vec![admin::socket::default_dir(node)],
        (None, None) => {
            let run = std::path::Path::new(admin::socket::RUN_DIR);
            let mut dirs: Vec<_> = std::fs::read_dir(run)
                .map_err(|e| anyhow::anyhow!("no running agent found in {}: {e}", run.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            if dirs.is_empty() {
                dirs.push(run.to_owned());
            }
            dirs
        }
    };
    Ok(dirs)
}

/// Blocks until SIGTERM or SIGINT (as PID 1 of a container, the default action would ignore
/// them).
fn wait_for_termination() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let signal = set.wait()?;
    eprintln!("mtls-agent: {signal}: exiting");
    Ok(())
}

/// Raises the soft limit of open files to the hard limit: every connection the agent carries
/// takes two fds, and 1024 (a common default) is exhausted by a few hundred clients.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!("open files limit raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("open files limit stays {soft}: raising it to {hard}: {e}"),
        },
        Ok((soft, _)) => tracing::info!("open files limit is {soft} (the hard limit)"),
        Err(e) => tracing::warn!("open files limit unknown: {e}"),
    }
}

/// Prints an admin API answer as a table, JSON or YAML.
fn print_answer(
    body: &str,
    output: Output,
    table: fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    match render::structured(&v, output)? {
        Some(text) => print!("{text}"),
        None => print!("{}", table(&v)),
    }
    Ok(())
}

/// `ca serve`: loads everything it decides with (any error stops it here, naming the file),
/// then serves until SIGTERM or SIGINT.
async fn ca_serve(args: mtls_agent::cli::CaServeArgs) -> anyhow::Result<()> {
    use mtls_agent::certservice::{authority, cluster, server};
    identity::validate_trust_domain(&args.trust_domain)?;
    anyhow::ensure!(!args.max_cert_ttl.is_zero(), "--max-cert-ttl: must be longer than 0s");
    let signer = Arc::new(identity::CaSigner::load(&args.ca_dir)?);
    let authority = match (&args.node_tokens, &args.workloads) {
        (Some(tokens), Some(workloads)) => authority::Authority::Files {
            tokens: authority::NodeTokens::load(tokens)?,
            placement: authority::Placement::load(workloads)?,
        },
        _ => {
            let trusted = cluster::parse_accounts(&args.trusted_node_accounts)
                .map_err(|e| anyhow::anyhow!(e))?;
            let client = mtls_agent::kubernetes::client(args.kubeconfig.as_deref()).await?;
            tracing::info!(
                trusted = ?args.trusted_node_accounts,
                audience = %args.token_audience,
                "Kubernetes mode: callers by TokenReview, pods by watch"
            );
            if !args.root_configmap.is_empty() {
                let (ns, name) = args.root_configmap.split_once('/').ok_or_else(|| {
                    anyhow::anyhow!(
                        "--root-configmap: {:?} is not NAMESPACE/NAME",
                        args.root_configmap
                    )
                })?;
                tokio::spawn(cluster::publish_roots(
                    client.clone(),
                    args.ca_dir.join(identity::ROOT_CERT_FILE),
                    ns.to_owned(),
                    name.to_owned(),
                ));
            }
            authority::Authority::Cluster(cluster::Cluster::start(
                client,
                args.token_audience.clone(),
                trusted,
            ))
        }
    };
    let serving = Arc::new(server::ServingCert::new(signer.clone(), args.server_names.clone())?);
    let tls = server::tls_config(serving)?;
    let service = Arc::new(server::CertService::new(
        signer,
        authority,
        &args.trust_domain,
        args.max_cert_ttl,
        args.node_rate,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    let monitoring = tokio::net::TcpListener::bind(args.monitoring)
        .await
        .map_err(|e| anyhow::anyhow!("--monitoring {}: {e}", args.monitoring))?;
    tokio::spawn(mtls_agent::certservice::monitor::serve(monitoring, service.clone()));
    let local = listener.local_addr()?;
    tracing::info!(address = %local, names = ?args.server_names, "certificate service listening");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = server::serve(listener, service, tls) => {}
        _ = sigterm.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}
