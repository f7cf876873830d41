//! End-to-end: bad input to a pod's tunnel port (`podIP:15008`) and to the files the agent
//! watches. Each is refused in bounded time and memory, counted (`/stats`, `/metrics`) and
//! logged, and the agent keeps serving mesh clients afterwards. Runs as root.
//!
//! The hostile clients are threads of this test process inside a pod's network namespace
//! (`Testbed::in_pod_netns`): the test process is not in the node's cgroup, so the agent does not
//! capture them, and they reach `podIP:15008` as a process on another node would. Their
//! certificates come from the mesh's own CA directory, loaded with `identity::CaSigner`.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use mtls_agent::{
    identity::{client_config, CaSigner, SpiffeId, WorkloadCert},
    tunnel::hbone::{self, HboneError},
};
use testbed::{
    agent::{AgentProcess, WorkloadsFile},
    mesh::{namespace_pa, Mesh, PolicyDir, PORT},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    client::TlsStream,
    rustls::{
        self, client::ResolvesClientCert, pki_types::ServerName, sign::CertifiedKey,
        SignatureScheme,
    },
    TlsConnector,
};

const NS: &str = "shop";
const TRUST_DOMAIN: &str = "cluster.local";
/// The agent's tunnel port.
const HBONE_PORT: u16 = 15008;
/// The agent closes a silent TLS client after 10 s, and a silent HTTP/2 client after as long;
/// this is the bound the tests hold it to.
const STALL_BOUND: Duration = Duration::from_secs(12);
/// Every other refusal is expected well within this.
const REJECT_BOUND: Duration = Duration::from_secs(5);
/// Counters and log lines appear within this after the event.
const OBSERVE: Duration = Duration::from_secs(5);
/// The agent's resident memory under a stream flood.
const RSS_BOUND_KIB: u64 = 200 * 1024;
/// Streams one flooding connection opens without waiting for answers.
const FLOOD_STREAMS: u32 = 5000;
/// The agent's per-connection stream limit (`hbone::ServerConfig::max_concurrent_streams`).
const MAX_CONCURRENT_STREAMS: u64 = 1000;

/// One node: `client` and `server` in the mesh, `outsider` (where the hostile clients run) not.
struct Bed {
    // Drop order: the runtime (our clients), then the agent and pods, then its policy directory.
    rt: tokio::runtime::Runtime,
    m: Mesh,
    policies: Option<PolicyDir>,
    signer: CaSigner,
    workloads: PathBuf,
}

impl Bed {
    /// `policies`: files of a `--policies` directory (the agent then also gets `--node-ip`).
    fn new(test: &str, policies: Option<&[(&str, &str)]>) -> Result<Bed> {
        let mut m = Mesh::build(
            test,
            NS,
            &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
        )?;
        let (workloads, _) = m.workloads("workloads", &["client", "server"])?;
        let ca = m.ca("ca")?;
        let mut extra: Vec<String> = Vec::new();
        let policies = match policies {
            Some(files) => {
                let dir = PolicyDir::new(m.bed.id())?;
                for (name, yaml) in files {
                    dir.write(name, yaml)?;
                }
                extra.extend(["--policies".into(), dir.0.display().to_string()]);
                extra.extend(["--node-ip".into(), m.bed.node("node1").ip.to_string()]);
                Some(dir)
            }
            None => None,
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        m.start_agent("node1", &workloads, &ca, &extra)?;
        let signer = CaSigner::load(&ca).context("loading the mesh CA")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        Ok(Bed { rt, m, policies, signer, workloads })
    }

    fn agent(&self) -> &AgentProcess {
        self.m.agent("node1")
    }

    fn ip(&self, pod: &str) -> IpAddr {
        IpAddr::V4(self.m.bed.pod(pod).ip)
    }

    /// The server pod's tunnel port.
    fn tunnel(&self) -> SocketAddr {
        SocketAddr::new(self.ip("server"), HBONE_PORT)
    }

    fn spiffe(trust_domain: &str, sa: &str) -> Result<SpiffeId> {
        Ok(SpiffeId::new(trust_domain, NS, sa)?)
    }

    /// A certificate from the mesh CA.
    fn cert(&self, trust_domain: &str, sa: &str, ttl: Duration) -> Result<WorkloadCert> {
        Ok(self.signer.issue(&Self::spiffe(trust_domain, sa)?, ttl)?)
    }

    /// What a mesh client presents to the server pod, expecting the server's own identity.
    fn tls_config(&self, cert: &WorkloadCert) -> Result<Arc<rustls::ClientConfig>> {
        let server = Self::spiffe(TRUST_DOMAIN, "server")?;
        Ok(client_config(cert, self.signer.trust_bundle(), &server)?)
    }

    /// A TCP connection from the outsider pod to the server's tunnel port.
    fn dial(&self) -> Result<std::net::TcpStream> {
        let to = self.tunnel();
        self.m
            .bed
            .in_pod_netns("outsider", move || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
            })?
            .with_context(|| format!("connecting to {to}"))
    }

    /// TLS (and ALPN h2) to the server's tunnel port with `cfg`.
    async fn tls(
        &self,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Result<(SocketAddr, std::io::Result<TlsStream<tokio::net::TcpStream>>)> {
        let tcp = self.dial()?;
        let local = tcp.local_addr()?;
        tcp.set_nonblocking(true)?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let name = ServerName::from(self.ip("server"));
        let tls = tokio::time::timeout(REJECT_BOUND, TlsConnector::from(cfg).connect(name, tcp))
            .await
            .map_err(|_| {
                anyhow!("TLS handshake with {} took over {REJECT_BOUND:?}", self.tunnel())
            })?;
        Ok((local, tls))
    }

    /// An HBONE (HTTP/2) connection with a valid mesh certificate, and its client address.
    async fn hbone(
        &self,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Result<(SocketAddr, h2::client::SendRequest<Bytes>)> {
        let (local, tls) = self.tls(cfg).await?;
        let tls = tls.context("TLS with a valid mesh certificate")?;
        let (send, _driver) = hbone::client_handshake(tls, &hbone::ClientConfig::default()).await?;
        Ok((local, send))
    }

    /// The counters this file checks, from `/stats` and `/metrics`.
    fn counters(&self) -> Result<Counters> {
        let stats = self.agent().stats()?;
        let get = |name: &str| stats[name].as_u64().unwrap_or_default();
        Ok(Counters {
            handshake_failures: get("inboundHandshakeFailures"),
            refused_streams: get("inboundRefusedStreams"),
            handshakes: get("inboundHandshakes"),
            rejections: rejections(&self.agent().metrics_text()?),
        })
    }

    /// Waits until `/metrics` counts `reason` at least `at_least` times.
    fn wait_rejections(&self, reason: &str, at_least: u64) -> Result<()> {
        let deadline = Instant::now() + OBSERVE;
        loop {
            let n = self.counters()?.rejection(reason);
            if n >= at_least {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("refusals counted under {reason}: {n}, expected {at_least}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for one log line, written after byte `from` of the log, that contains every needle.
    fn wait_log_line(&self, from: usize, needles: &[&str]) -> Result<String> {
        let deadline = Instant::now() + OBSERVE;
        loop {
            let log = self.agent().log();
            let found = log
                .get(from..)
                .unwrap_or_default()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned);
            if let Some(line) = found {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {needles:?} within {OBSERVE:?}; log since then:\n{}",
                    log.get(from..).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_mark(&self) -> usize {
        self.agent().log().len()
    }

    /// The highest connection record id so far.
    fn last_record(&self) -> Result<u64> {
        Ok(self.agent().connections()?.iter().filter_map(|c| c["id"].as_u64()).max().unwrap_or(0))
    }

    /// A mesh client (captured, so through the tunnel) still gets its echo, in mTLS, via a
    /// connection the server's agent verified.
    fn mesh_client_is_served(&self, msg: &str) -> Result<()> {
        let after = self.last_record()?;
        let (out, ok) = self.m.client(
            "client",
            &["--connect", &self.m.dst("server"), "--message", msg, "--timeout-ms", "3000"],
        )?;
        ensure!(ok && out == format!("server:{msg}"), "mesh client not served: {out}");
        let client_id = Self::spiffe(TRUST_DOMAIN, "client")?.to_string();
        self.agent().wait_connection(OBSERVE, |c| {
            c["id"].as_u64().unwrap_or(0) > after
                && c["direction"] == "inbound"
                && c["destinationPod"] == "server.shop"
                && c["mode"] == "mTLS"
                && c["peerIdentity"] == client_id.as_str()
        })?;
        Ok(())
    }

    /// The agent's resident memory.
    fn rss_kib(&self) -> Result<u64> {
        let pid = self.agent().pid().context("agent not running")?;
        rss_kib(pid)
    }
}

#[derive(Debug, Clone)]
struct Counters {
    handshake_failures: u64,
    refused_streams: u64,
    handshakes: u64,
    rejections: BTreeMap<String, u64>,
}

impl Counters {
    fn rejection(&self, reason: &str) -> u64 {
        self.rejections.get(reason).copied().unwrap_or(0)
    }
}

/// Refusals by reason: `mtls_agent_rejections_total` under its own reasons (`hbone:...`), and
/// `mtls_agent_tls_handshake_failures_total` as `tls_<direction>:<reason>`.
fn rejections(metrics: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let (tls, rest) = match (
            line.strip_prefix("mtls_agent_rejections_total{"),
            line.strip_prefix("mtls_agent_tls_handshake_failures_total{"),
        ) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => continue,
        };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                .map(|r| r.trim_end_matches('"').to_owned())
        };
        let key = match (tls, label("reason"), label("direction")) {
            (true, Some(reason), Some(direction)) => format!("tls_{direction}:{reason}"),
            (false, Some(reason), _) => reason,
            _ => continue,
        };
        if let Ok(value) = value.trim().parse::<f64>() {
            *out.entry(key).or_default() += value as u64;
        }
    }
    out
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("agent process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Reads until the peer closes (EOF or reset); fails if it is still open after `bound`.
/// Returns what was received (at most 64 KiB).
fn read_until_closed(s: &mut std::net::TcpStream, bound: Duration) -> Result<Vec<u8>> {
    s.set_read_timeout(Some(bound))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => {
                if got.len() < 64 * 1024 {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            // A reset is a close too (the agent closed with our bytes unread).
            Err(_) => return Ok(got),
        }
    }
    bail!("the agent kept the connection open for over {bound:?} (received {} bytes)", got.len())
}

/// Deterministic bytes that are not TLS (the first is not a TLS record type).
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    let mut out = vec![0xde, 0xad, 0xbe, 0xef];
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
    out
}

/// A client that has no certificate to offer.
#[derive(Debug)]
struct NoClientCert;

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// A TLS client with a bad certificate (or none) must be refused: the handshake fails, or the
/// agent's verdict (an alert or a close) follows it; it never gets application data.
async fn expect_tls_refused(tls: std::io::Result<TlsStream<tokio::net::TcpStream>>) -> Result<()> {
    let Ok(mut tls) = tls else { return Ok(()) };
    // TLS 1.3: the client finishes first; the server's verdict on its certificate comes next.
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(REJECT_BOUND, tls.read(&mut buf)).await {
        Err(_) => bail!("connection neither served nor closed within {REJECT_BOUND:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => bail!("the agent sent {n} bytes of HTTP/2 to a client it must refuse"),
    }
}

#[test]
fn bad_tls_clients_on_the_tunnel_port_are_refused_counted_and_logged() -> Result<()> {
    let b = Bed::new("bad-tls", None)?;
    // Issued first: a 1 s certificate has expired by the time it is used (no leeway).
    let expired = b.cert(TRUST_DOMAIN, "tester", Duration::from_secs(1))?;
    let valid = b.cert(TRUST_DOMAIN, "tester", Duration::from_secs(3600))?;
    let foreign = b.cert("other.example", "tester", Duration::from_secs(3600))?;
    let before = b.counters()?;
    let mark = b.log_mark();

    std::thread::scope(|s| -> Result<()> {
        // A client that connects and says nothing, alongside every other case below: the agent
        // must close it within its handshake timeout and serve the others meanwhile.
        let stalled = s.spawn(|| -> Result<(SocketAddr, Duration)> {
            let mut tcp = b.dial()?;
            let local = tcp.local_addr()?;
            let started = Instant::now();
            let got = read_until_closed(&mut tcp, STALL_BOUND + Duration::from_secs(3))?;
            ensure!(got.is_empty(), "the agent sent {} bytes to a silent client", got.len());
            Ok((local, started.elapsed()))
        });
        let stalled_started = Instant::now();

        // Each case: (what, expected rejection reason, log text, run it -> client address).
        type Case<'a> = (&'a str, &'a str, &'a str, Box<dyn Fn() -> Result<SocketAddr> + 'a>);
        let cases: Vec<Case> = vec![
            (
                "garbage bytes",
                "tls_inbound:not_tls",
                "did not speak TLS",
                Box::new(|| {
                    let mut tcp = b.dial()?;
                    let local = tcp.local_addr()?;
                    // The agent may close before everything is written; that is its right.
                    let _ = tcp.write_all(&garbage(4096));
                    read_until_closed(&mut tcp, REJECT_BOUND)?;
                    Ok(local)
                }),
            ),
            (
                "plaintext HTTP",
                "tls_inbound:not_tls",
                "did not speak TLS",
                Box::new(|| {
                    let mut tcp = b.dial()?;
                    let local = tcp.local_addr()?;
                    let _ = tcp
                        .write_all(b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n");
                    let reply = read_until_closed(&mut tcp, REJECT_BOUND)?;
                    ensure!(!reply.starts_with(b"HTTP/"), "plaintext HTTP got an HTTP answer");
                    Ok(local)
                }),
            ),
            (
                "TLS without a client certificate",
                "tls_inbound:no_client_cert",
                "no client certificate",
                Box::new(|| {
                    let mut cfg = (*b.tls_config(&valid)?).clone();
                    cfg.client_auth_cert_resolver = Arc::new(NoClientCert);
                    b.rt.block_on(async {
                        let (local, tls) = b.tls(Arc::new(cfg)).await?;
                        expect_tls_refused(tls).await?;
                        Ok(local)
                    })
                }),
            ),
            (
                "an expired client certificate",
                "tls_inbound:cert_expired",
                "certificate expired",
                Box::new(|| {
                    // Past its notAfter (whole seconds) for sure.
                    std::thread::sleep(
                        expired
                            .not_after()
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or_default()
                            + Duration::from_millis(1100),
                    );
                    let cfg = b.tls_config(&expired)?;
                    b.rt.block_on(async {
                        let (local, tls) = b.tls(cfg).await?;
                        expect_tls_refused(tls).await?;
                        Ok(local)
                    })
                }),
            ),
            (
                "a certificate of another trust domain (same CA)",
                "tls_inbound:wrong_trust_domain",
                "trust domain other.example is not cluster.local",
                Box::new(|| {
                    let cfg = b.tls_config(&foreign)?;
                    b.rt.block_on(async {
                        let (local, tls) = b.tls(cfg).await?;
                        expect_tls_refused(tls).await?;
                        Ok(local)
                    })
                }),
            ),
        ];

        // Refusal lines are rate-limited per (source address, destination, reason): a second
        // refusal for the same reason from this source within 10 s is counted, and its line
        // left out (issue 14: at most one line per 10 s, with the number suppressed).
        let mut logged: Vec<&str> = Vec::new();
        for (what, reason, text, run) in &cases {
            let seen = b.counters()?;
            let started = Instant::now();
            let local = run().with_context(|| format!("{what}: not refused as expected"))?;
            let took = started.elapsed();
            // (The expired case sleeps about 2 s before it connects.)
            ensure!(
                took < REJECT_BOUND + Duration::from_secs(3),
                "{what}: refused only after {took:?}"
            );
            b.wait_rejections(reason, seen.rejection(reason) + 1)
                .with_context(|| format!("{what}: not counted"))?;
            let client = format!("src={local}");
            if logged.contains(reason) {
                std::thread::sleep(Duration::from_millis(200));
                let log = b.agent().log();
                ensure!(
                    !log.lines().any(|l| l.contains("rejected:") && l.contains(&client)),
                    "{what}: logged again within 10 s for the same source and reason:\n{log}"
                );
            } else {
                b.wait_log_line(mark, &["rejected: TLS handshake failed", &client, text])
                    .with_context(|| format!("{what}: not logged"))?;
                logged.push(reason);
            }
            ensure!(
                b.counters()?.handshake_failures > seen.handshake_failures,
                "{what}: inboundHandshakeFailures did not grow"
            );
        }
        b.mesh_client_is_served("during-the-stall")?;
        // All of that happened while the silent client was being held.
        ensure!(
            stalled_started.elapsed() < Duration::from_secs(9),
            "the other cases took so long that they did not overlap the stalled handshake"
        );

        let (local, held) =
            stalled.join().map_err(|_| anyhow!("the stalled-handshake thread panicked"))??;
        ensure!(held <= STALL_BOUND, "a silent client was held for {held:?}");
        b.wait_rejections("tls_inbound:timeout", before.rejection("tls_inbound:timeout") + 1)?;
        b.wait_log_line(
            mark,
            &["rejected: TLS handshake failed", &format!("src={local}"), "timed out"],
        )?;
        Ok(())
    })?;

    let after = b.counters()?;
    // Exactly the six refused clients, each counted once.
    ensure!(after.handshake_failures - before.handshake_failures == 6, "{before:?}\n{after:?}");
    ensure!(
        after.rejection("tls_inbound:not_tls") - before.rejection("tls_inbound:not_tls") == 2,
        "{before:?}\n{after:?}"
    );
    let rss = b.rss_kib()?;
    ensure!(rss < RSS_BOUND_KIB, "agent RSS {rss} KiB after the bad TLS clients");
    // And the agent still serves the mesh, with a fresh handshake too.
    b.mesh_client_is_served("after-bad-tls")?;
    b.rt.block_on(async {
        let cfg = b.tls_config(&valid)?;
        let (_, mut send) = b.hbone(cfg).await?;
        let target = SocketAddr::new(b.ip("server"), PORT);
        echo_through(&mut send, target, "fresh").await
    })?;
    ensure!(b.counters()?.handshakes > after.handshakes, "no new inbound handshake");
    Ok(())
}

/// Opens a tunnel to the echo server and checks the reply.
async fn echo_through(
    send: &mut h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    msg: &str,
) -> Result<()> {
    let mut tunnel = hbone::connect_stream(send, target).await?;
    tunnel.write_all(msg.as_bytes()).await?;
    tunnel.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(REJECT_BOUND, tunnel.read_to_end(&mut reply))
        .await
        .context("echo reply timed out")??;
    ensure!(
        reply == format!("server:{msg}").as_bytes(),
        "echo reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    Ok(())
}

/// A request with an extra header of `pad` bytes: its status, or the error that ended it.
async fn request(
    send: &h2::client::SendRequest<Bytes>,
    method: Method,
    uri: &str,
    pad: usize,
) -> Result<std::result::Result<StatusCode, h2::Error>> {
    let mut req = Request::builder().method(method).uri(uri).version(Version::HTTP_2);
    if pad > 0 {
        req = req.header("x-pad", "a".repeat(pad));
    }
    let req = req.body(())?;
    let answer = async {
        let mut send = send.clone().ready().await?;
        let (response, _stream) = send.send_request(req, false)?;
        Ok::<_, h2::Error>(response.await?.status())
    };
    tokio::time::timeout(REJECT_BOUND, answer).await.context("no answer to a bad request")
}

#[test]
fn bad_hbone_requests_are_refused_and_a_stream_flood_stays_bounded() -> Result<()> {
    let b = Bed::new("bad-hbone", None)?;
    let cert = b.cert(TRUST_DOMAIN, "tester", Duration::from_secs(3600))?;
    let cfg = b.tls_config(&cert)?;
    let server = SocketAddr::new(b.ip("server"), PORT);
    let before = b.counters()?;
    let mark = b.log_mark();

    b.rt.block_on(async {
        // TLS done, then silence: no HTTP/2 preface. Runs alongside the rest.
        let silent = {
            let (_, tls) = b.tls(cfg.clone()).await?;
            let mut tls = tls.context("TLS with a valid certificate")?;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut buf = [0u8; 4096];
                let bound = STALL_BOUND + Duration::from_secs(3);
                loop {
                    match tokio::time::timeout(bound, tls.read(&mut buf)).await {
                        Err(_) => return Err(anyhow!("held for over {bound:?}")),
                        // The server's SETTINGS may come first; the close is what counts.
                        Ok(Ok(n)) if n > 0 => continue,
                        Ok(_) => return Ok(started.elapsed()),
                    }
                }
            })
        };

        let (_, mut send) = b.hbone(cfg.clone()).await?;
        // CONNECTs to addresses that are not this pod, and to the agent's own ports.
        let not_here = [
            (SocketAddr::new(b.ip("client"), PORT), "is not an address of pod server.shop"),
            (
                SocketAddr::new(IpAddr::V4(b.m.bed.node("node1").ip), PORT),
                "is not an address of pod server.shop",
            ),
            (SocketAddr::new(b.ip("server"), HBONE_PORT), "port 15008 is reserved"),
            (SocketAddr::new(b.ip("server"), 15001), "port 15001 is reserved"),
        ];
        for (i, (target, text)) in not_here.iter().enumerate() {
            let started = Instant::now();
            match hbone::connect_stream(&mut send, *target).await {
                Err(HboneError::Refused { status, .. }) => {
                    ensure!(status == StatusCode::FORBIDDEN, "CONNECT {target}: status {status}")
                }
                Err(e) => bail!("CONNECT {target}: {e} instead of a refusal"),
                Ok(_) => bail!("CONNECT {target} was accepted"),
            }
            ensure!(
                started.elapsed() < REJECT_BOUND,
                "CONNECT {target} refused only after {:?}",
                started.elapsed()
            );
            let target_text = target.to_string();
            b.wait_log_line(mark, &["rejected:", &target_text, text])?;
            b.wait_rejections(
                "hbone:target_refused",
                before.rejection("hbone:target_refused") + i as u64 + 1,
            )?;
        }
        ensure!(
            b.counters()?.refused_streams - before.refused_streams == not_here.len() as u64,
            "inboundRefusedStreams did not count every refused CONNECT"
        );
        // The connection that carried the refusals still works.
        echo_through(&mut send, server, "same-connection").await?;

        // Headers over the 16 KiB limit: refused (431), and the connection survives.
        let answer = request(&send, Method::CONNECT, &server.to_string(), 20 * 1024).await?;
        eprintln!("20 KiB of headers: {answer:?}");
        match answer {
            Ok(status) => ensure!(status != StatusCode::OK, "oversized headers accepted"),
            Err(e) => ensure!(e.is_reset() || e.is_go_away(), "oversized headers: {e}"),
        }
        echo_through(&mut send, server, "after-oversized").await?;
        // Far over it (1 MiB): refused; the agent may drop the whole connection.
        let (_, huge) = b.hbone(cfg.clone()).await?;
        let answer = request(&huge, Method::CONNECT, &server.to_string(), 1 << 20).await?;
        eprintln!("1 MiB of headers: {answer:?}");
        if let Ok(status) = answer {
            ensure!(status != StatusCode::OK, "1 MiB of headers accepted");
        }

        let held = silent.await??;
        ensure!(held <= STALL_BOUND, "a client silent after TLS was held for {held:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    b.mesh_client_is_served("after-bad-requests")?;

    // A flood: the most streams one connection may have, then FLOOD_STREAMS more CONNECTs on
    // top, sent without waiting for answers.
    let baseline = b.rss_kib()?;
    let stop = AtomicBool::new(false);
    let (at_limit, flood, peak) =
        std::thread::scope(|s| -> Result<(AtTheLimit, FloodOutcome, u64)> {
            let pid = b.agent().pid().context("agent not running")?;
            let stop = &stop;
            let sampler = s.spawn(move || -> Result<u64> {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid)?);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(peak)
            });
            let flood = b.rt.block_on(flood(&b, cfg.clone(), server));
            stop.store(true, Ordering::Relaxed);
            let peak = sampler.join().map_err(|_| anyhow!("RSS sampler panicked"))??;
            let (at_limit, flood) = flood?;
            Ok((at_limit, flood, peak))
        })?;
    eprintln!(
        "flood: at the limit {at_limit:?}; in the end {flood:?}; agent RSS {baseline} KiB before, \
         {peak} KiB at most"
    );
    ensure!(
        peak.max(at_limit.rss_kib) < RSS_BOUND_KIB,
        "agent RSS reached {} KiB under a stream flood",
        peak.max(at_limit.rss_kib)
    );
    ensure!(
        at_limit.answered == MAX_CONCURRENT_STREAMS && at_limit.established > 0,
        "the streams within the limit were not all answered: {at_limit:?}"
    );
    ensure!(
        flood.answered <= MAX_CONCURRENT_STREAMS,
        "{} streams answered on one connection (limit {MAX_CONCURRENT_STREAMS})",
        flood.answered
    );
    ensure!(
        flood.refused > 0 || flood.goaway,
        "the streams over the limit were neither refused nor the connection closed: {flood:?}"
    );
    // The flood's tunnels are gone once its connection is, and the mesh is served.
    let deadline = Instant::now() + OBSERVE;
    loop {
        let open = b.agent().connections()?.iter().filter(|c| c["open"] == true).count();
        if open == 0 {
            break;
        }
        ensure!(Instant::now() < deadline, "{open} connections still open after the flood ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.mesh_client_is_served("after-the-flood")?;
    Ok(())
}

/// `mtls_agent_rejections_total` over the HTTP/2-level reasons: every `hbone:` reason but the
/// handler's own refusals (`hbone:target_refused`, checked above).
fn http2_rejections(c: &Counters) -> u64 {
    c.rejections
        .iter()
        .filter(|(reason, _)| reason.starts_with("hbone:") && *reason != "hbone:target_refused")
        .map(|(_, n)| n)
        .sum()
}

impl Bed {
    /// A refusal of `client` by the HBONE layer: counted under an `hbone:` reason, and logged
    /// (not only at debug level) as a rejection naming the client.
    fn http2_refusal_recorded(
        &self,
        what: &str,
        before: &Counters,
        mark: usize,
        client: SocketAddr,
    ) -> Result<()> {
        let deadline = Instant::now() + OBSERVE;
        while http2_rejections(&self.counters()?) <= http2_rejections(before) {
            ensure!(
                Instant::now() < deadline,
                "{what}: not counted in mtls_agent_rejections_total (reasons: {:?})",
                self.counters()?.rejections
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let line = self
            .wait_log_line(mark, &["rejected", &format!("src={client}")])
            .with_context(|| format!("{what}: no rejection logged for client {client}"))?;
        ensure!(!line.contains(" DEBUG "), "{what}: logged at debug level only: {line}");
        Ok(())
    }
}

/// What the HTTP/2 layer refuses without asking the handler (h2's own limits, and requests that
/// are not a `CONNECT ip:port`) must be as visible to the operator as a refused target: counted
/// in `mtls_agent_rejections_total` and logged with the client's address. Today these are
/// refused correctly (the test above) but only a debug line, if anything, records them.
#[test]
fn http2_level_refusals_are_counted_and_logged() -> Result<()> {
    let b = Bed::new("bad-h2-count", None)?;
    let cert = b.cert(TRUST_DOMAIN, "tester", Duration::from_secs(3600))?;
    let cfg = b.tls_config(&cert)?;
    let server = SocketAddr::new(b.ip("server"), PORT);
    let mark = b.log_mark();

    b.rt.block_on(async {
        // Silent after TLS, alongside the rest.
        let before_silent = b.counters()?;
        let (silent_client, tls) = b.tls(cfg.clone()).await?;
        let mut tls = tls.context("TLS with a valid certificate")?;
        let silent = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(STALL_BOUND + Duration::from_secs(3), tls.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
            }
        });

        let cases: [(&str, Method, String, usize); 3] = [
            ("a request that is not CONNECT", Method::GET, format!("http://{server}/"), 0),
            ("a CONNECT to a name, not ip:port", Method::CONNECT, "example.com:80".into(), 0),
            ("oversized headers", Method::CONNECT, server.to_string(), 20 * 1024),
        ];
        for (what, method, uri, pad) in cases {
            let before = b.counters()?;
            let (client, send) = b.hbone(cfg.clone()).await?;
            let answer = request(&send, method, &uri, pad).await?;
            ensure!(!matches!(answer, Ok(StatusCode::OK)), "{what}: accepted");
            b.http2_refusal_recorded(what, &before, mark, client)?;
        }

        // A stream flood that makes the agent drop the connection (GOAWAY).
        let before = b.counters()?;
        let mut conn = RawH2::open(&b, cfg.clone()).await?;
        let client = conn.local;
        conn.send(raw_h2::connects(&server.to_string(), 0..FLOOD_STREAMS));
        conn.read_until(Duration::from_secs(10), |s| {
            s.answered + s.refused >= u64::from(FLOOD_STREAMS)
        })
        .await?;
        let flood = conn.close().await?;
        ensure!(flood.goaway, "the flood did not end the connection: {flood:?}");
        b.http2_refusal_recorded("a stream flood", &before, mark, client)?;

        silent.await?;
        b.http2_refusal_recorded("a client silent after TLS", &before_silent, mark, silent_client)?;
        Ok(())
    })
}

#[derive(Debug, Default)]
struct FloodOutcome {
    /// HEADERS answers (a status) received.
    answered: u64,
    /// Of those, 200s: tunnels established.
    ok: u64,
    /// Streams reset by the server.
    refused: u64,
    /// The server ended the connection with GOAWAY.
    goaway: bool,
    /// The server closed the transport.
    closed: bool,
}

/// HTTP/2 by hand: a raw client that does not respect SETTINGS_MAX_CONCURRENT_STREAMS.
mod raw_h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const END_HEADERS: u8 = 4;
    pub const ACK: u8 = 1;
    /// HPACK: `:status: 200` from the static table.
    pub const STATUS_200: u8 = 0x88;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// `CONNECT authority` as an HPACK block: literals without indexing, indexed names.
    pub fn connect(authority: &str) -> Vec<u8> {
        let mut block = vec![0x02, 7];
        block.extend_from_slice(b"CONNECT");
        block.push(0x01);
        block.push(authority.len() as u8);
        block.extend_from_slice(authority.as_bytes());
        block
    }

    /// `CONNECT authority` on each of `streams` (the n-th client stream has id 2n+1).
    pub fn connects(authority: &str, streams: std::ops::Range<u32>) -> Vec<u8> {
        let block = connect(authority);
        streams.flat_map(|n| frame(HEADERS, END_HEADERS, 2 * n + 1, &block)).collect()
    }
}

type Tls = TlsStream<tokio::net::TcpStream>;

/// One raw HTTP/2 connection over mTLS: frames go out through a writer task (so reading and
/// writing never wait on each other), answers are tallied as they come in.
struct RawH2 {
    /// Our end of the connection, as the agent logs it.
    local: SocketAddr,
    rd: tokio::io::ReadHalf<Tls>,
    out: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    writer: tokio::task::JoinHandle<std::io::Result<tokio::io::WriteHalf<Tls>>>,
    seen: FloodOutcome,
}

impl RawH2 {
    async fn open(b: &Bed, cfg: Arc<rustls::ClientConfig>) -> Result<RawH2> {
        use raw_h2::*;
        let (local, tls) = b.tls(cfg).await?;
        let (rd, mut wr) = tokio::io::split(tls.context("TLS with a valid certificate")?);
        let (out, mut queue) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(bytes) = queue.recv().await {
                wr.write_all(&bytes).await?;
                wr.flush().await?;
            }
            Ok(wr)
        });
        let conn = RawH2 { local, rd, out: Some(out), writer, seen: FloodOutcome::default() };
        conn.send([PREFACE, &frame(SETTINGS, 0, 0, &[])].concat());
        Ok(conn)
    }

    fn send(&self, bytes: Vec<u8>) {
        // A writer that failed reports it when the connection is closed.
        if let Some(out) = &self.out {
            let _ = out.send(bytes);
        }
    }

    /// Reads frames until `done`, the server gives up on the connection, or `within` passes.
    async fn read_until(
        &mut self,
        within: Duration,
        done: impl Fn(&FloodOutcome) -> bool,
    ) -> Result<()> {
        use raw_h2::*;
        let deadline = tokio::time::Instant::now() + within;
        let mut head = [0u8; 9];
        let mut payload = Vec::new();
        while !done(&self.seen) && !self.seen.goaway && !self.seen.closed {
            match tokio::time::timeout_at(deadline, self.rd.read_exact(&mut head)).await {
                Err(_) => return Ok(()),
                Ok(Err(_)) => {
                    self.seen.closed = true;
                    return Ok(());
                }
                Ok(Ok(_)) => {}
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            ensure!(len <= 1 << 24, "frame of {len} bytes");
            payload.resize(len, 0);
            match tokio::time::timeout_at(deadline, self.rd.read_exact(&mut payload)).await {
                Err(_) => return Ok(()),
                Ok(Err(_)) => {
                    self.seen.closed = true;
                    return Ok(());
                }
                Ok(Ok(_)) => {}
            }
            match (head[3], head[4]) {
                (HEADERS, _) => {
                    self.seen.answered += 1;
                    if payload.first() == Some(&STATUS_200) {
                        self.seen.ok += 1;
                    }
                }
                (RST_STREAM, _) => self.seen.refused += 1,
                (GOAWAY, _) => self.seen.goaway = true,
                (SETTINGS, flags) if flags & ACK == 0 => self.send(frame(SETTINGS, ACK, 0, &[])),
                (DATA, _) => bail!("the echo server sent data nobody asked for"),
                _ => {}
            }
        }
        Ok(())
    }

    /// Closes our side of the connection: the agent must tear down every tunnel on it.
    async fn close(mut self) -> Result<FloodOutcome> {
        self.out = None;
        let mut wr = match self.writer.await? {
            Ok(wr) => wr,
            // The agent closed the connection first.
            Err(_) => return Ok(self.seen),
        };
        let _ = wr.shutdown().await;
        Ok(self.seen)
    }
}

/// What the agent looked like with every stream it allows open on the flooding connection.
#[derive(Debug)]
struct AtTheLimit {
    answered: u64,
    established: u64,
    rss_kib: u64,
}

/// MAX_CONCURRENT_STREAMS tunnels on one connection, then FLOOD_STREAMS more CONNECTs on top,
/// without waiting for answers.
async fn flood(
    b: &Bed,
    cfg: Arc<rustls::ClientConfig>,
    target: SocketAddr,
) -> Result<(AtTheLimit, FloodOutcome)> {
    let limit = MAX_CONCURRENT_STREAMS as u32;
    let mut conn = RawH2::open(b, cfg).await?;
    conn.send(raw_h2::connects(&target.to_string(), 0..limit));
    conn.read_until(Duration::from_secs(10), |s| s.answered + s.refused >= u64::from(limit))
        .await?;
    let at_limit = AtTheLimit {
        answered: conn.seen.answered,
        established: conn.seen.ok,
        rss_kib: b.rss_kib()?,
    };
    conn.send(raw_h2::connects(&target.to_string(), limit..FLOOD_STREAMS));
    conn.read_until(Duration::from_secs(10), |s| {
        s.answered + s.refused >= u64::from(FLOOD_STREAMS)
    })
    .await?;
    Ok((at_limit, conn.close().await?))
}

// ---------------------------------------------------------------------------------------------
// Files the agent watches.

/// The line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> Result<usize> {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .with_context(|| format!("{needle:?} not in the file"))
}

impl Bed {
    /// STRICT in force: the mesh client is served in mTLS, the outsider's plaintext refused.
    fn strict_in_force(&self, msg: &str) -> Result<()> {
        self.mesh_client_is_served(msg)?;
        let (out, ok) = self.m.client(
            "outsider",
            &["--connect", &self.m.dst("server"), "--message", msg, "--timeout-ms", "2000"],
        )?;
        ensure!(!ok && out.contains("refused"), "plaintext was not refused: {out}");
        Ok(())
    }

    fn policy_dir(&self) -> Result<&PolicyDir> {
        self.policies.as_ref().context("bed without --policies")
    }

    /// Writes a policy file and waits for the agent's complaint about it, which must point at
    /// one of `lines`.
    fn bad_policy(
        &self,
        name: &str,
        yaml: &str,
        lines: RangeInclusive<usize>,
        text: &str,
    ) -> Result<String> {
        let mark = self.log_mark();
        self.policy_dir()?.write(name, yaml)?;
        let file = format!("{}:", self.policy_dir()?.0.join(name).display());
        let complaint =
            self.wait_log_line(mark, &[&file, text, "keeping the previous policies"])?;
        let line = complaint
            .split_once(&file)
            .and_then(|(_, rest)| rest.split(':').next())
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("no line number after {file}: {complaint}"))?;
        ensure!(
            lines.contains(&line),
            "the error points at line {line}, not {lines:?}: {complaint}"
        );
        Ok(complaint)
    }

    /// Writes the workloads file and waits for the agent's complaint about `line` of it.
    fn bad_workloads(&self, yaml: &str, line: usize, text: &str) -> Result<String> {
        let mark = self.log_mark();
        write_atomically(&self.workloads, yaml)?;
        let at = format!("{}:{line}:", self.workloads.display());
        self.wait_log_line(mark, &[&at, text, "keeping the previous workloads"])
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[test]
fn malformed_workloads_and_policy_files_keep_the_last_good_state() -> Result<()> {
    let strict = namespace_pa(NS, "STRICT");
    let b = Bed::new("bad-files", Some(&[("ns.yaml", &strict)]))?;
    b.strict_in_force("baseline")?;
    let workloads_before = b.agent().get("/workloads")?;

    // Policies. An unknown mode.
    let unknown_mode = "\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: server
  namespace: shop
spec:
  selector:
    matchLabels:
      app: server
  mtls:
    mode: STRCT
";
    let at = line_of(unknown_mode, "STRCT")?;
    b.bad_policy("zz-bad.yaml", unknown_mode, at..=at, "unknown mode")?;
    b.strict_in_force("after-unknown-mode")?;

    // A valid first document that would open the server to plaintext, then broken YAML: none of
    // the file may apply.
    let half_good = format!(
        "{}---\napiVersion: security.istio.io/v1\nkind: [PeerAuthentication\nmetadata: {{name: x}}\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: DISABLE\n",
    );
    let at = line_of(&half_good, "kind: [")?;
    // The parser may notice the unclosed flow sequence only where it ends, a line further on.
    let complaint = b.bad_policy("zz-bad.yaml", &half_good, at..=at + 1, "invalid YAML")?;
    eprintln!("broken policy file: {complaint}");
    b.strict_in_force("after-broken-policy")?;

    // Not YAML at all (binary junk in a .yaml file).
    let mark = b.log_mark();
    std::fs::write(b.policy_dir()?.0.join(".junk.tmp"), garbage(512))?;
    std::fs::rename(b.policy_dir()?.0.join(".junk.tmp"), b.policy_dir()?.0.join("zz-bad.yaml"))?;
    b.wait_log_line(mark, &["zz-bad.yaml", "keeping the previous policies"])?;
    b.strict_in_force("after-junk-policy")?;

    // Fixed: the directory loads again, and is what it was (so nothing changes).
    let mark = b.log_mark();
    std::fs::remove_file(b.policy_dir()?.0.join("zz-bad.yaml"))?;
    b.wait_log_line(mark, &["policies valid again, and unchanged"])?;
    b.strict_in_force("policies-fixed")?;

    // Workloads. The text the agent started with (as the test bed renders it).
    let good = std::fs::read_to_string(&b.workloads)?;
    let bad_ip = good.replacen(&format!("ip: {}\n", b.ip("server")), "ip: 10.0.0.300\n", 1);
    ensure!(bad_ip != good, "the server's ip line was not found");
    let complaint = b.bad_workloads(
        &bad_ip,
        line_of(&bad_ip, "10.0.0.300")?,
        "ip: invalid IP address \"10.0.0.300\"",
    )?;
    eprintln!("bad workloads file: {complaint}");
    b.strict_in_force("after-bad-ip")?;

    // Valid YAML that would drop the server (and so release it), plus one bad entry: nothing of
    // it may apply.
    let client_only = WorkloadsFile {
        workloads: vec![testbed::agent::WorkloadEntry::of(b.m.bed.pod("client"), NS)],
        services: vec![],
    }
    .render()
        + "- {name: broken, namespace: shop, ip: 10.0.0.1, node: node1, nodeName: typo}\n";
    let dropped = client_only.replace("services:\n", "");
    b.bad_workloads(&dropped, line_of(&dropped, "nodeName")?, "nodeName")?;
    b.strict_in_force("after-partial-workloads")?;

    // Broken YAML.
    let broken = format!("{good}  - [unclosed\n");
    let mark = b.log_mark();
    write_atomically(&b.workloads, &broken)?;
    let complaint = b.wait_log_line(mark, &["invalid YAML", "keeping the previous workloads"])?;
    ensure!(
        complaint.contains(&format!("{}:", b.workloads.display())),
        "the error does not name the file: {complaint}"
    );
    b.strict_in_force("after-broken-workloads")?;
    ensure!(b.agent().get("/workloads")? == workloads_before, "the workloads in force changed");

    // Fixed: reloaded, nothing lost.
    let mark = b.log_mark();
    write_atomically(&b.workloads, &good)?;
    b.wait_log_line(mark, &["workloads changed"])?;
    b.strict_in_force("workloads-fixed")?;
    ensure!(b.agent().get("/workloads")? == workloads_before, "the workloads in force changed");
    Ok(())
}
