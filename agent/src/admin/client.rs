//! A minimal client for the admin API, used by the CLI (`check`, `connections`, `certs`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent's admin API at {addr}: {source} (is `mtls-agent run` running there? see --admin)")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("admin API at {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("admin API at {addr}: malformed answer")]
    Malformed { addr: SocketAddr },
    #[error("{message}")]
    Status { message: String },
}

/// Bounds on what the CLI accepts from the admin API.
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: u64 = 64 << 20;

/// `GET path`; the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| ClientError::Connect { addr, source })?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: mtls-agent\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut buf = Vec::new();
    s.take(MAX_BODY).read_to_end(&mut buf).map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed { addr })?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(ClientError::Status { message: body.trim().to_owned() });
    }
    Ok(body.to_owned())
}
