//! SPIFFE ids of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE id the SPIFFE spec allows (bytes, whole URI).
const MAX_ID_LEN: usize = 2048;
/// The longest trust domain the SPIFFE spec allows (it is a DNS-like name).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not an acceptable SPIFFE id or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE id {input:?}: {reason}")]
pub struct SpiffeIdError {
    /// The text that was rejected (the whole id, or the trust domain alone).
    pub input: String,
    /// What is wrong with it, for the operator.
    pub reason: String,
}

impl SpiffeIdError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self { input: input.to_string(), reason: reason.into() }
    }
}

/// The identity of a Kubernetes workload: trust domain, namespace and service account.
///
/// Fields are private so that every value is valid (checked by [`SpiffeId::new`] and parsing);
/// an id that reaches a certificate or a comparison is always well-formed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an id from its parts, applying the same rules as parsing.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        let text = id.to_string();
        validate_trust_domain(trust_domain).map_err(|e| SpiffeIdError::new(&text, e.reason))?;
        validate_segment(namespace, "namespace").map_err(|r| SpiffeIdError::new(&text, r))?;
        validate_segment(service_account, "service account")
            .map_err(|r| SpiffeIdError::new(&text, r))?;
        if text.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::new(&text, format!("longer than {MAX_ID_LEN} bytes")));
        }
        Ok(id)
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| SpiffeIdError::new(s, reason);
        if s.len() > MAX_ID_LEN {
            return Err(err("longer than 2048 bytes"));
        }
        // The spec normalises the scheme to lower case; anything else is not an id we issued.
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| err("must start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| err("missing path /ns/<namespace>/sa/<service-account>"))?;
        validate_trust_domain(trust_domain).map_err(|e| err(&e.reason))?;
        let segments: Vec<&str> = path.split('/').collect();
        if segments.iter().any(|seg| seg.is_empty()) {
            return Err(err("empty path segment (double or trailing slash)"));
        }
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                validate_segment(namespace, "namespace").map_err(|r| err(&r))?;
                validate_segment(service_account, "service account").map_err(|r| err(&r))?;
                Ok(Self {
                    trust_domain: trust_domain.to_string(),
                    namespace: namespace.to_string(),
                    service_account: service_account.to_string(),
                })
            }
            _ => Err(err("path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

/// Checks a trust domain by the SPIFFE rules: lower-case letters, digits, `.`, `-`, `_`.
/// This also rules out ports, user info, upper case and percent-encoding.
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    let err = |reason: &str| SpiffeIdError::new(trust_domain, format!("trust domain {reason}"));
    if trust_domain.is_empty() {
        return Err(err("is empty"));
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(err("is longer than 255 bytes"));
    }
    if let Some(bad) = trust_domain
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(err(&format!("{trust_domain:?} contains {bad:?} (allowed: a-z 0-9 . - _)")));
    }
    Ok(())
}

/// Checks one path segment by the SPIFFE rules: letters, digits, `.`, `-`, `_`, and not a
/// relative segment (`.` or `..`).
fn validate_segment(segment: &str, what: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if segment == "." || segment == ".." {
        return Err(format!("{what} {segment:?} is a relative path segment"));
    }
    if let Some(bad) =
        segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("{what} {segment:?} contains {bad:?} (allowed: A-Z a-z 0-9 . - _)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/frontend".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "frontend");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/frontend");
        assert_eq!(SpiffeId::new("cluster.local", "default", "frontend").unwrap(), id);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "https://cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/serviceaccount/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#frag",
            "spiffe://cluster.local/ns/a%20b/sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn new_validates_parts() {
        assert!(SpiffeId::new("cluster.local", "", "sa").is_err());
        assert!(SpiffeId::new("cluster.local", "ns", "a/b").is_err());
        assert!(SpiffeId::new("bad domain", "ns", "sa").is_err());
        let e = SpiffeId::new("Cluster.local", "ns", "sa").unwrap_err();
        assert!(e.to_string().contains("trust domain"), "{e}");
    }

    #[test]
    fn error_names_the_input() {
        let e = "spiffe://cluster.local/ns/a".parse::<SpiffeId>().unwrap_err();
        let text = e.to_string();
        assert!(text.contains("spiffe://cluster.local/ns/a"), "{text}");
        assert!(text.contains("/ns/<namespace>/sa/<service-account>"), "{text}");
    }
}
