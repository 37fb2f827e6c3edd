//! Client-certificate authentication: a TLS client certificate issued by this deployment
//! proves the SPIFFE identity in its URI SAN. This is how VMs (and anything else holding a
//! mesh certificate) renew once their bootstrap token has expired.
//!
//! The TLS layer accepts any client certificate whose handshake signature verifies (proof
//! of possession) and leaves the decision here, so that a bad certificate gets a clear
//! UNAUTHENTICATED instead of a TLS alert, and so that trust bundle rotations apply without
//! rebuilding the TLS config. No credential has been checked yet when this runs, so the
//! order is cheapest first, and nothing costly is repeated:
//! 1. at most [`MAX_INTERMEDIATES`] intermediates and [`MAX_CHAIN_BYTES`] in all;
//! 2. a verdict already reached for this exact chain and trust bundle is reused (one path
//!    building per connection and bundle version: a connection presents one chain);
//! 3. the leaf has the exact profile the bridge issues (not a CA, EKU exactly serverAuth +
//!    clientAuth, empty subject, one URI SAN);
//! 4. its issuer is one this deployment issues under: the local CA, an intermediate the
//!    bridge obtained (any replica's), or one listed in `authn.clientCertIssuersFile`;
//!    so a certificate from elsewhere under the same enterprise root is not enough;
//! 5. only then is the path built against the trust bundle (rustls-webpki).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use super::{AuthMethod, Authenticator, AuthnError, Caller, RequestContext};
use crate::backend::{IssuerRef, Signer};
use crate::identity::SpiffeId;
use crate::trust::{SharedBundle, verify::workload_profile, verify_path};

/// Intermediates a client may present with its certificate. The bridge's own chains have
/// at most two (an intermediate-mode CA and the enterprise issuing CA).
pub const MAX_INTERMEDIATES: usize = 4;
/// The whole presented chain, in DER bytes.
pub const MAX_CHAIN_BYTES: usize = 32 * 1024;
/// Verdicts remembered (per chain and bundle), and for how long at most.
const VERDICTS: usize = 4096;
const VERDICT_TTL: Duration = Duration::from_secs(300);

type Verdict = Result<SpiffeId, AuthnError>;

struct Remembered {
    bundle: SharedBundle,
    verdict: Verdict,
    until: Instant,
}

pub struct ClientCertAuthenticator {
    /// The composed signer: its trust bundle, and which issuers are ours.
    signer: Arc<dyn Signer>,
    /// SubjectPublicKeyInfos of the issuers listed in `authn.clientCertIssuersFile`.
    extra_issuers: Vec<Vec<u8>>,
    trust_domains: Vec<String>,
    verdicts: Mutex<HashMap<[u8; 32], Remembered>>,
}

impl ClientCertAuthenticator {
    pub fn new(
        signer: Arc<dyn Signer>,
        extra_issuers: &[CertificateDer<'_>],
        trust_domains: Vec<String>,
    ) -> Result<Self, String> {
        let extra_issuers = extra_issuers
            .iter()
            .map(|c| {
                parse_x509_certificate(c)
                    .map(|(_, p)| p.public_key().raw.to_vec())
                    .map_err(|e| format!("renewal issuer: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            signer,
            extra_issuers,
            trust_domains,
            verdicts: Mutex::new(HashMap::new()),
        })
    }

    fn remembered(&self, key: &[u8; 32], bundle: &SharedBundle) -> Option<Verdict> {
        let map = self.verdicts.lock().expect("verdicts");
        let r = map.get(key)?;
        (Arc::ptr_eq(&r.bundle, bundle) && r.until > Instant::now()).then(|| r.verdict.clone())
    }

    /// `valid_for`: how long the leaf is still valid (a verdict never outlives it).
    fn remember(&self, key: [u8; 32], bundle: SharedBundle, verdict: Verdict, valid_for: Duration) {
        let mut map = self.verdicts.lock().expect("verdicts");
        let now = Instant::now();
        if map.len() >= VERDICTS {
            map.retain(|_, r| r.until > now && Arc::ptr_eq(&r.bundle, &bundle));
            if map.len() >= VERDICTS {
                map.clear();
            }
        }
        map.insert(
            key,
            Remembered {
                bundle,
                verdict,
                until: now + VERDICT_TTL.min(valid_for),
            },
        );
    }

    /// Steps 3 to 5 for one chain, and how long the verdict may be remembered: until the
    /// leaf expires, at most [`VERDICT_TTL`].
    fn decide(&self, certs: &[CertificateDer<'_>], bundle: &SharedBundle) -> (Verdict, Duration) {
        let (_, leaf) = match parse_x509_certificate(&certs[0]) {
            Ok(l) => l,
            Err(e) => {
                let e = AuthnError::Malformed(format!("client certificate: {e}"));
                return (Err(e), VERDICT_TTL);
            }
        };
        let left = leaf.validity().not_after.timestamp() - crate::pki::unix_secs(SystemTime::now());
        let valid_for = Duration::from_secs(left.max(0) as u64);
        (self.judge(&leaf, certs, bundle), valid_for)
    }

    fn judge(
        &self,
        leaf: &X509Certificate<'_>,
        certs: &[CertificateDer<'_>],
        bundle: &SharedBundle,
    ) -> Verdict {
        let uri = workload_profile(leaf).map_err(|e| {
            AuthnError::Invalid(format!(
                "client certificate is not one the bridge issues: {e}"
            ))
        })?;
        let identity = SpiffeId::parse(uri)
            .map_err(|e| AuthnError::Invalid(format!("client certificate URI SAN: {e}")))?;
        if !self
            .trust_domains
            .iter()
            .any(|td| td == identity.trust_domain())
        {
            return Err(AuthnError::Invalid(format!(
                "client certificate trust domain {} is not served here",
                identity.trust_domain()
            )));
        }
        if !self.issuer_is_ours(leaf, &certs[1..], bundle) {
            return Err(AuthnError::Invalid(
                "client certificate was not issued by this deployment (its issuer is neither the \
                 bridge's CA or intermediates nor in authn.clientCertIssuersFile)"
                    .into(),
            ));
        }
        verify_path(
            &certs[0],
            &certs[1..],
            bundle,
            webpki::KeyUsage::client_auth(),
            SystemTime::now(),
        )
        .map_err(|e| AuthnError::Invalid(format!("client certificate not trusted: {e}")))?;
        Ok(identity)
    }

    /// The leaf's issuer (the presented intermediate, or a root of the bundle, whose
    /// subject is the leaf's issuer name) is one this deployment issues under. Names are
    /// compared here; signatures are checked by the path building that follows.
    fn issuer_is_ours(
        &self,
        leaf: &X509Certificate<'_>,
        intermediates: &[CertificateDer<'_>],
        bundle: &SharedBundle,
    ) -> bool {
        let wanted = leaf.issuer().as_raw();
        let ours = |spki: &[u8], common_name: Option<&str>| {
            self.signer.issued_under(&IssuerRef { spki, common_name })
                || self.extra_issuers.iter().any(|s| s == spki)
        };
        let presented = intermediates.iter().any(|der| {
            parse_x509_certificate(der).is_ok_and(|(_, c)| {
                let cn = c
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|a| a.as_str().ok());
                c.subject().as_raw() == wanted && ours(c.public_key().raw, cn)
            })
        });
        presented
            || bundle
                .root_facts()
                .iter()
                .any(|r| r.subject == wanted && ours(&r.spki, r.common_name.as_deref()))
    }
}

/// One digest of the whole presented chain.
fn chain_key(certs: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for c in certs {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c.as_ref());
    }
    h.finalize().into()
}

#[async_trait]
impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "client_cert"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(certs) = ctx.peer_certs.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        if certs.len() > 1 + MAX_INTERMEDIATES {
            return Err(AuthnError::Invalid(format!(
                "client certificate chain has {} intermediates (at most {MAX_INTERMEDIATES})",
                certs.len() - 1
            )));
        }
        let bytes: usize = certs.iter().map(|c| c.len()).sum();
        if bytes > MAX_CHAIN_BYTES {
            return Err(AuthnError::Invalid(format!(
                "client certificate chain is {bytes} bytes (at most {MAX_CHAIN_BYTES})"
            )));
        }
        let bundle = self.signer.trust_bundle().borrow().clone();
        let key = chain_key(certs);
        let verdict = match self.remembered(&key, &bundle) {
            Some(v) => v,
            None => {
                let (v, valid_for) = self.decide(certs, &bundle);
                self.remember(key, bundle, v.clone(), valid_for);
                v
            }
        };
        Ok(Some(Caller {
            identity: verdict?,
            // A certificate proves an identity, not a cluster: the header is not evidence.
            cluster: None,
            via: AuthMethod::ClientCert,
            pod: None,
        }))
    }
}
