//! The embedded local CA: signs leaves in-process with rcgen.
//!
//! The signing CA comes from PEM files (a root, or an intermediate with its chain and a
//! root bundle) or, when none is configured, is a self-signed root generated on first start
//! in the state directory (key file mode 0600) and reused after restarts. The CA is held
//! behind an `ArcSwap` so that a later intermediate mode can swap it without locking the
//! signing path.

mod config;

pub use config::LocalConfig;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject,
};
use crate::pki::{self, PkiError};
use crate::trust::{SharedBundle, TrustBundle};

/// Leaves start this far in the past so that clients with a slightly slow clock accept
/// them (istiod does the same).
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);

const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pki { path: PathBuf, source: PkiError },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The CA that signs leaves, and what clients need to link a leaf to a root.
pub struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// Serial of the CA certificate (hex, as x509-parser prints it), for audit records.
    serial_hex: String,
    /// Certificates between the leaf and a root: the signing CA itself unless it is a root,
    /// then its own chain.
    chain: Vec<CertificateDer<'static>>,
    /// The CA certificate's SubjectPublicKeyInfo: leaves it signed may renew with a client
    /// certificate.
    spki: Vec<u8>,
}

impl SigningCa {
    /// Builds a signing CA from its certificate, key and chain, checking they fit together.
    pub fn new(
        ca_cert: CertificateDer<'static>,
        key: KeyPair,
        mut chain: Vec<CertificateDer<'static>>,
    ) -> Result<(Self, Vec<CertificateDer<'static>>), LocalError> {
        let info = pki::cert_info(&ca_cert).map_err(|e| LocalError::Invalid(e.to_string()))?;
        if !info.is_ca {
            return Err(LocalError::Invalid(
                "the CA certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&ca_cert)
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(LocalError::Invalid(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        let spki = parsed.public_key().raw.to_vec();
        let not_after = OffsetDateTime::from_unix_timestamp(info.not_after)
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        let not_before = OffsetDateTime::from_unix_timestamp(info.not_before)
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)?;
        // Roots found in the chain are trust anchors, not chain elements.
        let mut roots = Vec::new();
        let mut links = Vec::new();
        if info.self_signed {
            roots.push(ca_cert);
        } else {
            links.push(ca_cert);
        }
        for c in chain.drain(..) {
            let ci = pki::cert_info(&c).map_err(|e| LocalError::Invalid(e.to_string()))?;
            if ci.self_signed {
                roots.push(c);
            } else {
                links.push(c);
            }
        }
        Ok((
            Self {
                issuer,
                not_before,
                not_after,
                serial_hex: info.serial_hex,
                chain: links,
                spki,
            },
            roots,
        ))
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }

    /// The CA certificate's SubjectPublicKeyInfo (DER).
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// The certificates a leaf of this CA is answered with (leaf-most first, no roots).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs a leaf for `req` (CPU only, no I/O).
    pub fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(req.ttl)
            .map_err(|_| SignError::Rejected("ttl out of range".into()))?;
        let not_after = now.saturating_add(ttl).min(self.not_after);
        if not_after <= now {
            return Err(SignError::Unavailable("the signing CA has expired".into()));
        }
        let public_key = SubjectPublicKeyInfo::from_der(&req.public_key_der)
            .map_err(|e| SignError::Rejected(format!("unsupported public key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // Backdated for clock skew, but never before the CA itself is valid (a freshly
        // rotated intermediate is younger than the skew allowance).
        params.not_before =
            (now - time::Duration::try_from(CLOCK_SKEW).expect("small")).max(self.not_before);
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.subject_alt_names = subject_sans(&req.subject)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| SignError::Internal(format!("signing failed: {e}")))?;
        Ok(IssuedChain::new(cert.der().clone(), self.chain.clone()))
    }
}

fn subject_sans(subject: &Subject) -> Result<Vec<SanType>, SignError> {
    let bad = |e: rcgen::Error| SignError::Rejected(format!("invalid name: {e}"));
    match subject {
        Subject::Workload(id) => Ok(vec![SanType::URI(id.uri().try_into().map_err(bad)?)]),
        Subject::Server { dns_names } => dns_names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.as_str().try_into().map_err(bad)?)),
            })
            .collect(),
    }
}

/// 128 random bits, first byte forced positive and non-zero so the DER INTEGER keeps
/// all 16 bytes.
pub fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

pub struct LocalCa {
    ca: ArcSwap<SigningCa>,
    bundle: watch::Sender<SharedBundle>,
}

impl LocalCa {
    pub fn new(ca: SigningCa, bundle: TrustBundle) -> Self {
        let (tx, _) = watch::channel(Arc::new(bundle));
        Self {
            ca: ArcSwap::from_pointee(ca),
            bundle: tx,
        }
    }

    /// Loads the CA from files, or from/into the state directory when no files are set.
    pub fn load_or_create(cfg: &LocalConfig, trust_domain: &str) -> Result<Self, LocalError> {
        let (ca, mut roots) = match (&cfg.ca_cert_file, &cfg.ca_key_file) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(cert)?;
                let key_pair =
                    pki::load_key_pair(&read(key)?).map_err(|source| LocalError::Pki {
                        path: key.clone(),
                        source,
                    })?;
                let mut certs = certs.into_iter();
                let ca_cert = certs.next().expect("read_certs returns at least one");
                // Extra certificates after the CA in the same file are its chain.
                let mut chain: Vec<_> = certs.collect();
                if let Some(chain_file) = &cfg.chain_file {
                    chain.extend(read_certs(chain_file)?);
                }
                SigningCa::new(ca_cert, key_pair, chain)?
            }
            _ => {
                let (cert, key) = load_or_generate_root(cfg, trust_domain)?;
                SigningCa::new(cert, key, Vec::new())?
            }
        };
        if let Some(bundle_file) = &cfg.root_bundle_file {
            roots = read_certs(bundle_file)?;
        }
        if roots.is_empty() {
            return Err(LocalError::Invalid(
                "no root found: the CA chain does not end in a self-signed root; set rootBundleFile"
                    .into(),
            ));
        }
        let bundle = TrustBundle::new(roots).map_err(|e| LocalError::Invalid(e.to_string()))?;
        Ok(Self::new(ca, bundle))
    }

    /// Replaces the signing CA (and optionally the bundle) without interrupting signing.
    pub fn replace(&self, ca: SigningCa, bundle: Option<TrustBundle>) {
        self.ca.store(Arc::new(ca));
        if let Some(b) = bundle {
            self.bundle.send_replace(Arc::new(b));
        }
    }
}

impl Authority for LocalCa {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }
    fn health(&self) -> Health {
        if self.ca.load().not_after <= OffsetDateTime::now_utc() {
            Health::NotReady("the signing CA has expired".into())
        } else {
            Health::Ready
        }
    }
}

#[async_trait]
impl Signer for LocalCa {
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        self.ca.load().sign(req)
    }

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo {
            not_after: Some(self.ca.load().not_after.unix_timestamp()),
        }
    }

    fn issued_under(&self, issuer: &super::IssuerRef<'_>) -> bool {
        issuer.spki == self.ca.load().spki()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, LocalError> {
    std::fs::read(path).map_err(|source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LocalError> {
    pki::parse_certs_pem(&read(path)?).map_err(|source| LocalError::Pki {
        path: path.to_path_buf(),
        source,
    })
}

fn load_or_generate_root(
    cfg: &LocalConfig,
    trust_domain: &str,
) -> Result<(CertificateDer<'static>, KeyPair), LocalError> {
    let dir = &cfg.state_dir;
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    if cert_path.exists() || key_path.exists() {
        let certs = read_certs(&cert_path)?;
        let key = pki::load_key_pair(&read(&key_path)?).map_err(|source| LocalError::Pki {
            path: key_path.clone(),
            source,
        })?;
        tracing::info!(path = %cert_path.display(), "loaded the local CA root from the state directory");
        return Ok((certs.into_iter().next().expect("non-empty"), key));
    }
    let key = pki::generate_key(cfg.generated_key_type)
        .map_err(|e| LocalError::Invalid(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "istio-ca-bridge local root CA");
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::try_from(cfg.generated_ttl).expect("validated");
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    create_private_dir(dir)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::warn!(path = %cert_path.display(), "generated a new local CA root; every workload must trust it");
    Ok((cert.der().clone(), key))
}

fn create_private_dir(dir: &Path) -> Result<(), LocalError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LocalError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes a file that only the owner can read (private keys).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), LocalError> {
    write_file(path, data, 0o600)
}

/// Writes atomically (temp file + rename) with the given mode set at creation, so a key
/// is never readable by others even for a moment.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), LocalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The backend's name in logs and metric labels.
pub const KIND: &str = "local";

#[async_trait]
impl super::Plugin for LocalConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &crate::validate::Shared) -> Vec<crate::validate::FieldError> {
        LocalConfig::problems(self, shared)
    }

    async fn build(&self, ctx: &super::BuildContext) -> Result<Arc<dyn Signer>, super::BuildError> {
        let ca = LocalCa::load_or_create(self, &ctx.trust_domain)
            .map_err(|e| super::BuildError::new("local CA", e))?;
        Ok(Arc::new(ca))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;
    use crate::pki::KeyType;
    use x509_parser::prelude::*;

    fn ca() -> LocalCa {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LocalConfig {
            state_dir: dir.path().join("ca"),
            ..Default::default()
        };
        LocalCa::load_or_create(&cfg, "cluster.local").unwrap()
    }

    #[tokio::test]
    async fn leaf_basic_constraints_are_strict_der() {
        // DER forbids encoding the default cA=FALSE: the value must be an empty SEQUENCE
        // (what Go/istiod emit). Strict parsers (Python cryptography, BoringSSL) reject
        // anything else; rcgen < 0.14.10 got this wrong.
        let key = crate::pki::generate_key(KeyType::EcdsaP256).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let issued = ca()
            .sign(&SignRequest {
                subject: Subject::Workload(id),
                public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
                csr_der: Vec::new(),
                ttl: Duration::from_secs(3600),
                caller: None,
            })
            .await
            .unwrap();
        let (_, cert) = parse_x509_certificate(&issued.leaf).unwrap();
        let bc = cert
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS)
            .expect("basicConstraints present");
        assert!(bc.critical);
        assert_eq!(bc.value, &[0x30, 0x00]);
    }
}
