//! Helpers shared by the identity tests: throwaway CAs and real TLS handshakes over an
//! in-memory duplex pipe.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    init_ca, peer_identity, CaSigner, SpiffeId, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
};

pub(crate) fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// A fresh self-signed CA in its own temporary directory (kept alive by the `TempDir`).
pub(crate) fn new_ca(trust_domain: &str) -> (TempDir, CaSigner) {
    let dir = tempfile::tempdir().unwrap();
    let ca = init_ca(&dir.path().join("ca"), trust_domain).unwrap();
    (dir, ca)
}

/// Writes an Istio-style intermediate layout: a root in root-cert.pem, an intermediate (with
/// its key) as ca-cert.pem / ca-key.pem, and cert-chain.pem = intermediate + root.
/// Returns the root's PEM.
pub(crate) fn write_intermediate_layout(dir: &Path, org: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, org);
    name.push(DnType::CommonName, "Test Root CA");
    root_params.distinguished_name = name;
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).unwrap();

    let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut inter_params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, org);
    name.push(DnType::CommonName, "Test Intermediate CA");
    inter_params.distinguished_name = name;
    inter_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    inter_params.use_authority_key_identifier_extension = true;
    let inter = inter_params.signed_by(&inter_key, &root, &root_key).unwrap();

    std::fs::write(dir.join(CA_CERT_FILE), inter.pem()).unwrap();
    std::fs::write(dir.join(CA_KEY_FILE), inter_key.serialize_pem()).unwrap();
    std::fs::write(dir.join(ROOT_CERT_FILE), root.pem()).unwrap();
    std::fs::write(dir.join(CERT_CHAIN_FILE), format!("{}{}", inter.pem(), root.pem())).unwrap();
    root.pem()
}

/// What each side of a handshake saw: the peer's SPIFFE id, or the error.
pub(crate) struct Outcome {
    pub(crate) server: Result<SpiffeId, io::Error>,
    pub(crate) client: Result<SpiffeId, io::Error>,
}

fn to_io(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// Runs a real TLS handshake between the two configs over an in-memory pipe, then a
/// ping/pong so that a rejection of the client certificate (which TLS 1.3 reports after the
/// client has finished) reaches the client too.
pub(crate) async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);

    let server_side = async move {
        let mut tls = acceptor.accept(server_io).await?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let peer = peer_identity(conn.peer_certificates().unwrap_or_default()).map_err(to_io)?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        Ok::<_, io::Error>(peer)
    };
    let client_side = async move {
        // Any name will do: the verifier ignores it.
        let name = ServerName::try_from("name-is-ignored.invalid").unwrap();
        let mut tls = connector.connect(name, client_io).await?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        let peer = peer_identity(conn.peer_certificates().unwrap_or_default()).map_err(to_io)?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        Ok::<_, io::Error>(peer)
    };
    let (server, client) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("handshake timed out");
    Outcome { server, client }
}

/// Whether the `openssl` command is there (interop tests are skipped without it).
pub(crate) fn openssl_available() -> bool {
    std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs openssl in `dir`, panicking with its stderr on failure; returns stdout+stderr.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openssl {args:?} failed: {text}");
    text
}
