//! e2e-tool: the small TCP programs the end-to-end tests run inside pods.
//!
//! * `echo-server --listen ADDR [--prefix STR] [--idle-timeout-ms MS]`
//! * `client --connect ADDR --message STR [--count N] [--timeout-ms MS] [--mark N]`
//! * `sink --connect ADDR --bytes N [--timeout-ms MS]`
//! * `hold --connect ADDR --seconds S [--timeout-ms MS]`
//! * `slow-clients --connect ADDR... --count N --seconds S [--dawdle]`
//! * `unix-http --socket PATH --method M --path P`
//!
//! * `flood --target IPV4:PORT --count N --seconds S [--hold H] [--linger-ms MS]`
//! * `udp-echo --listen ADDR [--prefix STR]`
//! * `udp-client --connect ADDR --message STR [--timeout-ms MS]`
//!
//! Clients print `error: <kind> <detail>` (kind: refused, timeout, reset,
//! other) on stdout and exit 2 on any failure.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "e2e-tool", about = "TCP and UDP helpers for the mtls-agent end-to-end tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept forever; echo each connection's bytes back, after an optional prefix.
    EchoServer {
        #[arg(long)]
        listen: String,
        /// Sent once per connection, before the first echoed byte (or at EOF).
        #[arg(long)]
        prefix: Option<String>,
        /// A connection silent for this long is closed (keeps threads bounded).
        #[arg(long, default_value_t = 30_000)]
        idle_timeout_ms: u64,
    },
    /// N sequential connections: send message, half-close, print the reply.
    Client {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        message: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Local address to bind before connecting (e.g. to pick the client port).
        #[arg(long)]
        bind: Option<String>,
        /// Keep each connection open this long after sending, before half-closing.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Pause between connections.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// `SO_MARK` to set on each socket before connecting (needs `CAP_NET_RAW` or
        /// `CAP_NET_ADMIN`), e.g. `0x4d544c53`.
        #[arg(long, value_parser = parse_u32)]
        mark: Option<u32>,
    },
    /// Send N bytes, half-close, read to EOF; prints `sent N received M`.
    Sink {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Churn: N threads each open, use and close connections in a loop for S seconds, keeping
    /// up to N connections open at once; prints `ok X errors Y` (and the first errors).
    Churn {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        seconds: u64,
        /// Keep each connection open this long before closing it.
        #[arg(long, default_value_t = 200)]
        hold_ms: u64,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Up to N connect()s that fail before the SYN (an IPv6-only socket to the IPv4-mapped
    /// form of `target`), for at most S seconds; each socket closed at once, or the last H
    /// kept open (oldest closed first). Prints `flooded CALLS failed FAILED holding H`, waits
    /// `linger-ms` with the held sockets open, prints `done` and exits (closing them).
    Flood {
        #[arg(long)]
        target: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 0)]
        hold: usize,
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
    },
    /// Up to N connections to each address (opened within S/2 seconds, at most 15), held for S
    /// seconds, idle or (`--dawdle`) sending an endless HTTP request head one byte a second.
    /// Prints `connected ADDR OK FAILED` per address once all are opened, then
    /// `held ADDR OPEN CLOSED` (CLOSED: closed by the server) at the end.
    SlowClients {
        #[arg(long, required = true)]
        connect: Vec<String>,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        dawdle: bool,
    },
    /// Reconnects to ADDR in a loop from the loopback source BIND for S seconds (at most N
    /// connection attempts), keeping the last 512 open and silent: one attacker that takes
    /// every slot it is given. Prints `attempts N accepted M` at the end.
    ReconnectFlood {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        bind: std::net::Ipv4Addr,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 200_000)]
        max: u64,
    },
    /// One HTTP/1.1 request over a unix socket; prints the answer.
    UnixHttp {
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        path: String,
    },
    /// Connect and keep the connection open for S seconds; prints `connected` then `held`.
    Hold {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Up to N connection attempts, one after the other (an init container that talks at
    /// once): each sends the message, half-closes and reads the reply; prints `ok REPLY` or
    /// `failed KIND DETAIL` per attempt, stops after `until-ok` replies, then prints
    /// `attempts N ok M`.
    Attempts {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        message: String,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 1)]
        until_ok: u32,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// A UDP socket bound to ADDR that answers each datagram with prefix + datagram; prints
    /// `listening ADDR`, then `datagram from PEER` for each.
    UdpEcho {
        #[arg(long)]
        listen: String,
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Sends one datagram to ADDR (again every 500 ms: UDP may lose it) and prints the first
    /// reply.
    UdpClient {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        message: String,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

/// A failure reported to the test as `error: <kind> <detail>`.
struct Failure {
    kind: &'static str,
    detail: String,
}

impl Failure {
    fn io(what: &str, e: &io::Error) -> Failure {
        let kind = match e.kind() {
            ErrorKind::ConnectionRefused => "refused",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                "reset"
            }
            _ => "other",
        };
        Failure { kind, detail: format!("{what}: {e}") }
    }

    fn timeout(what: &str) -> Failure {
        Failure { kind: "timeout", detail: what.to_owned() }
    }

    fn other(detail: String) -> Failure {
        Failure { kind: "other", detail }
    }
}

type Outcome<T> = Result<T, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::EchoServer { listen, prefix, idle_timeout_ms } => {
            echo_server(&listen, prefix, Duration::from_millis(idle_timeout_ms))
        }
        Cmd::Client { connect, message, count, timeout_ms, bind, hold_ms, interval_ms, mark } => {
            bind.as_deref().map(resolve).transpose().and_then(|bind| {
                let opts = ClientOptions {
                    count,
                    timeout: Duration::from_millis(timeout_ms),
                    bind,
                    hold: Duration::from_millis(hold_ms),
                    interval: Duration::from_millis(interval_ms),
                    mark,
                };
                client(&connect, &message, opts)
            })
        }
        Cmd::Sink { connect, bytes, timeout_ms } => {
            sink(&connect, bytes, Duration::from_millis(timeout_ms))
        }
        Cmd::Churn { connect, concurrency, seconds, hold_ms, timeout_ms } => churn(
            &connect,
            concurrency,
            Duration::from_secs(seconds),
            Duration::from_millis(hold_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Flood { target, count, seconds, hold, linger_ms } => flood(
            &target,
            count,
            Duration::from_secs(seconds),
            hold,
            Duration::from_millis(linger_ms),
        ),
        Cmd::SlowClients { connect, count, seconds, dawdle } => {
            slow_clients(&connect, count, Duration::from_secs(seconds), dawdle)
        }
        Cmd::ReconnectFlood { connect, bind, seconds, max } => {
            reconnect_flood(&connect, bind, Duration::from_secs(seconds), max)
        }
        Cmd::UnixHttp { socket, method, path } => unix_http(&socket, &method, &path),
        Cmd::Hold { connect, seconds, timeout_ms } => {
            hold(&connect, Duration::from_secs(seconds), Duration::from_millis(timeout_ms))
        }
        Cmd::UdpEcho { listen, prefix } => udp_echo(&listen, &prefix),
        Cmd::Attempts { connect, message, count, until_ok, interval_ms, timeout_ms } => attempts(
            &connect,
            &message,
            (count, until_ok),
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::UdpClient { connect, message, timeout_ms } => {
            udp_client(&connect, &message, Duration::from_millis(timeout_ms))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            say(&format!("error: {} {}", f.kind, f.detail));
            ExitCode::from(2)
        }
    }
}

fn flood(target: &str, count: u64, run: Duration, hold: usize, linger: Duration) -> Outcome<()> {
    let SocketAddr::V4(v4) = resolve(target)? else {
        return Err(Failure::other(format!("{target}: an IPv4 target is needed")));
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
    if hold > 0 {
        // Room for the held sockets and a margin (we run as root: the hard limit may rise).
        let want = hold as u64 + 256;
        let lim = libc::rlimit { rlim_cur: want, rlim_max: want };
        // SAFETY: a valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(Failure::io("setrlimit", &io::Error::last_os_error()));
        }
    }
    let end = Instant::now() + run;
    let mut held = std::collections::VecDeque::with_capacity(hold);
    let (mut calls, mut failed) = (0u64, 0u64);
    while calls < count && Instant::now() < end {
        let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .map_err(|e| Failure::io("socket", &e))?;
        sock.set_only_v6(true).map_err(|e| Failure::io("setsockopt IPV6_V6ONLY", &e))?;
        calls += 1;
        // An IPv6-only socket cannot reach an IPv4-mapped address: fails before any SYN.
        if sock.connect(&mapped.into()).is_err() {
            failed += 1;
        }
        if hold > 0 {
            if held.len() == hold {
                held.pop_front();
            }
            held.push_back(sock);
        }
    }
    say(&format!("flooded {calls} failed {failed} holding {}", held.len()));
    std::thread::sleep(linger);
    drop(held);
    say("done");
    Ok(())
}

/// Prints one line and flushes, so tests waiting on stdout see it at once.
fn churn(
    addr: &str,
    concurrency: usize,
    run: Duration,
    hold: Duration,
    timeout: Duration,
) -> Outcome<()> {
    let addr = resolve(addr)?;
    let end = Instant::now() + run;
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, Vec::new());
                let msg = format!("churn-{i}");
                while Instant::now() < end {
                    let deadline = Instant::now() + timeout + hold;
                    let one = || -> Outcome<()> {
                        let mut s = connect(addr, deadline)?;
                        write_all(&mut s, msg.as_bytes(), deadline)?;
                        std::thread::sleep(hold);
                        s.shutdown(Shutdown::Write).map_err(|e| Failure::io("shutdown", &e))?;
                        let mut reply = Vec::new();
                        read_to_end(&mut s, deadline, &mut reply)?;
                        if !reply.ends_with(msg.as_bytes()) {
                            return Err(Failure::other(format!(
                                "wrong reply {:?}",
                                String::from_utf8_lossy(&reply)
                            )));
                        }
                        Ok(())
                    };
                    match one() {
                        Ok(()) => ok += 1,
                        Err(f) => errors.push(format!("{} {}", f.kind, f.detail)),
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    let (mut ok, mut errors) = (0u64, Vec::new());
    for w in workers {
        match w.join() {
            Ok((o, e)) => {
                ok += o;
                errors.extend(e);
            }
            Err(_) => errors.push("worker panicked".into()),
        }
    }
    say(&format!("ok {ok} errors {}", errors.len()));
    for e in errors.iter().take(5) {
        say(&format!("error: {e}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::other(format!("{} connections failed", errors.len())))
    }
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    // Nothing useful to do if our stdout is gone.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn resolve(addr: &str) -> Outcome<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Failure::other(format!("bad address {addr}: {e}")))?
        .next()
        .ok_or_else(|| Failure::other(format!("address {addr} resolves to nothing")))
}

fn echo_server(listen: &str, prefix: Option<String>, idle: Duration) -> Outcome<()> {
    let addr = resolve(listen)?;
    let listener = TcpListener::bind(addr).map_err(|e| Failure::io("bind", &e))?;
    let local = listener.local_addr().map_err(|e| Failure::io("local_addr", &e))?;
    say(&format!("listening {local}"));
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                say(&format!("accepted {peer}"));
                let prefix = prefix.clone();
                // One thread per connection; each is bounded by the idle timeout.
                let spawned = std::thread::Builder::new().name("echo".into()).spawn(move || {
                    if let Err(e) = echo_connection(conn, prefix.as_deref(), idle) {
                        eprintln!("echo: {e}");
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("echo: cannot spawn thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("accept: {e}");
                // Avoid a hot loop on persistent errors such as EMFILE.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn echo_connection(mut conn: TcpStream, prefix: Option<&str>, idle: Duration) -> io::Result<()> {
    conn.set_read_timeout(Some(idle))?;
    conn.set_write_timeout(Some(idle))?;
    let mut pending_prefix = prefix.map(str::as_bytes);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(p) = pending_prefix.take() {
            conn.write_all(p)?;
        }
        if n == 0 {
            // Peer half-closed: everything is echoed, so close our side too.
            conn.flush()?;
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

/// Connects with the deadline, and arms socket timeouts for the rest.
fn connect(addr: SocketAddr, deadline: Instant) -> Outcome<TcpStream> {
    let left = remaining(deadline).ok_or_else(|| Failure::timeout("before connect"))?;
    let stream = TcpStream::connect_timeout(&addr, left).map_err(|e| Failure::io("connect", &e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// Reads to EOF, never past `deadline`.
fn read_to_end(stream: &mut TcpStream, deadline: Instant, out: &mut Vec<u8>) -> Outcome<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = remaining(deadline).ok_or_else(|| Failure::timeout("waiting for reply"))?;
        stream.set_read_timeout(Some(left)).map_err(|e| Failure::io("set timeout", &e))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::io("read", &e)),
        }
    }
}

fn write_all(stream: &mut TcpStream, data: &[u8], deadline: Instant) -> Outcome<()> {
    let left = remaining(deadline).ok_or_else(|| Failure::timeout("before write"))?;
    stream.set_write_timeout(Some(left)).map_err(|e| Failure::io("set timeout", &e))?;
    stream.write_all(data).map_err(|e| Failure::io("write", &e))
}

/// Options of `client` beyond the address and message.
struct ClientOptions {
    count: u32,
    timeout: Duration,
    bind: Option<SocketAddr>,
    hold: Duration,
    interval: Duration,
    mark: Option<u32>,
}

/// `0x`-prefixed hex or decimal.
fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// Like `connect`, but from a chosen local address and/or with a socket mark.
fn connect_with(
    local: Option<SocketAddr>,
    mark: Option<u32>,
    addr: SocketAddr,
    deadline: Instant,
) -> Outcome<TcpStream> {
    let left = remaining(deadline).ok_or_else(|| Failure::timeout("before connect"))?;
    let sock =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
            .map_err(|e| Failure::io("socket", &e))?;
    if let Some(m) = mark {
        sock.set_mark(m).map_err(|e| Failure::io("setsockopt SO_MARK", &e))?;
    }
    if let Some(local) = local {
        sock.set_reuse_address(true).map_err(|e| Failure::io("setsockopt", &e))?;
        sock.bind(&local.into()).map_err(|e| Failure::io("bind", &e))?;
    }
    sock.connect_timeout(&addr.into(), left).map_err(|e| Failure::io("connect", &e))?;
    let stream: TcpStream = sock.into();
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn client(addr: &str, message: &str, opts: ClientOptions) -> Outcome<()> {
    let addr = resolve(addr)?;
    for _ in 0..opts.count {
        let deadline = Instant::now() + opts.timeout + opts.hold;
        let mut stream = match (opts.bind, opts.mark) {
            (None, None) => connect(addr, deadline)?,
            (local, mark) => connect_with(local, mark, addr, deadline)?,
        };
        write_all(&mut stream, message.as_bytes(), deadline)?;
        std::thread::sleep(opts.hold);
        if !opts.interval.is_zero() {
            std::thread::sleep(opts.interval);
        }
        stream.shutdown(Shutdown::Write).map_err(|e| Failure::io("shutdown", &e))?;
        let mut reply = Vec::new();
        read_to_end(&mut stream, deadline, &mut reply)?;
        // One line per connection: escape embedded line breaks.
        let text = String::from_utf8_lossy(&reply)
            .replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('\r', "\\r");
        say(&text);
    }
    Ok(())
}

fn attempts(
    addr: &str,
    message: &str,
    (count, until_ok): (u32, u32),
    interval: Duration,
    timeout: Duration,
) -> Outcome<()> {
    let addr = resolve(addr)?;
    let once = || -> Outcome<String> {
        let deadline = Instant::now() + timeout;
        let mut stream = connect(addr, deadline)?;
        write_all(&mut stream, message.as_bytes(), deadline)?;
        stream.shutdown(Shutdown::Write).map_err(|e| Failure::io("shutdown", &e))?;
        let mut reply = Vec::new();
        read_to_end(&mut stream, deadline, &mut reply)?;
        Ok(String::from_utf8_lossy(&reply).replace('\n', "\\n"))
    };
    let (mut tried, mut ok) = (0, 0);
    while tried < count && ok < until_ok {
        tried += 1;
        match once() {
            Ok(reply) => {
                ok += 1;
                say(&format!("ok {reply}"));
            }
            Err(f) => say(&format!("failed {} {}", f.kind, f.detail)),
        }
        std::thread::sleep(interval);
    }
    say(&format!("attempts {tried} ok {ok}"));
    Ok(())
}

fn sink(addr: &str, bytes: u64, timeout: Duration) -> Outcome<()> {
    let addr = resolve(addr)?;
    let deadline = Instant::now() + timeout;
    let mut stream = connect(addr, deadline)?;
    // Read the echo (if any) concurrently so neither side blocks on full buffers.
    let mut reader = stream.try_clone().map_err(|e| Failure::io("clone", &e))?;
    let counter = std::thread::spawn(move || -> Outcome<Vec<u8>> {
        let mut received = Vec::new();
        read_to_end(&mut reader, deadline, &mut received)?;
        Ok(received)
    });
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern_byte(sent + i as u64);
        }
        write_all(&mut stream, &chunk[..n], deadline)?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write).map_err(|e| Failure::io("shutdown", &e))?;
    let received =
        counter.join().map_err(|_| Failure::other("reader thread panicked".into()))??;
    // An echo ends with exactly what was sent (after the server's prefix, if any): a byte
    // lost, duplicated or out of order shows up here, not only in the count.
    if received.len() as u64 >= sent {
        let echo = &received[received.len() - sent as usize..];
        if let Some(at) = (0..sent).find(|&p| echo[p as usize] != pattern_byte(p)) {
            return Err(Failure::other(format!("echo differs from what was sent at byte {at}")));
        }
    }
    say(&format!("sent {sent} received {}", received.len()));
    Ok(())
}

/// The byte `sink` sends at stream offset `p`: depends on the position, so reordering shows.
fn pattern_byte(p: u64) -> u8 {
    (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// A TCP connection to `addr` from `source` (port chosen by the kernel), within `timeout`.
fn connect_from(
    source: std::net::Ipv4Addr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    s.connect_timeout(&addr.into(), timeout)?;
    Ok(s.into())
}

fn reconnect_flood(addr: &str, source: std::net::Ipv4Addr, run: Duration, max: u64) -> Outcome<()> {
    let addr = resolve(addr)?;
    let end = Instant::now() + run;
    let mut held = std::collections::VecDeque::with_capacity(512);
    let (mut attempts, mut accepted) = (0u64, 0u64);
    while attempts < max && Instant::now() < end {
        attempts += 1;
        if let Ok(s) = connect_from(source, addr, Duration::from_millis(500)) {
            accepted += 1;
            if held.len() == 512 {
                held.pop_front();
            }
            held.push_back(s);
        }
    }
    say(&format!("attempts {attempts} accepted {accepted}"));
    Ok(())
}

fn slow_clients(addrs: &[String], count: usize, run: Duration, dawdle: bool) -> Outcome<()> {
    // Thousands of sockets: take the whole hard limit of open files.
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
    let start = Instant::now();
    let end = start + run;
    let open_until = start + (run / 2).min(Duration::from_secs(15));
    // One thread per address, so that every port gets its burst at once.
    let mut openers = Vec::new();
    for a in addrs {
        let addr = resolve(a)?;
        openers.push(std::thread::spawn(move || {
            let (mut ok, mut failed) = (Vec::new(), 0usize);
            for _ in 0..count {
                if Instant::now() >= open_until {
                    failed += 1;
                    continue;
                }
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => {
                        let _ = s.set_nonblocking(true);
                        ok.push(s);
                    }
                    Err(_) => failed += 1,
                }
            }
            (addr, ok, failed)
        }));
    }
    let mut all: Vec<(SocketAddr, Vec<TcpStream>)> = Vec::new();
    for t in openers {
        let (addr, ok, failed) =
            t.join().map_err(|_| Failure::other("an opener thread panicked".into()))?;
        say(&format!("connected {addr} {} {failed}", ok.len()));
        all.push((addr, ok));
    }
    let head = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut sent = 0usize;
    while Instant::now() < end {
        if dawdle {
            // The request head never ends: one more byte a second on every connection.
            let byte = head.get(sent).copied().unwrap_or(b'a');
            for (_, streams) in &mut all {
                for s in streams.iter_mut() {
                    let _ = s.write(&[byte]);
                }
            }
            sent += 1;
        }
        std::thread::sleep(
            Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())),
        );
    }
    for (addr, streams) in &all {
        let mut closed = 0usize;
        let mut buf = [0u8; 4096];
        for mut s in streams {
            // Closed by the server: EOF or an error (reset) now, not "nothing to read yet".
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed += 1;
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        closed += 1;
                        break;
                    }
                }
            }
        }
        say(&format!("held {addr} {} {closed}", streams.len() - closed));
    }
    Ok(())
}

fn unix_http(socket: &std::path::Path, method: &str, path: &str) -> Outcome<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| Failure::io(&format!("connect {}", socket.display()), &e))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| Failure::io("timeout", &e))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| Failure::io("write", &e))?;
    let mut answer = Vec::new();
    s.take(1 << 20).read_to_end(&mut answer).map_err(|e| Failure::io("read", &e))?;
    say(String::from_utf8_lossy(&answer).trim());
    Ok(())
}

fn hold(addr: &str, hold_for: Duration, timeout: Duration) -> Outcome<()> {
    let addr = resolve(addr)?;
    let stream = connect(addr, Instant::now() + timeout)?;
    say("connected");
    let until = Instant::now() + hold_for;
    // Watch for the peer closing early while we hold.
    let mut probe = [0u8; 1];
    while let Some(left) = remaining(until) {
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .map_err(|e| Failure::io("set timeout", &e))?;
        match stream.peek(&mut probe) {
            Ok(0) => return Err(Failure::other("peer closed while holding".into())),
            // Data from the peer is fine; sleep a little so we don't spin on it.
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::io("hold", &e)),
        }
    }
    say("held");
    Ok(())
}

fn udp_echo(listen: &str, prefix: &str) -> Outcome<()> {
    let socket = UdpSocket::bind(resolve(listen)?).map_err(|e| Failure::io("bind", &e))?;
    let local = socket.local_addr().map_err(|e| Failure::io("local_addr", &e))?;
    say(&format!("listening {local}"));
    let mut buf = [0u8; 2048];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).map_err(|e| Failure::io("recv", &e))?;
        say(&format!("datagram from {peer}"));
        let mut reply = prefix.as_bytes().to_vec();
        reply.extend_from_slice(&buf[..n]);
        // A reply that cannot be sent is the client's loss, not the server's end.
        if let Err(e) = socket.send_to(&reply, peer) {
            eprintln!("send to {peer}: {e}");
        }
    }
}

fn udp_client(addr: &str, message: &str, timeout: Duration) -> Outcome<()> {
    let addr = resolve(addr)?;
    let any: SocketAddr =
        if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(any).map_err(|e| Failure::io("bind", &e))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while let Some(left) = remaining(deadline) {
        socket.send_to(message.as_bytes(), addr).map_err(|e| Failure::io("send", &e))?;
        let wait = left.min(Duration::from_millis(500));
        socket.set_read_timeout(Some(wait)).map_err(|e| Failure::io("set timeout", &e))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == addr => {
                say(&String::from_utf8_lossy(&buf[..n]));
                return Ok(());
            }
            // Another sender, or nothing yet: send again.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(Failure::io("recv", &e)),
        }
    }
    Err(Failure::timeout("no UDP reply"))
}
