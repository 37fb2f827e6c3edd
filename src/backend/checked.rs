//! `Checked`: the one verification of whatever any backend issued, as a decorator over
//! every [`Signer`] (built from the config or handed in by an embedder), so no backend
//! has to remember it and none writes its own copy.
//!
//! The check itself is [`crate::trust::check_issued`]. An answer that does not chain to
//! the bundle gets one second chance after [`Signer::refresh_trust_bundle`] (the CA's
//! roots may have rotated since the bundle was last read). A refused answer is an
//! INTERNAL error to the caller, logged with the reason and counted in
//! `istio_ca_bridge_backend_refused_answers_total{backend, reason}`.
//!
//! A leaf of an in-process CA (the local CA, intermediate mode: [`local::OwnIssuer`]) is
//! checked in full, chain signature included, once per CA and trust bundle; every later leaf
//! of that CA with that bundle gets every check but the signature verification of a chain
//! already verified ([`crate::trust::check_issued_known`]): its key was matched with the
//! certificate when the CA was loaded, so a signature check per leaf would only repeat
//! that. Remote backends' answers are verified in full, each exactly once.
//!
//! A leaf living longer than what was asked of the backend ([`Signer::asked_lifetime`] of
//! the request's TTL, from the moment it was asked, plus [`LIFETIME_SKEW`]) is counted in
//! `istio_ca_bridge_backend_ttl_exceeded_total` and refused, unless
//! `policy.acceptLongerLifetimes` opts in for a backend known to ignore the asked validity.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;

use super::{IssuedChain, SignError, SignRequest, Signer, Subject, local};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{
    ChainFacts, IssuedError, LeafFacts, SharedBundle, check_issued_full, check_issued_known,
};

/// How much later than asked a leaf may expire: clocks between the bridge and its CA, and
/// the CA's rounding of the validity it was sent.
pub const LIFETIME_SKEW: Duration = Duration::from_secs(300);

pub struct Checked {
    inner: Arc<dyn Signer>,
    metrics: Arc<Metrics>,
    /// `policy.acceptLongerLifetimes`: over-long leaves are counted and logged, not refused.
    accept_longer: bool,
    /// The in-process CA whose chain was last verified in full, with which bundle.
    known: ArcSwapOption<Known>,
    /// Chains verified in full (signatures included), for tests and benchmarks.
    full_checks: AtomicU64,
}

struct Known {
    own: local::OwnIssuer,
    bundle: SharedBundle,
    chain: ChainFacts,
}

impl Checked {
    pub fn new(inner: Arc<dyn Signer>, metrics: Arc<Metrics>, accept_longer: bool) -> Self {
        Self {
            inner,
            metrics,
            accept_longer,
            known: ArcSwapOption::empty(),
            full_checks: AtomicU64::new(0),
        }
    }

    /// How many chains were verified in full, signatures included.
    pub fn full_checks(&self) -> u64 {
        self.full_checks.load(Ordering::Relaxed)
    }

    /// The one check of `issued`: against the chain facts of its in-process CA when that
    /// CA's chain was verified in full with this bundle, in full otherwise.
    fn check_chain(
        &self,
        issued: &IssuedChain,
        req: &SignRequest,
        bundle: &SharedBundle,
        now: SystemTime,
    ) -> Result<LeafFacts, IssuedError> {
        let own = issued
            .own_issuer()
            .filter(|_| matches!(req.subject, Subject::Workload(_)));
        if let Some(own) = own
            && let Some(k) = &*self.known.load()
            && k.own.same(own)
            && Arc::ptr_eq(&k.bundle, bundle)
        {
            return check_issued_known(
                &issued.leaf,
                &issued.intermediates,
                &k.chain,
                &req.subject,
                &req.public_key_der,
                now,
            );
        }
        self.full_checks.fetch_add(1, Ordering::Relaxed);
        let (leaf, chain) = check_issued_full(
            &issued.leaf,
            &issued.intermediates,
            bundle,
            &req.subject,
            &req.public_key_der,
            now,
        )?;
        if let Some(own) = own {
            self.known.store(Some(Arc::new(Known {
                own: own.clone(),
                bundle: bundle.clone(),
                chain,
            })));
        }
        Ok(leaf)
    }

    fn check(
        &self,
        issued: &IssuedChain,
        req: &SignRequest,
        asked_at: SystemTime,
    ) -> Result<(SharedBundle, LeafFacts), IssuedError> {
        let bundle = self.inner.trust_bundle().borrow().clone();
        let checked = self.check_chain(issued, req, &bundle, SystemTime::now());
        let facts = match checked {
            Ok(f) => f,
            // A backend that ignores the asked validity (the opt-in's reason) also signs
            // past its root's end; everything else was checked before this, and the
            // lifetime is still counted below.
            Err(e @ IssuedError::OutlivesRoot { .. }) if self.accept_longer => {
                tracing::warn!(backend = self.inner.kind(), subject = %req.subject, "{e}; accepted (policy.acceptLongerLifetimes)");
                let (_, leaf) = x509_parser::parse_x509_certificate(&issued.leaf)
                    .map_err(|e| IssuedError::Malformed(e.to_string()))?;
                crate::trust::verify::leaf_facts(&leaf)
            }
            Err(e) => return Err(e),
        };
        let not_after = facts.not_after;
        let asked = self.inner.asked_lifetime(req.ttl);
        let limit = pki::unix_secs(asked_at) + (asked + LIFETIME_SKEW).as_secs() as i64;
        if not_after > limit {
            let kind = self.inner.kind();
            self.metrics
                .backend_ttl_exceeded
                .with_label_values(&[kind])
                .inc();
            let why = format!(
                "expires {}s after it was asked for, {}s were asked",
                not_after - pki::unix_secs(asked_at),
                asked.as_secs()
            );
            if !self.accept_longer {
                return Err(IssuedError::TooLong(why));
            }
            tracing::warn!(backend = kind, subject = %req.subject, "{why}; accepted (policy.acceptLongerLifetimes)");
        }
        Ok((bundle, facts))
    }

    fn refuse(&self, e: IssuedError) -> SignError {
        let kind = self.inner.kind();
        let reason = match e {
            IssuedError::Malformed(_) => "malformed",
            IssuedError::Untrusted(_) => "untrusted",
            IssuedError::WrongKey => "wrong_key",
            IssuedError::WrongNames(_) => "wrong_names",
            IssuedError::Profile(_) => "profile",
            IssuedError::TooLong(_) | IssuedError::OutlivesRoot { .. } => "too_long",
        };
        self.metrics
            .backend_refused_answers
            .with_label_values(&[kind, reason])
            .inc();
        tracing::error!(backend = kind, error = %e, "backend returned an unusable certificate; refused");
        SignError::Internal(format!("{kind} returned an unusable certificate: {e}"))
    }
}

crate::backend::forward_authority!(Checked, inner);

#[async_trait]
impl Signer for Checked {
    crate::backend::forward_signer_facts!(inner);

    async fn refresh_trust_bundle(&self) -> bool {
        self.inner.refresh_trust_bundle().await
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let asked_at = SystemTime::now();
        let mut issued = self.inner.sign(req).await?;
        let (bundle, facts) = match self.check(&issued, req, asked_at) {
            Ok(b) => b,
            Err(IssuedError::Untrusted(first)) => {
                if !self.inner.refresh_trust_bundle().await {
                    return Err(self.refuse(IssuedError::Untrusted(first)));
                }
                self.check(&issued, req, asked_at)
                    .map_err(|e| self.refuse(e))?
            }
            Err(e) => return Err(self.refuse(e)),
        };
        issued.verified = Some(super::Verified {
            bundle,
            leaf: facts,
        });
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Authority;
    use crate::backend::local::{LocalCa, LocalConfig};
    use crate::identity::SpiffeId;
    use crate::testing::conformance::workload_request;

    /// Asks its inner signer for ten times the lifetime it was asked for.
    struct Longer {
        inner: Arc<dyn Signer>,
    }

    crate::backend::forward_authority!(Longer, inner);

    #[async_trait]
    impl Signer for Longer {
        async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
            let mut r = req.clone();
            r.ttl = req.ttl * 10;
            self.inner.sign(&r).await
        }
    }

    #[tokio::test]
    async fn a_leaf_longer_than_asked_is_refused_unless_opted_in_and_always_counted() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::open_standalone(
            &LocalConfig {
                state_dir: dir.path().to_path_buf(),
                ..Default::default()
            },
            "cluster.local",
        )
        .await
        .unwrap();
        let longer: Arc<dyn Signer> = Arc::new(Longer {
            inner: Arc::new(ca),
        });
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/long").unwrap();
        let (req, _) = workload_request(
            &id,
            crate::pki::KeyType::EcdsaP256,
            Duration::from_secs(3600),
        );
        let metrics = Arc::new(Metrics::new(false));
        let exceeded = || {
            metrics
                .backend_ttl_exceeded
                .with_label_values(&["local"])
                .get()
        };

        let strict = Checked::new(longer.clone(), metrics.clone(), false);
        let e = strict.sign(&req).await.unwrap_err();
        assert!(matches!(e, SignError::Internal(_)), "{e}");
        assert!(e.to_string().contains("longer than asked"), "{e}");
        assert_eq!(exceeded(), 1);
        assert_eq!(
            metrics
                .backend_refused_answers
                .with_label_values(&["local", "too_long"])
                .get(),
            1
        );

        let lenient = Checked::new(longer, metrics.clone(), true);
        lenient.sign(&req).await.unwrap();
        assert_eq!(exceeded(), 2, "accepted, still counted");
    }

    async fn local_ca(dir: &std::path::Path) -> Arc<LocalCa> {
        crate::install_crypto_provider();
        Arc::new(
            LocalCa::open_standalone(
                &LocalConfig {
                    state_dir: dir.to_path_buf(),
                    ..Default::default()
                },
                "cluster.local",
            )
            .await
            .unwrap(),
        )
    }

    type Tamper = Box<dyn Fn(&SignRequest, &mut IssuedChain) -> Option<SignRequest> + Send + Sync>;

    /// Hands on what `tamper` makes of its inner signer's answer: it may change the answer,
    /// and the request the inner signer is asked (returned as `Some`).
    struct Tampering {
        inner: Arc<dyn Signer>,
        tamper: std::sync::Mutex<Option<Tamper>>,
    }

    crate::backend::forward_authority!(Tampering, inner);

    #[async_trait]
    impl Signer for Tampering {
        async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
            let mut dummy = IssuedChain::new(Vec::new().into(), Vec::new());
            let asked = {
                let t = self.tamper.lock().unwrap();
                t.as_ref().and_then(|t| t(req, &mut dummy))
            };
            let mut issued = self.inner.sign(asked.as_ref().unwrap_or(req)).await?;
            if let Some(t) = &*self.tamper.lock().unwrap() {
                t(req, &mut issued);
            }
            Ok(issued)
        }
    }

    #[tokio::test]
    async fn an_in_process_ca_chain_is_verified_once_per_ca_and_bundle_and_every_leaf_still_checked()
     {
        let dir = tempfile::tempdir().unwrap();
        let ca = local_ca(&dir.path().join("a")).await;
        let other = local_ca(&dir.path().join("b")).await;
        let tampering = Arc::new(Tampering {
            inner: ca.clone(),
            tamper: std::sync::Mutex::new(None),
        });
        let metrics = Arc::new(Metrics::new(false));
        let checked = Checked::new(tampering.clone(), metrics.clone(), false);
        let bundle = ca.trust_bundle().borrow().clone();
        let id =
            |n: usize| SpiffeId::parse(&format!("spiffe://cluster.local/ns/a/sa/w{n}")).unwrap();
        let ttl = Duration::from_secs(3600);

        for n in 0..50 {
            let (req, _) = workload_request(&id(n), crate::pki::KeyType::EcdsaP256, ttl);
            let issued = checked.sign(&req).await.unwrap();
            // What clients do still accepts every one of them.
            crate::trust::verify_path(
                &issued.leaf,
                &issued.intermediates,
                &bundle,
                webpki::KeyUsage::client_auth(),
                SystemTime::now(),
            )
            .unwrap();
            let facts = &issued.verified.as_ref().expect("verified").leaf;
            assert!(facts.not_after > facts.not_before);
        }
        assert_eq!(checked.full_checks(), 1, "one full check for 50 leaves");

        // Each of these reaches the known-chain path and is refused there, with its reason.
        let (req, _) = workload_request(&id(0), crate::pki::KeyType::EcdsaP256, ttl);
        let foreign = other.sign(&req).await.unwrap();
        let refusals: Vec<(&str, Tamper)> = vec![
            // A leaf of another CA (same name, another key) under this CA's mark.
            ("untrusted", {
                let leaf = foreign.leaf.clone();
                Box::new(move |_, i| {
                    if !i.leaf.is_empty() {
                        i.leaf = leaf.clone();
                    }
                    None
                })
            }),
            // A chain with a certificate that was never verified.
            ("untrusted", {
                let extra = other.trust_bundle().borrow().roots()[0].clone();
                Box::new(move |_, i| {
                    if !i.leaf.is_empty() {
                        i.intermediates.push(extra.clone());
                    }
                    None
                })
            }),
            // Another identity than asked for.
            ("wrong_names", {
                Box::new(move |r, _| {
                    let mut other = r.clone();
                    other.subject = Subject::Workload(id(999));
                    Some(other)
                })
            }),
            // Another key than asked for.
            ("wrong_key", {
                Box::new(move |r, _| {
                    let (mut other, _) =
                        workload_request(&id(0), crate::pki::KeyType::EcdsaP256, ttl);
                    other.subject = r.subject.clone();
                    Some(other)
                })
            }),
        ];
        for (reason, tamper) in refusals {
            *tampering.tamper.lock().unwrap() = Some(tamper);
            let before = metrics
                .backend_refused_answers
                .with_label_values(&["local", reason])
                .get();
            let e = checked.sign(&req).await.unwrap_err();
            assert!(matches!(e, SignError::Internal(_)), "{reason}: {e}");
            assert_eq!(
                metrics
                    .backend_refused_answers
                    .with_label_values(&["local", reason])
                    .get(),
                before + 1,
                "{reason}: {e}"
            );
        }
        *tampering.tamper.lock().unwrap() = None;
        checked.sign(&req).await.unwrap();
        // The refused leaf of another CA got one full check (after the bundle was re-read).
        assert!(checked.full_checks() <= 2, "{}", checked.full_checks());

        // A new CA (a rotation, a new intermediate) is verified in full once.
        let full = checked.full_checks();
        let (cert, key) = crate::backend::local::generate_root_pair(
            &LocalConfig::default(),
            "cluster.local",
            Some(1),
        )
        .unwrap();
        let (sca, _) = crate::backend::local::SigningCa::new(cert.clone(), key, vec![]).unwrap();
        ca.replace(
            sca,
            Some(crate::trust::TrustBundle::new(vec![cert]).unwrap()),
        );
        for n in 0..10 {
            let (req, _) = workload_request(&id(n), crate::pki::KeyType::EcdsaP256, ttl);
            checked.sign(&req).await.unwrap();
        }
        assert_eq!(checked.full_checks(), full + 1);
    }
}
