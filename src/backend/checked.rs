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
//! A leaf living longer than what was asked of the backend ([`Signer::asked_lifetime`] of
//! the request's TTL, from the moment it was asked, plus [`LIFETIME_SKEW`]) is counted in
//! `istio_ca_bridge_backend_ttl_exceeded_total` and refused, unless
//! `policy.acceptLongerLifetimes` opts in for a backend known to ignore the asked validity.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::{IssuedChain, SignError, SignRequest, Signer};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{IssuedError, SharedBundle, check_issued};

/// How much later than asked a leaf may expire: clocks between the bridge and its CA, and
/// the CA's rounding of the validity it was sent.
pub const LIFETIME_SKEW: Duration = Duration::from_secs(300);

pub struct Checked {
    inner: Arc<dyn Signer>,
    metrics: Arc<Metrics>,
    /// `policy.acceptLongerLifetimes`: over-long leaves are counted and logged, not refused.
    accept_longer: bool,
}

impl Checked {
    pub fn new(inner: Arc<dyn Signer>, metrics: Arc<Metrics>, accept_longer: bool) -> Self {
        Self {
            inner,
            metrics,
            accept_longer,
        }
    }

    fn check(
        &self,
        issued: &IssuedChain,
        req: &SignRequest,
        asked_at: SystemTime,
    ) -> Result<SharedBundle, IssuedError> {
        let bundle = self.inner.trust_bundle().borrow().clone();
        let checked = check_issued(
            &issued.leaf,
            &issued.intermediates,
            &bundle,
            &req.subject,
            &req.public_key_der,
            SystemTime::now(),
        );
        let not_after = match checked {
            Ok(na) => na,
            // A backend that ignores the asked validity (the opt-in's reason) also signs
            // past its root's end; everything else was checked before this, and the
            // lifetime is still counted below.
            Err(e @ IssuedError::OutlivesRoot { leaf_not_after, .. }) if self.accept_longer => {
                tracing::warn!(backend = self.inner.kind(), subject = %req.subject, "{e}; accepted (policy.acceptLongerLifetimes)");
                leaf_not_after
            }
            Err(e) => return Err(e),
        };
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
        Ok(bundle)
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
        let bundle = match self.check(&issued, req, asked_at) {
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
        issued.verified_with = Some(bundle);
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
