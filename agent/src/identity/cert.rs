//! A workload's certificate and private key, as held in memory by the agent.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::SpiffeId;

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
}

impl WorkloadCert {
    pub(crate) fn new(
        certified: Arc<CertifiedKey>,
        spiffe_id: SpiffeId,
        serial: String,
        not_before: SystemTime,
        not_after: SystemTime,
        renew_at: SystemTime,
    ) -> Self {
        Self { certified, spiffe_id, serial, not_before, not_after, renew_at }
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
}
