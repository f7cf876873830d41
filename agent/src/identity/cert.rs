//! A workload's certificate and private key, as held in memory by the agent.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::SpiffeId;
use super::tls::TrustBundle;
use super::IdentityError;

/// A workload's X.509-SVID: the chain (leaf first, then intermediates) and its private key.
///
/// The private key lives only inside the rustls signing key (`certified_key`); it is never
/// written to disk, never logged, and left out of `Debug`.
pub struct WorkloadCert {
    certified: Arc<CertifiedKey>,
    spiffe_id: SpiffeId,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
    /// Which CA signed it, in words (`certs`, `check`, logs).
    issued_by: Arc<str>,
}

impl WorkloadCert {
    pub(crate) fn new(
        certified: Arc<CertifiedKey>,
        spiffe_id: SpiffeId,
        serial: String,
        not_before: SystemTime,
        not_after: SystemTime,
        renew_at: SystemTime,
        issued_by: Arc<str>,
    ) -> Self {
        Self { certified, spiffe_id, serial, not_before, not_after, renew_at, issued_by }
    }

    /// Builds the certificate of `id` from a CA's answer (`chain`: PEM elements, leaf first;
    /// Istio's CAs put the roots last) to a request made with `key`. Nothing of the answer is
    /// trusted: the leaf must be for `key` and name exactly `id`, and it must verify, with the
    /// answer's other certificates as intermediates, against the node's own `bundle` (never
    /// against roots the answer carries). Certificates of the answer that are roots of the
    /// bundle are not sent in handshakes.
    pub fn from_answer(
        chain: &[String],
        key: &rcgen::KeyPair,
        id: &SpiffeId,
        bundle: &TrustBundle,
        issued_by: Arc<str>,
    ) -> Result<WorkloadCert, IdentityError> {
        use rustls_pki_types::pem::PemObject;
        let bad = |reason: String| IdentityError::Issue { id: id.to_string(), reason };
        let mut certs: Vec<CertificateDer<'static>> = Vec::new();
        for (i, element) in chain.iter().enumerate() {
            let mut found = 0;
            for cert in CertificateDer::pem_slice_iter(element.as_bytes()) {
                let cert =
                    cert.map_err(|e| bad(format!("the answer's element {i} is not PEM: {e}")))?;
                found += 1;
                // A root of ours is the anchor, not part of the chain we present.
                if !certs.is_empty() && bundle.contains(&cert) {
                    continue;
                }
                certs.push(cert);
            }
            if found == 0 {
                return Err(bad(format!("the answer's element {i} holds no certificate")));
            }
        }
        let leaf = certs.first().ok_or_else(|| bad("the answer holds no certificate".into()))?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|e| bad(format!("the answer's leaf does not parse: {e}")))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(bad("the CA answered with a certificate for another key".into()));
        }
        let named = super::tls::peer_identity(&certs[..1])
            .map_err(|e| bad(format!("the answer's leaf: {e}")))?;
        if named != *id {
            return Err(bad(format!("the CA answered with a certificate for {named}")));
        }
        super::tls::verify_chain_now(&certs, bundle).map_err(|e| {
            bad(format!(
                "the answer does not verify against the node's trust bundle: {}",
                super::tls::describe_tls_error(&e)
            ))
        })?;
        let serial = super::ca::hex(parsed.raw_serial());
        let not_before = super::ca::asn1_time(parsed.validity().not_before);
        let not_after = super::ca::asn1_time(parsed.validity().not_after);
        drop(parsed);
        let now = SystemTime::now();
        if not_after <= now {
            return Err(bad("the CA answered with an expired certificate".into()));
        }
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(
            &rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialized_der().to_vec().into()),
        )
        .map_err(|e| bad(format!("loading the key: {e}")))?;
        let renew_at = renewal_instant(now, not_after, rand::random::<f64>());
        Ok(WorkloadCert::new(
            Arc::new(CertifiedKey::new(certs, signing_key)),
            id.clone(),
            serial,
            not_before,
            not_after,
            renew_at,
            issued_by,
        ))
    }

    /// Which CA signed it, in words.
    pub fn issued_by(&self) -> &str {
        &self.issued_by
    }

    /// The certificate chain as sent in the handshake: leaf first, then intermediates
    /// (never the root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // A CertifiedKey is only ever built from a chain that starts with the leaf.
        &self.certified.cert[0]
    }

    /// The chain and signing key in the form rustls uses (shared, so configs are cheap to build).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }

    /// The workload identity in the certificate's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The serial number, lower-case hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Start of validity (backdated a little for clock skew between nodes).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the renewal driver replaces this certificate: half-way through its lifetime
    /// (counted from issuance, not from the backdated not-before) minus a random jitter of up
    /// to 10% of the lifetime, fixed at issuance so that every caller sees the same instant.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at
    }

    /// Whether the certificate is outside its validity period at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after || now < self.not_before
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately absent: Debug output ends up in logs.
        f.debug_struct("WorkloadCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("renew_at", &self.renew_at)
            .field("issued_by", &self.issued_by)
            .field("chain_len", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

/// The serial (lower-case hex, as [`WorkloadCert::serial`]) and end of validity of a DER
/// certificate, e.g. a peer's leaf after a handshake; `None` if it does not parse.
pub fn serial_and_not_after(cert: &CertificateDer<'_>) -> Option<(String, SystemTime)> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    Some((super::ca::hex(parsed.raw_serial()), super::ca::asn1_time(parsed.validity().not_after)))
}

/// The renewal instant for a certificate issued at `issued_at` that expires at `not_after`:
/// half-life minus `jitter_fraction` (0..=1) of 10% of the lifetime.
pub(crate) fn renewal_instant(
    issued_at: SystemTime,
    not_after: SystemTime,
    jitter_fraction: f64,
) -> SystemTime {
    let lifetime = not_after.duration_since(issued_at).unwrap_or(Duration::ZERO);
    let jitter = lifetime.mul_f64(0.1 * jitter_fraction.clamp(0.0, 1.0));
    issued_at + lifetime / 2 - jitter
}

/// A time as RFC 3339 UTC with whole seconds, for logs and error messages.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => fmt_unix(d.as_secs()),
        Err(e) => format!("{} s before 1970", e.duration().as_secs()),
    }
}

/// Seconds since the Unix epoch as RFC 3339 UTC.
pub(crate) fn fmt_unix(secs: u64) -> String {
    match i64::try_from(secs).ok().and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok()) {
        Some(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => format!("{secs} s after 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_minus_at_most_ten_percent() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(100);
        assert_eq!(renewal_instant(t0, end, 0.0), t0 + Duration::from_secs(50));
        assert_eq!(renewal_instant(t0, end, 1.0), t0 + Duration::from_secs(40));
        let mid = renewal_instant(t0, end, 0.5);
        assert_eq!(mid, t0 + Duration::from_secs(45));
        // An already-expired certificate renews immediately rather than panicking.
        assert_eq!(renewal_instant(end, t0, 0.3), end);
    }

    #[test]
    fn serial_and_expiry_are_read_back_from_der() {
        let (_tmp, ca) = super::super::testutil::new_ca("cluster.local");
        let id = super::super::testutil::id("spiffe://cluster.local/ns/a/sa/b");
        let cert = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let (serial, not_after) = serial_and_not_after(cert.leaf()).unwrap();
        assert_eq!(serial, cert.serial());
        assert_eq!(not_after, cert.not_after());
        assert_eq!(serial_and_not_after(&CertificateDer::from(vec![0x30, 0x00])), None);
    }

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(fmt_unix(0), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(fmt_time(t), "2023-11-14T22:13:20Z");
    }

    /// What `ca` answers to a request of `key` for `signed_for`, in the shape Istio's CAs send:
    /// the leaf, then the roots as the last element.
    fn answer(
        ca: &super::super::CaSigner,
        key: &rcgen::KeyPair,
        signed_for: &SpiffeId,
    ) -> Vec<String> {
        let csr = {
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            let mut san = rcgen::CustomExtension::from_oid_content(
                super::super::der::OID_SUBJECT_ALT_NAME,
                super::super::der::san_uri(&signed_for.to_string()),
            );
            san.set_criticality(true);
            params.custom_extensions.push(san);
            params.serialize_request(key).unwrap().pem().unwrap()
        };
        let checked = super::super::csr::check(csr.as_bytes(), "cluster.local").unwrap();
        let mut chain: Vec<String> = ca
            .sign_csr(&checked, Duration::from_secs(3600))
            .unwrap()
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref())))
            .collect();
        chain.push(
            ca.trust_bundle()
                .certs()
                .iter()
                .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref())))
                .collect(),
        );
        chain
    }

    fn refusal(r: Result<WorkloadCert, IdentityError>) -> String {
        match r {
            Ok(c) => panic!("accepted {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_answer_is_believed_only_for_our_key_our_identity_and_our_roots() {
        let (_tmp, ca) = super::super::testutil::new_ca("cluster.local");
        let bundle = ca.trust_bundle().clone();
        let web = super::super::testutil::id("spiffe://cluster.local/ns/shop/sa/web");
        let db = super::super::testutil::id("spiffe://cluster.local/ns/shop/sa/db");
        let (_, key) = super::super::csr::request(&web).unwrap();
        let by: Arc<str> = Arc::from("certificate service https://ca:15012");

        // The honest answer: the root of the last element is not sent in handshakes.
        let good =
            WorkloadCert::from_answer(&answer(&ca, &key, &web), &key, &web, &bundle, by.clone())
                .unwrap();
        assert_eq!(good.spiffe_id(), &web);
        assert_eq!(good.chain().len(), 1, "the root is the peer's anchor, not part of our chain");
        assert_eq!(good.issued_by(), &*by);
        assert!(good.renew_at() < good.not_after());

        // A certificate for another key (someone else's CSR, replayed to us).
        let (_, stranger) = super::super::csr::request(&web).unwrap();
        let e = refusal(WorkloadCert::from_answer(
            &answer(&ca, &stranger, &web),
            &key,
            &web,
            &bundle,
            by.clone(),
        ));
        assert!(e.contains("another key"), "{e}");

        // A certificate for another identity than the one asked for.
        let e = refusal(WorkloadCert::from_answer(
            &answer(&ca, &key, &db),
            &key,
            &web,
            &bundle,
            by.clone(),
        ));
        assert!(e.contains("for spiffe://cluster.local/ns/shop/sa/db"), "{e}");

        // A rogue CA that answers with its own root in the chain: our bundle decides.
        let (_tmp2, rogue) = super::super::testutil::new_ca("cluster.local");
        let e = refusal(WorkloadCert::from_answer(
            &answer(&rogue, &key, &web),
            &key,
            &web,
            &bundle,
            by.clone(),
        ));
        assert!(e.contains("does not verify against the node's trust bundle"), "{e}");

        // Nothing, or not PEM.
        let e = refusal(WorkloadCert::from_answer(&[], &key, &web, &bundle, by.clone()));
        assert!(e.contains("holds no certificate"), "{e}");
        let e = refusal(WorkloadCert::from_answer(&["hello".into()], &key, &web, &bundle, by));
        assert!(e.contains("element 0 holds no certificate"), "{e}");
    }
}
