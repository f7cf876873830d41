//! The CA, kept in Istio's plug-in CA layout so that an existing Istio PKI can be reused:
//!
//! - `ca-cert.pem`: the signing certificate (a root, or an intermediate),
//! - `ca-key.pem`: its private key (PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted),
//! - `root-cert.pem`: the trust bundle, one or more roots (several during a root rotation),
//! - `cert-chain.pem`: `ca-cert.pem` followed by any intermediates up to (optionally
//!   including) a root of the bundle.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
    PKCS_RSA_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::cert::{fmt_time, renewal_instant, WorkloadCert};
use super::csr::CheckedCsr;
use super::der;
use super::spiffe::{validate_trust_domain, SpiffeId};
use super::tls::{describe_tls_error, verify_chain_now, TrustBundle};
use super::IdentityError;

pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// How far certificates are backdated, so that a peer whose clock is a little behind ours
/// does not reject a certificate we just issued as "not valid yet".
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Lifetime of a root made by [`init_ca`] (ten years, as Istio's self-signed root).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ROOT_COMMON_NAME: &str = "mtls-agent root CA";
const INTERMEDIATE_COMMON_NAME: &str = "mtls-agent intermediate CA";
/// Lifetime of an intermediate made by [`sign_intermediate`].
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// The root's key in a root directory (`ca init --root-dir`), kept offline.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// What [`CertIssuer::issue`] returns: a certificate, some time later.
pub type IssueFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>,
>;

/// Anything that can issue workload certificates: the CA of this node ([`CaSigner`], for
/// development), or the certificate service over the network (`certservice::RemoteIssuer`).
/// The store's driver is its only caller; tests stand in for it.
pub trait CertIssuer: Send + Sync {
    /// A new key and a certificate for `id`, valid for about `ttl`.
    fn issue<'a>(&'a self, id: &'a SpiffeId, ttl: Duration) -> IssueFuture<'a>;
    /// Who signs, in words: `certs` and `check` show it.
    fn describe(&self) -> &str;
}

/// Creates a fresh self-signed ECDSA P-256 root in `dir` (created if missing): `ca-cert.pem`
/// = `root-cert.pem` = `cert-chain.pem`, and `ca-key.pem` with mode 0600. Refuses to touch a
/// directory that already holds any of the four files. Returns the loaded CA.
pub fn init_ca(dir: &Path, trust_domain: &str) -> Result<CaSigner, IdentityError> {
    validate_trust_domain(trust_domain)?;
    refuse_existing(dir, &[CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE])?;
    let (key, cert) = new_root(dir, trust_domain)?;
    let cert_pem = cert.pem();
    write_all_new(
        dir,
        &[
            (CA_KEY_FILE, key.serialize_pem(), 0o600),
            (CA_CERT_FILE, cert_pem.clone(), 0o644),
            (ROOT_CERT_FILE, cert_pem.clone(), 0o644),
            (CERT_CHAIN_FILE, cert_pem, 0o644),
        ],
    )?;
    tracing::info!(dir = %dir.display(), trust_domain, "created a new self-signed root CA");
    CaSigner::load(dir)
}

/// Creates a fresh root in `root_dir` (`root-cert.pem`, `root-key.pem`) and an intermediate
/// signed by it in `dir` (Istio's plug-in layout, what `ca serve` and the `cacerts` secret
/// need), so that the root's key can go offline: it is needed again only to sign the next
/// intermediate ([`sign_intermediate`]). Refuses to touch a directory that holds any of its
/// files.
pub fn init_root_and_intermediate(
    root_dir: &Path,
    dir: &Path,
    trust_domain: &str,
) -> Result<CaSigner, IdentityError> {
    validate_trust_domain(trust_domain)?;
    refuse_existing(root_dir, &[ROOT_CERT_FILE, ROOT_KEY_FILE])?;
    refuse_existing(dir, &[CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE])?;
    let (key, cert) = new_root(root_dir, trust_domain)?;
    write_all_new(
        root_dir,
        &[(ROOT_KEY_FILE, key.serialize_pem(), 0o600), (ROOT_CERT_FILE, cert.pem(), 0o644)],
    )?;
    tracing::info!(dir = %root_dir.display(), trust_domain, "created a new root CA: keep this directory offline");
    sign_intermediate(root_dir, dir, trust_domain)
}

/// Signs a new intermediate CA with the root in `root_dir` (`root-cert.pem`, whose first
/// certificate is the root of `root-key.pem`) into `dir`: `ca-cert.pem` and `ca-key.pem` the
/// intermediate, `root-cert.pem` every root of `root_dir` (several during a root rotation),
/// `cert-chain.pem` the intermediate then its root. Valid for two years, or until the root
/// expires if sooner.
pub fn sign_intermediate(
    root_dir: &Path,
    dir: &Path,
    trust_domain: &str,
) -> Result<CaSigner, IdentityError> {
    validate_trust_domain(trust_domain)?;
    refuse_existing(dir, &[CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE])?;
    let roots_path = root_dir.join(ROOT_CERT_FILE);
    let roots = read_certs(&roots_path)?;
    let root =
        roots.first().ok_or_else(|| IdentityError::file(&roots_path, "holds no certificate"))?;
    let root_key = load_key(&root_dir.join(ROOT_KEY_FILE))?;
    let issuer = CertificateParams::from_ca_cert_der(root)
        .and_then(|params| params.self_signed(&root_key))
        .map_err(|e| IdentityError::file(&roots_path, format!("cannot sign with it: {e}")))?;
    let (_, parsed) = X509Certificate::from_der(root)
        .map_err(|e| IdentityError::file(&roots_path, format!("does not parse: {e}")))?;
    // Checked before anything is written: a wrong key would leave an intermediate no
    // verifier accepts in the way of the next attempt.
    if parsed.public_key().raw != root_key.public_key_der().as_slice() {
        return Err(IdentityError::file(
            root_dir.join(ROOT_KEY_FILE),
            format!("is not the key of the first certificate in {ROOT_CERT_FILE}"),
        ));
    }
    let root_not_after = asn1_time(parsed.validity().not_after);
    drop(parsed);

    let ca_err = |e: rcgen::Error| IdentityError::Ca {
        dir: dir.to_path_buf(),
        reason: format!("signing the intermediate: {e}"),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
    // It signs workload certificates only, never another CA.
    let mut params =
        ca_params(trust_domain, INTERMEDIATE_COMMON_NAME, BasicConstraints::Constrained(0));
    let now = SystemTime::now();
    params.not_after = (now + INTERMEDIATE_LIFETIME).min(root_not_after).into();
    let cert = params.signed_by(&key, &issuer, &root_key).map_err(ca_err)?;
    let root_pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE", root.as_ref()));
    let bundle = fs::read_to_string(&roots_path).map_err(|e| IdentityError::io(&roots_path, e))?;
    write_all_new(
        dir,
        &[
            (CA_KEY_FILE, key.serialize_pem(), 0o600),
            (CA_CERT_FILE, cert.pem(), 0o644),
            (ROOT_CERT_FILE, bundle, 0o644),
            (CERT_CHAIN_FILE, format!("{}{root_pem}", cert.pem()), 0o644),
        ],
    )?;
    tracing::info!(dir = %dir.display(), root = %root_dir.display(), "signed a new intermediate CA");
    CaSigner::load(dir)
}

/// Errors if `dir` holds any of `names` (a dangling symlink counts: someone put a file there).
fn refuse_existing(dir: &Path, names: &[&str]) -> Result<(), IdentityError> {
    for name in names {
        let file = dir.join(name);
        if file.symlink_metadata().is_ok() {
            return Err(IdentityError::CaExists { dir: dir.to_path_buf(), file });
        }
    }
    Ok(())
}

/// The fields a CA certificate made here has: `O=<trust domain>`, `CN=<what> <random>`, the
/// CA flag with `constraints`, the signing key usages, a random serial, backdated for clock
/// skew. The caller sets `not_after`.
fn ca_params(trust_domain: &str, what: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    // A random suffix tells CAs apart in logs and lets verifiers see at once that a
    // certificate from another cluster's root is from an unknown CA.
    name.push(DnType::CommonName, format!("{what} {:08x}", rand::random::<u32>()));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = (SystemTime::now() - CLOCK_SKEW).into();
    params
}

/// A new self-signed root: its key and certificate.
fn new_root(dir: &Path, trust_domain: &str) -> Result<(KeyPair, Certificate), IdentityError> {
    let ca_err = |e: rcgen::Error| IdentityError::Ca {
        dir: dir.to_path_buf(),
        reason: format!("generating the root: {e}"),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
    let mut params = ca_params(trust_domain, ROOT_COMMON_NAME, BasicConstraints::Unconstrained);
    let now = SystemTime::now();
    params.not_after = (now + ROOT_LIFETIME).into();
    let cert = params.self_signed(&key).map_err(ca_err)?;
    Ok((key, cert))
}

/// Writes every file new in `dir` (created if missing), or none: a half-made CA would block
/// the next attempt.
fn write_all_new(dir: &Path, files: &[(&str, String, u32)]) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(|e| IdentityError::io(dir, e))?;
    let mut written: Vec<PathBuf> = Vec::new();
    for (name, contents, mode) in files {
        let path = dir.join(name);
        if let Err(e) = write_new_file(&path, contents.as_bytes(), *mode) {
            for done in &written {
                let _ = fs::remove_file(done);
            }
            return Err(e);
        }
        written.push(path);
    }
    Ok(())
}

/// `create_new` makes the no-overwrite promise hold even against a concurrent writer.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io_err = |e| IdentityError::io(path, e);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => IdentityError::CaExists {
                dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                file: path.to_path_buf(),
            },
            _ => io_err(e),
        },
    )?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// A loaded, validated CA that issues workload certificates.
pub struct CaSigner {
    dir: PathBuf,
    /// rcgen's view of ca-cert.pem: its subject and key identifier go into every leaf.
    issuer: Certificate,
    key: KeyPair,
    ca_cert: CertificateDer<'static>,
    /// Whether ca-cert.pem has a subjectKeyIdentifier for leaves to point at (AKI).
    ca_has_ski: bool,
    ca_not_after: SystemTime,
    /// What follows the leaf on the wire: cert-chain.pem minus the roots of the bundle.
    intermediates: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    /// `node-local CA in <dir>`: what the certificates it signed say of their issuer.
    described: String,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No key material in Debug output.
        f.debug_struct("CaSigner")
            .field("dir", &self.dir)
            .field("ca_not_after", &fmt_time(self.ca_not_after))
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.bundle.len())
            .finish_non_exhaustive()
    }
}

impl CaSigner {
    /// Loads and validates the CA in `dir`. Checks, each with an error naming the file: the
    /// files parse, ca-key.pem matches ca-cert.pem, ca-cert.pem is a currently valid CA
    /// allowed to sign certificates, cert-chain.pem starts with ca-cert.pem and ends at (or
    /// just below) a root of root-cert.pem. Finally a probe leaf is issued and verified
    /// exactly as a peer would, so a CA that loads is a CA whose certificates verify.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let root_path = dir.join(ROOT_CERT_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);

        let key = load_key(&key_path)?;
        let ca_certs = read_certs(&cert_path)?;
        if ca_certs.len() > 1 {
            tracing::warn!(
                file = %cert_path.display(),
                count = ca_certs.len(),
                "more than one certificate; using the first as the signing certificate"
            );
        }
        // read_certs never returns an empty list.
        let ca_cert = ca_certs[0].clone();
        let bundle = TrustBundle::from_pem_file(&root_path)?;
        let chain = read_certs(&chain_path)?;

        let (_, ca) = X509Certificate::from_der(&ca_cert).map_err(|e| {
            IdentityError::file(&cert_path, format!("not an X.509 certificate: {e}"))
        })?;
        if ca.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IdentityError::file(
                &key_path,
                format!(
                    "does not match the public key of {CA_CERT_FILE} \
                     (key and certificate come from different CAs?)"
                ),
            ));
        }
        match ca.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(IdentityError::file(
                    &cert_path,
                    "is not a CA certificate (basicConstraints CA:TRUE is missing)",
                ))
            }
            Err(e) => {
                return Err(IdentityError::file(&cert_path, format!("bad basicConstraints: {e}")))
            }
        }
        match ca.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(IdentityError::file(
                    &cert_path,
                    "key usage does not allow signing certificates (keyCertSign)",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(IdentityError::file(&cert_path, format!("bad keyUsage: {e}"))),
        }
        let now = SystemTime::now();
        let ca_not_before = asn1_time(ca.validity().not_before);
        let ca_not_after = asn1_time(ca.validity().not_after);
        if now >= ca_not_after {
            return Err(IdentityError::file(
                &cert_path,
                format!("expired at {}", fmt_time(ca_not_after)),
            ));
        }
        if ca_not_before > now + CLOCK_SKEW {
            return Err(IdentityError::file(
                &cert_path,
                format!("not valid before {} (check the clock)", fmt_time(ca_not_before)),
            ));
        }
        let ca_has_ski = ca
            .extensions()
            .iter()
            .any(|ext| matches!(ext.parsed_extension(), ParsedExtension::SubjectKeyIdentifier(_)));

        if chain[0].as_ref() != ca_cert.as_ref() {
            return Err(IdentityError::file(
                &chain_path,
                format!("must start with the certificate in {CA_CERT_FILE}"),
            ));
        }
        check_chain_reaches_bundle(dir, &chain, &bundle)?;
        let intermediates: Vec<CertificateDer<'static>> =
            chain.iter().filter(|c| !bundle.contains(c)).cloned().collect();

        let issuer = CertificateParams::from_ca_cert_der(&ca_cert)
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| {
                IdentityError::file(
                    &cert_path,
                    format!("cannot be used to issue certificates: {e}"),
                )
            })?;

        let signer = Self {
            described: format!("node-local CA in {}", dir.display()),
            dir: dir.to_path_buf(),
            issuer,
            key,
            ca_cert,
            ca_has_ski,
            ca_not_after,
            intermediates,
            bundle,
        };
        signer.self_check()?;
        Ok(signer)
    }

    /// The directory the CA was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The roots of `root-cert.pem`: what peers' chains are verified against.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The signing certificate (`ca-cert.pem`).
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// When the signing certificate expires; leaves are never issued past it.
    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// Issues a workload certificate for `id`, valid from a minute ago (clock skew) until
    /// `now + ttl`, capped at the CA's own expiry.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let (now, not_after) = self.validity(&id.to_string(), ttl)?;
        self.issue_with_validity(id, now - CLOCK_SKEW, not_after, now)
    }

    /// Signs a checked request ([`super::csr::check`]): a certificate for its identity and
    /// key, as [`CaSigner::issue`] makes one, valid for `ttl` capped at the CA's expiry.
    /// Returns the leaf and the intermediates (the trust bundle is the caller's to add).
    pub fn sign_csr(
        &self,
        csr: &CheckedCsr,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let id = &csr.id;
        let issue_err = |reason: String| IdentityError::Issue { id: id.to_string(), reason };
        let (now, not_after) = self.validity(&id.to_string(), ttl)?;
        let key = rcgen::SubjectPublicKeyInfo::from_der(&csr.public_key)
            .map_err(|e| issue_err(format!("reading the request's key: {e}")))?;
        // Only the key is taken from the request; every other field is the CA's.
        let cert = self
            .leaf_params(id, now - CLOCK_SKEW, not_after)
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| issue_err(format!("signing: {e}")))?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        Ok(chain)
    }

    /// The serving certificate of the certificate service itself: the DNS `names` its
    /// clients dial (`mtls-ca.mtls-system.svc`), server auth only, `CA:false`, its key made
    /// here. Returns it with its renewal time.
    pub fn issue_serving(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), IdentityError> {
        let what = names.join(",");
        let issue_err = |reason: String| IdentityError::Issue { id: what.clone(), reason };
        let (now, not_after) = self.validity(&what, ttl)?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| issue_err(format!("DNS names: {e}")))?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = self.ca_has_ski;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| issue_err(format!("generating the key: {e}")))?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| issue_err(format!("signing: {e}")))?;
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialized_der()),
        ))
        .map_err(|e| issue_err(format!("loading the new key: {e}")))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        let renew_at = renewal_instant(now, not_after, rand::random::<f64>());
        Ok((Arc::new(CertifiedKey::new(chain, signing_key)), renew_at))
    }

    /// When a certificate issued now for `ttl` starts, and ends (capped at the CA's expiry).
    fn validity(
        &self,
        what: &str,
        ttl: Duration,
    ) -> Result<(SystemTime, SystemTime), IdentityError> {
        let id = what;
        let issue_err = |reason: String| IdentityError::Issue { id: id.to_string(), reason };
        if ttl.is_zero() {
            return Err(issue_err("the lifetime must be positive".into()));
        }
        let now = SystemTime::now();
        // An absurd ttl from the config must not overflow SystemTime: cap it like any other
        // ttl that outlives the CA.
        let mut not_after = now.checked_add(ttl).unwrap_or(self.ca_not_after);
        if not_after > self.ca_not_after {
            tracing::warn!(
                identity = %id,
                ca_not_after = %fmt_time(self.ca_not_after),
                "workload certificate lifetime cut short by the CA certificate's expiry"
            );
            not_after = self.ca_not_after;
        }
        if not_after <= now {
            return Err(issue_err(format!(
                "{} expired at {}",
                self.dir.join(CA_CERT_FILE).display(),
                fmt_time(self.ca_not_after)
            )));
        }
        Ok((now, not_after))
    }

    /// A workload certificate's fields: empty subject, the identity only in the (critical)
    /// SAN, `CA:false`, digital signature, server and client auth.
    fn leaf_params(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertificateParams {
        let mut params = CertificateParams::default();
        // Empty subject, identity only in the (then critical) SAN: as Istio's workload certs.
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        // ECDSA keys sign; keyEncipherment would be meaningless for them.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = self.ca_has_ski;
        // rcgen writes SANs non-critical; RFC 5280 wants them critical when the subject is
        // empty, so the SAN goes in as a custom extension.
        let mut san = CustomExtension::from_oid_content(
            der::OID_SUBJECT_ALT_NAME,
            der::san_uri(&id.to_string()),
        );
        san.set_criticality(true);
        params.custom_extensions.push(san);
        params
    }

    /// Issues with an explicit validity; `issued_at` anchors the renewal time. Tests use it
    /// to make certificates that are already expired.
    pub(crate) fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        issued_at: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let issue_err = |reason: String| IdentityError::Issue { id: id.to_string(), reason };
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| issue_err(format!("generating the key: {e}")))?;

        let cert = self
            .leaf_params(id, not_before, not_after)
            .signed_by(&leaf_key, &self.issuer, &self.key)
            .map_err(|e| issue_err(format!("signing: {e}")))?;

        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(leaf_key.serialized_der()),
        ))
        .map_err(|e| issue_err(format!("loading the new key: {e}")))?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());

        // Read back what was written: certificate times have whole seconds only.
        let (_, parsed) = X509Certificate::from_der(&chain[0])
            .map_err(|e| issue_err(format!("parsing the new certificate: {e}")))?;
        let serial = hex(parsed.raw_serial());
        let not_before = asn1_time(parsed.validity().not_before);
        let not_after = asn1_time(parsed.validity().not_after);
        drop(parsed);

        let renew_at = renewal_instant(issued_at, not_after, rand::random::<f64>());
        Ok(WorkloadCert::new(
            Arc::new(CertifiedKey::new(chain, signing_key)),
            id.clone(),
            serial,
            not_before,
            not_after,
            renew_at,
            Arc::from(self.described.as_str()),
        ))
    }

    /// Issues a probe certificate and verifies it the way a peer will. Catches what the
    /// individual checks cannot name precisely (a wrong signature in the chain, a subject
    /// rcgen cannot reproduce byte for byte, a broken intermediate).
    fn self_check(&self) -> Result<(), IdentityError> {
        let ca_err = |reason: String| IdentityError::Ca { dir: self.dir.clone(), reason };
        let probe = SpiffeId::new("cluster.local", "mtls-agent", "ca-self-check")?;
        let cert = self.issue(&probe, Duration::from_secs(60))?;

        let (_, leaf) = X509Certificate::from_der(cert.leaf())
            .map_err(|e| ca_err(format!("probe certificate does not parse: {e}")))?;
        let (_, ca) = X509Certificate::from_der(&self.ca_cert)
            .map_err(|e| ca_err(format!("{CA_CERT_FILE} does not parse: {e}")))?;
        if leaf.issuer().as_raw() != ca.subject().as_raw() {
            return Err(ca_err(format!(
                "the subject of {CA_CERT_FILE} ({}) cannot be reproduced exactly in issued \
                 certificates (repeated or multi-valued attributes?); re-issue it with a simpler subject",
                ca.subject()
            )));
        }
        verify_chain_now(cert.chain(), &self.bundle).map_err(|e| {
            let hint = match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                    " (each certificate of cert-chain.pem must be signed by the next, the last by \
                     a root in root-cert.pem; a root of the same name with another key does not \
                     count)"
                }
                _ => "",
            };
            ca_err(format!(
                "certificates issued by {CA_CERT_FILE} do not verify against {ROOT_CERT_FILE} \
                 with the intermediates of {CERT_CHAIN_FILE}: {}{hint}",
                describe_tls_error(&e)
            ))
        })
    }
}

impl CertIssuer for CaSigner {
    fn issue<'a>(&'a self, id: &'a SpiffeId, ttl: Duration) -> IssueFuture<'a> {
        // A signature takes well under a millisecond: no need to leave the runtime's thread.
        Box::pin(std::future::ready(CaSigner::issue(self, id, ttl)))
    }

    fn describe(&self) -> &str {
        &self.described
    }
}

/// The last certificate of the chain must be a root of the bundle or be issued (by name) by
/// one; this gives a precise message for the commonest mistake, a root-cert.pem from another
/// PKI. Signatures are checked by the probe in `self_check`.
fn check_chain_reaches_bundle(
    dir: &Path,
    chain: &[CertificateDer<'static>],
    bundle: &TrustBundle,
) -> Result<(), IdentityError> {
    let Some(last) = chain.last() else {
        return Ok(());
    };
    if bundle.contains(last) {
        return Ok(());
    }
    let chain_path = dir.join(CERT_CHAIN_FILE);
    let (_, last) = X509Certificate::from_der(last)
        .map_err(|e| IdentityError::file(&chain_path, format!("not an X.509 certificate: {e}")))?;
    let self_signed = last.issuer().as_raw() == last.subject().as_raw();
    if self_signed {
        return Err(IdentityError::Ca {
            dir: dir.to_path_buf(),
            reason: format!(
                "{CERT_CHAIN_FILE} ends with the root \"{}\", which is not in {ROOT_CERT_FILE} \
                 (a root of another PKI with the same name?)",
                last.subject()
            ),
        });
    }
    let mut subjects = Vec::new();
    for root in bundle.certs() {
        if let Ok((_, root)) = X509Certificate::from_der(root) {
            if root.subject().as_raw() == last.issuer().as_raw() {
                return Ok(());
            }
            subjects.push(format!("\"{}\"", root.subject()));
        }
    }
    Err(IdentityError::Ca {
        dir: dir.to_path_buf(),
        reason: format!(
            "{CERT_CHAIN_FILE} ends with \"{}\", issued by \"{}\", which is not a root in \
             {ROOT_CERT_FILE} (it holds {})",
            last.subject(),
            last.issuer(),
            subjects.join(", ")
        ),
    })
}

/// All certificates of a PEM file; at least one, each a parsable X.509 certificate.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = fs::read(path).map_err(|e| IdentityError::io(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::file(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(IdentityError::file(path, "no CERTIFICATE block found"));
    }
    for (i, cert) in certs.iter().enumerate() {
        X509Certificate::from_der(cert).map_err(|e| {
            IdentityError::file(path, format!("certificate #{} is not valid X.509: {e}", i + 1))
        })?;
    }
    Ok(certs)
}

/// The CA key in any of the unencrypted forms OpenSSL and Istio tooling write. ring (through
/// rcgen) only takes PKCS#8, so PKCS#1 and SEC1 keys are wrapped first.
fn load_key(path: &Path) -> Result<KeyPair, IdentityError> {
    let pem_bytes = fs::read(path).map_err(|e| IdentityError::io(path, e))?;
    let key = PrivateKeyDer::from_pem_slice(&pem_bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => IdentityError::file(
            path,
            "no private key found (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY \
             PEM block; encrypted keys are not supported)",
        ),
        other => IdentityError::file(path, format!("not valid PEM: {other}")),
    })?;
    let unusable =
        |detail: String| IdentityError::file(path, format!("not a usable private key: {detail}"));
    match &key {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            KeyPair::try_from(pkcs8).map_err(|e| unusable(e.to_string()))
        }
        PrivateKeyDer::Pkcs1(pkcs1) => {
            let pkcs8 = PrivatePkcs8KeyDer::from(der::pkcs8_from_pkcs1(pkcs1.secret_pkcs1_der()));
            KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_RSA_SHA256)
                .map_err(|e| unusable(format!("RSA key: {e}")))
        }
        PrivateKeyDer::Sec1(sec1) => [der::OID_P256, der::OID_P384]
            .iter()
            .find_map(|curve| {
                let pkcs8 =
                    PrivatePkcs8KeyDer::from(der::pkcs8_from_sec1(sec1.secret_sec1_der(), curve));
                KeyPair::try_from(&pkcs8).ok()
            })
            .ok_or_else(|| unusable("EC key on a curve other than P-256 or P-384".into())),
        _ => Err(unusable("unsupported key format".into())),
    }
}

/// 16 random bytes, first byte 0x01..=0x7f: positive and exactly 16 bytes in DER, so the hex
/// serial is always 32 digits.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn asn1_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::SanType;
    use x509_parser::extensions::GeneralName;

    use super::super::testutil::{
        id, new_ca, openssl, openssl_available, write_intermediate_layout,
    };
    use super::*;

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn a_signed_request_gets_the_cas_fields_around_its_own_key_and_identity() {
        let (_tmp, ca) = new_ca("cluster.local");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut req = CertificateParams::default();
        // A subject naming someone else is not copied: the identity is the SAN alone.
        req.distinguished_name.push(DnType::CommonName, "kubernetes-admin");
        req.subject_alt_names =
            vec![SanType::URI("spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap())];
        let pem = req.serialize_request(&key).unwrap().pem().unwrap();
        let checked = super::super::csr::check(pem.as_bytes(), "cluster.local").unwrap();
        let chain = ca.sign_csr(&checked, Duration::from_secs(3600)).unwrap();
        verify_chain_now(&chain, ca.trust_bundle()).unwrap();
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice(), "the request's key");
        assert!(leaf.subject().as_raw().len() <= 2, "empty subject: {}", leaf.subject());
        let bc = leaf.basic_constraints().unwrap().map(|b| b.value.ca);
        assert_eq!(bc, Some(false));
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        assert_eq!(
            san.value.general_names,
            [GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
        );
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 3600 + CLOCK_SKEW.as_secs() as i64);
    }

    #[test]
    fn init_then_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let ca = init_ca(&dir, "cluster.local").unwrap();

        let mode = fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "ca-key.pem must be private");
        let ca_pem = read(&dir.join(CA_CERT_FILE));
        assert_eq!(ca_pem, read(&dir.join(ROOT_CERT_FILE)));
        assert_eq!(ca_pem, read(&dir.join(CERT_CHAIN_FILE)));

        let loaded = CaSigner::load(&dir).unwrap();
        assert_eq!(loaded.trust_bundle().len(), 1);
        assert_eq!(loaded.ca_cert(), ca.ca_cert());
        assert!(loaded.trust_bundle().contains(loaded.ca_cert()));
        // A self-signed root: nothing goes between the leaf and the root.
        let cert =
            loaded.issue(&id("spiffe://cluster.local/ns/a/sa/b"), Duration::from_secs(60)).unwrap();
        assert_eq!(cert.chain().len(), 1);
        verify_chain_now(cert.chain(), ca.trust_bundle()).unwrap();

        let (_, root) = X509Certificate::from_der(ca.ca_cert()).unwrap();
        assert!(root.subject().to_string().contains("O=cluster.local"), "{}", root.subject());
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        init_ca(&dir, "cluster.local").unwrap();
        let key_before = read(&dir.join(CA_KEY_FILE));

        let err = init_ca(&dir, "cluster.local").unwrap_err();
        assert!(matches!(err, IdentityError::CaExists { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("refusing to overwrite"), "{text}");
        assert!(text.contains(CA_CERT_FILE), "{text}");
        assert_eq!(key_before, read(&dir.join(CA_KEY_FILE)), "key was changed");

        // Any one of the four files is enough to refuse.
        let other = tmp.path().join("partial");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join(ROOT_CERT_FILE), "x").unwrap();
        let text = init_ca(&other, "cluster.local").unwrap_err().to_string();
        assert!(text.contains(ROOT_CERT_FILE), "{text}");
        assert!(!other.join(CA_KEY_FILE).exists());
    }

    #[test]
    fn init_rejects_bad_trust_domain() {
        let tmp = tempfile::tempdir().unwrap();
        let err = init_ca(&tmp.path().join("ca"), "Bad Domain").unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");
        assert!(!tmp.path().join("ca").join(CA_KEY_FILE).exists());
    }

    #[test]
    fn corrupted_key_is_named() {
        let (_tmp, ca) = new_ca("cluster.local");
        let key_path = ca.dir().join(CA_KEY_FILE);

        fs::write(&key_path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let text = CaSigner::load(ca.dir()).unwrap_err().to_string();
        assert!(text.contains(&key_path.display().to_string()), "{text}");
        assert!(text.contains("not a usable private key"), "{text}");

        fs::write(&key_path, "garbage").unwrap();
        let text = CaSigner::load(ca.dir()).unwrap_err().to_string();
        assert!(text.contains(CA_KEY_FILE) && text.contains("no private key found"), "{text}");
    }

    #[test]
    fn mismatched_key_is_named() {
        let (_tmp, ca) = new_ca("cluster.local");
        let (_tmp2, other) = new_ca("cluster.local");
        fs::copy(other.dir().join(CA_KEY_FILE), ca.dir().join(CA_KEY_FILE)).unwrap();
        let text = CaSigner::load(ca.dir()).unwrap_err().to_string();
        assert!(text.contains(CA_KEY_FILE), "{text}");
        assert!(text.contains("does not match the public key of ca-cert.pem"), "{text}");
    }

    #[test]
    fn missing_file_is_named() {
        let (_tmp, ca) = new_ca("cluster.local");
        fs::remove_file(ca.dir().join(CERT_CHAIN_FILE)).unwrap();
        let text = CaSigner::load(ca.dir()).unwrap_err().to_string();
        assert!(text.contains(CERT_CHAIN_FILE), "{text}");
    }

    #[test]
    fn non_ca_certificate_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["leaf.example".to_string()]).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.self_signed(&key).unwrap();
        for name in [CA_CERT_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
            fs::write(dir.join(name), cert.pem()).unwrap();
        }
        fs::write(dir.join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        let text = CaSigner::load(dir).unwrap_err().to_string();
        assert!(text.contains(CA_CERT_FILE) && text.contains("not a CA certificate"), "{text}");
    }

    #[test]
    fn root_from_another_pki_is_refused() {
        let (_tmp, ca) = new_ca("cluster.local");
        let (_tmp2, other) = new_ca("cluster.local");
        fs::copy(other.dir().join(ROOT_CERT_FILE), ca.dir().join(ROOT_CERT_FILE)).unwrap();
        let text = CaSigner::load(ca.dir()).unwrap_err().to_string();
        assert!(text.contains(ROOT_CERT_FILE), "{text}");
        assert!(text.contains("which is not in root-cert.pem"), "{text}");
    }

    #[test]
    fn chain_must_start_with_ca_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let root_pem = write_intermediate_layout(&dir, "Acme");
        fs::write(dir.join(CERT_CHAIN_FILE), root_pem).unwrap();
        let text = CaSigner::load(&dir).unwrap_err().to_string();
        assert!(text.contains(CERT_CHAIN_FILE) && text.contains("must start with"), "{text}");
    }

    #[test]
    fn chain_missing_the_intermediate_link_is_refused() {
        // ca-cert is an intermediate, but root-cert.pem holds a root of another PKI that
        // happens to have the same name: only the signature check can tell.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        write_intermediate_layout(&dir, "Acme");
        let impostor = tmp.path().join("impostor");
        let impostor_root = write_intermediate_layout(&impostor, "Acme");
        fs::write(dir.join(ROOT_CERT_FILE), &impostor_root).unwrap();
        let chain = read(&dir.join(CA_CERT_FILE));
        fs::write(dir.join(CERT_CHAIN_FILE), chain).unwrap();
        let text = CaSigner::load(&dir).unwrap_err().to_string();
        assert!(text.contains("do not verify against root-cert.pem"), "{text}");
        assert!(text.contains("certificate signed by an unknown CA"), "{text}");
    }

    #[test]
    fn issued_leaf_has_the_expected_contents() {
        let (_tmp, ca) = new_ca("cluster.local");
        let spiffe = id("spiffe://cluster.local/ns/shop/sa/cart");
        let before = SystemTime::now();
        let cert = ca.issue(&spiffe, Duration::from_secs(3600)).unwrap();

        assert_eq!(cert.spiffe_id(), &spiffe);
        assert_eq!(cert.serial().len(), 32, "{}", cert.serial());
        assert!(cert.serial().chars().all(|c| c.is_ascii_hexdigit()));
        let skew = before.duration_since(cert.not_before()).unwrap();
        assert!(skew >= Duration::from_secs(59) && skew <= Duration::from_secs(62), "{skew:?}");
        let life = cert.not_after().duration_since(before).unwrap();
        assert!(life >= Duration::from_secs(3598) && life <= Duration::from_secs(3601), "{life:?}");
        // Renewal between 40% and 50% of the lifetime from issuance.
        let renew = cert.renew_at().duration_since(before).unwrap();
        assert!(
            renew >= Duration::from_secs(1438) && renew <= Duration::from_secs(1801),
            "{renew:?}"
        );

        let (_, leaf) = X509Certificate::from_der(cert.leaf()).unwrap();
        assert_eq!(hex(leaf.raw_serial()), cert.serial());
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN must be critical with an empty subject");
        assert_eq!(san.value.general_names.len(), 1);
        assert!(matches!(
            san.value.general_names[0],
            GeneralName::URI("spiffe://cluster.local/ns/shop/sa/cart")
        ));
        assert_eq!(leaf.subject().iter().count(), 0, "subject should be empty");
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_encipherment() && !ku.value.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let (_, ca_cert) = X509Certificate::from_der(ca.ca_cert()).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca_cert.subject().as_raw());
        assert!(leaf
            .extensions()
            .iter()
            .any(|e| matches!(e.parsed_extension(), ParsedExtension::AuthorityKeyIdentifier(_))));

        // Every issuance gets a fresh key and serial.
        let again = ca.issue(&spiffe, Duration::from_secs(3600)).unwrap();
        assert_ne!(again.serial(), cert.serial());
        assert_ne!(
            X509Certificate::from_der(again.leaf()).unwrap().1.public_key().raw,
            leaf.public_key().raw
        );

        let debug = format!("{cert:?}");
        assert!(debug.contains("spiffe://cluster.local/ns/shop/sa/cart"), "{debug}");
        assert!(!debug.to_lowercase().contains("key"), "Debug must not show the key: {debug}");
    }

    #[test]
    fn huge_ttl_is_capped_at_the_ca_expiry() {
        let (_tmp, ca) = new_ca("cluster.local");
        let cert = ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), Duration::MAX).unwrap();
        let ca_not_after_secs =
            ca.ca_not_after().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let leaf_secs = cert.not_after().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(leaf_secs, ca_not_after_secs);
    }

    #[test]
    fn zero_ttl_is_refused() {
        let (_tmp, ca) = new_ca("cluster.local");
        let err = ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("spiffe://cluster.local/ns/a/sa/b"), "{err}");
    }

    #[test]
    fn a_root_cert_file_with_two_roots_loads_and_verifies_leaves_from_either() {
        // Root rotation: this CA's directory also trusts the next root, listed first.
        let (_tmp, current) = new_ca("cluster.local");
        let (_tmp2, next) = new_ca("cluster.local");
        let dir = current.dir().to_path_buf();
        let both = format!(
            "{}{}",
            read(&next.dir().join(ROOT_CERT_FILE)),
            read(&dir.join(ROOT_CERT_FILE))
        );
        fs::write(dir.join(ROOT_CERT_FILE), both).unwrap();
        let ca = CaSigner::load(&dir).unwrap();
        assert_eq!(ca.trust_bundle().len(), 2);
        let leaf_id = id("spiffe://cluster.local/ns/a/sa/b");
        for issuer in [&ca, &next] {
            let cert = issuer.issue(&leaf_id, Duration::from_secs(60)).unwrap();
            verify_chain_now(cert.chain(), ca.trust_bundle()).unwrap();
        }
        // Trusting two roots is not trusting everyone.
        let (_tmp3, stranger) = new_ca("cluster.local");
        let cert = stranger.issue(&leaf_id, Duration::from_secs(60)).unwrap();
        let err = verify_chain_now(cert.chain(), ca.trust_bundle()).unwrap_err();
        assert_eq!(describe_tls_error(&err), "certificate signed by an unknown CA");
    }

    #[test]
    fn intermediate_layout_issues_leaves_that_chain_to_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        write_intermediate_layout(&dir, "Acme");
        let ca = CaSigner::load(&dir).unwrap();
        assert_eq!(ca.trust_bundle().len(), 1);
        let cert =
            ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), Duration::from_secs(60)).unwrap();
        // Leaf + intermediate; the root stays out of the handshake.
        assert_eq!(cert.chain().len(), 2);
        assert_eq!(&cert.chain()[1], ca.ca_cert());
        verify_chain_now(cert.chain(), ca.trust_bundle()).unwrap();
        // Without the intermediate the leaf does not verify: it really is below it.
        let err = verify_chain_now(&cert.chain()[..1], ca.trust_bundle()).unwrap_err();
        assert_eq!(describe_tls_error(&err), "certificate signed by an unknown CA");
    }

    #[test]
    fn expired_leaf_can_be_made_for_tests() {
        let (_tmp, ca) = new_ca("cluster.local");
        let now = SystemTime::now();
        let cert = ca
            .issue_with_validity(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
                now - Duration::from_secs(7200),
            )
            .unwrap();
        assert!(cert.is_expired_at(now));
        let err = verify_chain_now(cert.chain(), ca.trust_bundle()).unwrap_err();
        assert!(describe_tls_error(&err).starts_with("certificate expired"), "{err}");
    }

    /// An Istio-style plug-in CA made with openssl, as operators have it: an RSA root with a
    /// PKCS#1 key, and intermediates with a SEC1 EC key or a PKCS#1 RSA key. Our leaves must
    /// pass `openssl verify -x509_strict` against it.
    #[test]
    fn openssl_made_istio_ca_interoperates() {
        if !openssl_available() {
            eprintln!("openssl not found; skipping the interop test");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root_dir = tmp.path();
        openssl(root_dir, &["genrsa", "-traditional", "-out", "root-key.pem", "2048"]);
        assert!(read(&root_dir.join("root-key.pem")).contains("BEGIN RSA PRIVATE KEY"));
        openssl(
            root_dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "root-key.pem",
                "-sha256",
                "-days",
                "3650",
                "-subj",
                "/O=Istio/CN=Root CA",
                "-addext",
                "basicConstraints=critical,CA:true",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "root-cert.pem",
            ],
        );
        fs::write(
            root_dir.join("ext.cnf"),
            "[v3_ca]\nbasicConstraints=critical,CA:true,pathlen:0\n\
             keyUsage=critical,digitalSignature,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n\
             subjectAltName=DNS:istiod.istio-system.svc\n",
        )
        .unwrap();

        for (name, keygen) in [
            ("ec-sec1", vec!["ecparam", "-name", "prime256v1", "-genkey", "-out"]),
            ("rsa-pkcs1", vec!["genrsa", "-traditional", "-out"]),
        ] {
            let dir = root_dir.join(name);
            fs::create_dir_all(&dir).unwrap();
            let mut args = keygen.clone();
            args.push("ca-key.pem");
            if name.starts_with("rsa") {
                args.push("2048");
            }
            openssl(&dir, &args);
            let key_pem = read(&dir.join("ca-key.pem"));
            assert!(
                key_pem.contains("BEGIN EC PRIVATE KEY")
                    || key_pem.contains("BEGIN RSA PRIVATE KEY"),
                "{key_pem}"
            );
            openssl(
                &dir,
                &[
                    "req",
                    "-new",
                    "-key",
                    "ca-key.pem",
                    "-subj",
                    &format!("/O=Istio/CN=Intermediate CA/L={name}"),
                    "-out",
                    "ca.csr",
                ],
            );
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    "ca.csr",
                    "-CA",
                    "../root-cert.pem",
                    "-CAkey",
                    "../root-key.pem",
                    "-CAcreateserial",
                    "-days",
                    "730",
                    "-sha256",
                    "-extfile",
                    "../ext.cnf",
                    "-extensions",
                    "v3_ca",
                    "-out",
                    "ca-cert.pem",
                ],
            );
            fs::copy(root_dir.join("root-cert.pem"), dir.join("root-cert.pem")).unwrap();
            let chain =
                format!("{}{}", read(&dir.join("ca-cert.pem")), read(&dir.join("root-cert.pem")));
            fs::write(dir.join("cert-chain.pem"), chain).unwrap();

            let ca = CaSigner::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
            let cert = ca
                .issue(&id("spiffe://cluster.local/ns/default/sa/web"), Duration::from_secs(600))
                .unwrap();
            assert_eq!(cert.chain().len(), 2);
            fs::write(dir.join("leaf.der"), cert.leaf().as_ref()).unwrap();
            openssl(&dir, &["x509", "-inform", "DER", "-in", "leaf.der", "-out", "leaf.pem"]);
            for purpose in ["sslclient", "sslserver"] {
                let out = openssl(
                    &dir,
                    &[
                        "verify",
                        "-x509_strict",
                        "-purpose",
                        purpose,
                        "-CAfile",
                        "root-cert.pem",
                        "-untrusted",
                        "cert-chain.pem",
                        "leaf.pem",
                    ],
                );
                assert!(out.contains("leaf.pem: OK"), "{name}/{purpose}: {out}");
            }
        }

        // Our own root passes the strict checks too.
        let (_tmp2, ours) = new_ca("cluster.local");
        let cert = ours
            .issue(&id("spiffe://cluster.local/ns/default/sa/web"), Duration::from_secs(600))
            .unwrap();
        let dir = ours.dir();
        fs::write(dir.join("leaf.der"), cert.leaf().as_ref()).unwrap();
        openssl(dir, &["x509", "-inform", "DER", "-in", "leaf.der", "-out", "leaf.pem"]);
        let out = openssl(dir, &["verify", "-x509_strict", "-CAfile", ROOT_CERT_FILE, "leaf.pem"]);
        assert!(out.contains("leaf.pem: OK"), "{out}");
        let _ = SanType::URI; // (keeps the rcgen import list honest across versions)
    }

    #[test]
    fn a_root_kept_apart_signs_intermediates_whose_certificates_one_bundle_trusts() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, first, second) =
            (tmp.path().join("root"), tmp.path().join("ca1"), tmp.path().join("ca2"));
        let ca1 = init_root_and_intermediate(&root, &first, "cluster.local").unwrap();
        // The root's key is only in the root directory; the signing directory has the
        // intermediate's.
        assert!(root.join(ROOT_KEY_FILE).exists() && !first.join(ROOT_KEY_FILE).exists());
        let root_key = fs::read(root.join(ROOT_KEY_FILE)).unwrap();
        assert_ne!(fs::read(first.join(CA_KEY_FILE)).unwrap(), root_key);
        assert_eq!(
            fs::metadata(root.join(ROOT_KEY_FILE)).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let id = super::super::testutil::id("spiffe://cluster.local/ns/shop/sa/web");
        let leaf = ca1.issue(&id, Duration::from_secs(600)).unwrap();
        assert_eq!(leaf.chain().len(), 2, "leaf and intermediate, never the root");
        let bundle = TrustBundle::from_pem_file(&root.join(ROOT_CERT_FILE)).unwrap();
        verify_chain_now(leaf.chain(), &bundle).unwrap();
        let (_, inter) = X509Certificate::from_der(&leaf.chain()[1]).unwrap();
        let bc = inter.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0), "an intermediate that signs no CA");

        // Later, with the root brought back: a new intermediate, trusted by the same bundle.
        let ca2 = sign_intermediate(&root, &second, "cluster.local").unwrap();
        let leaf2 = ca2.issue(&id, Duration::from_secs(600)).unwrap();
        assert_ne!(leaf2.chain()[1], leaf.chain()[1]);
        verify_chain_now(leaf2.chain(), &bundle).unwrap();
        // Nothing is overwritten.
        assert!(matches!(
            sign_intermediate(&root, &second, "cluster.local"),
            Err(IdentityError::CaExists { .. })
        ));
        assert!(matches!(
            init_root_and_intermediate(&root, &tmp.path().join("ca3"), "cluster.local"),
            Err(IdentityError::CaExists { .. })
        ));
        assert!(!tmp.path().join("ca3").join(CA_KEY_FILE).exists());
        // Another root's key is refused before anything is written.
        let other = tmp.path().join("other");
        init_root_and_intermediate(&other, &tmp.path().join("ca4"), "cluster.local").unwrap();
        fs::copy(other.join(ROOT_KEY_FILE), tmp.path().join("wrong-key.pem")).unwrap();
        fs::remove_file(root.join(ROOT_KEY_FILE)).unwrap();
        fs::copy(tmp.path().join("wrong-key.pem"), root.join(ROOT_KEY_FILE)).unwrap();
        let e = sign_intermediate(&root, &tmp.path().join("ca5"), "cluster.local").unwrap_err();
        assert!(e.to_string().contains("is not the key of the first certificate"), "{e}");
        assert!(!tmp.path().join("ca5").join(CA_CERT_FILE).exists());
    }
}
