//! Running the real `mtls-agent` binary against a test bed: its workloads file, its process,
//! and a small client for its admin API.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{Pod, Testbed};

/// The agent binary: `MTLS_AGENT_BIN`, or `mtls-agent` next to the test executable's
/// target directory (`cargo xtask test` builds it before the tests run).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MTLS_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // A test runs from target/<profile>/deps/, a binary (the demo) from target/<profile>/.
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let bin =
        [dir.join("mtls-agent"), dir.parent().map(|d| d.join("mtls-agent")).unwrap_or_default()]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| dir.join("mtls-agent"));
    assert!(
        bin.is_file(),
        "the agent binary {} is missing: build it with `cargo build -p mtls-agent` \
         (`cargo xtask test` does) or set MTLS_AGENT_BIN",
        bin.display()
    );
    bin
}

/// A pod entry of a workloads file.
#[derive(Clone, Debug)]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub ip: Ipv4Addr,
    /// Every address of the pod (`ips:`), when the test lists them.
    pub ips: Vec<std::net::IpAddr>,
    pub node: String,
    pub netns: PathBuf,
    pub probe_ports: Vec<u16>,
}

impl WorkloadEntry {
    /// An entry for a test bed pod, `app: <pod name>` as its label.
    pub fn of(pod: &Pod, namespace: &str) -> WorkloadEntry {
        WorkloadEntry {
            name: pod.name.clone(),
            namespace: namespace.to_owned(),
            service_account: pod.name.clone(),
            labels: vec![("app".into(), pod.name.clone())],
            ip: pod.ip,
            ips: vec![],
            node: pod.node.clone(),
            netns: pod.netns.clone(),
            probe_ports: vec![],
        }
    }
}

/// A service entry of a workloads file.
#[derive(Clone, Debug)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub vip: Option<Ipv4Addr>,
    pub selector: Vec<(String, String)>,
    /// (port, targetPort)
    pub ports: Vec<(u16, u16)>,
}

/// A workloads file the test writes and rewrites (atomically, by rename).
#[derive(Clone, Debug, Default)]
pub struct WorkloadsFile {
    pub workloads: Vec<WorkloadEntry>,
    pub services: Vec<ServiceEntry>,
}

fn map(pairs: &[(String, String)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", inner.join(", "))
}

impl WorkloadsFile {
    pub fn render(&self) -> String {
        let mut s = String::from("workloads:\n");
        for w in &self.workloads {
            let _ = writeln!(s, "- name: {}", w.name);
            let _ = writeln!(s, "  namespace: {}", w.namespace);
            let _ = writeln!(s, "  serviceAccount: {}", w.service_account);
            let _ = writeln!(s, "  labels: {}", map(&w.labels));
            let _ = writeln!(s, "  ip: {}", w.ip);
            if !w.ips.is_empty() {
                let ips: Vec<String> = w.ips.iter().map(|a| format!("\"{a}\"")).collect();
                let _ = writeln!(s, "  ips: [{}]", ips.join(", "));
            }
            let _ = writeln!(s, "  node: {}", w.node);
            let _ = writeln!(s, "  netns: {}", w.netns.display());
            if !w.probe_ports.is_empty() {
                let ports: Vec<String> = w.probe_ports.iter().map(u16::to_string).collect();
                let _ = writeln!(s, "  probePorts: [{}]", ports.join(", "));
            }
        }
        s.push_str("services:\n");
        for svc in &self.services {
            let _ = writeln!(s, "- name: {}", svc.name);
            let _ = writeln!(s, "  namespace: {}", svc.namespace);
            if let Some(vip) = svc.vip {
                let _ = writeln!(s, "  vip: {vip}");
            }
            let _ = writeln!(s, "  selector: {}", map(&svc.selector));
            let ports: Vec<String> =
                svc.ports.iter().map(|(p, t)| format!("{{port: {p}, targetPort: {t}}}")).collect();
            let _ = writeln!(s, "  ports: [{}]", ports.join(", "));
        }
        s
    }

    /// Writes the file atomically (write + rename), as a config manager would.
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}

/// A CA directory made by `mtls-agent ca init`, removed on drop.
pub struct CaDir {
    pub path: PathBuf,
}

impl CaDir {
    /// A fresh root CA for `trust_domain` in a unique temporary directory.
    pub fn init(label: &str, trust_domain: &str) -> Result<CaDir> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mtls-test-ca-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let out = Command::new(agent_bin())
            .args(["ca", "init", "--dir"])
            .arg(&path)
            .args(["--trust-domain", trust_domain])
            .output()
            .context("running mtls-agent ca init")?;
        let ca = CaDir { path };
        if !out.status.success() {
            bail!("mtls-agent ca init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(ca)
    }
}

impl Drop for CaDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Options for starting an agent for one node of a test bed.
pub struct AgentOptions {
    pub node: String,
    /// `None`: Kubernetes mode (`extra_args` say where the API server is).
    pub workloads: Option<PathBuf>,
    /// The CA to sign with; `None` makes a fresh one for this agent alone.
    pub ca_dir: Option<PathBuf>,
    /// Certificates from a certificate service instead: its flags
    /// ([`crate::certservice::CaService::agent_args`]); no CA directory is given then.
    pub ca_service: Option<Vec<String>>,
    /// A command the agent is started through (it gets the agent's path and arguments), e.g.
    /// `unshare --mount ...`.
    pub wrapper: Vec<String>,
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the agent; `None`: `MTLS_TEST_AGENT_LOG` or debug for the agent and
    /// its eBPF programs.
    pub log_filter: Option<String>,
    /// A cgroup v2 directory to run the agent in (made here, removed when the agent
    /// process is dropped), e.g. one under the node's pods cgroup as the agent's own pod is in
    /// Kubernetes. `None`: the test's own cgroup.
    pub cgroup: Option<PathBuf>,
    /// How the admin API is reached.
    pub admin: AdminFlags,
    /// The agent's soft limit of open files at start (its hard limit stays the test's).
    pub open_files: Option<u64>,
}

/// The admin flags the test bed gives the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdminFlags {
    /// `--admin 127.0.0.1:<free port>` and `--admin-dir <a directory of this agent's>`: tests
    /// of one node name never share a socket directory.
    #[default]
    TcpAndOwnDir,
    /// Neither: the agent's defaults (no TCP, sockets in /run/mtls-agent/<node>). The node name
    /// must be unique to the test.
    Defaults,
}

impl AgentOptions {
    pub fn new(node: &str, workloads: &Path) -> AgentOptions {
        AgentOptions {
            node: node.into(),
            workloads: Some(workloads.to_owned()),
            ca_dir: None,
            ca_service: None,
            wrapper: vec![],
            extra_args: vec![],
            log_filter: None,
            cgroup: None,
            admin: AdminFlags::default(),
            open_files: None,
        }
    }

    /// Kubernetes mode: the API server from `kubeconfig`, pods' cgroups under `cgroup_root`.
    pub fn kubernetes(node: &str, kubeconfig: &Path, cgroup_root: &Path) -> AgentOptions {
        AgentOptions {
            node: node.into(),
            workloads: None,
            ca_dir: None,
            ca_service: None,
            wrapper: vec![],
            extra_args: vec![
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--cgroup-root".into(),
                cgroup_root.display().to_string(),
            ],
            log_filter: None,
            cgroup: None,
            admin: AdminFlags::default(),
            open_files: None,
        }
    }
}

/// A running agent process; killed (by its PID) and reaped on drop.
pub struct AgentProcess {
    child: Option<Child>,
    /// The admin TCP address (with [`AdminFlags::TcpAndOwnDir`]; else nothing listens there).
    pub admin: SocketAddr,
    /// The directory of the agent's admin sockets.
    pub admin_dir: PathBuf,
    admin_flags: AdminFlags,
    open_files: Option<u64>,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub bpffs: PathBuf,
    pub node: String,
    log: Arc<Mutex<String>>,
    cmd: Vec<String>,
    wrapper: Vec<String>,
    log_filter: String,
    /// The cgroup the agent runs in, when the test chose one; removed after the agent.
    cgroup: Option<crate::cgroup::CgroupDir>,
    _own_ca: Option<CaDir>,
}

impl AgentProcess {
    /// Starts `mtls-agent run` for `node` of `bed` and waits until its admin API answers
    /// (the node's pods are enrolled by then).
    pub fn start(bed: &Testbed, opts: AgentOptions) -> Result<AgentProcess> {
        Self::launch(bed, opts, true)
    }

    fn launch(bed: &Testbed, opts: AgentOptions, wait_ready: bool) -> Result<AgentProcess> {
        let admin: SocketAddr = (Ipv4Addr::LOCALHOST, crate::free_loopback_port()).into();
        let metrics: SocketAddr = (Ipv4Addr::LOCALHOST, crate::free_loopback_port()).into();
        let health: SocketAddr = (Ipv4Addr::LOCALHOST, crate::free_loopback_port()).into();
        let node = bed.node(&opts.node);
        let bpffs = bed.bpffs_dir(&opts.node);
        let own_ca = match (&opts.ca_dir, &opts.ca_service) {
            (None, None) => Some(CaDir::init(&opts.node, "cluster.local")?),
            _ => None,
        };
        let ca_dir = opts
            .ca_dir
            .clone()
            .or_else(|| own_ca.as_ref().map(|c| c.path.clone()))
            .unwrap_or_default();
        static NEXT_DIR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let admin_dir = match opts.admin {
            AdminFlags::TcpAndOwnDir => std::env::temp_dir().join(format!(
                "mtls-test-admin-{}-{}-{}",
                std::process::id(),
                NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                opts.node
            )),
            AdminFlags::Defaults => PathBuf::from("/run/mtls-agent").join(&opts.node),
        };
        let mut cmd = vec![
            "run".to_owned(),
            "--node".into(),
            opts.node.clone(),
            "--cgroup".into(),
            node.cgroup.display().to_string(),
            "--bpffs".into(),
            bpffs.display().to_string(),
        ];
        if opts.admin == AdminFlags::TcpAndOwnDir {
            cmd.extend([
                "--admin".into(),
                admin.to_string(),
                "--admin-dir".into(),
                admin_dir.display().to_string(),
            ]);
        }
        match &opts.ca_service {
            Some(args) => cmd.extend(args.iter().cloned()),
            None => cmd.extend(["--ca-dir".into(), ca_dir.display().to_string()]),
        }
        cmd.extend([
            "--metrics".into(),
            metrics.to_string(),
            "--health".into(),
            health.to_string(),
        ]);
        if let Some(w) = &opts.workloads {
            cmd.extend(["--workloads".into(), w.display().to_string()]);
        }
        cmd.extend(opts.extra_args.iter().cloned());
        let cgroup = opts.cgroup.clone().map(crate::cgroup::CgroupDir::create).transpose()?;
        let mut agent = AgentProcess {
            child: None,
            admin,
            admin_dir,
            admin_flags: opts.admin,
            open_files: opts.open_files,
            metrics,
            health,
            bpffs,
            node: opts.node.clone(),
            log: Arc::new(Mutex::new(String::new())),
            cmd,
            wrapper: opts.wrapper.clone(),
            log_filter: opts.log_filter.clone().unwrap_or_else(|| {
                std::env::var("MTLS_TEST_AGENT_LOG")
                    .unwrap_or_else(|_| "info,mtls_agent=debug,mtls_agent_ebpf=debug".into())
            }),
            cgroup,
            _own_ca: own_ca,
        };
        if wait_ready {
            agent.spawn()?;
        } else {
            agent.spawn_child()?;
            agent.wait_health_answers(Duration::from_secs(20))?;
        }
        Ok(agent)
    }

    fn spawn_child(&mut self) -> Result<()> {
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        // Opened before fork: the child may only make raw syscalls.
        let procs = match &self.cgroup {
            Some(c) => {
                let path = c.path().join("cgroup.procs");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("open {}", path.display()))?;
                Some(f)
            }
            None => None,
        };
        if let Some(f) = &procs {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            let fd = f.as_raw_fd();
            // SAFETY: only write(2) on an fd that stays open in the parent until spawn returns.
            unsafe {
                command.pre_exec(move || {
                    // "0" moves the writing process itself, before it runs the agent.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(soft) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec, only the async-signal-safe getrlimit/setrlimit.
            unsafe {
                command.pre_exec(move || {
                    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    l.rlim_cur = soft.min(l.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .args(&self.cmd)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mtls-agent")?;
        drop(procs);
        let stderr = child.stderr.take().context("agent stderr")?;
        let log = self.log.clone();
        let node = self.node.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("MTLS_TEST_ECHO_AGENT").is_some() {
                    eprintln!("[agent {node}] {line}");
                }
                if let Ok(mut l) = log.lock() {
                    // Bounded: a runaway log cannot eat the test's memory. Past the first
                    // 16 MiB only warnings and errors are kept, up to twice that.
                    let notable = line.contains("WARN") || line.contains("ERROR");
                    if l.len() < 16 << 20 || (notable && l.len() < 32 << 20) {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            }
        });
        self.child = Some(child);
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_child()?;
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("mtls-agent exited early ({status}); log:\n{}", self.log());
                }
            }
            if http(self.health, "GET", "/healthz/ready").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("mtls-agent not ready after {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (bounded).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent log has no {needle:?} after {timeout:?}; log:\n{}", self.log())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent not running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                bail!("mtls-agent ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A rolling update: starts a new instance with the same arguments next to the running one,
    /// waits until the new one is ready, then SIGTERMs the old one and waits (bounded) for it
    /// to drain and exit. Returns the old instance's exit status.
    pub fn handover(&mut self) -> Result<std::process::ExitStatus> {
        let mut old = self.child.take().context("agent not running")?;
        let ready_lines = |log: &str| log.matches("node ready").count();
        let before = ready_lines(&self.log());
        self.spawn_child()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while ready_lines(&self.log()) <= before {
            if Instant::now() > deadline {
                let _ = old.kill();
                let _ = old.wait();
                bail!("the new agent instance did not become ready; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = nix::unistd::Pid::from_raw(old.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = old.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                old.kill()?;
                old.wait()?;
                bail!("the old agent instance did not exit within 40 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again with the same arguments (same bpffs, cgroup, admin port).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// This instance's admin socket.
    pub fn admin_socket(&self) -> Option<PathBuf> {
        Some(self.admin_dir.join(format!("admin-{}.sock", self.pid()?)))
    }

    /// GET on the admin API; returns the body of a 200 answer.
    pub fn get(&self, path: &str) -> Result<String> {
        self.admin_request("GET", path)
    }

    /// POST on the admin API; returns the body of a 200 answer.
    pub fn post(&self, path: &str) -> Result<String> {
        self.admin_request("POST", path)
    }

    fn admin_request(&self, method: &str, path: &str) -> Result<String> {
        match self.admin_flags {
            AdminFlags::TcpAndOwnDir => http(self.admin, method, path),
            AdminFlags::Defaults => {
                let socket = self.admin_socket().context("agent not running")?;
                let s = std::os::unix::net::UnixStream::connect(&socket)
                    .with_context(|| format!("connecting to {}", socket.display()))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                http_over(s, method, path)
            }
        }
    }

    /// The Prometheus metrics text.
    pub fn metrics_text(&self) -> Result<String> {
        http(self.metrics, "GET", "/metrics")
    }

    /// The readiness answer: (ready, body).
    pub fn readiness(&self) -> Result<(bool, String)> {
        match http(self.health, "GET", "/healthz/ready") {
            Ok(body) => Ok((true, body)),
            Err(e) if e.to_string().contains("503") => Ok((false, e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// The agent's counters (`/stats`).
    pub fn stats(&self) -> Result<serde_json::Value> {
        let body = self.get("/stats")?;
        serde_json::from_str(&body).context("parsing /stats")
    }

    /// The agent's workload certificates (`/certs`).
    pub fn certs(&self) -> Result<Vec<serde_json::Value>> {
        let body = self.get("/certs")?;
        serde_json::from_str(&body).context("parsing /certs")
    }

    /// The agent's connection records (`/connections`).
    pub fn connections(&self) -> Result<Vec<serde_json::Value>> {
        let body = self.get("/connections")?;
        serde_json::from_str(&body).context("parsing /connections")
    }

    /// Waits until a closed connection record matching `pred` appears (bounded).
    pub fn wait_connection(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let conns = self.connections()?;
            if let Some(c) = conns.iter().find(|c| c["open"] == false && pred(c)) {
                return Ok(c.clone());
            }
            if Instant::now() > deadline {
                bail!("no matching connection record after {timeout:?}; records: {conns:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One HTTP/1.1 request to a local endpoint; the body of a 200 answer, else an error with the
/// status line.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Result<String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    http_over(s, method, path)
}

/// [`http`] over a connected stream (TCP or a unix socket).
pub fn http_over<S: Read + Write>(mut s: S, method: &str, path: &str) -> Result<String> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(64 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{method} {path}: {} {}", head.lines().next().unwrap_or_default(), body.trim());
    }
    Ok(body.to_owned())
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut c) = self.cgroup.take() {
            if let Err(e) = c.remove() {
                eprintln!("testbed: removing the agent's cgroup: {e:#}");
            }
        }
        // A killed agent leaves its socket; the directory is this agent's alone.
        let _ = std::fs::remove_dir_all(&self.admin_dir);
        // The pins outlive the agent on purpose; a test bed removes its bpffs directory itself.
    }
}

impl AgentProcess {
    /// Starts the agent like [`AgentProcess::start`] but returns as soon as its health endpoint
    /// answers, ready or not: for agents that must not become ready.
    pub fn start_unready(bed: &Testbed, opts: AgentOptions) -> Result<AgentProcess> {
        Self::launch(bed, opts, false)
    }

    fn wait_health_answers(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("mtls-agent exited early ({status}); log:\n{}", self.log());
                }
            }
            if self.readiness().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mtls-agent's health endpoint silent after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
