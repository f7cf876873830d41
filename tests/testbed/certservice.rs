//! A running `mtls-agent ca serve` on loopback for a test bed's agents: one token per node,
//! the trust bundle copied out of the CA directory (as Kubernetes hands agents a ConfigMap, not
//! the secret), all in a directory of its own that goes on drop. The service is ended by its PID.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::agent::agent_bin;

/// The name the service's certificate carries and agents ask for.
pub const SERVER_NAME: &str = "mtls-ca.mtls-system.svc";

pub struct CaService {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The service's own files: tokens, the nodes' token files, the trust bundle.
    pub dir: PathBuf,
    /// The trust bundle agents get (`--ca-root`): a copy of the CA's root-cert.pem.
    pub root: PathBuf,
    args: Vec<String>,
    log: Arc<Mutex<String>>,
}

impl CaService {
    /// Serves the CA in `ca_dir` to the agents of `nodes`, placing pods as `workloads` says.
    pub fn start(
        label: &str,
        ca_dir: &Path,
        workloads: &Path,
        nodes: &[&str],
    ) -> Result<CaService> {
        let dir = std::env::temp_dir().join(format!("mtls-test-casvc-{label}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let root = dir.join("root-cert.pem");
        std::fs::copy(ca_dir.join("root-cert.pem"), &root).context("copying the trust bundle")?;
        let mut tokens = String::from("nodes:\n");
        for node in nodes {
            let token = format!("{node}-{:032x}", rand_u128());
            tokens.push_str(&format!("- {{node: {node}, token: {token}}}\n"));
            std::fs::write(dir.join(format!("token-{node}")), &token)?;
        }
        let tokens_file = dir.join("tokens.yaml");
        std::fs::write(&tokens_file, tokens)?;
        let addr: SocketAddr = (Ipv4Addr::LOCALHOST, crate::free_loopback_port()).into();
        let monitoring: SocketAddr = (Ipv4Addr::LOCALHOST, crate::free_loopback_port()).into();
        let args = vec![
            "ca".into(),
            "serve".into(),
            "--monitoring".into(),
            monitoring.to_string(),
            "--trust-domain".into(),
            "cluster.local".into(),
            "--listen".into(),
            addr.to_string(),
            "--server-name".into(),
            SERVER_NAME.into(),
            "--ca-dir".into(),
            ca_dir.display().to_string(),
            "--node-tokens".into(),
            tokens_file.display().to_string(),
            "--workloads".into(),
            workloads.display().to_string(),
        ];
        let mut s = CaService {
            child: None,
            addr,
            dir,
            root,
            args,
            log: Arc::new(Mutex::new(String::new())),
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(agent_bin())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mtls-agent ca serve")?;
        let stderr = child.stderr.take().context("ca serve stderr")?;
        let log = self.log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    if l.len() < 4 << 20 {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("ca serve exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("ca serve not listening on {} after 20 s:\n{}", self.addr, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The flags that point `node`'s agent at this service.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        vec![
            "--ca-address".into(),
            format!("https://{}", self.addr),
            "--ca-token-file".into(),
            self.token_file(node).display().to_string(),
            "--ca-root".into(),
            self.root.display().to_string(),
            "--ca-server-name".into(),
            SERVER_NAME.into(),
        ]
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir.join(format!("token-{node}"))
    }

    /// Ends the service (by its PID): the CA is down.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts it again, on the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    // getrandom(2) through libc: the testbed has no rand crate.
    // SAFETY: writes at most 16 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        // Unique enough for a test token when getrandom is unavailable.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return t ^ u128::from(std::process::id());
    }
    u128::from_le_bytes(b)
}
