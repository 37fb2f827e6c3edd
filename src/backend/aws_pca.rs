//! AWS Private CA backend: every certificate is one `IssueCertificate` call.
//!
//! One request: wait for the client-side token bucket (below the account's 25 TPS
//! IssueCertificate quota, so a restart storm queues here instead of being throttled
//! there), `IssueCertificate` with the CSR, an absolute validity and an idempotency token
//! derived from the request (so a retry after a lost answer never issues twice), then
//! `GetCertificate` until the asynchronous issuance is done. Everything happens within
//! `issueTimeout`: `ThrottlingException`, `RequestInProgressException` and transient
//! failures are retried with jittered backoff through [`remote::Retry`] while the deadline
//! allows, then the call fails with [`SignError::Throttled`] or [`SignError::Unavailable`].
//! The SDK's own retries are off so that this one loop decides.
//!
//! What comes back is verified centrally ([`crate::backend::checked`]), not here; that
//! includes refusing a leaf that lives longer than requested (AWS honours `Validity`;
//! moto and templates that fix the validity do not: `policy.acceptLongerLifetimes`). The trust
//! bundle is the CA's root (from `GetCertificateAuthorityCertificate`) plus an optional
//! extra roots file, re-read periodically.
//!
//! - `client`: the narrow [`PcaClient`] seam over the SDK (four calls) and the reading of
//!   SDK errors;
//! - `signer`: [`AwsPca`], the [`Signer`] and [`UpstreamAuthority`] over that client.

mod client;
mod config;
mod signer;

pub use client::{AwsPcaError, Issue, PcaClient, Pems, SdkClient};
pub use config::*;
pub use signer::{AwsPca, idempotency_token};

use std::sync::Arc;

use async_trait::async_trait;

#[cfg(doc)]
use super::SignError;
use super::{BuildContext, BuildError, Plugin, Signer, remote};
use crate::validate::{FieldError, Shared};

pub(crate) const KIND: &str = "aws_pca";

#[async_trait]
impl Plugin for AwsPcaConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        AwsPcaConfig::problems(self, shared)
    }

    /// Direct mode: the signer. Intermediate mode: the intermediate signer over a lazily
    /// connected upstream (a replica starts with its stored intermediate during an outage).
    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Signer>, BuildError> {
        let cfg = self.clone();
        remote::build_in_mode(KIND, self.mode, &self.intermediate, ctx, move |metrics| {
            let cfg = cfg.clone();
            async move {
                AwsPca::connect(&cfg, metrics)
                    .await
                    .map_err(|e| BuildError::new("AWS Private CA", e))
            }
        })
        .await
    }
}
