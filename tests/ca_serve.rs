//! End-to-end: the certificate service (`mtls-agent ca serve`, a real process on loopback)
//! signs a pod's identity only for the agent of that pod's node, over Istio's CA protocol
//! (gRPC over TLS), and refuses, with the reason named, what a hostile node or network
//! tries: another node's pod, a forged token, a request that asks for more than an identity,
//! an oversized message, a lifetime past the cap, an impostor service.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mtls_agent::certservice::client::{request_for, CaClient, ClientError};
use mtls_agent::identity::{csr, SpiffeId, TrustBundle};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use testbed::apiserver::{ApiServer, PODS};
use tonic::Code;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const NAME: &str = "mtls-ca.mtls-system.svc";
const TOKEN1: &str = "node1-token-6f1c0a57d2e94b8c9a3d1e7f5b2c8a4d";
const TOKEN2: &str = "node2-token-0b9e4d2c7a1f5e3b8d6c4a2e9f7b1d3c";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// A running `ca serve` (ended by its PID when dropped) and what a client needs of it.
struct Service {
    child: Child,
    addr: SocketAddr,
    /// `/metrics` and `/healthz/ready`.
    monitoring: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// A new CA, node1 running shop/web and node2 running shop/db, certificates capped at 1 h.
    fn start() -> Result<Service> {
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens.yaml");
        std::fs::write(
            &tokens,
            format!(
                "nodes:\n- {{node: node1, token: {TOKEN1}}}\n- {{node: node2, token: {TOKEN2}}}\n"
            ),
        )?;
        let workloads = dir.path().join("workloads.yaml");
        std::fs::write(
            &workloads,
            "workloads:\n\
             - {name: web-1, namespace: shop, serviceAccount: web, ip: 10.0.0.1, node: node1}\n\
             - {name: db-1, namespace: shop, serviceAccount: db, ip: 10.0.0.2, node: node2}\n",
        )?;
        let mode = vec![
            "--node-tokens".into(),
            tokens.display().to_string(),
            "--workloads".into(),
            workloads.display().to_string(),
        ];
        Self::spawn(dir, mode)
    }

    /// In Kubernetes mode, against the stand-in API server `api` (there is no real one here).
    fn start_kubernetes(api: &ApiServer) -> Result<Service> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        Self::spawn(dir, vec!["--kubeconfig".into(), kubeconfig.display().to_string()])
    }

    /// `ca serve` with a new CA in `dir`, and `mode`'s arguments.
    fn spawn(dir: tempfile::TempDir, mode: Vec<String>) -> Result<Service> {
        let bin = testbed::agent::agent_bin();
        let ca = dir.path().join("ca");
        let out = Command::new(&bin)
            .args(["ca", "init", "--trust-domain", "cluster.local", "--dir"])
            .arg(&ca)
            .output()?;
        ensure!(out.status.success(), "ca init: {}", String::from_utf8_lossy(&out.stderr));
        // A free loopback port, then the service binds it.
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
        let monitoring = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
        let child = Command::new(&bin)
            .args(["ca", "serve", "--trust-domain", "cluster.local", "--max-cert-ttl", "1h"])
            .args(["--monitoring", &monitoring.to_string()])
            // 2 a second, bursts of 20: what each test asks, and the flood test's flood.
            .args(["--node-rate", "2"])
            .args(["--listen", &addr.to_string(), "--server-name", NAME, "--ca-dir"])
            .arg(&ca)
            .args(&mode)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("MTLS_TEST_ECHO_CA").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()?;
        let mut s = Service { child, addr, monitoring, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(s.addr).is_err() {
            ensure!(s.child.try_wait()?.is_none(), "ca serve exited");
            ensure!(Instant::now() < deadline, "ca serve not listening after 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    fn bundle(&self) -> Result<TrustBundle> {
        Ok(TrustBundle::from_pem_file(&self.dir.path().join("ca/root-cert.pem"))?)
    }

    fn client(&self) -> Result<CaClient> {
        Ok(CaClient::new(&format!("https://{}", self.addr), &self.bundle()?, Some(NAME))?)
    }
}

fn id(s: &str) -> SpiffeId {
    s.parse().expect("a SPIFFE id")
}

fn refused(r: Result<Vec<String>, ClientError>) -> (Code, String) {
    match r {
        Err(ClientError::Refused { code, message, .. }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The leaf of an answer, checked against the service's roots; its SAN URIs and lifetime.
fn leaf_of(chain: &[String], bundle: &TrustBundle) -> Result<(Vec<String>, i64)> {
    ensure!(chain.len() >= 2, "ztunnel needs the leaf and the roots: {} elements", chain.len());
    let roots: Vec<CertificateDer> =
        CertificateDer::pem_slice_iter(chain.last().unwrap().as_bytes())
            .collect::<Result<_, _>>()?;
    ensure!(roots.iter().all(|r| bundle.contains(r)), "the last element is the trust bundle");
    let mut certs = Vec::new();
    for pem in &chain[..chain.len() - 1] {
        certs.push(CertificateDer::from_pem_slice(pem.as_bytes())?);
    }
    let (_, leaf) = X509Certificate::from_der(&certs[0])?;
    let san = leaf.subject_alternative_name()?.context("no SAN")?;
    let uris = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    Ok((uris, life))
}

#[tokio::test]
async fn an_agent_gets_its_own_nodes_pod_identity_and_the_answer_verifies() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let web = id(WEB);
    let (pem, _key) = csr::request(&web)?;
    let chain = c
        .create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), Some(&web)))
        .await?;
    let (uris, life) = leaf_of(&chain, &s.bundle()?)?;
    assert_eq!(uris, [WEB]);
    assert_eq!(life, 600 + 60, "the asked lifetime, backdated a minute for clock skew");
    // Without the impersonation metadata the CSR alone names it: the same answer.
    let (pem, _key) = csr::request(&web)?;
    let chain =
        c.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), None)).await?;
    assert_eq!(leaf_of(&chain, &s.bundle()?)?.0, [WEB]);
    Ok(())
}

#[tokio::test]
async fn a_node_cannot_get_the_identity_of_a_pod_on_another_node() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let db = id(DB);
    let (pem, _key) = csr::request(&db)?;
    let (code, message) = refused(
        c.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), Some(&db))).await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(message, format!("no pod with identity {DB} is on node node1, the caller's"));
    assert!(!message.contains("node2"), "where the identity runs is not told");
    // Asking for one identity in the metadata and another in the CSR gets neither.
    let (pem, _key) = csr::request(&db)?;
    let (code, message) = refused(
        c.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), Some(&id(WEB))))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(message, format!("the CSR names {DB}, the request impersonates {WEB}"));
    // Its own node's agent gets it.
    let (pem, _key) = csr::request(&db)?;
    c.create_certificate(TOKEN2, request_for(pem, Duration::from_secs(600), Some(&db))).await?;
    Ok(())
}

#[tokio::test]
async fn forged_and_missing_tokens_are_unauthenticated() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let web = id(WEB);
    for (token, want) in [
        ("node1-token-6f1c0a57d2e94b8c9a3d1e7f5b2c8a4e", "the bearer token is not a node agent's"),
        (&TOKEN1[..TOKEN1.len() - 1], "the bearer token is not a node agent's"),
        ("", "the authorization header is not `Bearer <token>`"),
    ] {
        let (pem, _key) = csr::request(&web)?;
        let (code, message) = refused(
            c.create_certificate(token, request_for(pem, Duration::from_secs(600), Some(&web)))
                .await,
        );
        assert_eq!((code, message.as_str()), (Code::Unauthenticated, want), "token {token:?}");
    }
    for (authorization, want) in [
        (None, "no authorization header (a bearer token)"),
        (Some(format!("Basic {TOKEN1}")), "the authorization header is not `Bearer <token>`"),
        (Some(TOKEN1.to_owned()), "the authorization header is not `Bearer <token>`"),
    ] {
        let (pem, _key) = csr::request(&web)?;
        let req = request_for(pem, Duration::from_secs(600), Some(&web));
        let (code, message) = refused(c.create_certificate_as(authorization.as_deref(), req).await);
        assert_eq!((code, message.as_str()), (Code::Unauthenticated, want), "{authorization:?}");
    }
    Ok(())
}

/// A request written by hand, as a hostile node would: a key, and the SANs it wants.
fn hostile_csr(sans: Vec<SanType>) -> Result<String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    Ok(p.serialize_request(&key)?.pem()?)
}

#[tokio::test]
async fn a_request_that_asks_for_more_than_one_identity_is_refused_naming_what() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let cases = [
        // The service's own name, so that a pod could pose as the CA.
        (vec![uri(WEB), SanType::DnsName(NAME.try_into()?)], format!("the CSR's subjectAltName has DNS name {NAME:?}")),
        (vec![uri(WEB), uri(DB)], "the CSR's subjectAltName has 2 URIs: it must name one".into()),
        (
            vec![uri("spiffe://evil.example/ns/shop/sa/web")],
            "the CSR's subjectAltName URI spiffe://evil.example/ns/shop/sa/web is of trust domain evil.example, not cluster.local".into(),
        ),
    ];
    for (sans, want) in cases {
        let pem = hostile_csr(sans)?;
        let (code, message) = refused(
            c.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), None)).await,
        );
        assert_eq!((code, message), (Code::InvalidArgument, want));
    }
    Ok(())
}

#[tokio::test]
async fn the_lifetime_is_capped_and_an_oversized_request_does_not_stop_the_service() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let web = id(WEB);
    let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
    let (pem, _key) = csr::request(&web)?;
    let chain = c.create_certificate(TOKEN1, request_for(pem, ten_years, Some(&web))).await?;
    assert_eq!(leaf_of(&chain, &s.bundle()?)?.1, 3600 + 60, "cut to --max-cert-ttl 1h");
    // A message past the 64 KiB bound is refused before it is read as a request...
    let big = request_for("A".repeat(100 * 1024), Duration::from_secs(600), None);
    let (code, _) = refused(c.create_certificate(TOKEN1, big).await);
    assert_eq!(code, Code::OutOfRange, "tonic's code for a message over the limit");
    // ...one under it but with an oversized CSR by the CSR check, and the service serves on.
    let big = request_for("A".repeat(20 * 1024), Duration::from_secs(600), None);
    let (code, message) = refused(c.create_certificate(TOKEN1, big).await);
    assert_eq!(
        (code, message.as_str()),
        (Code::InvalidArgument, "the CSR is 20480 bytes, more than 16384")
    );
    let (pem, _key) = csr::request(&web)?;
    c.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), Some(&web))).await?;
    Ok(())
}

#[tokio::test]
async fn a_client_accepts_the_service_only_by_its_name_and_the_meshs_roots() -> Result<()> {
    let s = Service::start()?;
    let web = id(WEB);
    let (pem, _key) = csr::request(&web)?;
    // The name dialled is not the service's.
    let wrong = CaClient::new(
        &format!("https://{}", s.addr),
        &s.bundle()?,
        Some("istiod.istio-system.svc"),
    )?;
    let r = wrong
        .create_certificate(TOKEN1, request_for(pem.clone(), Duration::from_secs(600), None))
        .await;
    assert!(
        matches!(&r, Err(ClientError::Connect { reason, .. }) if reason.contains("TLS")),
        "{r:?}"
    );
    // Another mesh's roots: the service (or an impostor on its address) is not trusted, and
    // the token is never sent to it.
    let other = tempfile::tempdir()?;
    mtls_agent::identity::init_ca(&other.path().join("ca"), "cluster.local")?;
    let roots = TrustBundle::from_pem_file(&other.path().join("ca/root-cert.pem"))?;
    let foreign = CaClient::new(&format!("https://{}", s.addr), &roots, Some(NAME))?;
    let r =
        foreign.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), None)).await;
    assert!(
        matches!(&r, Err(ClientError::Connect { reason, .. }) if reason.contains("TLS")),
        "{r:?}"
    );
    Ok(())
}

#[test]
fn the_service_refuses_to_start_on_a_bad_tokens_file_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = testbed::agent::agent_bin();
    let ca = dir.path().join("ca");
    Command::new(&bin).args(["ca", "init", "--dir"]).arg(&ca).output()?;
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, "nodes:\n- {node: node1, token: short}\n")?;
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(&workloads, "workloads: []\n")?;
    let out = Command::new(&bin)
        .args([
            "ca",
            "serve",
            "--trust-domain",
            "cluster.local",
            "--listen",
            "127.0.0.1:0",
            "--ca-dir",
        ])
        .arg(&ca)
        .arg("--node-tokens")
        .arg(&tokens)
        .arg("--workloads")
        .arg(&workloads)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want =
        format!("{}: nodes[0].token: shorter than 32 characters (node node1)", tokens.display());
    assert!(err.contains(&want), "{err}");
    Ok(())
}

#[tokio::test]
async fn connections_that_never_finish_tls_do_not_keep_a_node_from_its_certificate() -> Result<()> {
    let s = Service::start()?;
    // A hostile pod (its own address, 127.0.0.2) opens connections and sends nothing: past
    // the per-address cap the service closes them at once, so it cannot take every slot.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind((Ipv4Addr::new(127, 0, 0, 2), 0).into())?;
        idle.push(sock.connect(s.addr).await?);
    }
    let mut closed = 0;
    for conn in &mut idle {
        let mut b = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(conn, &mut b);
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(300), read).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 40 - 16, "all but MAX_CONNECTIONS_PER_IP closed on accept");
    let mut junk = tokio::net::TcpStream::connect(s.addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut junk, &[0x16, 0x03, 0x01, 0xff, 0xff]).await?;
    let web = id(WEB);
    let (pem, _key) = csr::request(&web)?;
    let started = Instant::now();
    let c = s.client()?;
    c.create_certificate(TOKEN1, request_for(pem, Duration::from_secs(600), Some(&web))).await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served beside them: {:?}",
        started.elapsed()
    );
    drop(idle);
    Ok(())
}

#[tokio::test]
async fn a_connection_with_no_authenticated_request_is_closed() -> Result<()> {
    let s = Service::start()?;
    // A hostile pod finishes TLS (the service's certificate is public) and then only holds
    // its slots: each is closed after the deadline, though it broke no other bound.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in s.bundle()?.certs() {
        roots.add(c.clone())?;
    }
    let mut cfg = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut held = Vec::new();
    for _ in 0..4 {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind((Ipv4Addr::new(127, 0, 0, 3), 0).into())?;
        let tcp = sock.connect(s.addr).await?;
        let name = rustls_pki_types::ServerName::try_from(NAME)?;
        held.push(connector.connect(name, tcp).await?);
    }
    let started = Instant::now();
    for tls in &mut held {
        // The server's HTTP/2 preface may come first; then the end.
        let mut buf = vec![0u8; 4096];
        loop {
            let read = tokio::io::AsyncReadExt::read(tls, &mut buf);
            match tokio::time::timeout(Duration::from_secs(20), read).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => anyhow::bail!("an unauthenticated connection still open after 20 s"),
            }
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(8), "closed too soon: {took:?}");
    Ok(())
}

#[tokio::test]
async fn a_pod_that_moves_is_signed_for_its_new_node_only_and_a_broken_placement_signs_nothing(
) -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let web = id(WEB);
    let ask = |token: &'static str| {
        let (c, web) = (&c, web.clone());
        async move {
            let (pem, _key) = csr::request(&web)?;
            let req = request_for(pem, Duration::from_secs(600), Some(&web));
            anyhow::Ok(c.create_certificate(token, req).await)
        }
    };
    ask(TOKEN1).await??;
    // web-1 is rescheduled to node2 (a new mtime: the file is read again).
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        s.dir.path().join("workloads.yaml"),
        "workloads:\n- {name: web-1, namespace: shop, serviceAccount: web, ip: 10.0.0.1, node: node2}\n",
    )?;
    assert_eq!(refused(ask(TOKEN1).await?).0, Code::PermissionDenied, "node1 no longer runs it");
    ask(TOKEN2).await??;
    // A placement that does not parse grants nothing, not the last good one.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(s.dir.path().join("workloads.yaml"), "workloads: [\n")?;
    let (code, message) = refused(ask(TOKEN2).await?);
    assert_eq!(code, Code::Unavailable);
    assert_eq!(message, "the certificate service cannot read where pods run (see its log)");
    Ok(())
}

#[tokio::test]
async fn a_lifetime_of_zero_or_below_gets_the_cap() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let web = id(WEB);
    for secs in [0, -5, i64::MIN, i64::MAX] {
        let (pem, _key) = csr::request(&web)?;
        let mut req = request_for(pem, Duration::ZERO, Some(&web));
        req.validity_duration = secs;
        let chain = c.create_certificate(TOKEN1, req).await?;
        assert_eq!(leaf_of(&chain, &s.bundle()?)?.1, 3600 + 60, "validity_duration {secs}");
    }
    Ok(())
}

#[tokio::test]
async fn a_node_that_floods_the_service_is_slowed_and_the_others_are_served() -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    let web = id(WEB);
    let (pem, _key) = csr::request(&web)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut exhausted = 0;
    for _ in 0..60 {
        ensure!(Instant::now() < deadline, "60 requests took over 60 s");
        let req = request_for(pem.clone(), Duration::from_secs(600), Some(&web));
        match c.create_certificate(TOKEN1, req).await {
            Ok(_) => {}
            Err(ClientError::Refused { code: Code::ResourceExhausted, message, .. }) => {
                assert_eq!(message, "node node1 asks for more than 2 certificates a second");
                exhausted += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert!(exhausted > 0, "60 requests in a row from one node are slowed");
    let db = id(DB);
    let (pem, _key) = csr::request(&db)?;
    c.create_certificate(TOKEN2, request_for(pem, Duration::from_secs(600), Some(&db))).await?;
    Ok(())
}

/// A running pod as the API server shows it.
fn pod(ns: &str, name: &str, uid: &str, node: &str, account: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": account, "containers": []},
        "status": {"phase": "Running"},
    })
}

const AGENT1: &str = "eyJhbGciOiJSUzI1NiJ9.eyJhZ2VudDEiOnRydWV9.c2lnbmVkLWFnZW50MQ";
const STALE: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdGFsZSI6dHJ1ZX0.c2lnbmVkLXN0YWxl";
const UNBOUND: &str = "eyJhbGciOiJSUzI1NiJ9.eyJ1bmJvdW5kIjp0cnVlfQ.c2lnbmVkLXVuYm91bmQ";
const WRONG_AUDIENCE: &str = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJrdWJlIn0.c2lnbmVkLWF1ZA";
const WEB_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJ3ZWIiOnRydWV9.c2lnbmVkLXdlYg";
const EXPIRED: &str = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2lnbmVkLWV4cA";

/// Kubernetes mode against the stand-in API server (it says so; no real one runs here): the
/// agents' pods on node1 and node2, shop/web on node1, shop/db on node2, and tokens.
fn kubernetes() -> Result<(ApiServer, Service)> {
    let api = ApiServer::start()?;
    api.serve(PODS);
    api.apply(PODS, pod("mtls-system", "agent-a", "uid-a", "node1", "mtls-agent"));
    api.apply(PODS, pod("mtls-system", "agent-b", "uid-b", "node2", "mtls-agent"));
    api.apply(PODS, pod("shop", "web-1", "uid-w", "node1", "web"));
    api.apply(PODS, pod("shop", "db-1", "uid-d", "node2", "db"));
    let agent = ("mtls-system", "mtls-agent");
    api.script_token(AGENT1, "istio-ca", agent.0, agent.1, Some(("agent-a", "uid-a")));
    // The same pod name, another uid: a token of the pod agent-a was before it was recreated.
    api.script_token(STALE, "istio-ca", agent.0, agent.1, Some(("agent-a", "uid-old")));
    api.script_token(UNBOUND, "istio-ca", agent.0, agent.1, None);
    api.script_token(
        WRONG_AUDIENCE,
        "https://kubernetes.default.svc",
        agent.0,
        agent.1,
        Some(("agent-a", "uid-a")),
    );
    api.script_token(WEB_TOKEN, "istio-ca", "shop", "web", Some(("web-1", "uid-w")));
    api.script_refused_token(EXPIRED, "[invalid bearer token, service account token has expired]");
    api.serve(ROOT_CONFIGMAPS);
    let s = Service::start_kubernetes(&api)?;
    Ok((api, s))
}

/// Where the service keeps the trust bundle for the agents.
const ROOT_CONFIGMAPS: &str = "/api/v1/namespaces/mtls-system/configmaps";

async fn ask(c: &CaClient, token: &str, who: &str) -> Result<Vec<String>, ClientError> {
    let id = id(who);
    let (pem, _key) = csr::request(&id).expect("a CSR");
    c.create_certificate(token, request_for(pem, Duration::from_secs(600), Some(&id))).await
}

#[tokio::test]
async fn kubernetes_mode_an_agent_token_bound_to_its_pod_gets_that_nodes_identities_only(
) -> Result<()> {
    let (api, s) = kubernetes()?;
    let c = s.client()?;
    // The first list may still be on its way: UNAVAILABLE until then.
    let deadline = Instant::now() + Duration::from_secs(10);
    let chain = loop {
        match ask(&c, AGENT1, WEB).await {
            Ok(chain) => break chain,
            Err(ClientError::Refused { code: Code::Unavailable, .. })
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    };
    assert_eq!(leaf_of(&chain, &s.bundle()?)?.0, [WEB]);
    // The agents' trust bundle is published as a ConfigMap (they never mount the secret).
    let roots = std::fs::read_to_string(s.dir.path().join("ca/root-cert.pem"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.objects(ROOT_CONFIGMAPS).iter().any(|cm| {
        cm["metadata"]["name"] == "mtls-ca-root-cert"
            && cm["data"]["root-cert.pem"] == roots.as_str()
    }) {
        ensure!(
            Instant::now() < deadline,
            "no trust bundle ConfigMap: {:?}",
            api.objects(ROOT_CONFIGMAPS)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, message) = refused(ask(&c, AGENT1, DB).await);
    assert_eq!(
        (code, message.as_str()),
        (
            Code::PermissionDenied,
            &*format!("no pod with identity {DB} is on node node1, the caller's")
        )
    );
    // The pod moves away from node1: its identity goes with it.
    api.delete(PODS, Some("shop"), "web-1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ask(&c, AGENT1, WEB).await {
            Err(ClientError::Refused { code: Code::PermissionDenied, .. }) => break,
            other if Instant::now() < deadline => {
                drop(other);
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => anyhow::bail!("web-1 deleted, still: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn kubernetes_mode_refuses_stale_unbound_expired_wrong_audience_and_unknown_tokens(
) -> Result<()> {
    let (_api, s) = kubernetes()?;
    let c = s.client()?;
    // Wait for the pods' first list (an honest request gets through).
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&c, AGENT1, WEB).await.is_err() {
        ensure!(Instant::now() < deadline, "the service never answered the honest agent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cases: [(&str, Code, &str); 6] = [
        (EXPIRED, Code::Unauthenticated, "the token is not valid for audience istio-ca: [invalid bearer token, service account token has expired]"),
        (STALE, Code::PermissionDenied, "the token's pod mtls-system/agent-a (uid uid-old) does not exist: it was deleted or recreated"),
        (UNBOUND, Code::PermissionDenied, "the node agent account mtls-system/mtls-agent's token is bound to no pod: use a projected token"),
        (WRONG_AUDIENCE, Code::Unauthenticated, "the token is not valid for audience istio-ca: [invalid bearer token, token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences [\"istio-ca\"]]"),
        ("eyJhbGciOiJSUzI1NiJ9.eyJmb3JnZWQiOjF9.bm90LXNpZ25lZA", Code::Unauthenticated, "the token is not valid for audience istio-ca: [invalid bearer token, token lookup failed]"),
        ("forged-token", Code::Unauthenticated, "the bearer token is not a Kubernetes service account token (a JWT)"),
    ];
    for (token, code, want) in cases {
        let (got, message) = refused(ask(&c, token, WEB).await);
        assert_eq!((got, message.as_str()), (code, want), "token {token}");
    }
    // A workload's own token: its own identity, and nothing else.
    let chain = ask(&c, WEB_TOKEN, WEB).await?;
    assert_eq!(leaf_of(&chain, &s.bundle()?)?.0, [WEB]);
    let (code, message) = refused(ask(&c, WEB_TOKEN, DB).await);
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(message, format!("service account shop/web is no node agent: it may have its own identity only, not {DB}"));
    Ok(())
}

/// GET `path` of the service's monitoring endpoint: (status code, body).
fn monitor(s: &Service, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.monitoring)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("a status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

#[tokio::test]
async fn refusals_are_counted_by_code_and_kubernetes_mode_is_ready_once_pods_are_listed(
) -> Result<()> {
    let s = Service::start()?;
    let c = s.client()?;
    ask(&c, TOKEN1, WEB).await?;
    refused(ask(&c, TOKEN1, DB).await);
    refused(ask(&c, "node9-token-0000000000000000000000000000000000", WEB).await);
    let (code, metrics) = monitor(&s, "/metrics")?;
    assert_eq!(code, 200);
    for line in [
        "mtls_ca_certificates_issued_total 1",
        "mtls_ca_requests_refused_total{code=\"PERMISSION_DENIED\"} 1",
        "mtls_ca_requests_refused_total{code=\"UNAUTHENTICATED\"} 1",
        "mtls_ca_ready 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in:\n{metrics}");
    }

    // Kubernetes mode, the API server slow to list pods: not ready, and it says why.
    let api = ApiServer::start()?;
    api.serve(PODS);
    api.serve(ROOT_CONFIGMAPS);
    api.hold_lists(true);
    let k = Service::start_kubernetes(&api)?;
    let (code, body) = monitor(&k, "/healthz/ready")?;
    assert_eq!((code, body.trim()), (503, "not ready: the pods of the cluster are not listed yet"));
    api.hold_lists(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while monitor(&k, "/healthz/ready")?.0 != 200 {
        ensure!(Instant::now() < deadline, "never ready after the pods were listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
