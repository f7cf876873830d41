//! `cargo xtask bench`: plain TCP (A) against mtls-agent (B) against a pair of stunnel4
//! instances doing mutual TLS (C), pod to pod on the test bed, in one run and on the same path
//! (issue 6 lists the figures and the targets). D, a pair of bare TCP relays (this binary's
//! `relay`: no TLS, no HTTP/2, a thread per connection) on stunnel's path, is the floor any
//! proxy in the pods' path stands on: what the two extra user-space hops alone cost here.
//!
//! node1 holds the client pod and 99 idle filler pods (100 enrolled pods for the idle RSS
//! figure); node2 holds the server pod and one fresh peer pod per run (for the first connection
//! to a new peer). A and C run on the client and server pods before any agent starts, so nothing
//! captures them; B runs after, under a namespace-wide STRICT PeerAuthentication.
//!
//! The load generators are hidden subcommands of this binary started inside the pods with
//! `spawn_in_pod` (capture applies only to processes in a pod's cgroup); bulk throughput is
//! iperf3's. Every loop is bounded in count and time, all traffic stays between the bed's
//! namespaces, and everything is removed on exit (Drop guards, Ctrl-C included).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{json, Value};
use testbed::{
    agent::{AgentOptions, AgentProcess, CaDir, WorkloadEntry, WorkloadsFile},
    mesh::{namespace_pa, PolicyDir},
    Pod, PodProcess, Testbed,
};

#[path = "bench/scale.rs"]
mod scale;

const NS: &str = "bench";
/// Echo server with a fixed thread pool (round trips, new connections).
const ECHO_PORT: u16 = 7000;
/// Echo server with a thread per connection (1,000 open connections).
const HOLD_PORT: u16 = 7001;
const IPERF_PORT: u16 = 5201;
/// stunnel: the client side accepts on loopback in the client pod, the server side on the
/// server pod's address and hands over to the same servers on loopback.
const ST_IPERF_LOCAL: u16 = 15201;
const ST_IPERF_REMOTE: u16 = 16201;
const ST_ECHO_LOCAL: u16 = 17000;
const ST_ECHO_REMOTE: u16 = 17001;
/// The bare relays (D), laid out like stunnel.
const RL_IPERF_LOCAL: u16 = 25201;
const RL_IPERF_REMOTE: u16 = 26201;
const RL_ECHO_LOCAL: u16 = 27000;
const RL_ECHO_REMOTE: u16 = 27001;
const MSG: usize = 64;
/// With the client pod, node1 enrolls 100 pods.
const FILLERS: usize = 99;
const HOLD_CONNS: u32 = 1000;
const ECHO_POOL: usize = 16;
const MAX_HOLD_THREADS: usize = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MIB: f64 = 1024.0 * 1024.0;
const MAX_LOAD: Duration = Duration::from_secs(600);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// `--trace-phases`: print each measurement's start on CLOCK_MONOTONIC (perf -k
/// CLOCK_MONOTONIC timestamps), to cut a system-wide profile into phases.
static TRACE_PHASES: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(name = "bench", about = "plain TCP vs mtls-agent vs a stunnel4 pair, pod to pod (root)")]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// One run of each figure with short durations (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Runs of each figure (the median is reported); default 3, or 1 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Where the JSON goes (default: target/bench/latest.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these systems (for profiling one of them): plain, agent, stunnel, relay.
    #[arg(long, value_delimiter = ',', default_value = "plain,agent,stunnel,relay")]
    only: Vec<String>,
    /// Print when each measurement starts (CLOCK_MONOTONIC seconds), for profiling.
    #[arg(long)]
    trace_phases: bool,
    /// KEY=VALUE set in the agents' environment (experiments, e.g. MTLS_AGENT_WORKER_THREADS=2).
    #[arg(long)]
    agent_env: Vec<String>,
    /// Before each measurement, wait up to this long for other processes to leave the CPUs
    /// alone (default 30, or 5 with --quick; 0: do not wait).
    #[arg(long)]
    wait_quiet: Option<u64>,
    /// Instead of the figures above: the scale section, at each of these cluster sizes (pods),
    /// e.g. 1000,10000,150000 (`scale.rs`).
    #[arg(long, value_delimiter = ',')]
    scale: Option<Vec<usize>>,
    /// Scale section: the agent is killed (and the size reported failed) past this RSS.
    #[arg(long, default_value_t = 4096)]
    scale_max_rss_mib: u64,
}

/// Load tools, run inside the pods by the bench itself.
#[derive(Subcommand)]
enum Tool {
    /// Echo servers: a pooled one on LISTEN, a thread-per-connection one on HOLD_LISTEN.
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        hold_listen: Option<String>,
        /// The server exits by itself after this long.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// 64-byte round trips over one connection.
    #[command(hide = true)]
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// New connections (connect, one 64-byte round trip, close) from WORKERS threads.
    #[command(hide = true)]
    Conns {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        seconds: f64,
    },
    /// Bare TCP relay: each ROUTE is LISTEN=TARGET; every accepted connection is copied both
    /// ways to a new connection to TARGET by two threads, half-closes passed on.
    #[command(hide = true)]
    Relay {
        #[arg(long = "route", required = true)]
        routes: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// Opens CONNS connections (one round trip each), reports, keeps them open.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        conns: u32,
        #[arg(long)]
        seconds: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.tool {
        Some(tool) => run_tool(tool),
        None => {
            handle_signals();
            TRACE_PHASES.store(cli.trace_phases, Ordering::Relaxed);
            let mut set = Settings::new(cli.quick, cli.runs);
            if let Some(w) = cli.wait_quiet {
                set.quiet_wait = Duration::from_secs(w.min(600));
            }
            set.agent_env = cli.agent_env;
            match &cli.scale {
                Some(sizes) => std::env::current_exe()
                    .context("current_exe")
                    .and_then(|exe| scale::run(&exe, sizes, cli.scale_max_rss_mib, cli.out)),
                None => run_bench(set, cli.out, &cli.only),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

/// Only a waiter thread receives SIGINT/SIGTERM, so an interruption unwinds through the Drop
/// guards instead of killing the process mid-way (as in the demo).
fn handle_signals() {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("bench: cannot handle Ctrl-C ({e}); interrupting it may leave pods behind");
    }
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("\n{sig}: stopping the bench and cleaning up");
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
    });
}

fn phase(sys: System, name: &str) {
    if TRACE_PHASES.load(Ordering::Relaxed) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        println!("   phase {} {name} at {}.{:09}", sys.name(), ts.tv_sec, ts.tv_nsec);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load tools (inside the pods)

fn run_tool(tool: Tool) -> Result<()> {
    match tool {
        Tool::EchoServer { listen, hold_listen, max_seconds } => {
            echo_server(&listen, hold_listen.as_deref(), Duration::from_secs(max_seconds))
        }
        Tool::Rr { connect, count, seconds } => rr(connect, count, secs(seconds)?),
        Tool::Conns { connect, workers, count, seconds } => {
            conns(connect, workers, count, secs(seconds)?)
        }
        Tool::Hold { connect, conns, seconds } => {
            hold(connect, conns, Duration::from_secs(seconds))
        }
        Tool::Relay { routes, max_seconds } => relay(&routes, Duration::from_secs(max_seconds)),
    }
}

fn relay(routes: &[String], lifetime: Duration) -> Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    for r in routes {
        let (listen, target) =
            r.split_once('=').with_context(|| format!("--route {r:?}: not LISTEN=TARGET"))?;
        let target: SocketAddr = target.parse().with_context(|| format!("--route {r:?}"))?;
        let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
        thread_per_connection(l, live.clone(), move |s| drop(relay_one(s, target)));
    }
    println!("listening");
    let _ = std::io::stdout().flush();
    std::thread::sleep(lifetime);
    Ok(())
}

/// One relayed connection: this thread copies client -> target, a second one the way back.
fn relay_one(client: TcpStream, target: SocketAddr) -> std::io::Result<()> {
    let upstream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
        // Bounds the threads: a peer that vanished silently frees them.
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
    }
    let (mut c_in, mut u_out) = (client.try_clone()?, upstream.try_clone()?);
    let back = std::thread::Builder::new().stack_size(64 << 10).spawn(move || {
        let (mut u_in, mut c_out) = (upstream, client);
        let r = pump(&mut u_in, &mut c_out);
        let _ = c_out.shutdown(std::net::Shutdown::Write);
        r
    })?;
    let r = pump(&mut c_in, &mut u_out);
    let _ = u_out.shutdown(std::net::Shutdown::Write);
    let _ = back.join();
    r
}

/// Copies until EOF through a 64 KiB buffer (std's copy would use 8 KiB).
fn pump(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// At most ten minutes: no load loop outlives a bench run.
fn secs(s: f64) -> Result<Duration> {
    Ok(Duration::try_from_secs_f64(s).context("invalid number of seconds")?.min(MAX_LOAD))
}

/// One result line on stdout, for the bench to parse.
fn report(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "result {v}");
    let _ = out.flush();
}

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    // Bounds the thread: a client that vanished silently frees it.
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

fn echo_server(listen: &str, hold_listen: Option<&str>, lifetime: Duration) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    // A fixed pool blocking in accept(): no thread is started per connection, so the server's
    // own cost stays out of the new-connection figures.
    for _ in 0..ECHO_POOL {
        let l = l.try_clone()?;
        std::thread::Builder::new().stack_size(256 << 10).spawn(move || loop {
            match l.accept() {
                Ok((s, _)) => drop(echo(s)),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        })?;
    }
    if let Some(addr) = hold_listen {
        let h = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        thread_per_connection(h, Arc::new(AtomicUsize::new(0)), |s| drop(echo(s)));
    }
    println!("listening");
    let _ = std::io::stdout().flush();
    std::thread::sleep(lifetime);
    Ok(())
}

/// Serves every connection `l` accepts on a thread of its own, at most `MAX_HOLD_THREADS` at
/// once (counted in `live`); beyond that a connection is closed at once.
fn thread_per_connection<F>(l: TcpListener, live: Arc<AtomicUsize>, serve: F)
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    std::thread::spawn(move || loop {
        let Ok((s, _)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if live.load(Ordering::Relaxed) >= MAX_HOLD_THREADS {
            continue; // dropped: the client sees the connection closed
        }
        live.fetch_add(1, Ordering::Relaxed);
        let (done, serve) = (live.clone(), serve.clone());
        let spawned = std::thread::Builder::new().stack_size(64 << 10).spawn(move || {
            serve(s);
            done.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            // The thread never ran: give its slot back.
            live.fetch_sub(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn round_trip(s: &mut TcpStream, msg: &[u8; MSG]) -> std::io::Result<()> {
    let mut back = [0u8; MSG];
    s.write_all(msg)?;
    s.read_exact(&mut back)?;
    if &back != msg {
        return Err(std::io::Error::other("echo returned other bytes"));
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i]
}

fn rr(addr: SocketAddr, count: usize, run: Duration) -> Result<()> {
    let mut s = dial(addr).with_context(|| format!("connect {addr}"))?;
    let msg = [0x5a; MSG];
    for _ in 0..200 {
        round_trip(&mut s, &msg).context("warm-up round trip")?;
    }
    let end = Instant::now() + run;
    let mut lat = Vec::with_capacity(count.min(1 << 20));
    while lat.len() < count && Instant::now() < end {
        let t = Instant::now();
        round_trip(&mut s, &msg).context("round trip")?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    report(
        json!({"n": lat.len(), "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99)}),
    );
    Ok(())
}

fn conns(addr: SocketAddr, workers: usize, count: u64, run: Duration) -> Result<()> {
    let start = Instant::now();
    let end = start + run;
    let claimed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let threads: Vec<_> = (0..workers.clamp(1, 64))
        .map(|_| {
            let (claimed, errors, first_error) =
                (claimed.clone(), errors.clone(), first_error.clone());
            std::thread::spawn(move || {
                let msg = [0x5a; MSG];
                let mut lat = Vec::new();
                while claimed.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < end {
                    let t = Instant::now();
                    match dial(addr).and_then(|mut s| round_trip(&mut s, &msg)) {
                        Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                        Err(e) => {
                            let n = errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert_with(|| e.to_string());
                            }
                            // A broken path fails fast instead of spinning to the deadline.
                            if n > 100 {
                                break;
                            }
                        }
                    }
                }
                (lat, Instant::now())
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut last = start;
    for t in threads {
        let (l, done) = t.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
        lat.extend(l);
        last = last.max(done);
    }
    let errors = errors.load(Ordering::Relaxed);
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    if lat.is_empty() {
        bail!("no connection succeeded ({errors} errors, first: {first_error:?})");
    }
    lat.sort_by(f64::total_cmp);
    let wall = (last - start).as_secs_f64();
    report(json!({
        "n": lat.len(),
        "errors": errors,
        "first_error": first_error,
        "per_s": lat.len() as f64 / wall,
        "p50_us": percentile(&lat, 0.5),
        "p99_us": percentile(&lat, 0.99),
    }));
    Ok(())
}

fn hold(addr: SocketAddr, n: u32, keep: Duration) -> Result<()> {
    let msg = [0x5a; MSG];
    let end = Instant::now() + Duration::from_secs(60);
    let mut held = Vec::new();
    let mut errors = 0u32;
    while held.len() < n as usize && Instant::now() < end && errors <= 10 {
        match dial(addr).and_then(|mut s| round_trip(&mut s, &msg).map(|()| s)) {
            Ok(s) => held.push(s),
            Err(_) => errors += 1,
        }
    }
    report(json!({"held": held.len(), "errors": errors}));
    std::thread::sleep(keep.min(MAX_LOAD));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The bench

struct Settings {
    quick: bool,
    runs: usize,
    bulk_secs: u32,
    rr_count: usize,
    rr_secs: f64,
    rate_workers: usize,
    rate_secs: f64,
    lat_count: u64,
    lat_secs: f64,
    settle: Duration,
    quiet_wait: Duration,
    agent_env: Vec<String>,
}

impl Settings {
    fn new(quick: bool, runs: Option<usize>) -> Settings {
        let runs = runs.unwrap_or(if quick { 1 } else { 3 }).clamp(1, 20);
        if quick {
            Settings {
                quick,
                runs,
                bulk_secs: 1,
                rr_count: 2_000,
                rr_secs: 1.0,
                rate_workers: 4,
                rate_secs: 1.0,
                lat_count: 300,
                lat_secs: 1.0,
                settle: Duration::from_millis(500),
                quiet_wait: Duration::from_secs(5),
                agent_env: vec![],
            }
        } else {
            Settings {
                quick,
                runs,
                bulk_secs: 5,
                rr_count: 20_000,
                rr_secs: 5.0,
                rate_workers: 4,
                rate_secs: 3.0,
                lat_count: 3_000,
                lat_secs: 3.0,
                settle: Duration::from_secs(1),
                quiet_wait: Duration::from_secs(30),
                agent_env: vec![],
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Plain,
    Agent,
    Stunnel,
    Relay,
}

impl System {
    fn index(self) -> usize {
        self as usize
    }
    fn name(self) -> &'static str {
        match self {
            System::Plain => "plain",
            System::Agent => "agent",
            System::Stunnel => "stunnel",
            System::Relay => "relay",
        }
    }
}

/// Samples per figure, per system.
#[derive(Default)]
struct Samples(BTreeMap<String, [Vec<f64>; 4]>);

impl Samples {
    fn add(&mut self, figure: &str, sys: System, v: f64) {
        if v.is_finite() {
            self.0.entry(figure.to_owned()).or_default()[sys.index()].push(v);
        }
    }

    fn median(&self, figure: &str, sys: System) -> Option<f64> {
        let mut v = self.0.get(figure)?[sys.index()].clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("mtls-bench-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything the bench builds. Fields drop in order: load and servers, agents, their files,
/// then the bed.
struct Rig {
    servers: Vec<PodProcess>,
    stunnel: Vec<PodProcess>,
    relays: Vec<PodProcess>,
    agents: Vec<AgentProcess>,
    policies: Option<PolicyDir>,
    ca: Option<CaDir>,
    /// Workloads file, stunnel certificates and configurations.
    files: TempDir,
    bed: Testbed,
    exe: PathBuf,
    client: Pod,
    server: Pod,
    peers: Vec<Pod>,
    fillers: Vec<Pod>,
    stunnel_bin: PathBuf,
}

fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

fn run_bench(set: Settings, out: Option<PathBuf>, only: &[String]) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the bench builds network namespaces, cgroups and eBPF programs: run it as root");
    }
    for o in only {
        ensure!(
            ["plain", "agent", "stunnel", "relay"].contains(&o.as_str()),
            "--only: unknown {o:?}"
        );
    }
    let wanted = |sys: System| only.iter().any(|o| o == sys.name());
    let exe = std::env::current_exe().context("current_exe")?;
    let out = match out {
        Some(p) => p,
        // target/release/bench -> target/bench/latest.json; a partial run does not replace it.
        None => exe
            .parent()
            .and_then(Path::parent)
            .context("cannot place target/bench next to the executable")?
            .join(if only.len() == 4 { "bench/latest.json" } else { "bench/partial.json" }),
    };
    let agent = exe.with_file_name("mtls-agent");
    ensure!(agent.is_file(), "{} is missing: run `cargo xtask bench`", agent.display());
    let stunnel_bin = find_on_path(&["stunnel4", "stunnel"])
        .context("stunnel4 not found: `cargo xtask bench` installs it")?;
    for tool in ["iperf3", "openssl"] {
        find_on_path(&[tool])
            .with_context(|| format!("{tool} not found: `cargo xtask bench` installs it"))?;
    }
    // Production logging: debug would add the eBPF programs' own log events to their run time.
    if std::env::var_os("MTLS_TEST_AGENT_LOG").is_none() {
        std::env::set_var("MTLS_TEST_AGENT_LOG", "info");
    }
    for kv in &set.agent_env {
        let (k, v) =
            kv.split_once('=').with_context(|| format!("--agent-env {kv:?}: not KEY=VALUE"))?;
        // Inherited by the agents (AgentProcess passes our environment on).
        std::env::set_var(k, v);
        println!("   agent environment: {k}={v}");
    }
    let _ = testbed::cleanup_stale();

    let started = Instant::now();
    println!("== bench: {} run(s) per figure{}", set.runs, if set.quick { " (quick)" } else { "" });
    let mut rig = Rig::build(&set, exe, stunnel_bin)?;
    let mut samples = Samples::default();

    if wanted(System::Plain) || wanted(System::Stunnel) || wanted(System::Relay) {
        println!(
            "== A (plain TCP), C (stunnel4 pair) and D (bare relay pair), before any agent runs"
        );
    }
    if wanted(System::Stunnel) {
        rig.start_stunnel()?;
    }
    if wanted(System::Relay) {
        rig.start_relays()?;
    }
    for r in 0..set.runs {
        for sys in
            [System::Plain, System::Stunnel, System::Relay].into_iter().filter(|s| wanted(*s))
        {
            check_interrupted()?;
            println!("-- run {}/{}: {}", r + 1, set.runs, sys.name());
            rig.measure(sys, &set, &mut samples)?;
        }
    }
    rig.stunnel.clear();
    rig.relays.clear();

    if wanted(System::Agent) {
        println!("== B (mtls-agent, STRICT)");
        rig.start_agents()?;
        for r in 0..set.runs {
            check_interrupted()?;
            println!("-- run {}/{}: agent", r + 1, set.runs);
            rig.measure_agent(r, &set, &mut samples)?;
        }
    }
    let elapsed = started.elapsed();
    drop(rig);

    let figures = figures(&samples);
    print_table(&figures, &samples, set.runs, elapsed);
    let doc = to_json(&figures, &samples);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

impl Rig {
    fn build(set: &Settings, exe: PathBuf, stunnel_bin: PathBuf) -> Result<Rig> {
        let t = Instant::now();
        let files = TempDir::new("files")?;
        let mut bed = Testbed::new("bench")?;
        bed.add_node("node1")?;
        bed.add_node("node2")?;
        let client = bed.add_pod("node1", "client")?;
        let server = bed.add_pod("node2", "server")?;
        let mut rig = Rig {
            servers: vec![],
            stunnel: vec![],
            relays: vec![],
            agents: vec![],
            policies: None,
            ca: None,
            files,
            bed,
            exe,
            client,
            server,
            peers: vec![],
            fillers: vec![],
            stunnel_bin,
        };
        for i in 0..set.runs {
            check_interrupted()?;
            let p = rig.bed.add_pod("node2", &format!("peer{i}"))?;
            rig.peers.push(p);
        }
        for i in 0..FILLERS {
            check_interrupted()?;
            let p = rig.bed.add_pod("node1", &format!("fill{i:02}"))?;
            rig.fillers.push(p);
        }
        // Thousands of short connections a second: let TIME_WAIT ports be reused (after 1 s,
        // with timestamps) and widen the range; our listeners all sit below it.
        for pod in ["client", "server"] {
            rig.bed.in_pod_netns(pod, || -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
                std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "20000 60999")
            })??;
        }
        let server_echo = rig.tool(&[
            "echo-server",
            "--listen",
            &format!("0.0.0.0:{ECHO_PORT}"),
            "--hold-listen",
            &format!("0.0.0.0:{HOLD_PORT}"),
        ]);
        let p = rig.bed.spawn_in_pod("server", server_echo)?;
        p.wait_for_stdout("listening", IO_TIMEOUT)?;
        rig.servers.push(p);
        for i in 0..set.runs {
            let cmd = rig.tool(&["echo-server", "--listen", &format!("0.0.0.0:{ECHO_PORT}")]);
            let p = rig.bed.spawn_in_pod(&format!("peer{i}"), cmd)?;
            p.wait_for_stdout("listening", IO_TIMEOUT)?;
            rig.servers.push(p);
        }
        println!(
            "   test bed {}: client {} on node1 (+{FILLERS} idle pods), server {} and {} peer(s) \
             on node2 ({} ms)",
            rig.bed.id(),
            rig.client.ip,
            rig.server.ip,
            rig.peers.len(),
            t.elapsed().as_millis()
        );
        Ok(rig)
    }

    fn tool(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args);
        c
    }

    /// Runs a load tool in the client pod and returns its result line.
    fn run_tool(&self, args: &[&str], timeout: Duration) -> Result<Value> {
        let p = self.bed.spawn_in_pod("client", self.tool(args))?;
        let out = p.wait_with_output(timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{args:?} failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("result "))
            .with_context(|| format!("{args:?}: no result in {stdout:?}"))?;
        serde_json::from_str(line).with_context(|| format!("{args:?}: parsing {line:?}"))
    }

    fn addrs(&self, sys: System) -> (SocketAddr, SocketAddr) {
        let lo = Ipv4Addr::LOCALHOST;
        match sys {
            System::Plain | System::Agent => {
                ((self.server.ip, IPERF_PORT).into(), (self.server.ip, ECHO_PORT).into())
            }
            System::Stunnel => ((lo, ST_IPERF_LOCAL).into(), (lo, ST_ECHO_LOCAL).into()),
            System::Relay => ((lo, RL_IPERF_LOCAL).into(), (lo, RL_ECHO_LOCAL).into()),
        }
    }

    /// Processes whose CPU time is charged to the transport.
    fn transport_pids(&self, sys: System) -> Vec<u32> {
        match sys {
            System::Plain => vec![],
            System::Agent => self.agents.iter().filter_map(AgentProcess::pid).collect(),
            System::Stunnel => self.stunnel.iter().map(PodProcess::pid).collect(),
            System::Relay => self.relays.iter().map(PodProcess::pid).collect(),
        }
    }

    /// Bulk throughput (Gbit/s) and the transport's CPU seconds per GB moved.
    fn iperf(&self, sys: System, streams: u32, secs: u32) -> Result<(f64, Option<f64>)> {
        let (target, _) = self.addrs(sys);
        // A one-off server per test: a failed test cannot leave it busy for the next one.
        let mut s = Command::new("iperf3");
        s.args(["-s", "-1", "-p", &IPERF_PORT.to_string()]);
        let mut server = self.bed.spawn_in_pod("server", s)?;
        wait_listening(&mut server, IPERF_PORT)?;
        let pids = self.transport_pids(sys);
        let cpu0 = cpu_seconds(&pids)?;
        let mut c = Command::new("iperf3");
        c.args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "5000",
        ]);
        let out = self
            .bed
            .spawn_in_pod("client", c)?
            .wait_with_output(Duration::from_secs(u64::from(secs) + 30))?;
        let cpu1 = cpu_seconds(&pids)?;
        drop(server);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("iperf3 output: {text:?} {:?}", out.stderr))?;
        if let Some(e) = v.get("error") {
            bail!("iperf3 to {target} ({} streams): {e}", streams);
        }
        ensure!(out.status.success(), "iperf3 to {target} failed: {}", out.status);
        let sum = &v["end"]["sum_received"];
        let bps = sum["bits_per_second"].as_f64().context("iperf3: no bits_per_second")?;
        let bytes = sum["bytes"].as_f64().context("iperf3: no bytes")?;
        let cpu = (!pids.is_empty() && bytes > 0.0).then(|| (cpu1 - cpu0) / (bytes / 1e9));
        Ok((bps / 1e9, cpu))
    }

    /// The figures all three systems share, with the CPU other processes took meanwhile.
    fn measure(&self, sys: System, set: &Settings, samples: &mut Samples) -> Result<()> {
        self.wait_quiet(set.quiet_wait)?;
        let before = self.cpu_snapshot()?;
        self.measure_shared(sys, set, samples)?;
        let load = self.cpu_snapshot()?.background_since(&before);
        samples.add("background_load", sys, load);
        if load > BUSY {
            println!("   warning: other processes used {load:.2} CPUs meanwhile");
        }
        Ok(())
    }

    /// CPU time of the whole machine and of what the bench runs (pods, agents, itself).
    fn cpu_snapshot(&self) -> Result<CpuSnapshot> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("malformed /proc/stat")?
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        // (steal is CPU another guest took from us).
        let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| ticks.get(i)).sum();
        let pods = std::fs::read_to_string(self.bed.base_cgroup().join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1e6;
        let mut own: Vec<u32> = self.agents.iter().filter_map(AgentProcess::pid).collect();
        own.push(std::process::id());
        Ok(CpuSnapshot {
            at: Instant::now(),
            busy: busy as f64 / clock_ticks()?,
            ours: pods + cpu_seconds(&own)?,
        })
    }

    /// Waits (bounded) until other processes leave the CPUs mostly idle.
    fn wait_quiet(&self, max: Duration) -> Result<()> {
        let start = Instant::now();
        let mut told = false;
        while !max.is_zero() {
            let before = self.cpu_snapshot()?;
            std::thread::sleep(Duration::from_millis(500));
            let load = self.cpu_snapshot()?.background_since(&before);
            if load < BUSY {
                return Ok(());
            }
            if start.elapsed() >= max {
                println!("   still busy after {max:?} ({load:.2} CPUs used by others): measuring");
                return Ok(());
            }
            if !told {
                println!("   waiting for other processes to leave the CPUs ({load:.2} in use)");
                told = true;
            }
            check_interrupted()?;
        }
        Ok(())
    }

    fn measure_shared(&self, sys: System, set: &Settings, samples: &mut Samples) -> Result<()> {
        let (_, echo) = self.addrs(sys);
        phase(sys, "bulk1");
        let (gbit, cpu) = self.iperf(sys, 1, set.bulk_secs)?;
        samples.add("throughput_1_stream", sys, gbit);
        if let Some(cpu) = cpu {
            samples.add("cpu_per_gb", sys, cpu);
        }
        check_interrupted()?;
        phase(sys, "bulk4");
        let (gbit4, _) = self.iperf(sys, 4, set.bulk_secs)?;
        samples.add("throughput_4_streams", sys, gbit4);
        check_interrupted()?;

        let budget = |s: f64| Duration::from_secs_f64(s + 30.0);
        let echo_s = echo.to_string();
        phase(sys, "rr");
        let switches0 = machine_switches()?;
        let v = self.run_tool(
            &[
                "rr",
                "--connect",
                &echo_s,
                "--count",
                &set.rr_count.to_string(),
                "--seconds",
                &set.rr_secs.to_string(),
            ],
            budget(set.rr_secs),
        )?;
        samples.add("rr_64b_p50", sys, num(&v, "p50_us")?);
        samples.add("rr_64b_p99", sys, num(&v, "p99_us")?);
        // The round trips plus the tool's 200 warm-up ones.
        let trips = num(&v, "n")? + 200.0;
        samples.add("switches_per_rr", sys, (machine_switches()? - switches0) as f64 / trips);
        check_interrupted()?;

        let conns = |workers: usize, count: u64, secs: f64| {
            self.run_tool(
                &[
                    "conns",
                    "--connect",
                    &echo_s,
                    "--workers",
                    &workers.to_string(),
                    "--count",
                    &count.to_string(),
                    "--seconds",
                    &secs.to_string(),
                ],
                budget(secs),
            )
        };
        phase(sys, "rate");
        let v = conns(set.rate_workers, 1_000_000, set.rate_secs)?;
        samples.add("new_connections_per_s", sys, num(&v, "per_s")?);
        warn_errors(sys, &v);
        check_interrupted()?;
        phase(sys, "conn-latency");
        let switches0 = machine_switches()?;
        let v = conns(1, set.lat_count, set.lat_secs)?;
        let per = (machine_switches()? - switches0) as f64 / num(&v, "n")?.max(1.0);
        samples.add("switches_per_conn", sys, per);
        samples.add("new_connection_p50", sys, num(&v, "p50_us")?);
        warn_errors(sys, &v);
        println!(
            "   1 stream {gbit:.2} Gbit/s, 4 streams {gbit4:.2} Gbit/s{}, RR p50 {:.1} us, \
             {:.0} conn/s, conn p50 {:.1} us",
            cpu.map(|c| format!(" ({c:.2} CPU s/GB)")).unwrap_or_default(),
            samples.0["rr_64b_p50"][sys.index()].last().copied().unwrap_or(f64::NAN),
            samples.0["new_connections_per_s"][sys.index()].last().copied().unwrap_or(f64::NAN),
            num(&v, "p50_us")?,
        );
        Ok(())
    }

    fn start_stunnel(&mut self) -> Result<()> {
        let dir = self.files.0.join("stunnel");
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        let server_ip = self.server.ip;
        make_certs(&dir, server_ip)?;
        // Both sides verify the other, as the agent does: the chain to our CA, and the peer's
        // name (the server's IP, the client's DNS name).
        let common = format!(
            "foreground = yes\npid =\nsyslog = no\nsocket = l:TCP_NODELAY=1\n\
             socket = r:TCP_NODELAY=1\nCAfile = {d}/ca.pem\nverifyChain = yes\n"
        );
        let client_conf = format!(
            "{common}cert = {d}/client.pem\nkey = {d}/client.key\ncheckIP = {server_ip}\n\
             [iperf]\nclient = yes\naccept = 127.0.0.1:{ST_IPERF_LOCAL}\n\
             connect = {server_ip}:{ST_IPERF_REMOTE}\n\
             [echo]\nclient = yes\naccept = 127.0.0.1:{ST_ECHO_LOCAL}\n\
             connect = {server_ip}:{ST_ECHO_REMOTE}\n"
        );
        let server_conf = format!(
            "{common}cert = {d}/server.pem\nkey = {d}/server.key\nrequireCert = yes\n\
             checkHost = client.{NS}\n\
             [iperf]\naccept = {server_ip}:{ST_IPERF_REMOTE}\nconnect = 127.0.0.1:{IPERF_PORT}\n\
             [echo]\naccept = {server_ip}:{ST_ECHO_REMOTE}\nconnect = 127.0.0.1:{ECHO_PORT}\n"
        );
        for (pod, conf, ports) in [
            ("server", server_conf, [ST_IPERF_REMOTE, ST_ECHO_REMOTE]),
            ("client", client_conf, [ST_IPERF_LOCAL, ST_ECHO_LOCAL]),
        ] {
            let path = dir.join(format!("{pod}.conf"));
            std::fs::write(&path, conf)?;
            let mut c = Command::new(&self.stunnel_bin);
            c.arg(&path);
            let mut p = self.bed.spawn_in_pod(pod, c)?;
            for port in ports {
                wait_listening(&mut p, port)?;
            }
            self.stunnel.push(p);
        }
        Ok(())
    }

    /// D: a bare relay in each pod, on stunnel's path (client loopback -> server pod's
    /// address -> server loopback).
    fn start_relays(&mut self) -> Result<()> {
        let sip = self.server.ip;
        let lo = Ipv4Addr::LOCALHOST;
        for (pod, routes) in [
            (
                "server",
                [
                    format!("{sip}:{RL_IPERF_REMOTE}={lo}:{IPERF_PORT}"),
                    format!("{sip}:{RL_ECHO_REMOTE}={lo}:{ECHO_PORT}"),
                ],
            ),
            (
                "client",
                [
                    format!("{lo}:{RL_IPERF_LOCAL}={sip}:{RL_IPERF_REMOTE}"),
                    format!("{lo}:{RL_ECHO_LOCAL}={sip}:{RL_ECHO_REMOTE}"),
                ],
            ),
        ] {
            let mut args = vec!["relay"];
            for r in &routes {
                args.extend(["--route", r]);
            }
            let p = self.bed.spawn_in_pod(pod, self.tool(&args))?;
            p.wait_for_stdout("listening", IO_TIMEOUT)?;
            self.relays.push(p);
        }
        Ok(())
    }

    fn start_agents(&mut self) -> Result<()> {
        let files = self.files.0.clone();
        let mut wl = WorkloadsFile::default();
        let pods = std::iter::once(&self.client)
            .chain(&self.fillers)
            .chain(std::iter::once(&self.server))
            .chain(&self.peers);
        for p in pods {
            wl.workloads.push(WorkloadEntry::of(p, NS));
        }
        let workloads = files.join("workloads.yaml");
        wl.write(&workloads)?;
        let policies = PolicyDir::new(self.bed.id())?;
        policies.write("strict.yaml", &namespace_pa(NS, "STRICT"))?;
        let dir = policies.0.display().to_string();
        self.policies = Some(policies);
        let ca = CaDir::init(&format!("bench-{}", self.bed.id()), "cluster.local")?;
        let ca_path = ca.path.clone();
        self.ca = Some(ca);
        for node in ["node1", "node2"] {
            let mut opts = AgentOptions::new(node, &workloads);
            opts.ca_dir = Some(ca_path.clone());
            opts.extra_args = vec!["--policies".into(), dir.clone()];
            self.agents.push(AgentProcess::start(&self.bed, opts)?);
        }
        self.wait_enrolled(0, 1 + FILLERS)?;
        self.wait_enrolled(1, 1 + self.peers.len())?;
        Ok(())
    }

    fn wait_enrolled(&self, agent: usize, pods: usize) -> Result<()> {
        let a = &self.agents[agent];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = a.certs().map(|c| c.len()).unwrap_or(0);
            if n >= pods {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent {}: {n} of {pods} pods enrolled after 60 s", a.node);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn measure_agent(&mut self, run: usize, set: &Settings, samples: &mut Samples) -> Result<()> {
        phase(System::Agent, "restart");
        // A fresh node1 agent each run: idle RSS before any traffic, and an empty pool.
        if run > 0 {
            self.agents[0].restart()?;
            self.wait_enrolled(0, 1 + FILLERS)?;
        }
        std::thread::sleep(set.settle);
        let node1 = self.agents[0].pid().context("node1 agent not running")?;
        let idle = rss_mib(node1)?;
        samples.add("rss_idle_100_pods", System::Agent, idle);
        let ebpf0 = self.ebpf_totals()?;

        let peer: SocketAddr = (self.peers[run].ip, ECHO_PORT).into();
        let peer_s = peer.to_string();
        let v = self.run_tool(
            &["conns", "--connect", &peer_s, "--workers", "1", "--count", "1", "--seconds", "10"],
            Duration::from_secs(30),
        )?;
        let first_ms = num(&v, "p50_us")? / 1000.0;
        samples.add("first_connection_new_peer", System::Agent, first_ms);
        self.check_mtls(peer)?;
        println!(
            "   idle RSS {idle:.1} MiB (100 pods), first connection to {peer}: {first_ms:.2} ms"
        );
        check_interrupted()?;

        self.measure(System::Agent, set, samples)?;
        check_interrupted()?;

        phase(System::Agent, "hold");
        let hold = self.bed.spawn_in_pod(
            "client",
            self.tool(&[
                "hold",
                "--connect",
                &SocketAddr::from((self.server.ip, HOLD_PORT)).to_string(),
                "--conns",
                &HOLD_CONNS.to_string(),
                "--seconds",
                "120",
            ]),
        )?;
        let line = hold.wait_for_stdout("result ", Duration::from_secs(90))?;
        let v: Value = serde_json::from_str(line.trim_start_matches("result "))
            .with_context(|| format!("hold: parsing {line:?}"))?;
        let held = num(&v, "held")?;
        ensure!(held as u32 == HOLD_CONNS, "only {held} of {HOLD_CONNS} connections opened: {v}");
        std::thread::sleep(set.settle);
        let mut rss = Vec::new();
        for a in &self.agents {
            rss.push(rss_mib(a.pid().context("agent not running")?)?);
        }
        drop(hold);
        let max = rss.iter().copied().fold(0.0, f64::max);
        samples.add("rss_1000_connections", System::Agent, max);
        println!(
            "   RSS with {HOLD_CONNS} open connections: node1 {:.1} MiB, node2 {:.1} MiB",
            rss[0], rss[1]
        );

        phase(System::Agent, "end");
        let ebpf1 = self.ebpf_totals()?;
        let mut line = String::from("   eBPF average run time:");
        for (prog, (runs1, ns1)) in &ebpf1 {
            let (runs0, ns0) = ebpf0.get(prog).copied().unwrap_or((0.0, 0.0));
            if runs1 > &runs0 {
                let avg = (ns1 - ns0) / (runs1 - runs0);
                samples.add(&format!("ebpf_{prog}_avg"), System::Agent, avg);
                let _ = write!(line, " {prog} {avg:.0} ns ({:.0} runs)", runs1 - runs0);
            }
        }
        println!("{line}");
        Ok(())
    }

    /// The agent carried the connection to `dst` in mTLS (not as passthrough).
    fn check_mtls(&self, dst: SocketAddr) -> Result<()> {
        let rec = self.agents[0]
            .wait_connection(Duration::from_secs(5), |c| {
                c["destination"] == dst.to_string() && c["direction"] == "outbound"
            })
            .context("the agent did not record the first connection")?;
        ensure!(rec["mode"] == "mTLS", "B is not encrypted: the agent carried it as {rec}");
        Ok(())
    }

    /// Per eBPF program over both agents: (runs, nanoseconds), from `/metrics`.
    fn ebpf_totals(&self) -> Result<BTreeMap<String, (f64, f64)>> {
        let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for a in &self.agents {
            let text = a.metrics_text()?;
            for line in text.lines() {
                let (is_runs, rest) =
                    if let Some(r) = line.strip_prefix("mtls_agent_ebpf_program_runs_total{") {
                        (true, r)
                    } else if let Some(r) =
                        line.strip_prefix("mtls_agent_ebpf_program_run_seconds_total{")
                    {
                        (false, r)
                    } else {
                        continue;
                    };
                let Some((labels, value)) = rest.split_once("} ") else { continue };
                let Some(prog) = labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("program=\""))
                    .and_then(|p| p.strip_suffix('"'))
                else {
                    continue;
                };
                let Ok(value) = value.trim().parse::<f64>() else { continue };
                let e = totals.entry(prog.to_owned()).or_default();
                if is_runs {
                    e.0 += value;
                } else {
                    e.1 += value * 1e9;
                }
            }
        }
        ensure!(!totals.is_empty(), "the agents' /metrics carry no eBPF program statistics");
        Ok(totals)
    }
}

fn warn_errors(sys: System, v: &Value) {
    if v["errors"].as_u64().unwrap_or(0) > 0 {
        eprintln!(
            "   {}: {} failed connections (first: {})",
            sys.name(),
            v["errors"],
            v["first_error"]
        );
    }
}

fn num(v: &Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

/// Waits until the process (or a thread of it) listens on `port` in its own namespace.
fn wait_listening(p: &mut PodProcess, port: u16) -> Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let hex = format!(":{port:04X}");
    loop {
        for file in ["tcp", "tcp6"] {
            let table = std::fs::read_to_string(format!("/proc/{}/net/{file}", p.pid()))
                .unwrap_or_default();
            let listening = table.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&hex) && f[3] == "0A"
            });
            if listening {
                return Ok(());
            }
        }
        if let Some(status) = p.try_wait()? {
            bail!("exited ({status}) before listening on {port}: {}", p.stderr());
        }
        if Instant::now() > deadline {
            bail!("not listening on {port} after {IO_TIMEOUT:?}: {}", p.stderr());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Other processes using more CPUs than this make a measurement suspect.
const BUSY: f64 = 0.15;

struct CpuSnapshot {
    at: Instant,
    /// Busy CPU seconds of the whole machine.
    busy: f64,
    /// CPU seconds of the bench's own processes.
    ours: f64,
}

impl CpuSnapshot {
    /// CPUs (on average) that others used between `before` and this snapshot.
    fn background_since(&self, before: &CpuSnapshot) -> f64 {
        let wall = (self.at - before.at).as_secs_f64().max(1e-3);
        (((self.busy - before.busy) - (self.ours - before.ours)) / wall).max(0.0)
    }
}

fn clock_ticks() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(hz as f64)
}

/// utime + stime of the processes (all their threads), in seconds.
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let hz = clock_ticks()?;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // The command name may hold spaces; the fields after it are plain.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat(5); `rest` starts at field 3.
        let get = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).context("malformed stat");
        ticks += get(11)? + get(12)?;
    }
    Ok(ticks as f64 / hz)
}

/// Context switches of the whole machine (`ctxt` in /proc/stat): unlike per-thread counts it
/// keeps those of short-lived threads (stunnel's per connection, the agent's per dial).
fn machine_switches() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .context("no ctxt in /proc/stat")
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024.0 / MIB)
}

/// A CA, a server certificate for the server pod's IP and a client certificate for
/// `client.<NS>`, all ECDSA P-256 like the agent's.
fn make_certs(dir: &Path, server_ip: Ipv4Addr) -> Result<()> {
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench-ca"];
    openssl(&[&["req", "-x509"], &ec[..], &ca[..]].concat())?;
    for (name, ext) in [
        ("server", format!("subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\n")),
        ("client", format!("subjectAltName=DNS:client.{NS}\nextendedKeyUsage=clientAuth\n")),
    ] {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), format!("basicConstraints=CA:FALSE\n{ext}"))?;
        openssl(
            &[&["req"], &ec[..], &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]]
                .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Clone, Copy)]
enum Target {
    None,
    /// agent / plain at least this.
    RatioAtLeast(f64),
    /// agent / plain at most this.
    RatioAtMost(f64),
    /// agent below this (absolute).
    Below(f64),
    /// agent at most this (absolute).
    AtMost(f64),
}

struct Figure {
    key: String,
    label: String,
    unit: &'static str,
    target: Target,
    /// A ratio to plain means something (not for the background load).
    compare: bool,
}

fn figures(samples: &Samples) -> Vec<Figure> {
    let f = |key: &str, label: &str, unit: &'static str, target: Target| Figure {
        key: key.into(),
        label: label.into(),
        unit,
        target,
        compare: true,
    };
    let mut v = vec![
        f("throughput_1_stream", "throughput, 1 stream", "Gbit/s", Target::RatioAtLeast(0.40)),
        f("throughput_4_streams", "throughput, 4 streams", "Gbit/s", Target::RatioAtLeast(0.25)),
        f("rr_64b_p50", "64 B round trip p50", "us", Target::RatioAtMost(1.7)),
        f("rr_64b_p99", "64 B round trip p99", "us", Target::None),
        f("new_connections_per_s", "new connections (4 workers)", "conn/s", Target::None),
        f("new_connection_p50", "new connection p50", "us", Target::RatioAtMost(2.0)),
        f("first_connection_new_peer", "first connection, new peer", "ms", Target::Below(5.0)),
        f("cpu_per_gb", "CPU per GB (both sides)", "CPU s/GB", Target::None),
        f("rss_idle_100_pods", "agent RSS idle, 100 pods", "MiB", Target::AtMost(40.0)),
        f("rss_1000_connections", "agent RSS, 1,000 conns", "MiB", Target::AtMost(100.0)),
        f("switches_per_rr", "context switches / round trip", "count", Target::None),
        f("switches_per_conn", "context switches / new conn", "count", Target::None),
        Figure { compare: false, ..f("background_load", "others' CPU use", "CPUs", Target::None) },
    ];
    for key in samples.0.keys() {
        if let Some(prog) = key.strip_prefix("ebpf_").and_then(|k| k.strip_suffix("_avg")) {
            v.push(Figure {
                key: key.clone(),
                label: format!("eBPF {prog} avg run"),
                unit: "ns",
                target: Target::Below(1000.0),
                compare: true,
            });
        }
    }
    v
}

fn ratio(fig: &Figure, a: Option<f64>, plain: Option<f64>) -> Option<f64> {
    match (a, plain) {
        (Some(a), Some(p)) if p > 0.0 && fig.compare => Some(a / p),
        _ => None,
    }
}

/// (target text, verdict) for the agent's figure.
fn verdict(fig: &Figure, agent: Option<f64>, r: Option<f64>) -> (String, &'static str) {
    let pass = |ok: Option<bool>| match ok {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "n/a",
    };
    match fig.target {
        Target::None => (String::new(), ""),
        Target::RatioAtLeast(t) => (format!(">= {t:.2}x"), pass(r.map(|r| r >= t))),
        Target::RatioAtMost(t) => (format!("<= {t:.2}x"), pass(r.map(|r| r <= t))),
        Target::Below(t) => (format!("< {t} {}", fig.unit), pass(agent.map(|a| a < t))),
        Target::AtMost(t) => (format!("<= {t} {}", fig.unit), pass(agent.map(|a| a <= t))),
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} x {cpu}, Linux {}", kernel.trim())
}

fn print_table(figures: &[Figure], s: &Samples, runs: usize, elapsed: Duration) {
    println!();
    println!("== results: median of {runs} run(s); {}; {:.0} s", machine(), elapsed.as_secs_f64());
    println!(
        "{:<30} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>7}  {:<12}",
        "figure",
        "unit",
        "plain (A)",
        "agent (B)",
        "stunnel (C)",
        "relay (D)",
        "B/A",
        "C/A",
        "D/A",
        "target (B)"
    );
    let mut verdicts = BTreeMap::<&str, Vec<&str>>::new();
    for fig in figures {
        let (a, b, c, d) = (
            s.median(&fig.key, System::Plain),
            s.median(&fig.key, System::Agent),
            s.median(&fig.key, System::Stunnel),
            s.median(&fig.key, System::Relay),
        );
        let r = ratio(fig, b, a);
        let (target, v) = verdict(fig, b, r);
        if !v.is_empty() {
            verdicts.entry(v).or_default().push(&fig.label);
        }
        println!(
            "{:<30} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>7}  {:<12} {}",
            fig.label,
            fig.unit,
            fmt_value(a),
            fmt_value(b),
            fmt_value(c),
            fmt_value(d),
            fmt_ratio(r),
            fmt_ratio(ratio(fig, c, a)),
            fmt_ratio(ratio(fig, d, a)),
            target,
            v
        );
    }
    println!(
        "CPU per GB: both agents (B), both stunnel processes (C) or both relays (D), during the \
         1-stream run. \
         eBPF: kernel BPF stats over B's traffic, both nodes. RSS: node1 (100 pods) idle; the \
         larger of the two agents with 1,000 connections."
    );
    for (v, labels) in &verdicts {
        println!("{v}: {}", labels.join(", "));
    }
    let busiest = [System::Plain, System::Agent, System::Stunnel, System::Relay]
        .into_iter()
        .filter_map(|sys| s.0.get("background_load").map(|r| r[sys.index()].clone()))
        .flatten()
        .fold(0.0, f64::max);
    if busiest > BUSY {
        println!(
            "WARNING: other processes used up to {busiest:.2} CPUs during a measurement; \
             figures from a busy machine are not comparable"
        );
    }
}

fn to_json(figures: &[Figure], s: &Samples) -> Value {
    let mut doc = serde_json::Map::new();
    for fig in figures {
        let (a, b, c, d) = (
            s.median(&fig.key, System::Plain),
            s.median(&fig.key, System::Agent),
            s.median(&fig.key, System::Stunnel),
            s.median(&fig.key, System::Relay),
        );
        let r = ratio(fig, b, a);
        let (target, v) = verdict(fig, b, r);
        doc.insert(
            fig.key.clone(),
            json!({
                "plain": a,
                "agent": b,
                "stunnel": c,
                "relay": d,
                "ratio": r,
                "unit": fig.unit,
                "target": (!target.is_empty()).then_some(target),
                "status": (!v.is_empty()).then_some(v),
                "samples": s.0.get(&fig.key).map(|r| json!({
                    "plain": r[System::Plain.index()],
                    "agent": r[System::Agent.index()],
                    "stunnel": r[System::Stunnel.index()],
                    "relay": r[System::Relay.index()],
                })),
            }),
        );
    }
    Value::Object(doc)
}
