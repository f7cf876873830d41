//! The agent's certificates from the certificate service: the key is made here and never
//! leaves the node; the CSR goes to the CA (ours or istiod) with the node's token, and the
//! answer is believed only once it verifies against the node's own trust bundle, for our key
//! and the identity asked for.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::client::{request_for, CaClient, ClientError};
use crate::identity::{
    csr, CertIssuer, IdentityError, IssueFuture, SharedTrust, SpiffeId, TrustBundle, WorkloadCert,
};

/// The largest token file read: a projected ServiceAccount token is about 1 KiB.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: &'static str },
}

/// The node's token, read again for every request (a projected token is rotated on disk).
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let io = |source| TokenError::Io { path: path.to_owned(), source };
    let bad = |reason| TokenError::Bad { path: path.to_owned(), reason };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(bad("larger than 64 KiB: not a token"));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("holds characters a bearer token cannot have"));
    }
    Ok(token.to_owned())
}

/// Issues through the certificate service at `address`.
pub struct RemoteIssuer {
    address: String,
    server_name: Option<String>,
    /// The client, made again when the trust bundle changes (the service's certificate may
    /// come from a new root after a rotation), with the bundle version it was made for.
    client: Mutex<(u64, Arc<CaClient>)>,
    token_file: PathBuf,
    trust: Arc<SharedTrust>,
    described: String,
}

impl RemoteIssuer {
    /// `trust`: the roots the service's certificate and every answer must lead to (the node's
    /// trust bundle, `--ca-root`).
    pub fn new(
        address: &str,
        server_name: Option<&str>,
        token_file: PathBuf,
        trust: Arc<SharedTrust>,
    ) -> Result<RemoteIssuer, ClientError> {
        let (version, bundle) = trust.current();
        let client = CaClient::new(address, &bundle, server_name)?;
        Ok(RemoteIssuer {
            described: format!("certificate service {address}"),
            address: address.to_owned(),
            server_name: server_name.map(str::to_owned),
            client: Mutex::new((version, Arc::new(client))),
            token_file,
            trust,
        })
    }

    /// The client for the current bundle, and the bundle.
    fn client(&self) -> Result<(Arc<CaClient>, TrustBundle), ClientError> {
        let (version, bundle) = self.trust.current();
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if c.0 != version {
            let fresh = CaClient::new(&self.address, &bundle, self.server_name.as_deref())?;
            *c = (version, Arc::new(fresh));
        }
        Ok((c.1.clone(), bundle))
    }

    async fn fetch(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let issue = |reason: String| IdentityError::Issue { id: id.to_string(), reason };
        let token = read_token(&self.token_file).map_err(|e| issue(format!("the token: {e}")))?;
        let (pem, key) = csr::request(id).map_err(|e| issue(format!("making the CSR: {e}")))?;
        let (client, bundle) = self.client().map_err(|e| issue(e.to_string()))?;
        // A node agent names the pod's identity, as ztunnel does: istiod needs it.
        let chain = client
            .create_certificate(&token, request_for(pem, ttl, Some(id)))
            .await
            .map_err(|e| issue(e.to_string()))?;
        WorkloadCert::from_answer(&chain, &key, id, &bundle, Arc::from(self.described.as_str()))
    }
}

impl CertIssuer for RemoteIssuer {
    fn issue<'a>(&'a self, id: &'a SpiffeId, ttl: Duration) -> IssueFuture<'a> {
        Box::pin(self.fetch(id, ttl))
    }

    fn describe(&self) -> &str {
        &self.described
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc.def-ghi\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc.def-ghi");
        std::fs::write(&path, "  \n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().ends_with("is empty"));
        std::fs::write(&path, "two words").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("cannot have"));
        std::fs::write(&path, vec![b'a'; 65 * 1024]).unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("64 KiB"));
        let missing = read_token(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
    }
}
