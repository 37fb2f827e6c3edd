//! The embedded local CA: signs leaves in-process with rcgen.
//!
//! The signing CA comes from PEM files (a root, or an intermediate with its chain and a
//! root bundle) or, when none is configured, is a self-signed root generated on first start
//! in the state directory (key file mode 0600) and reused after restarts. The CA is held
//! behind an `ArcSwap` so that a later intermediate mode can swap it without locking the
//! signing path.

mod config;
mod rotation;
pub mod store;

pub use config::LocalConfig;
pub use store::{CaDocument, CaStore, FileStore, KeyedCert, StoreError, Stored};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
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
    /// The key is RSA: a signature costs about a millisecond of CPU ([`sign_off_workers`]).
    rsa: bool,
    own: OwnIssuer,
}

/// Marks the leaves of one [`SigningCa`], whose key was matched with its certificate once,
/// when it was built. [`super::checked`] verifies the chain of the first such leaf (per CA
/// and trust bundle) as clients do and checks every later one's key, names, profile and
/// lifetime without verifying its signature again: the key that made it is the one the
/// verified chain certifies. Only [`SigningCa::new`] makes one; clones are the same CA.
#[derive(Clone)]
pub struct OwnIssuer(Arc<OwnInner>);

struct OwnInner {
    /// The chain a leaf is answered with, as PEM (encoded once).
    chain_pem: Vec<String>,
}

impl OwnIssuer {
    /// Whether both mark the leaves of the same CA.
    pub fn same(&self, other: &OwnIssuer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The PEM of each certificate of [`SigningCa::chain`], in order.
    pub fn chain_pem(&self) -> &[String] {
        &self.0.chain_pem
    }
}

impl std::fmt::Debug for OwnIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnIssuer")
            .field("chain", &self.0.chain_pem.len())
            .finish()
    }
}

/// Signs with `ca` on the blocking pool when its key is RSA (about a millisecond of CPU per
/// signature, which would hold up the async workers that serve every other call), inline
/// otherwise (an ECDSA signature costs less than handing it to another thread, and the
/// request is not copied).
pub async fn sign_off_workers(
    ca: &Arc<SigningCa>,
    req: &SignRequest,
) -> Result<IssuedChain, SignError> {
    if !ca.rsa {
        return ca.sign(req);
    }
    let (ca, req) = (ca.clone(), req.clone());
    run_off_workers(true, move || ca.sign(&req)).await
}

/// Runs `sign` on the blocking pool when `off` is set, inline otherwise.
async fn run_off_workers<F>(off: bool, sign: F) -> Result<IssuedChain, SignError>
where
    F: FnOnce() -> Result<IssuedChain, SignError> + Send + 'static,
{
    if !off {
        return sign();
    }
    tokio::task::spawn_blocking(sign)
        .await
        .map_err(|e| SignError::Internal(format!("the signing task failed: {e}")))?
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
        let rsa = [
            &rcgen::PKCS_RSA_SHA256,
            &rcgen::PKCS_RSA_SHA384,
            &rcgen::PKCS_RSA_SHA512,
        ]
        .contains(&key.algorithm());
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
        let own = OwnIssuer(Arc::new(OwnInner {
            chain_pem: links.iter().map(|c| pki::cert_pem(c)).collect(),
        }));
        Ok((
            Self {
                issuer,
                not_before,
                not_after,
                serial_hex: info.serial_hex,
                chain: links,
                spki,
                rsa,
                own,
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

    /// Whether the CA key is RSA.
    pub fn is_rsa(&self) -> bool {
        self.rsa
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
        let mut issued = IssuedChain::new(cert.der().clone(), self.chain.clone());
        issued.own = Some(self.own.clone());
        Ok(issued)
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

/// What signs and what is trusted right now: swapped as a whole when the CA or, during a
/// root rotation, the phase changes, without locking the signing path.
pub(crate) struct Core {
    ca: ArcSwap<SigningCa>,
    bundle: watch::Sender<SharedBundle>,
    /// SubjectPublicKeyInfos of the roots whose leaves may renew with a client certificate.
    renewable: ArcSwap<Vec<Vec<u8>>>,
    /// The latest NotAfter of the workload certificates this replica signed (unix
    /// seconds): how long a rotation phase must wait at least for those already out.
    signed_until: AtomicI64,
}

impl Core {
    fn new(ca: SigningCa, bundle: TrustBundle, renewable: Vec<Vec<u8>>) -> Self {
        let (tx, _) = watch::channel(Arc::new(bundle));
        Self {
            ca: ArcSwap::from_pointee(ca),
            bundle: tx,
            renewable: ArcSwap::from_pointee(renewable),
            signed_until: AtomicI64::new(0),
        }
    }

    /// Installs a CA and bundle. Every receiver of the bundle is told, even when the roots
    /// are unchanged: a new signing root must reach the serving and istiod certificates.
    fn install(&self, ca: SigningCa, bundle: TrustBundle, renewable: Vec<Vec<u8>>) {
        self.ca.store(Arc::new(ca));
        self.renewable.store(Arc::new(renewable));
        self.bundle.send_replace(Arc::new(bundle));
    }
}

pub struct LocalCa {
    core: Arc<Core>,
    /// For a generated root: its shared state and rotation.
    rotation: Option<Arc<rotation::Controller>>,
    _stop: Option<tokio_util::sync::DropGuard>,
}

impl LocalCa {
    pub fn new(ca: SigningCa, bundle: TrustBundle) -> Self {
        let renewable = vec![ca.spki().to_vec()];
        Self {
            core: Arc::new(Core::new(ca, bundle, renewable)),
            rotation: None,
            _stop: None,
        }
    }

    /// Loads the CA from files, or, when none are set, from (or into) `store`: the state
    /// directory unless another store is handed in. A generated root can rotate.
    pub async fn open(cfg: &LocalConfig, ctx: &super::BuildContext) -> Result<Self, LocalError> {
        if cfg.ca_cert_file.is_some() {
            return Self::from_files(cfg);
        }
        let state_dir = FileStore::new(cfg.state_dir.clone());
        let (store, import_from): (Arc<dyn CaStore>, Option<&dyn CaStore>) = match &ctx.ca_store {
            Some(shared) => (shared.clone(), Some(&state_dir)),
            None => (Arc::new(FileStore::new(cfg.state_dir.clone())), None),
        };
        let controller = rotation::Controller::open(
            store,
            import_from,
            cfg,
            &ctx.trust_domain,
            ctx.rotation.clone(),
            ctx.max_leaf_ttl,
            ctx.metrics.clone(),
        )
        .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        controller.spawn(stop.clone());
        Ok(Self {
            core: controller.core(),
            rotation: Some(controller),
            _stop: Some(stop.drop_guard()),
        })
    }

    /// [`Self::open`] with the default rotation settings and a 24 h maximum leaf lifetime
    /// (tests and tools that build a CA outside a bridge).
    pub async fn open_standalone(
        cfg: &LocalConfig,
        trust_domain: &str,
    ) -> Result<Self, LocalError> {
        let ctx = super::BuildContext {
            trust_domain: trust_domain.to_string(),
            max_leaf_ttl: Duration::from_secs(24 * 3600),
            metrics: Arc::new(crate::metrics::Metrics::new(false)),
            rotation: Default::default(),
            ca_store: None,
        };
        Self::open(cfg, &ctx).await
    }

    /// The CA from `caCertFile`/`caKeyFile` (and its chain and bundle files).
    pub fn from_files(cfg: &LocalConfig) -> Result<Self, LocalError> {
        let (Some(cert), Some(key)) = (&cfg.ca_cert_file, &cfg.ca_key_file) else {
            return Err(LocalError::Invalid(
                "caCertFile and caKeyFile must be set together".into(),
            ));
        };
        let certs = read_certs(cert)?;
        let key_pair = pki::load_key_pair(&read(key)?).map_err(|source| LocalError::Pki {
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
        let (ca, mut roots) = SigningCa::new(ca_cert, key_pair, chain)?;
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
        let renewable = vec![ca.spki().to_vec()];
        let bundle = bundle.unwrap_or_else(|| (**self.core.bundle.borrow()).clone());
        self.core.install(ca, bundle, renewable);
    }
}

impl Authority for LocalCa {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.core.bundle.subscribe()
    }
    fn health(&self) -> Health {
        if self.core.ca.load().not_after <= OffsetDateTime::now_utc() {
            Health::NotReady("the signing CA has expired".into())
        } else {
            Health::Ready
        }
    }
}

#[async_trait]
impl Signer for LocalCa {
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let ca = self.core.ca.load_full();
        let issued = sign_off_workers(&ca, req).await?;
        // Workload certificates only: the serving and istiod certificates are re-issued
        // when a rotation's phase changes, so no phase waits for them.
        if !matches!(req.subject, Subject::Workload(_)) {
            return Ok(issued);
        }
        let until = (OffsetDateTime::now_utc().unix_timestamp())
            .saturating_add(i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX))
            .min(ca.not_after.unix_timestamp());
        self.core.signed_until.fetch_max(until, Ordering::Relaxed);
        Ok(issued)
    }

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo {
            not_after: Some(self.core.ca.load().not_after.unix_timestamp()),
        }
    }

    fn issued_under(&self, issuer: &super::IssuerRef<'_>) -> bool {
        issuer.spki == self.core.ca.load().spki()
            || self.core.renewable.load().iter().any(|s| s == issuer.spki)
    }

    fn root_rotation(&self) -> Option<Arc<dyn super::RootRotation>> {
        self.rotation
            .clone()
            .map(|c| c as Arc<dyn super::RootRotation>)
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

/// A new self-signed root and its key. `rotated_at` names a rotation's next root apart from
/// the one it replaces (some verifiers pick an issuer by name alone).
pub(crate) fn generate_root_pair(
    cfg: &LocalConfig,
    trust_domain: &str,
    rotated_at: Option<i64>,
) -> Result<(CertificateDer<'static>, KeyPair), LocalError> {
    let key = pki::generate_key(cfg.generated_key_type)
        .map_err(|e| LocalError::Invalid(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    let cn = match rotated_at {
        None => "istio-ca-bridge local root CA".to_string(),
        Some(t) => format!("istio-ca-bridge local root CA {}", pki::rfc3339(t)),
    };
    dn.push(DnType::CommonName, cn);
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
    Ok((cert.der().clone(), key))
}

/// [`generate_root_pair`] as the store keeps it.
fn generate_root(
    cfg: &LocalConfig,
    trust_domain: &str,
    rotated_at: Option<i64>,
) -> Result<KeyedCert, LocalError> {
    let (cert, key) = generate_root_pair(cfg, trust_domain, rotated_at)?;
    Ok(KeyedCert {
        cert_pem: pki::cert_pem(&cert),
        key_pem: key.serialize_pem(),
    })
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), LocalError> {
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
        let ca = LocalCa::open(self, ctx)
            .await
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

    async fn ca() -> LocalCa {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LocalConfig {
            state_dir: dir.path().join("ca"),
            ..Default::default()
        };
        LocalCa::open_standalone(&cfg, "cluster.local")
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn leaf_basic_constraints_are_strict_der() {
        // DER forbids encoding the default cA=FALSE: the value must be an empty SEQUENCE
        // (what Go/istiod emit). Strict parsers (Python cryptography, BoringSSL) reject
        // anything else; rcgen < 0.14.10 got this wrong.
        let key = crate::pki::generate_key(KeyType::EcdsaP256).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let issued = ca()
            .await
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

    /// An RSA CA signs on the blocking pool, not on the async worker; a P-256 CA inline.
    #[tokio::test(flavor = "current_thread")]
    async fn rsa_signatures_leave_the_async_worker() {
        for (key_type, rsa) in [(KeyType::Rsa, true), (KeyType::EcdsaP256, false)] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = LocalConfig {
                state_dir: dir.path().join("ca"),
                generated_key_type: key_type,
                ..Default::default()
            };
            let ca = LocalCa::open_standalone(&cfg, "cluster.local")
                .await
                .unwrap();
            assert_eq!(ca.core.ca.load().is_rsa(), rsa, "{key_type:?}");
            let worker = std::thread::current().id();
            let ran_on = run_off_workers(ca.core.ca.load().is_rsa(), move || {
                Err(SignError::Internal(format!(
                    "{:?}",
                    std::thread::current().id()
                )))
            })
            .await
            .unwrap_err()
            .to_string();
            assert_eq!(
                ran_on.contains(&format!("{worker:?}")),
                !rsa,
                "{key_type:?}: {ran_on}"
            );
            // And it signs.
            let key = crate::pki::generate_key(KeyType::EcdsaP256).unwrap();
            let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
            ca.sign(&SignRequest {
                subject: Subject::Workload(id),
                public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
                csr_der: Vec::new(),
                ttl: Duration::from_secs(3600),
                caller: None,
            })
            .await
            .unwrap();
        }
    }
}
