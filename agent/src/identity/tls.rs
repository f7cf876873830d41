//! rustls configurations for the HBONE tunnel: TLS 1.3 only, ALPN `h2`, certificate chains
//! verified against a [`TrustBundle`], then an exact SPIFFE URI-SAN check. DNS names are never
//! consulted.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    OtherError, PeerIncompatible, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::cert::{fmt_unix, WorkloadCert};
use super::spiffe::{validate_trust_domain, SpiffeId, SpiffeIdError};
use super::IdentityError;

/// The ALPN protocol of HBONE (HTTP/2 CONNECT).
pub const ALPN_H2: &[u8] = b"h2";

/// The ring provider, built once. aws-lc is never linked: the provider is chosen explicitly
/// rather than through rustls' process-wide default. Only its TLS 1.3 suites: another crate in
/// the build (the Kubernetes client) turns on rustls' `tls12` feature, and a ClientHello must
/// not offer TLS 1.2 suites.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.retain(|s| s.version() == &rustls::version::TLS13);
        Arc::new(p)
    }))
}

/// The node's trust bundle, replaced whole when its file changes (a root rotation): every new
/// handshake takes the current one; connections already made keep theirs.
pub struct SharedTrust {
    current: std::sync::RwLock<(u64, TrustBundle)>,
}

impl SharedTrust {
    pub fn new(bundle: TrustBundle) -> SharedTrust {
        SharedTrust { current: std::sync::RwLock::new((0, bundle)) }
    }

    /// The current bundle and its version (bumped by every replacement).
    pub fn current(&self) -> (u64, TrustBundle) {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self) -> TrustBundle {
        self.current().1
    }

    pub fn replace(&self, bundle: TrustBundle) {
        let mut c = self.current.write().unwrap_or_else(|e| e.into_inner());
        *c = (c.0 + 1, bundle);
    }
}

/// The roots a peer's chain must lead to. Holds several roots during a root rotation.
#[derive(Clone)]
pub struct TrustBundle {
    store: Arc<RootCertStore>,
    certs: Arc<[CertificateDer<'static>]>,
}

impl TrustBundle {
    /// Every `CERTIFICATE` block of a PEM document becomes a root; at least one is required.
    pub fn from_pem(pem: &[u8]) -> Result<Self, IdentityError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::TrustBundle(format!("not valid PEM: {e}")))?;
        Self::from_der(certs)
    }

    /// Reads a PEM file of roots (e.g. Istio's `root-cert.pem`); errors name the file.
    pub fn from_pem_file(path: &Path) -> Result<Self, IdentityError> {
        let pem = std::fs::read(path).map_err(|e| IdentityError::io(path, e))?;
        Self::from_pem(&pem).map_err(|e| match e {
            IdentityError::TrustBundle(reason) => IdentityError::file(path, reason),
            other => other,
        })
    }

    /// Roots given as DER certificates.
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<Self, IdentityError> {
        if certs.is_empty() {
            return Err(IdentityError::TrustBundle(
                "no CERTIFICATE found; at least one root is required".into(),
            ));
        }
        let mut store = RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store.add(cert.clone()).map_err(|e| {
                IdentityError::TrustBundle(format!(
                    "root #{} is not a usable certificate: {e}",
                    i + 1
                ))
            })?;
        }
        Ok(Self { store: Arc::new(store), certs: certs.into() })
    }

    /// A bundle that trusts no root: every peer chain fails. For an agent that carries
    /// nothing (a node it refuses), whose admin API still shows a mesh.
    pub(crate) fn trusting_nothing() -> Self {
        Self { store: Arc::new(RootCertStore::empty()), certs: Vec::new().into() }
    }

    /// The roots, in file order.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The number of roots.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Never true for a constructed bundle; present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Whether `cert` is one of the roots (byte-for-byte).
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.certs.iter().any(|c| c.as_ref() == cert.as_ref())
    }

    pub(crate) fn root_store(&self) -> &Arc<RootCertStore> {
        &self.store
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle").field("roots", &self.certs.len()).finish()
    }
}

/// Why a peer certificate was refused after (or instead of) chain verification. The Display
/// text is what the operator reads; it survives inside `rustls::Error` (see
/// [`describe_tls_error`]).
#[derive(Clone, thiserror::Error)]
pub enum PeerVerifyError {
    #[error("no peer certificate")]
    NoCertificate,
    #[error("certificate could not be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; a SPIFFE certificate must have exactly one")]
    MultipleUris(usize),
    #[error("certificate URI SAN is not a valid SPIFFE id: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    #[error("peer identity {presented} is not the one expected ({expected})")]
    WrongIdentity {
        // Boxed to keep the error (and every Result carrying it) small.
        presented: Box<SpiffeId>,
        expected: Box<SpiffeId>,
    },
    #[error("trust domain {presented} is not {expected} (peer identity {peer})")]
    WrongTrustDomain { presented: String, expected: String, peer: Box<SpiffeId> },
}

/// Debug prints the message: rustls' Display of `CertificateError::Other` shows its payload
/// with Debug, and this keeps that readable in logs that print the raw rustls error.
impl std::fmt::Debug for PeerVerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl PeerVerifyError {
    /// A short, fixed reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_peer_cert",
            Self::BadCertificate(_) => "bad_certificate",
            Self::NoSpiffeId | Self::MultipleUris(_) | Self::InvalidSpiffeId(_) => "bad_spiffe_id",
            Self::WrongIdentity { .. } => "wrong_identity",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
        }
    }
}

impl From<PeerVerifyError> for rustls::Error {
    fn from(e: PeerVerifyError) -> Self {
        // `Other` keeps our text in rustls' Display and lets `describe_tls_error` downcast it.
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The SPIFFE id of a peer, from the leaf (first) certificate of its chain. The leaf must carry
/// exactly one URI SAN, and it must be a valid SPIFFE id.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, PeerVerifyError> {
    let leaf = certs.first().ok_or(PeerVerifyError::NoCertificate)?;
    leaf_identity(leaf)
}

fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, PeerVerifyError> {
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| PeerVerifyError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerVerifyError::BadCertificate(format!("subjectAltName: {e}")))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(PeerVerifyError::NoSpiffeId),
        [uri] => uri.parse().map_err(PeerVerifyError::InvalidSpiffeId),
        many => Err(PeerVerifyError::MultipleUris(many.len())),
    }
}

/// Verifies `leaf` + `intermediates` up to a root of `roots` at `now`, for TLS server use
/// (webpki: signatures, validity, CA flags, path length, EKU serverAuth). No name checks.
pub(crate) fn verify_server_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        algs.all,
    )
    .map_err(unknown_ca_for_bad_signature)
}

/// webpki reports a chain whose issuer *name* matches a trusted root but whose signature does
/// not (two CAs created with the same name, the common case with default Istio or mtls-agent
/// roots) as a bad signature. For the operator, and in the alert the peer gets, that is an
/// unknown CA: the certificate is not signed by anything we trust.
fn unknown_ca_for_bad_signature(err: rustls::Error) -> rustls::Error {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        other => other,
    }
}

/// Like [`verify_server_chain`] with the ring algorithms, for the CA self-check at load.
pub(crate) fn verify_chain_now(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) =
        chain.split_first().ok_or(rustls::Error::NoCertificatesPresented)?;
    verify_server_chain(
        leaf,
        intermediates,
        bundle.root_store(),
        UnixTime::now(),
        &provider().signature_verification_algorithms,
    )
}

/// Client side: chain to the bundle, then the server's SPIFFE id must equal `expected`.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Deliberately unused: identity is the SPIFFE id, never a DNS name.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain first: nothing in an unverified certificate is worth reading.
        verify_server_chain(end_entity, intermediates, &self.roots, now, &self.algs)?;
        let presented = leaf_identity(end_entity)?;
        if presented != self.expected {
            return Err(PeerVerifyError::WrongIdentity {
                presented: Box::new(presented),
                expected: Box::new(self.expected.clone()),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: a client certificate is required; webpki checks its chain against the
/// bundle, then its SPIFFE id must be in our trust domain. Which identities may connect is
/// policy, decided later from [`peer_identity`].
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(unknown_ca_for_bad_signature)?;
        let peer = leaf_identity(end_entity)?;
        if peer.trust_domain() != self.trust_domain {
            return Err(PeerVerifyError::WrongTrustDomain {
                presented: peer.trust_domain().to_string(),
                expected: self.trust_domain.clone(),
                peer: Box::new(peer),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Always presents the same workload certificate, on either side of the handshake.
struct FixedCert(Arc<CertifiedKey>);

impl std::fmt::Debug for FixedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // rustls configs are Debug; keep anything key-related out of that output.
        f.debug_struct("FixedCert").field("chain_len", &self.0.cert.len()).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The tunnel server (inbound, port 15008) configuration: presents `cert`, requires a client
/// certificate that chains to `trust` and carries a SPIFFE id in `trust_domain`.
///
/// Session resumption is off: every connection re-verifies the peer against the current
/// bundle, and HBONE pools connections, so full handshakes are rare anyway.
pub fn server_config(
    cert: &WorkloadCert,
    trust: &TrustBundle,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, IdentityError> {
    validate_trust_domain(trust_domain)?;
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::clone(trust.root_store()),
        provider.clone(),
    )
    .build()
    .map_err(|e| IdentityError::TrustBundle(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier { inner, trust_domain: trust_domain.to_string() });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The tunnel client (outbound) configuration: presents `cert`, and accepts only a server whose
/// chain leads to `trust` and whose SPIFFE id is exactly `expected`. The `ServerName` passed to
/// the connector is ignored (and not sent as SNI).
pub fn client_config(
    cert: &WorkloadCert,
    trust: &TrustBundle,
    expected: &SpiffeId,
) -> Result<Arc<ClientConfig>, IdentityError> {
    build_client_config(Some(cert), trust, expected)
}

pub(crate) fn build_client_config(
    cert: Option<&WorkloadCert>,
    trust: &TrustBundle,
    expected: &SpiffeId,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::clone(trust.root_store()),
        expected: expected.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(FixedCert(cert.certified_key()))),
        // Only tests build a client without a certificate, to see the server refuse it.
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// A handshake failure in words for the log: what was wrong, on which side.
pub fn describe_tls_error(err: &rustls::Error) -> String {
    classify(err).1
}

/// A short, fixed reason for a handshake failure, fit for a metrics label.
pub fn tls_error_reason(err: &rustls::Error) -> &'static str {
    classify(err).0
}

/// [`describe_tls_error`] for the `io::Error`s tokio-rustls returns (it wraps rustls errors).
pub fn describe_io_error(err: &io::Error) -> String {
    match rustls_error_in(err) {
        Some(tls) => describe_tls_error(tls),
        None if err.kind() == io::ErrorKind::UnexpectedEof => {
            "connection closed by the peer during the TLS handshake".to_string()
        }
        None => err.to_string(),
    }
}

/// [`tls_error_reason`] for the `io::Error`s tokio-rustls returns.
pub fn io_error_reason(err: &io::Error) -> &'static str {
    match rustls_error_in(err) {
        Some(tls) => tls_error_reason(tls),
        None if err.kind() == io::ErrorKind::UnexpectedEof => "peer_closed",
        None => "io_error",
    }
}

fn rustls_error_in(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn classify(err: &rustls::Error) -> (&'static str, String) {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(cert_err) => classify_certificate(cert_err),
        E::NoCertificatesPresented => ("no_client_cert", "no client certificate".into()),
        E::AlertReceived(alert) => classify_alert(*alert),
        E::PeerIncompatible(why) => match why {
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig => (
                "protocol_version",
                "peer does not speak TLS 1.3 (mtls-agent accepts nothing older)".into(),
            ),
            other => ("peer_incompatible", format!("peer is incompatible: {other:?}")),
        },
        E::NoApplicationProtocol => {
            ("alpn", "peer does not offer ALPN h2 (not an HBONE client or server?)".into())
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => (
            "not_tls",
            format!("peer did not speak TLS as expected (plaintext to a TLS port?): {err}"),
        ),
        E::General(text) => ("tls_error", text.clone()),
        other => ("tls_error", other.to_string()),
    }
}

fn classify_certificate(err: &CertificateError) -> (&'static str, String) {
    use CertificateError as C;
    match err {
        C::UnknownIssuer => ("unknown_ca", "certificate signed by an unknown CA".into()),
        C::Expired => ("cert_expired", "certificate expired".into()),
        C::ExpiredContext { time, not_after } => (
            "cert_expired",
            format!(
                "certificate expired (not valid after {}, {} s ago)",
                fmt_unix(not_after.as_secs()),
                time.as_secs().saturating_sub(not_after.as_secs())
            ),
        ),
        C::NotValidYet => {
            ("cert_not_yet_valid", "certificate not valid yet (check the clocks)".into())
        }
        C::NotValidYetContext { not_before, .. } => (
            "cert_not_yet_valid",
            format!(
                "certificate not valid yet (not before {}; check the clocks)",
                fmt_unix(not_before.as_secs())
            ),
        ),
        C::BadSignature => ("bad_signature", "certificate signature does not verify".into()),
        C::BadEncoding => ("bad_certificate", "certificate could not be parsed".into()),
        C::Revoked => ("cert_revoked", "certificate revoked".into()),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            ("bad_key_usage", format!("certificate not allowed for this use: {err}"))
        }
        C::Other(other) => match other.0.downcast_ref::<PeerVerifyError>() {
            Some(peer) => (peer.reason(), peer.to_string()),
            None => ("bad_certificate", format!("certificate rejected: {other}")),
        },
        other => ("bad_certificate", format!("certificate rejected: {other}")),
    }
}

fn classify_alert(alert: AlertDescription) -> (&'static str, String) {
    use AlertDescription as A;
    let (reason, text) = match alert {
        A::UnknownCA => (
            "peer_rejected_unknown_ca",
            "peer rejected our certificate: certificate signed by an unknown CA",
        ),
        A::CertificateExpired => (
            "peer_rejected_expired",
            "peer rejected our certificate: certificate expired or not yet valid",
        ),
        A::CertificateRequired => {
            ("peer_requires_client_cert", "peer requires a client certificate and we sent none")
        }
        // Our verifiers send this for identity and trust-domain mismatches.
        A::CertificateUnknown => (
            "peer_rejected_identity",
            "peer rejected our certificate (identity or trust domain not accepted)",
        ),
        A::BadCertificate | A::UnsupportedCertificate | A::AccessDenied => {
            ("peer_rejected_cert", "peer rejected our certificate")
        }
        A::DecryptError => (
            "peer_rejected_signature",
            "peer could not verify a signature (certificate or handshake)",
        ),
        A::ProtocolVersion => {
            ("protocol_version", "peer refused the TLS version (mtls-agent speaks TLS 1.3 only)")
        }
        A::NoApplicationProtocol => ("alpn", "peer refused ALPN h2 (not an HBONE endpoint?)"),
        A::HandshakeFailure => (
            "handshake_failure",
            "peer aborted the handshake (no common cipher suite, group or signature scheme)",
        ),
        other => return ("peer_alert", format!("peer sent TLS alert {other:?}")),
    };
    (reason, text.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::super::testutil::{handshake, id, new_ca, write_intermediate_layout};
    use super::super::CaSigner;
    use super::*;

    const TTL: Duration = Duration::from_secs(3600);
    const TD: &str = "cluster.local";

    fn issue(ca: &CaSigner, spiffe: &str) -> WorkloadCert {
        ca.issue(&id(spiffe), TTL).unwrap()
    }

    fn err_text(result: &Result<SpiffeId, io::Error>) -> String {
        match result {
            Ok(peer) => panic!("expected an error, the peer was accepted as {peer}"),
            Err(e) => describe_io_error(e),
        }
    }

    #[tokio::test]
    async fn mutual_handshake_sees_both_identities() {
        let (_tmp, ca) = new_ca(TD);
        let server_cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        let client_cert = issue(&ca, "spiffe://cluster.local/ns/a/sa/frontend");
        let out = handshake(
            server_config(&server_cert, ca.trust_bundle(), TD).unwrap(),
            client_config(&client_cert, ca.trust_bundle(), server_cert.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(out.server.unwrap(), *client_cert.spiffe_id());
        assert_eq!(out.client.unwrap(), *server_cert.spiffe_id());
    }

    #[tokio::test]
    async fn client_refuses_an_unexpected_server_identity() {
        let (_tmp, ca) = new_ca(TD);
        let server_cert = issue(&ca, "spiffe://cluster.local/ns/a/sa/x");
        let client_cert = issue(&ca, "spiffe://cluster.local/ns/c/sa/client");
        let expected = id("spiffe://cluster.local/ns/b/sa/y");
        let out = handshake(
            server_config(&server_cert, ca.trust_bundle(), TD).unwrap(),
            client_config(&client_cert, ca.trust_bundle(), &expected).unwrap(),
        )
        .await;
        let want = "peer identity spiffe://cluster.local/ns/a/sa/x is not the one expected \
                    (spiffe://cluster.local/ns/b/sa/y)";
        assert_eq!(err_text(&out.client), want);
        let client_err = out.client.as_ref().unwrap_err();
        assert_eq!(io_error_reason(client_err), "wrong_identity");
        // rustls' own Display keeps the text too, for code that logs the raw error.
        assert!(client_err.to_string().contains(want), "{client_err}");
        assert_eq!(
            err_text(&out.server),
            "peer rejected our certificate (identity or trust domain not accepted)"
        );
    }

    #[tokio::test]
    async fn server_refuses_a_client_from_an_unknown_ca() {
        let (_tmp, ca) = new_ca(TD);
        let (_tmp2, other) = new_ca(TD);
        refuse_client_from(&ca, &other).await;
        // Two PKIs whose roots have the same name: webpki finds the "issuer" by name and
        // fails on the signature; that must still read as an unknown CA.
        let tmp = tempfile::tempdir().unwrap();
        write_intermediate_layout(&tmp.path().join("one"), "Same Org");
        write_intermediate_layout(&tmp.path().join("two"), "Same Org");
        let one = CaSigner::load(&tmp.path().join("one")).unwrap();
        let two = CaSigner::load(&tmp.path().join("two")).unwrap();
        refuse_client_from(&one, &two).await;
    }

    async fn refuse_client_from(ca: &CaSigner, other: &CaSigner) {
        let server_cert = issue(ca, "spiffe://cluster.local/ns/b/sa/backend");
        let stranger = issue(other, "spiffe://cluster.local/ns/a/sa/frontend");
        let out = handshake(
            server_config(&server_cert, ca.trust_bundle(), TD).unwrap(),
            // The stranger trusts our root, so it gets as far as presenting its certificate.
            client_config(&stranger, ca.trust_bundle(), server_cert.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(err_text(&out.server), "certificate signed by an unknown CA");
        assert_eq!(io_error_reason(out.server.as_ref().unwrap_err()), "unknown_ca");
        assert_eq!(
            err_text(&out.client),
            "peer rejected our certificate: certificate signed by an unknown CA"
        );
    }

    #[tokio::test]
    async fn client_refuses_a_server_from_an_unknown_ca() {
        let (_tmp, ca) = new_ca(TD);
        let (_tmp2, other) = new_ca(TD);
        let impostor = issue(&other, "spiffe://cluster.local/ns/b/sa/backend");
        let client_cert = issue(&ca, "spiffe://cluster.local/ns/a/sa/frontend");
        let out = handshake(
            server_config(&impostor, other.trust_bundle(), TD).unwrap(),
            client_config(&client_cert, ca.trust_bundle(), impostor.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(err_text(&out.client), "certificate signed by an unknown CA");
    }

    #[tokio::test]
    async fn server_refuses_a_client_without_certificate() {
        let (_tmp, ca) = new_ca(TD);
        let server_cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        let out = handshake(
            server_config(&server_cert, ca.trust_bundle(), TD).unwrap(),
            build_client_config(None, ca.trust_bundle(), server_cert.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(err_text(&out.server), "no client certificate");
        assert_eq!(err_text(&out.client), "peer requires a client certificate and we sent none");
    }

    #[tokio::test]
    async fn server_refuses_another_trust_domain() {
        let (_tmp, ca) = new_ca(TD);
        let server_cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        // Same CA, so the chain is fine: only the trust domain is wrong.
        let foreign = issue(&ca, "spiffe://other.local/ns/a/sa/x");
        let out = handshake(
            server_config(&server_cert, ca.trust_bundle(), TD).unwrap(),
            client_config(&foreign, ca.trust_bundle(), server_cert.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(
            err_text(&out.server),
            "trust domain other.local is not cluster.local (peer identity spiffe://other.local/ns/a/sa/x)"
        );
        assert_eq!(io_error_reason(out.server.as_ref().unwrap_err()), "wrong_trust_domain");
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn server_refuses_an_expired_client_certificate() {
        let (_tmp, ca) = new_ca(TD);
        let server_cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        let now = SystemTime::now();
        let expired = ca
            .issue_with_validity(
                &id("spiffe://cluster.local/ns/a/sa/frontend"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(60),
                now - Duration::from_secs(7200),
            )
            .unwrap();
        let out = handshake(
            server_config(&server_cert, ca.trust_bundle(), TD).unwrap(),
            client_config(&expired, ca.trust_bundle(), server_cert.spiffe_id()).unwrap(),
        )
        .await;
        let text = err_text(&out.server);
        assert!(text.starts_with("certificate expired (not valid after "), "{text}");
        assert_eq!(io_error_reason(out.server.as_ref().unwrap_err()), "cert_expired");
        assert_eq!(
            err_text(&out.client),
            "peer rejected our certificate: certificate expired or not yet valid"
        );
    }

    #[tokio::test]
    async fn client_refuses_an_expired_server_certificate() {
        let (_tmp, ca) = new_ca(TD);
        let now = SystemTime::now();
        let expired = ca
            .issue_with_validity(
                &id("spiffe://cluster.local/ns/b/sa/backend"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(60),
                now - Duration::from_secs(7200),
            )
            .unwrap();
        let client_cert = issue(&ca, "spiffe://cluster.local/ns/a/sa/frontend");
        let out = handshake(
            server_config(&expired, ca.trust_bundle(), TD).unwrap(),
            client_config(&client_cert, ca.trust_bundle(), expired.spiffe_id()).unwrap(),
        )
        .await;
        assert!(err_text(&out.client).starts_with("certificate expired"));
    }

    #[tokio::test]
    async fn intermediate_ca_leaves_verify_against_the_root_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let root_pem = write_intermediate_layout(&dir, "Acme");
        let ca = CaSigner::load(&dir).unwrap();
        // Peers know only the root.
        let roots_only = TrustBundle::from_pem(root_pem.as_bytes()).unwrap();
        let server_cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        let client_cert = issue(&ca, "spiffe://cluster.local/ns/a/sa/frontend");
        assert_eq!(server_cert.chain().len(), 2);
        let out = handshake(
            server_config(&server_cert, &roots_only, TD).unwrap(),
            client_config(&client_cert, &roots_only, server_cert.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(out.server.unwrap(), *client_cert.spiffe_id());
        assert_eq!(out.client.unwrap(), *server_cert.spiffe_id());
    }

    #[tokio::test]
    async fn a_bundle_with_two_roots_accepts_leaves_from_either() {
        let (_tmp, old_ca) = new_ca(TD);
        let (_tmp2, new_ca_) = new_ca(TD);
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(old_ca.dir().join("root-cert.pem")).unwrap(),
            std::fs::read_to_string(new_ca_.dir().join("root-cert.pem")).unwrap()
        );
        let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(bundle.len(), 2);
        let from_old = issue(&old_ca, "spiffe://cluster.local/ns/b/sa/backend");
        let from_new = issue(&new_ca_, "spiffe://cluster.local/ns/a/sa/frontend");
        // Old server, new client; then the other way round.
        for (server_cert, client_cert) in [(&from_old, &from_new), (&from_new, &from_old)] {
            let out = handshake(
                server_config(server_cert, &bundle, TD).unwrap(),
                client_config(client_cert, &bundle, server_cert.spiffe_id()).unwrap(),
            )
            .await;
            assert_eq!(out.server.unwrap(), *client_cert.spiffe_id());
            assert_eq!(out.client.unwrap(), *server_cert.spiffe_id());
        }
        // A bundle holding only the new root refuses the old CA's leaves.
        let out = handshake(
            server_config(&from_new, new_ca_.trust_bundle(), TD).unwrap(),
            client_config(&from_old, &bundle, from_new.spiffe_id()).unwrap(),
        )
        .await;
        assert_eq!(err_text(&out.server), "certificate signed by an unknown CA");
    }

    /// Reads the ClientHello our client config sends: only TLS 1.3 in supported_versions and
    /// only TLS 1.3 cipher suites.
    #[test]
    fn tls12_is_not_offered() {
        let (_tmp, ca) = new_ca(TD);
        let cert = issue(&ca, "spiffe://cluster.local/ns/a/sa/frontend");
        let config = client_config(&cert, ca.trust_bundle(), cert.spiffe_id()).unwrap();
        let name = ServerName::try_from("ignored.invalid").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();

        let be16 = |b: &[u8], at: usize| usize::from(u16::from_be_bytes([b[at], b[at + 1]]));
        assert_eq!(wire[0], 0x16, "handshake record");
        let hello = &wire[5..];
        assert_eq!(hello[0], 0x01, "ClientHello");
        let mut at = 4 + 2 + 32;
        at += 1 + usize::from(hello[at]); // session id
        let suites_len = be16(hello, at);
        let suites: Vec<usize> = (0..suites_len / 2).map(|i| be16(hello, at + 2 + 2 * i)).collect();
        assert!(suites.iter().all(|s| s >> 8 == 0x13), "non-TLS 1.3 suites offered: {suites:x?}");
        at += 2 + suites_len;
        at += 1 + usize::from(hello[at]); // compression methods
        let end = at + 2 + be16(hello, at);
        at += 2;
        let mut versions = None;
        let mut alpn = None;
        while at < end {
            let (kind, len) = (be16(hello, at), be16(hello, at + 2));
            let body = &hello[at + 4..at + 4 + len];
            match kind {
                0x002b => versions = Some(body[1..].to_vec()),
                0x0010 => alpn = Some(body[2..].to_vec()),
                0x0000 => panic!("SNI must not be sent"),
                _ => {}
            }
            at += 4 + len;
        }
        assert_eq!(versions, Some(vec![0x03, 0x04]), "supported_versions must be TLS 1.3 only");
        assert_eq!(alpn, Some(b"\x02h2".to_vec()));
    }

    /// Feeds the server a ClientHello that offers only TLS 1.2.
    #[test]
    fn tls12_is_not_accepted() {
        let (_tmp, ca) = new_ca(TD);
        let cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        let config = server_config(&cert, ca.trust_bundle(), TD).unwrap();
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // no session id
        body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2b]); // ECDHE-ECDSA-AES128-GCM-SHA256
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        let extensions: &[u8] = &[
            0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17, // supported_groups: P-256
            0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04,
            0x03, // signature_algorithms: ecdsa p256
            0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        ];
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut handshake_msg = vec![0x01, 0x00];
        handshake_msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        handshake_msg.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake_msg.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake_msg);

        let mut conn = rustls::ServerConnection::new(config).unwrap();
        conn.read_tls(&mut &record[..]).unwrap();
        let err = conn.process_new_packets().unwrap_err();
        assert_eq!(tls_error_reason(&err), "protocol_version", "{err:?}");
        assert!(describe_tls_error(&err).contains("TLS 1.3"));
    }

    #[test]
    fn peer_identity_requires_exactly_one_spiffe_uri() {
        let make = |sans: Vec<SanType>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            params.self_signed(&key).unwrap().der().clone()
        };
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let dns = |s: &str| SanType::DnsName(s.try_into().unwrap());

        let ok = make(vec![dns("backend.b.svc"), uri("spiffe://cluster.local/ns/b/sa/y")]);
        assert_eq!(peer_identity(&[ok]).unwrap(), id("spiffe://cluster.local/ns/b/sa/y"));
        let none = make(vec![dns("backend.b.svc")]);
        assert!(matches!(peer_identity(&[none]), Err(PeerVerifyError::NoSpiffeId)));
        let two = make(vec![
            uri("spiffe://cluster.local/ns/b/sa/y"),
            uri("spiffe://cluster.local/ns/b/sa/z"),
        ]);
        assert!(matches!(peer_identity(&[two]), Err(PeerVerifyError::MultipleUris(2))));
        let bad = make(vec![uri("spiffe://cluster.local/workload/y")]);
        let err = peer_identity(&[bad]).unwrap_err();
        assert!(err.to_string().contains("not a valid SPIFFE id"), "{err}");
        assert!(matches!(peer_identity(&[]), Err(PeerVerifyError::NoCertificate)));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(peer_identity(&[garbage]), Err(PeerVerifyError::BadCertificate(_))));
    }

    #[test]
    fn trust_bundle_errors_are_clear() {
        let err = TrustBundle::from_pem(b"").unwrap_err();
        assert!(err.to_string().contains("at least one root"), "{err}");
        let err = TrustBundle::from_pem(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("root #1"), "{err}");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("roots.pem");
        std::fs::write(&path, "nothing here").unwrap();
        let err = TrustBundle::from_pem_file(&path).unwrap_err();
        assert!(err.to_string().contains("roots.pem"), "{err}");
        let err = TrustBundle::from_pem_file(&tmp.path().join("missing.pem")).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn server_config_rejects_a_bad_trust_domain() {
        let (_tmp, ca) = new_ca(TD);
        let cert = issue(&ca, "spiffe://cluster.local/ns/b/sa/backend");
        assert!(server_config(&cert, ca.trust_bundle(), "Not Valid").is_err());
    }

    #[test]
    fn io_errors_without_tls_inside_are_described_plainly() {
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "eof");
        assert_eq!(
            describe_io_error(&eof),
            "connection closed by the peer during the TLS handshake"
        );
        assert_eq!(io_error_reason(&eof), "peer_closed");
        let wrapped =
            io::Error::new(io::ErrorKind::InvalidData, rustls::Error::NoCertificatesPresented);
        assert_eq!(describe_io_error(&wrapped), "no client certificate");
    }
}
