//! cert-manager backend: every certificate is one `cert-manager.io/v1` CertificateRequest,
//! so any cert-manager issuer signs (its CA and Vault issuers, Venafi, the AWS Private CA
//! and Google CAS issuers, step-issuer, ...).
//!
//! One request: wait for the client-side token bucket (`qps`, `burst`: a restart storm
//! queues here instead of flooding the API server and cert-manager), create the request in
//! `namespace` with the workload's checked CSR, the TTL as `spec.duration`, the leaf usages,
//! `isCA: false` and the configured `issuerRef`, labels and annotations, then watch it by
//! name from the created object's resourceVersion until it is terminal, all within
//! `requestTimeout`:
//! - `Ready=True`: `status.certificate` (and `status.ca`) form the chain, which the central
//!   check ([`crate::backend::checked`]) verifies like every backend's answer;
//! - `Denied=True` (an approver said no): [`SignError::Rejected`] (INVALID_ARGUMENT), the
//!   approver's reason logged;
//! - `Ready=False`, reason `Failed`: [`SignError::Rejected`] if cert-manager also marked it
//!   `InvalidRequest`, else [`SignError::Unavailable`];
//! - no answer in time: [`SignError::Unavailable`]; the API server throttling (429):
//!   [`SignError::Throttled`] (RESOURCE_EXHAUSTED); refusing (401/403) or failing:
//!   [`SignError::Unavailable`], and 401/403 make the bridge not ready.
//!
//! The request is deleted afterwards (in the background) unless `preserveRequests`:
//! leftover requests have exhausted cert-manager's memory. Approval is cert-manager's
//! business (docs/cert-manager.md says what an approver-policy must allow).
//!
//! The trust bundle comes from `rootBundleFile`, `rootBundleConfigMap` or
//! `rootBundleSecret`, re-read every `rootRefreshInterval`, or, with `trustFirstAnswer`,
//! from `status.ca` of one request made at start (trust on first use, logged as such).
//!
//! Intermediate mode: one request with `isCA: true` per replica's intermediate, rotated by
//! [`crate::backend::intermediate`] like the Vault and AWS upstreams.
//!
//! - `client`: the CertificateRequest calls and the reading of their outcome;
//! - `signer`: [`CertManager`], the [`Signer`] and upstream authority.

mod client;
mod config;
mod signer;

pub use client::{MANAGED_BY, Outcome, outcome};
pub use config::*;
pub use signer::CertManager;

use std::sync::Arc;

use async_trait::async_trait;

#[cfg(doc)]
use super::SignError;
use super::{BuildContext, BuildError, Plugin, Signer, remote};
use crate::validate::{FieldError, Shared};

pub(crate) const KIND: &str = "cert_manager";

#[async_trait]
impl Plugin for CertManagerConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        CertManagerConfig::problems(self, shared)
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Signer>, BuildError> {
        let cfg = self.clone();
        let td = ctx.trust_domain.clone();
        remote::build_in_mode(KIND, self.mode, &self.intermediate, ctx, move |metrics| {
            let (cfg, td) = (cfg.clone(), td.clone());
            async move {
                CertManager::connect(&cfg, &td, metrics)
                    .await
                    .map_err(|e| BuildError::new("cert-manager", e))
            }
        })
        .await
    }
}
