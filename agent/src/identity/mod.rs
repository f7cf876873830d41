//! Workload identity: SPIFFE ids, the CA (Istio plug-in CA layout), workload certificates and
//! their renewal, and the rustls configurations that enforce SPIFFE-based mutual TLS.
//!
//! - [`SpiffeId`] — `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`init_ca`] / [`CaSigner`] — a CA directory holding `ca-cert.pem`, `ca-key.pem`,
//!   `root-cert.pem` and `cert-chain.pem`, so an existing Istio PKI can be reused.
//! - [`WorkloadCert`], [`CertStore`], [`run_renewals`] — per-node certificates for local pods,
//!   one per identity, got from a [`CertIssuer`] (the certificate service, or a CA key on the
//!   node for development) and renewed at half-life with jitter; a failed renewal keeps the
//!   old certificate.
//! - [`server_config`], [`client_config`], [`peer_identity`], [`describe_tls_error`] — TLS 1.3
//!   only, chain verification against a [`TrustBundle`] and exact SPIFFE URI-SAN checks; no DNS
//!   hostname checks anywhere.

mod ca;
mod cert;
pub mod csr;
mod der;
mod spiffe;
mod store;
mod tls;

#[cfg(test)]
mod testutil;

use std::path::PathBuf;

pub use ca::{
    init_ca, init_root_and_intermediate, sign_intermediate, CaSigner, CertIssuer, IssueFuture,
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CLOCK_SKEW, ROOT_CERT_FILE, ROOT_KEY_FILE,
};
pub use cert::{serial_and_not_after, WorkloadCert};
pub use spiffe::{validate_trust_domain, SpiffeId, SpiffeIdError};
pub use store::{describe_pending, run_renewals, CaHealth, CertInfo, CertStore, PendingCert};
pub use tls::{
    client_config, describe_io_error, describe_tls_error, io_error_reason, peer_identity,
    server_config, tls_error_reason, PeerVerifyError, SharedTrust, TrustBundle, ALPN_H2,
};

/// Everything that can go wrong in this module, worded for the operator who reads the log.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),

    #[error("refusing to overwrite the existing CA in {dir}: {file} already exists")]
    CaExists { dir: PathBuf, file: PathBuf },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A problem with one file of the CA directory or trust bundle; `path` names it.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },

    /// A problem that involves several files of the CA directory (e.g. the chain).
    #[error("CA in {dir}: {reason}")]
    Ca { dir: PathBuf, reason: String },

    #[error("issuing a certificate for {id}: {reason}")]
    Issue { id: String, reason: String },

    #[error("trust bundle: {0}")]
    TrustBundle(String),

    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    #[error(transparent)]
    Peer(#[from] PeerVerifyError),
}

impl IdentityError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::File { path: path.into(), reason: reason.into() }
    }
}
