//! A minimal client for the admin API, used by the CLI (`check`, `connections`, `certs`): over
//! the agent instance's unix socket (found in the socket directory: the ready instance, the
//! newest if several), or over TCP when the agent was started with `--admin`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

/// Where the admin API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent's admin API at {at}: {source} (is `mtls-agent run` running there? see --admin-socket, --admin)")]
    Connect { at: Endpoint, source: std::io::Error },
    #[error("admin API at {at}: {source}")]
    Io { at: Endpoint, source: std::io::Error },
    #[error("admin API at {at}: malformed answer")]
    Malformed { at: Endpoint },
    #[error("{message}")]
    Status { status: u16, message: String },
    #[error("no running agent found in {dirs}: {why} (start `mtls-agent run`, or choose one with --admin-socket PATH or --admin ADDR)")]
    NotFound { dirs: String, why: String },
}

/// Bounds on what the CLI accepts from the admin API.
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: u64 = 64 << 20;

/// `GET path`; the body of a 200 answer.
pub fn get(at: &Endpoint, path: &str) -> Result<String, ClientError> {
    get_within(at, path, TIMEOUT)
}

/// `GET path` with reads bounded by `timeout`; the body of a 200 answer.
pub fn get_within(at: &Endpoint, path: &str, timeout: Duration) -> Result<String, ClientError> {
    let io = |source| ClientError::Io { at: at.clone(), source };
    let connect = |source| ClientError::Connect { at: at.clone(), source };
    let request = format!("GET {path} HTTP/1.1\r\nHost: mtls-agent\r\nConnection: close\r\n\r\n");
    let mut buf = Vec::new();
    match at {
        Endpoint::Tcp(addr) => {
            let mut s = TcpStream::connect_timeout(addr, timeout).map_err(connect)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.write_all(request.as_bytes()).map_err(io)?;
            s.take(MAX_BODY).read_to_end(&mut buf).map_err(io)?;
        }
        Endpoint::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(connect)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            s.write_all(request.as_bytes()).map_err(io)?;
            s.take(MAX_BODY).read_to_end(&mut buf).map_err(io)?;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or(ClientError::Malformed { at: at.clone() })?;
    let status = head.lines().next().unwrap_or_default();
    let code = status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if code != 200 {
        return Err(ClientError::Status { status: code, message: body.trim().to_owned() });
    }
    Ok(body.to_owned())
}

/// The admin socket to use among those in `dirs`: the newest ready instance, else (none
/// ready, e.g. while a node starts) the newest that answers at all.
pub fn find(dirs: &[PathBuf]) -> Result<Endpoint, ClientError> {
    let names = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    let mut sockets = Vec::new();
    for d in dirs {
        match super::socket::discover(d) {
            Ok(found) => sockets.extend(found),
            Err(e) if dirs.len() == 1 => {
                return Err(ClientError::NotFound { dirs: names, why: e.to_string() })
            }
            Err(_) => {}
        }
    }
    if sockets.is_empty() {
        return Err(ClientError::NotFound { dirs: names, why: "no admin socket there".into() });
    }
    // Newest first across directories too.
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    sockets.sort_by_key(|p| std::cmp::Reverse(mtime(p)));
    let mut answering = None;
    let mut errors = Vec::new();
    for s in sockets {
        let at = Endpoint::Unix(s);
        match get(&at, "/healthz/ready") {
            Ok(_) => return Ok(at),
            Err(ClientError::Status { status: 503, .. }) => {
                answering.get_or_insert(at);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(at) = answering {
        eprintln!("mtls-agent: no agent instance is ready; asking {at}, which is not ready yet");
        return Ok(at);
    }
    Err(ClientError::NotFound { dirs: names, why: errors.join("; ") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent instance: answers every request with `status` on its socket.
    fn instance(dir: &Path, pid: u32, status: &'static str) -> std::thread::JoinHandle<()> {
        let l =
            std::os::unix::net::UnixListener::bind(dir.join(format!("admin-{pid}.sock"))).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(4) {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
            }
        })
    }

    #[test]
    fn the_ready_instance_is_chosen_even_when_a_newer_one_is_not_ready() {
        let tmp = tempfile::tempdir().unwrap();
        let _ready = instance(tmp.path(), 1001, "200 OK");
        std::thread::sleep(Duration::from_millis(20));
        let _starting = instance(tmp.path(), 1002, "503 Service Unavailable");
        let chosen = find(&[tmp.path().to_owned()]).unwrap();
        assert_eq!(chosen, Endpoint::Unix(tmp.path().join("admin-1001.sock")));
    }

    #[test]
    fn an_empty_directory_names_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let e = find(&[tmp.path().to_owned()]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("no running agent found in {}", tmp.path().display())),
            "{e}"
        );
        let e = find(&[tmp.path().join("missing")]).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
    }
}
