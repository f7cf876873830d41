//! The agent's side of the CA protocol: a TLS 1.3 + HTTP/2 connection to the certificate
//! service (ours, or istiod), whose serving certificate must lead to the mesh's roots and name
//! the DNS name dialled; the node's token goes as `authorization: Bearer`. One connection per
//! request: certificates are asked for a few times a day per pod.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use super::proto::IstioCertificateRequest;
use super::MAX_MESSAGE_BYTES;
use crate::identity::{TrustBundle, ALPN_H2};

/// How long one request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("connecting to the CA at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("the CA at {address} refused the request: {code:?}: {message}")]
    Refused { address: String, code: tonic::Code, message: String },
    #[error("the CA at {address} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout { address: String },
}

/// A request for the identity named by `csr_pem`, for `ttl`; a node agent names the pod's
/// identity again as `ImpersonatedIdentity`, as ztunnel does.
pub fn request_for(
    csr_pem: String,
    ttl: Duration,
    impersonate: Option<&crate::identity::SpiffeId>,
) -> IstioCertificateRequest {
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            super::IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
            },
        )]
        .into_iter()
        .collect(),
    });
    IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        metadata,
    }
}

/// Where the CA is and how it is recognised.
pub struct CaClient {
    /// `https://host:port`, as given.
    address: String,
    origin: http::Uri,
    dial: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
}

impl CaClient {
    /// `address` is `https://host[:port]` (port 15012 by default); the CA's certificate must
    /// lead to `roots` and name `server_name` (default: the address's host).
    pub fn new(
        address: &str,
        roots: &TrustBundle,
        server_name: Option<&str>,
    ) -> Result<CaClient, ClientError> {
        let bad = |reason: String| ClientError::Address { address: address.into(), reason };
        let uri: http::Uri = address.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https".into()));
        }
        let host = uri.host().ok_or_else(|| bad("no host".into()))?.to_owned();
        let port = uri.port_u16().unwrap_or(super::DEFAULT_PORT);
        let name = server_name.unwrap_or(host.trim_matches(|c| c == '[' || c == ']'));
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| bad(format!("server name {name:?}: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots.root_store().clone())
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let origin = format!("https://{name}:{port}").parse().map_err(|e| bad(format!("{e}")))?;
        Ok(CaClient {
            address: address.into(),
            origin,
            dial: format!("{host}:{port}"),
            server_name,
            tls: Arc::new(tls),
        })
    }

    /// The address as given (`https://host:port`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends `request` with `token`; the PEM chain of the answer (leaf first, roots last).
    pub async fn create_certificate(
        &self,
        token: &str,
        request: IstioCertificateRequest,
    ) -> Result<Vec<String>, ClientError> {
        self.create_certificate_as(Some(&format!("Bearer {token}")), request).await
    }

    /// As [`CaClient::create_certificate`], with `authorization` as given (or none).
    pub async fn create_certificate_as(
        &self,
        authorization: Option<&str>,
        request: IstioCertificateRequest,
    ) -> Result<Vec<String>, ClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request(authorization, request))
            .await
            .map_err(|_| ClientError::Timeout { address: self.address.clone() })?
    }

    async fn request(
        &self,
        authorization: Option<&str>,
        request: IstioCertificateRequest,
    ) -> Result<Vec<String>, ClientError> {
        let connect =
            |reason: String| ClientError::Connect { address: self.address.clone(), reason };
        let tcp = TcpStream::connect(&self.dial).await.map_err(|e| connect(e.to_string()))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| connect(format!("TLS: {e}")))?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| connect(format!("HTTP/2: {e}")))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("CA connection: {e}");
            }
        });
        let mut client =
            IstioCertificateServiceClient::with_origin(Channel(send), self.origin.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut req = tonic::Request::new(request);
        if let Some(value) = authorization {
            let value =
                value.parse().map_err(|_| connect("the token is not valid in a header".into()))?;
            req.metadata_mut().insert("authorization", value);
        }
        let answer = client.create_certificate(req).await;
        driver.abort();
        match answer {
            Ok(resp) => Ok(resp.into_inner().cert_chain),
            Err(status) => Err(ClientError::Refused {
                address: self.address.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            }),
        }
    }
}

/// One HTTP/2 connection as the service tonic's client sends its requests through.
#[derive(Clone)]
struct Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower_service::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}
