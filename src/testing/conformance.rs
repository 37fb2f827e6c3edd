//! One suite of behaviours every backend must show, run by each backend's black-box test
//! against its real server (or, where nothing real runs offline, its documented fake).
//!
//! The suite gets a way to build the backend's signer and wraps it the way the bridge does
//! (`backend::checked::Checked`), then checks:
//! - a P-256 and an RSA 2048 workload leaf, each with the exact profile the bridge hands
//!   out (see [`assert_workload_profile`]);
//! - an answer for another key, or for another identity, is refused (INTERNAL): the backend
//!   really signs, a [`Tamper`] layer only changes what it is asked for;
//! - an outage is UNAVAILABLE and throttling RESOURCE_EXHAUSTED, through the one error
//!   mapping of the gRPC edge, where the backend can be taken down or made to throttle.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use x509_parser::prelude::*;

use crate::backend::checked::Checked;
use crate::backend::{IssuedChain, SignError, SignRequest, Signer, Subject};
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::pki::{self, CsrShape, KeyType};
use crate::server::{RequestError, to_status};

/// What a backend's test hands the suite.
#[async_trait]
pub trait BackendUnderTest: Send + Sync {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;

    /// Trust domain the backend's role or profile allows.
    fn trust_domain(&self) -> &str {
        "cluster.local"
    }

    /// A signer for the backend as the test configured it (the suite adds the check).
    async fn signer(&self) -> Arc<dyn Signer>;

    /// Makes the backend stop answering. `false`: this backend cannot be down (the local
    /// CA signs in-process).
    async fn outage(&self) -> bool {
        false
    }

    /// Undoes [`Self::outage`].
    async fn recover(&self) {}

    /// Makes the backend throttle the calls that follow. `false`: it cannot.
    async fn throttle(&self) -> bool {
        false
    }

    /// Whether the backend issues the lifetime it is asked for. moto ignores the
    /// `Validity` of IssueCertificate (real AWS Private CA honours it), so its test says
    /// `false` and the lifetime is not checked there.
    fn honours_validity(&self) -> bool {
        true
    }
}

/// What the suite saw, for the test's own assertions and output.
#[derive(Debug, Default)]
pub struct Report {
    /// The backend could be taken down, and its outage was UNAVAILABLE.
    pub checked_outage: bool,
    /// The backend could be made to throttle, and that was RESOURCE_EXHAUSTED.
    pub checked_throttle: bool,
}

/// A workload request for `id` with a new key of `kind`, shaped as istio-agent sends it.
pub fn workload_request(id: &SpiffeId, kind: KeyType, ttl: Duration) -> (SignRequest, Vec<u8>) {
    let (key, csr_pem) = super::csr_for(&id.uri(), kind, CsrShape::IstioAgent);
    let csr_der = ::pem::parse(csr_pem).expect("pem").into_contents();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    (
        SignRequest {
            subject: Subject::Workload(id.clone()),
            public_key_der: spki.clone(),
            csr_der,
            ttl,
            caller: None,
        },
        spki,
    )
}

/// Signs something other than what it is asked for, then answers as if it had not: the
/// backend's real answer for another key or another identity.
pub struct Tamper {
    inner: Arc<dyn Signer>,
    what: TamperWith,
}

/// What [`Tamper`] changes in the request it passes on.
#[derive(Clone, Copy)]
pub enum TamperWith {
    /// Ask the backend for the same identity with a different key.
    Key,
    /// Ask the backend for another identity (same trust domain) with the same kind of key.
    Identity,
}

impl Tamper {
    /// Tampers with every workload request before `inner` sees it.
    pub fn new(inner: Arc<dyn Signer>, what: TamperWith) -> Self {
        Self { inner, what }
    }
}

crate::backend::forward_authority!(Tamper, inner);

#[async_trait]
impl Signer for Tamper {
    crate::backend::forward_signer_facts!(inner);

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let Subject::Workload(id) = &req.subject else {
            return self.inner.sign(req).await;
        };
        let other = match self.what {
            TamperWith::Key => id.clone(),
            TamperWith::Identity => SpiffeId::parse(&format!(
                "spiffe://{}/ns/{}/sa/{}-other",
                id.trust_domain(),
                id.namespace(),
                id.service_account(),
            ))
            .expect("other identity"),
        };
        let (swapped, _) = workload_request(&other, KeyType::EcdsaP256, req.ttl);
        self.inner.sign(&swapped).await
    }
}

/// Runs the suite; panics with the backend's name and what failed.
pub async fn run(b: &dyn BackendUnderTest) -> Report {
    crate::install_crypto_provider();
    let name = b.name();
    let metrics = Arc::new(Metrics::new(false));
    let raw = b.signer().await;
    // As the bridge composes it; a backend known to ignore the asked validity gets the
    // documented opt-in (policy.acceptLongerLifetimes), as its operators would set it.
    let accept_longer = !b.honours_validity();
    let checked = Checked::new(raw.clone(), metrics.clone(), accept_longer);
    let id = SpiffeId::parse(&format!(
        "spiffe://{}/ns/default/sa/conformance",
        b.trust_domain()
    ))
    .expect("identity");
    let ttl = Duration::from_secs(3600);

    for kind in [KeyType::EcdsaP256, KeyType::Rsa] {
        let (req, spki) = workload_request(&id, kind, ttl);
        let asked_at = SystemTime::now();
        let issued = checked
            .sign(&req)
            .await
            .unwrap_or_else(|e| panic!("{name}: {kind:?} leaf: {e}"));
        assert!(issued.verified.is_some(), "{name}: the check did not run");
        let asked = b.honours_validity().then_some((asked_at, ttl));
        assert_workload_profile(name, &issued, &id, &spki, asked);
    }

    for what in [TamperWith::Key, TamperWith::Identity] {
        let tampered = Checked::new(
            Arc::new(Tamper::new(raw.clone(), what)),
            metrics.clone(),
            accept_longer,
        );
        let (req, _) = workload_request(&id, KeyType::EcdsaP256, ttl);
        let err = tampered.sign(&req).await.err().unwrap_or_else(|| {
            panic!(
                "{name}: an answer for another {} was handed out",
                match what {
                    TamperWith::Key => "key",
                    TamperWith::Identity => "identity",
                }
            )
        });
        assert!(matches!(err, SignError::Internal(_)), "{name}: {err}");
        assert_eq!(code(err), tonic::Code::Internal, "{name}");
    }
    let refused: u64 = ["wrong_key", "wrong_names"]
        .iter()
        .map(|r| {
            metrics
                .backend_refused_answers
                .with_label_values(&[raw.kind(), r])
                .get()
        })
        .sum();
    assert_eq!(refused, 2, "{name}: refusals are counted by reason");

    let mut report = Report::default();
    if b.throttle().await {
        let (req, _) = workload_request(&id, KeyType::EcdsaP256, ttl);
        let err = checked
            .sign(&req)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: signed while throttled"));
        assert!(
            matches!(err, SignError::Throttled { .. }),
            "{name}: throttling must be Throttled, got {err}"
        );
        assert_eq!(code(err), tonic::Code::ResourceExhausted, "{name}");
        report.checked_throttle = true;
    }
    if b.outage().await {
        let (req, _) = workload_request(&id, KeyType::EcdsaP256, ttl);
        let err = checked
            .sign(&req)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: signed while down"));
        assert!(
            matches!(err, SignError::Unavailable(_)),
            "{name}: an outage must be Unavailable, got {err}"
        );
        assert_eq!(code(err), tonic::Code::Unavailable, "{name}");
        b.recover().await;
        report.checked_outage = true;
    }
    report
}

fn code(e: SignError) -> tonic::Code {
    to_status(&RequestError::Sign(e)).code()
}

/// The profile every workload leaf must have, whatever signed it: the key asked for;
/// exactly one SAN, the URI of `id`; no CN or other subject attribute besides Istio's empty
/// `O`; not a CA; key usage digitalSignature; extended key usage exactly serverAuth and
/// clientAuth; and no longer than asked (plus the bridge's 2-minute backdating and a
/// minute of rounding).
pub fn assert_workload_profile(
    name: &str,
    issued: &IssuedChain,
    id: &SpiffeId,
    spki: &[u8],
    asked: Option<(SystemTime, Duration)>,
) {
    let (_, leaf) = parse_x509_certificate(&issued.leaf).expect("leaf parses");
    assert_eq!(leaf.public_key().raw, spki, "{name}: key");
    let san = leaf
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(&id.uri())],
        "{name}: SAN"
    );
    for attr in leaf.subject().iter_attributes() {
        let empty_o = attr.attr_type() == &x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME
            && attr.as_str().is_ok_and(str::is_empty);
        assert!(empty_o, "{name}: subject carries {attr:?}");
    }
    if let Some(bc) = leaf.basic_constraints().expect("basicConstraints parses") {
        assert!(!bc.value.ca, "{name}: leaf is a CA");
    }
    let ku = leaf
        .key_usage()
        .expect("keyUsage parses")
        .expect("keyUsage present");
    assert!(ku.value.digital_signature(), "{name}: keyUsage");
    assert!(!ku.value.key_cert_sign(), "{name}: keyUsage certSign");
    let eku = leaf
        .extended_key_usage()
        .expect("EKU parses")
        .expect("EKU present")
        .value;
    assert!(
        eku.server_auth
            && eku.client_auth
            && eku.other.is_empty()
            && !eku.any
            && !eku.code_signing
            && !eku.email_protection
            && !eku.time_stamping
            && !eku.ocsp_signing,
        "{name}: EKU must be exactly serverAuth + clientAuth: {eku:?}"
    );
    if let Some((asked_at, ttl)) = asked {
        let asked_until = pki::unix_secs(asked_at) + ttl.as_secs() as i64;
        let not_after = leaf.validity().not_after.timestamp();
        assert!(
            not_after <= asked_until + 60,
            "{name}: leaf lives until {not_after}, asked until {asked_until}"
        );
    }
}
