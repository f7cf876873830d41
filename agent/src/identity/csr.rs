//! Certificate signing requests as the certificate service accepts them: a request names one
//! SPIFFE identity of the trust domain and proves it holds the key, and nothing else. The CA
//! writes every other field of what it issues itself (empty subject, `CA:false`, client and
//! server auth, its own lifetime), so a request cannot ask for more than an identity; one
//! that tries (a DNS name, `CA:true`, key usages, a second identity) is refused with the
//! field named, not silently trimmed: the caller learns what it did wrong.
//!
//! Bounded: the request is at most [`MAX_CSR_BYTES`] before anything parses it.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS9_EXTENSION_REQUEST,
    OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::prelude::FromDer;

use super::spiffe::SpiffeId;

/// The largest request read: a P-256 request with one SAN is under 600 bytes of PEM.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why a request is refused; each names the part of the request at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is {0} bytes, more than {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error("the CSR is neither a PEM CERTIFICATE REQUEST nor DER: {0}")]
    Encoding(String),
    #[error("the CSR does not parse: {0}")]
    Parse(String),
    #[error("the CSR's signature does not verify with the key it carries")]
    Signature,
    #[error("the CSR's key is {0}: only ECDSA P-256 keys are accepted")]
    Key(String),
    #[error("the CSR has attribute {0}: only one extensionRequest is accepted")]
    Attribute(String),
    #[error(
        "the CSR asks for extension {0}: only a subjectAltName is accepted (the CA sets the \
         rest)"
    )]
    Extension(String),
    #[error("the CSR's subjectAltName {0}")]
    San(String),
}

/// A request that passed: the identity it asks for and the key to certify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    pub id: SpiffeId,
    /// The key to certify (a DER SubjectPublicKeyInfo).
    pub public_key: Vec<u8>,
}

/// Checks `csr` (PEM or DER): well formed, self-signed by its key, an ECDSA P-256 key, and
/// asking for exactly one URI SAN that is a SPIFFE id of `trust_domain`, and for nothing else.
pub fn check(csr: &[u8], trust_domain: &str) -> Result<CheckedCsr, CsrError> {
    if csr.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(csr.len()));
    }
    let der: Vec<u8> = if csr.trim_ascii_start().starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map_err(|e| CsrError::Encoding(e.to_string()))?
            .as_ref()
            .to_vec()
    } else {
        csr.to_vec()
    };
    let (rest, req) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Parse(format!("{} bytes after the request", rest.len())));
    }
    req.verify_signature().map_err(|_| CsrError::Signature)?;

    let spki = &req.certification_request_info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        let name = match curve {
            Some(c) if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY => {
                format!("EC on curve {c}")
            }
            _ => format!("of algorithm {}", spki.algorithm.algorithm),
        };
        return Err(CsrError::Key(name));
    }

    // Every attribute is looked at, not the first extension request only (x509-parser's
    // `requested_extensions` reads the first): a second one must not slip extensions past.
    let mut uris = Vec::new();
    let mut requests = 0;
    for attr in req.certification_request_info.attributes() {
        if attr.oid != OID_PKCS9_EXTENSION_REQUEST {
            return Err(CsrError::Attribute(attr.oid.to_id_string()));
        }
        requests += 1;
        if requests > 1 {
            return Err(CsrError::Attribute("extensionRequest, a second time".into()));
        }
        let ParsedCriAttribute::ExtensionRequest(r) = attr.parsed_attribute() else {
            return Err(CsrError::Attribute("extensionRequest, unreadable".into()));
        };
        for ext in &r.extensions {
            if ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
                return Err(CsrError::Extension(extension_name(ext.parsed_extension(), &ext.oid)));
            }
            let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                return Err(CsrError::San("does not parse".into()));
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(*uri),
                    other => return Err(CsrError::San(format!("has {}", general_name(other)))),
                }
            }
        }
    }
    let uri = match uris.as_slice() {
        [one] => *one,
        [] => return Err(CsrError::San("is missing: it must name one SPIFFE id".into())),
        more => return Err(CsrError::San(format!("has {} URIs: it must name one", more.len()))),
    };
    let id: SpiffeId =
        uri.parse().map_err(|e| CsrError::San(format!("URI {uri:?} is not a SPIFFE id: {e}")))?;
    if id.trust_domain() != trust_domain {
        return Err(CsrError::San(format!(
            "URI {uri} is of trust domain {}, not {trust_domain}",
            id.trust_domain()
        )));
    }
    Ok(CheckedCsr { id, public_key: spki.raw.to_vec() })
}

/// A request for `id` as the agent sends it, with the new key it is for (made here, never
/// sent): an empty subject and the identity as the one (critical) URI SAN, as ztunnel's.
pub fn request(id: &SpiffeId) -> Result<(String, rcgen::KeyPair), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let mut san = rcgen::CustomExtension::from_oid_content(
        super::der::OID_SUBJECT_ALT_NAME,
        super::der::san_uri(&id.to_string()),
    );
    san.set_criticality(true);
    params.custom_extensions.push(san);
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((pem, key))
}

fn extension_name(parsed: &ParsedExtension<'_>, oid: &x509_parser::der_parser::Oid<'_>) -> String {
    match parsed {
        ParsedExtension::BasicConstraints(b) => format!("basicConstraints (CA:{})", b.ca),
        ParsedExtension::KeyUsage(_) => "keyUsage".into(),
        ParsedExtension::ExtendedKeyUsage(_) => "extendedKeyUsage".into(),
        ParsedExtension::NameConstraints(_) => "nameConstraints".into(),
        _ => oid.to_id_string(),
    }
}

fn general_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(d) => format!("DNS name {d:?}"),
        GeneralName::IPAddress(_) => "an IP address".into(),
        GeneralName::RFC822Name(m) => format!("email {m:?}"),
        GeneralName::DirectoryName(_) => "a directory name".into(),
        _ => "a name that is not a URI".into(),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, CustomExtension, DistinguishedName, KeyPair, KeyUsagePurpose, SanType,
        PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn params(sans: Vec<SanType>) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        p
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn csr_of(p: CertificateParams, alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr(p: CertificateParams) -> String {
        csr_of(p, &PKCS_ECDSA_P256_SHA256)
    }

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap().as_ref().to_vec()
    }

    #[test]
    fn a_request_for_one_spiffe_id_passes_in_pem_and_der() {
        let pem = csr(params(vec![uri(ID)]));
        let ok = check(pem.as_bytes(), "cluster.local").unwrap();
        assert_eq!(ok.id.to_string(), ID);
        assert_eq!(check(&der_of(&pem), "cluster.local").unwrap(), ok);
    }

    #[test]
    fn the_agents_own_request_passes() {
        let id: SpiffeId = ID.parse().unwrap();
        let (pem, key) = request(&id).unwrap();
        let ok = check(pem.as_bytes(), "cluster.local").unwrap();
        assert_eq!(ok.id, id);
        assert_eq!(ok.public_key, key.public_key_der());
    }

    #[test]
    fn anything_but_one_spiffe_uri_san_is_refused_with_the_field_named() {
        let td = "cluster.local";
        let err = |p: CertificateParams| check(csr(p).as_bytes(), td).unwrap_err();
        assert_eq!(
            err(params(vec![
                uri(ID),
                SanType::DnsName("istiod.istio-system.svc".try_into().unwrap())
            ])),
            CsrError::San("has DNS name \"istiod.istio-system.svc\"".into())
        );
        assert_eq!(
            err(params(vec![uri(ID), uri("spiffe://cluster.local/ns/kube-system/sa/admin")])),
            CsrError::San("has 2 URIs: it must name one".into())
        );
        assert!(matches!(err(params(vec![])), CsrError::San(m) if m.contains("missing")));
        assert!(matches!(
            err(params(vec![uri("spiffe://other.domain/ns/shop/sa/web")])),
            CsrError::San(m) if m.contains("trust domain other.domain")
        ));
        assert!(matches!(
            err(params(vec![uri("https://example.com/web")])),
            CsrError::San(m) if m.contains("not a SPIFFE id")
        ));
        // rcgen will not put basicConstraints in a request: written by hand, CA:TRUE.
        let mut ca = params(vec![uri(ID)]);
        let bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 3, 1, 1, 0xff]);
        ca.custom_extensions.push(bc);
        assert_eq!(err(ca), CsrError::Extension("basicConstraints (CA:true)".into()));
        let mut ku = params(vec![uri(ID)]);
        ku.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        assert_eq!(err(ku), CsrError::Extension("keyUsage".into()));
        let mut other = params(vec![uri(ID)]);
        other.custom_extensions.push(CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![5, 0]));
        assert_eq!(err(other), CsrError::Extension("1.2.3.4".into()));
    }

    #[test]
    fn only_p256_keys_and_valid_signatures_pass() {
        let td = "cluster.local";
        let p384 = csr_of(params(vec![uri(ID)]), &PKCS_ECDSA_P384_SHA384);
        assert!(
            matches!(check(p384.as_bytes(), td), Err(CsrError::Key(k)) if k.contains("1.3.132.0.34"))
        );
        let ed = csr_of(params(vec![uri(ID)]), &PKCS_ED25519);
        assert!(matches!(check(ed.as_bytes(), td), Err(CsrError::Key(_))));
        // A request whose signature is not its key's: the last byte of the signature flipped.
        let mut der = der_of(&csr(params(vec![uri(ID)])));
        let last = der.len() - 1;
        der[last] ^= 1;
        assert_eq!(check(&der, td), Err(CsrError::Signature));
    }

    #[test]
    fn garbage_and_oversized_input_is_refused_before_parsing() {
        let td = "cluster.local";
        assert_eq!(
            check(&vec![b'A'; MAX_CSR_BYTES + 1], td),
            Err(CsrError::TooLarge(MAX_CSR_BYTES + 1))
        );
        assert!(matches!(
            check(b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n", td),
            Err(CsrError::Encoding(_))
        ));
        assert!(matches!(check(b"\x30\x03\x02\x01", td), Err(CsrError::Parse(_))));
        let mut der = der_of(&csr(params(vec![uri(ID)])));
        der.push(0);
        assert!(matches!(check(&der, td), Err(CsrError::Parse(m)) if m.contains("after")));
    }
}
