//! One generation of intermediate mode: an intermediate CA with its key and chain.
//! [`prepare`] has the backend sign a fresh key; [`check_and_build`] accepts the answer
//! only if it is a CA for that key that clients will accept, which [`probe`] shows by
//! signing a throwaway leaf and verifying it.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use x509_parser::prelude::*;

use super::{
    IntermediateConfig, IntermediateError, IntermediateRequest, UpstreamAuthority, now_secs,
};
use crate::backend::local::SigningCa;
use crate::backend::{IssuedChain, SignError, SignRequest, Subject};
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{TrustBundle, check_issued};

/// One preparation (the backend call) may take this long before it counts as failed.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

/// One intermediate CA, and what the state directory keeps of it.
pub(super) struct Generation {
    pub(super) ca: std::sync::Arc<SigningCa>,
    /// The certificate and its chain as PEM, and the key, for the state directory.
    pub(super) chain_pem: String,
    pub(super) key_pem: String,
    /// The root of the bundle its chain ends in, when it was checked.
    pub(super) root: Option<rustls_pki_types::CertificateDer<'static>>,
}

impl Generation {
    pub(super) fn not_before(&self) -> i64 {
        self.ca.not_before().unix_timestamp()
    }
    pub(super) fn not_after(&self) -> i64 {
        self.ca.not_after().unix_timestamp()
    }
    pub(super) fn serial(&self) -> &str {
        self.ca.serial_hex()
    }
    pub(super) fn remaining(&self, now: i64) -> i64 {
        self.not_after() - now
    }
    /// Whether its chain ends in `root`.
    pub(super) fn under(&self, root: &rustls_pki_types::CertificateDer<'_>) -> bool {
        self.root
            .as_ref()
            .is_some_and(|r| r.as_ref() == root.as_ref())
    }
}

/// The subject of our intermediates: the trust domain and this replica's name, so an
/// operator can tell replicas apart in the enterprise CA's records.
/// Every intermediate the bridge asks for is named `<prefix><host>`: leaves under any of
/// them (this replica's, earlier ones, other replicas') may renew with a client
/// certificate.
pub const COMMON_NAME_PREFIX: &str = "istio-ca-bridge ";

fn common_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    let mut cn = format!("{COMMON_NAME_PREFIX}{host}");
    cn.truncate(64);
    cn
}

/// Generates a key, has the backend sign it as a CA (under `under_root`, if the backend can
/// choose) and checks the answer; counted in
/// `istio_ca_bridge_intermediate_preparations_total{backend, result}`.
pub(super) async fn prepare(
    upstream: &dyn UpstreamAuthority,
    cfg: &IntermediateConfig,
    trust_domain: &str,
    metrics: &Metrics,
    under_root: Option<rustls_pki_types::CertificateDer<'static>>,
) -> Result<Generation, IntermediateError> {
    let r = prepare_uncounted(upstream, cfg, trust_domain, under_root).await;
    metrics
        .intermediate_preparations
        .with_label_values(&[
            upstream.kind(),
            if r.is_ok() { "success" } else { "failure" },
        ])
        .inc();
    r
}

async fn prepare_uncounted(
    upstream: &dyn UpstreamAuthority,
    cfg: &IntermediateConfig,
    trust_domain: &str,
    under_root: Option<rustls_pki_types::CertificateDer<'static>>,
) -> Result<Generation, IntermediateError> {
    let key = pki::generate_key(cfg.key_type)
        .map_err(|e| IntermediateError::Unusable(format!("key generation: {e}")))?;
    let cn = common_name();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn.as_str());
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IntermediateError::Unusable(format!("CSR: {e}")))?;
    let req = IntermediateRequest {
        csr_der: csr.der().to_vec(),
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        common_name: cn,
        ttl: cfg.ttl,
        path_len_zero: cfg.path_len_zero,
        under_root,
    };
    let issued = match tokio::time::timeout(PREPARE_TIMEOUT, upstream.sign_intermediate(&req)).await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(
                SignError::Unavailable(format!("no answer within {PREPARE_TIMEOUT:?}")).into(),
            );
        }
    };
    // The bundle as it is now: it may have changed while we waited (a root added with the
    // backend's new issuer).
    let bundle = upstream.trust_bundle().borrow().clone();
    check_and_build(issued, key, cfg, trust_domain, &bundle)
}

/// Checks what the backend returned and turns it into a signing generation.
pub(super) fn check_and_build(
    issued: IssuedChain,
    key: KeyPair,
    cfg: &IntermediateConfig,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<Generation, IntermediateError> {
    let bad = |m: String| IntermediateError::Unusable(m);
    let (_, cert) =
        parse_x509_certificate(&issued.leaf).map_err(|e| bad(format!("unparsable: {e}")))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(bad("it certifies another public key than ours".into()));
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if cfg.path_len_zero && bc.value.path_len_constraint != Some(0) {
                return Err(bad(format!(
                    "pathLenConstraint is {:?}, expected 0 (intermediate.pathLenZero is set; \
                     use a template/role that sets it, or set pathLenZero: false)",
                    bc.value.path_len_constraint
                )));
            }
        }
        Ok(_) => {
            return Err(bad(
                "it is not a CA certificate (basicConstraints CA:TRUE is missing); the backend \
                 ignored the CA template or role (moto's acm-pca does this), so the bridge will \
                 not sign with it"
                    .into(),
            ));
        }
        Err(e) => return Err(bad(format!("basicConstraints: {e}"))),
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(bad("keyUsage lacks keyCertSign".into()));
    }
    let not_after = cert.validity().not_after.timestamp();
    let now = now_secs();
    // Usable means: longer than the readiness margin, and not a sliver of what was asked.
    let min_left = cfg
        .ready_margin
        .max((cfg.ttl / 4).min(Duration::from_secs(60)));
    if not_after - now <= min_left.as_secs() as i64 {
        return Err(bad(format!(
            "it expires in {}s (at least {}s needed: readyMargin, a quarter of the ttl asked); \
             the backend capped its lifetime (Vault: the mount's max_lease_ttl or the issuer's \
             expiry)",
            not_after - now,
            min_left.as_secs()
        )));
    }
    let mut chain_pem = pki::cert_pem(&issued.leaf);
    for c in &issued.intermediates {
        chain_pem.push_str(&pki::cert_pem(c));
    }
    let key_pem = key.serialize_pem();
    let (ca, _roots) = SigningCa::new(issued.leaf.clone(), key, issued.intermediates.clone())
        .map_err(|e| bad(e.to_string()))?;
    probe(&ca, trust_domain, bundle)?;
    let top = issued.intermediates.last().unwrap_or(&issued.leaf);
    let root = pki::signing_root(top, bundle.roots()).cloned();
    Ok(Generation {
        ca: std::sync::Arc::new(ca),
        chain_pem,
        key_pem,
        root,
    })
}

/// Signs a throwaway leaf and puts it through the check every answer gets
/// ([`check_issued`], as [`crate::backend::checked`] applies it): the chain must reach the
/// bundle's roots as clients build it (rustls-webpki) and every constraint on the way must
/// admit a SPIFFE workload. This checks the CA at preparation, not the leaves it will
/// sign: those are checked centrally, once each.
pub(super) fn probe(
    ca: &SigningCa,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<(), IntermediateError> {
    let key = pki::generate_key(crate::pki::KeyType::EcdsaP256)
        .map_err(|e| IntermediateError::Unusable(format!("probe key: {e}")))?;
    let id = SpiffeId::parse(&format!(
        "spiffe://{trust_domain}/ns/istio-system/sa/istio-ca-bridge-probe"
    ))
    .map_err(|e| IntermediateError::Unusable(format!("probe identity: {e}")))?;
    let req = SignRequest {
        subject: Subject::Workload(id),
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        csr_der: Vec::new(),
        ttl: Duration::from_secs(60),
        caller: None,
    };
    let issued = ca
        .sign(&req)
        .map_err(|e| IntermediateError::Unusable(format!("probe leaf: {e}")))?;
    check_issued(
        &issued.leaf,
        &issued.intermediates,
        bundle,
        &req.subject,
        &req.public_key_der,
        SystemTime::now(),
    )
    .map(|_| ())
    .map_err(|e| IntermediateError::Unusable(format!("a leaf it signs would be refused: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::intermediate::test_support::{cfg, chain, generation};
    use crate::pki::KeyType;

    /// Why `check_and_build` refuses this answer of the backend (the bundle, the
    /// intermediate, the key it should certify).
    fn refusal(
        (bundle, issued, key): (TrustBundle, IssuedChain, KeyPair),
        cfg: &IntermediateConfig,
    ) -> String {
        check_and_build(issued, key, cfg, "cluster.local", &bundle)
            .err()
            .expect("refused")
            .to_string()
    }

    #[test]
    fn a_proper_intermediate_is_accepted_and_its_leaves_verify() {
        let (_, g) = generation();
        assert_eq!(g.ca.chain().len(), 1);
    }

    #[test]
    fn a_certificate_without_ca_true_is_refused_naming_the_reason() {
        let e = refusal(chain(None, false), &cfg());
        assert!(e.contains("not a CA certificate"), "{e}");
    }

    #[test]
    fn a_missing_path_length_is_refused_when_asked_for() {
        let e = refusal(chain(None, true), &cfg());
        assert!(e.contains("pathLenConstraint"), "{e}");
        let (bundle, issued, key) = chain(None, true);
        let lax = IntermediateConfig {
            path_len_zero: false,
            ..cfg()
        };
        check_and_build(issued, key, &lax, "cluster.local", &bundle).unwrap();
    }

    #[test]
    fn an_intermediate_for_another_key_or_root_is_refused() {
        let (bundle, issued, _key) = chain(Some(0), true);
        let other = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let e = refusal((bundle, issued, other), &cfg());
        assert!(e.contains("another public key"), "{e}");
        let (_, issued, key) = chain(Some(0), true);
        let (other_bundle, _, _) = chain(Some(0), true);
        let e = refusal((other_bundle, issued, key), &cfg());
        assert!(e.contains("does not verify"), "{e}");
    }

    /// Why there is no URI name-constraint option: rustls-webpki (ztunnel's verifier and
    /// ours) fails closed on URI name constraints, so every SPIFFE leaf below such a CA is
    /// refused.
    #[test]
    fn uri_name_constraints_break_rustls() {
        let root_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut rp = CertificateParams::default();
        rp.distinguished_name.push(DnType::CommonName, "root");
        rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // nameConstraints { permittedSubtrees [ URI "cluster.local" ] }
        let uri = b"cluster.local";
        let mut subtree = vec![0x86, uri.len() as u8];
        subtree.extend_from_slice(uri);
        let mut gs = vec![0x30, subtree.len() as u8];
        gs.extend(subtree);
        let mut permitted = vec![0xa0, gs.len() as u8];
        permitted.extend(gs);
        let mut value = vec![0x30, permitted.len() as u8];
        value.extend(permitted);
        let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], value);
        ext.set_criticality(true);
        rp.custom_extensions = vec![ext];
        let root = rp.self_signed(&root_key).unwrap();
        let bundle = TrustBundle::new(vec![root.der().clone()]).unwrap();
        let (ca, _) = SigningCa::new(root.der().clone(), root_key, vec![]).unwrap();
        let e = probe(&ca, "cluster.local", &bundle)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("NameConstraintViolation"), "{e}");
    }
}
