//! What the unit tests of intermediate mode share: a config, a root with an intermediate,
//! and [`StubUpstream`], an in-process backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rcgen::{CertificateParams, DnType, KeyPair};
use tokio::sync::watch;

use super::generation::{Generation, check_and_build};
use super::{IntermediateConfig, IntermediateRequest, UpstreamAuthority};
use crate::backend::{Authority, Health, IssuedChain, SignError, SignRequest, Subject};
use crate::identity::SpiffeId;
use crate::pki::{self, KeyType};
use crate::trust::{SharedBundle, TrustBundle};

pub(super) fn cfg() -> IntermediateConfig {
    IntermediateConfig {
        ttl: Duration::from_secs(7 * 86400),
        ready_margin: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// A root and an intermediate it signs, with the given constraints.
pub(super) fn chain(path_len: Option<u8>, ca: bool) -> (TrustBundle, IssuedChain, KeyPair) {
    let root_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::CommonName, "root");
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = rp.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), root_key).unwrap();
    let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name.push(DnType::CommonName, "int");
    ip.is_ca = match (ca, path_len) {
        (false, _) => rcgen::IsCa::ExplicitNoCa,
        (true, Some(n)) => rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(n)),
        (true, None) => rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
    };
    let int = ip.signed_by(&key, &issuer).unwrap();
    (
        TrustBundle::new(vec![root.der().clone()]).unwrap(),
        IssuedChain::new(int.der().clone(), vec![]),
        key,
    )
}

/// A checked generation under a fresh root, and the bundle of that root.
pub(super) fn generation() -> (TrustBundle, Generation) {
    let (bundle, issued, key) = chain(Some(0), true);
    let g = check_and_build(issued, key, &cfg(), "cluster.local", &bundle).unwrap();
    (bundle, g)
}

/// An upstream signing intermediates with an rcgen root that the test can swap (a root
/// rotation in the backend) or switch off (an outage).
pub(super) struct StubUpstream {
    root: Mutex<(rcgen::Issuer<'static, KeyPair>, TrustBundle)>,
    bundle: watch::Sender<SharedBundle>,
    pub(super) down: std::sync::atomic::AtomicBool,
}

pub(super) fn new_root(name: &str) -> (rcgen::Issuer<'static, KeyPair>, TrustBundle) {
    let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    let bundle = TrustBundle::new(vec![cert.der().clone()]).unwrap();
    (rcgen::Issuer::new(p, key), bundle)
}

impl StubUpstream {
    pub(super) fn new() -> Arc<Self> {
        let (issuer, bundle) = new_root("root A");
        let (tx, _) = watch::channel(Arc::new(bundle.clone()));
        Arc::new(Self {
            root: Mutex::new((issuer, bundle)),
            bundle: tx,
            down: false.into(),
        })
    }

    /// The backend now signs under a new root, and the bundle holds only that root.
    pub(super) fn rotate_root(&self) -> TrustBundle {
        let (issuer, bundle) = new_root("root B");
        *self.root.lock().unwrap() = (issuer, bundle.clone());
        self.bundle.send_replace(Arc::new(bundle.clone()));
        bundle
    }
}

impl Authority for StubUpstream {
    fn kind(&self) -> &'static str {
        "stub"
    }

    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }

    fn health(&self) -> Health {
        Health::Ready
    }
}

#[async_trait]
impl UpstreamAuthority for StubUpstream {
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SignError::Unavailable("stub is down".into()));
        }
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, req.common_name.as_str());
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let now = ::time::OffsetDateTime::now_utc();
        p.not_before = now - ::time::Duration::seconds(1);
        p.not_after = now + ::time::Duration::try_from(req.ttl).unwrap();
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&req.public_key_der).unwrap();
        let root = self.root.lock().unwrap();
        let cert = p.signed_by(&spki, &root.0).unwrap();
        Ok(IssuedChain::new(cert.der().clone(), vec![]))
    }
}

pub(super) fn workload() -> SignRequest {
    let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    SignRequest {
        subject: Subject::Workload(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap()),
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        csr_der: Vec::new(),
        ttl: Duration::from_secs(3600),
        caller: None,
    }
}

pub(super) async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
