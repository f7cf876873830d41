//! The certificate service (`mtls-agent ca serve`): the one process that holds the CA's key.
//!
//! Node agents (and Istio's own node proxies, ztunnel) send it a CSR over Istio's CA protocol,
//! gRPC `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS, with a bearer token,
//! and get back a certificate only for an identity the caller may hold: a node's agent, the
//! identity of a pod scheduled to its node. The key a certificate is for is made on the node and
//! never leaves it; the CA's key never reaches a node. Whoever owns one node can then mint the
//! identities of that node's pods, and no others.
//!
//! Data flows one way: [`authority`] says who is calling and what its node runs, [`server`]
//! checks the request (`identity::csr`), decides and signs, [`client`] is the agent's side of
//! the protocol and [`issuer`] the agent's certificates through it.
//! Every refusal is a gRPC status whose message names the reason, and is logged.

pub mod authority;
pub mod client;
pub mod cluster;
pub mod issuer;
pub mod monitor;
pub mod server;

/// The generated protocol types (from the vendored `proto/istio/v1/auth/ca.proto`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}

/// The request metadata key with which a node proxy names the pod identity it asks for
/// (istio/istio `pkg/security`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Istio's CA port.
pub const DEFAULT_PORT: u16 = 15012;

/// The largest gRPC message either side decodes: a request is a CSR of under 1 KiB, a response
/// a short chain.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
