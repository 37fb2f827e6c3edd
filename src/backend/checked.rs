//! `Checked`: the one verification of whatever any backend issued, as a decorator over
//! every [`Signer`] (built from the config or handed in by an embedder), so no backend
//! has to remember it and none writes its own copy.
//!
//! The check itself is [`crate::trust::check_issued`]. An answer that does not chain to
//! the bundle gets one second chance after [`Signer::refresh_trust_bundle`] (the CA's
//! roots may have rotated since the bundle was last read). A refused answer is an
//! INTERNAL error to the caller, logged with the reason and counted in
//! `istio_ca_bridge_backend_refused_answers_total{backend, reason}`.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use super::{IssuedChain, SignError, SignRequest, Signer, SigningCaInfo};
use crate::metrics::Metrics;
use crate::trust::{IssuedError, SharedBundle, check_issued};

pub struct Checked {
    inner: Arc<dyn Signer>,
    metrics: Arc<Metrics>,
}

impl Checked {
    pub fn new(inner: Arc<dyn Signer>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn check(&self, issued: &IssuedChain, req: &SignRequest) -> Result<SharedBundle, IssuedError> {
        let bundle = self.inner.trust_bundle().borrow().clone();
        check_issued(
            &issued.leaf,
            &issued.intermediates,
            &bundle,
            &req.subject,
            &req.public_key_der,
            SystemTime::now(),
        )?;
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
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let mut issued = self.inner.sign(req).await?;
        let bundle = match self.check(&issued, req) {
            Ok(b) => b,
            Err(IssuedError::Untrusted(first)) => {
                if !self.inner.refresh_trust_bundle().await {
                    return Err(self.refuse(IssuedError::Untrusted(first)));
                }
                self.check(&issued, req).map_err(|e| self.refuse(e))?
            }
            Err(e) => return Err(self.refuse(e)),
        };
        issued.verified_with = Some(bundle);
        Ok(issued)
    }

    async fn refresh_trust_bundle(&self) -> bool {
        self.inner.refresh_trust_bundle().await
    }

    fn signing_ca(&self) -> SigningCaInfo {
        self.inner.signing_ca()
    }

    fn issued_under(&self, issuer: &crate::backend::IssuerRef<'_>) -> bool {
        self.inner.issued_under(issuer)
    }
}
