//! DigiCert Trust Lifecycle Manager (DigiCert ONE) backend: every certificate is one REST
//! enrollment, `POST /mpki/api/v1/certificate`.
//!
//! One request: wait for the client-side token bucket (DigiCert rate limits its API and
//! answers 429), send the CSR with the identity in `attributes.extensions.san` (a SPIFFE URI
//! for workloads, DNS names for serving certificates), the seat, a validity in whole hours
//! or days and `include_ca_chain: true`. DigiCert answers the certificate at once, or
//! `{"status":"PENDING","request_id":..}` when the profile needs approval or issues
//! asynchronously: then `POST /mpki/api/v1/certificate-pickup/<request_id>` is polled with
//! exponential backoff from `pollInitialInterval` to `pollMaxInterval`. Everything happens
//! within `requestTimeout`:
//!
//! - 429 (with `Retry-After` in seconds or as an HTTP date, or without it) is retried after
//!   that delay (or a jittered backoff) while the budget allows, then [`SignError::Throttled`]
//!   carrying the server's `Retry-After`;
//! - 401/403 are [`SignError::Unavailable`], logged loudly (the cause, never the key), and
//!   flip readiness until a later call succeeds (a background `GET /hello` every few
//!   seconds notices a fixed key even without traffic);
//! - other 4xx are [`SignError::Rejected`] with DigiCert's `errors[].message` logged;
//! - 502/503/504 and refused connections are retried (nothing was enrolled); other 5xx,
//!   timeouts and broken answers are [`SignError::Unavailable`] without a retry, because an
//!   enrollment that may have succeeded must not be sent twice (DigiCert documents no
//!   idempotency key). Pickups are idempotent and retried on any transient failure.
//!
//! Calls run through [`remote::Retry`] (token bucket, retries, PENDING polling) until the
//! deadline. The chain is laid out by issuer names from DigiCert's answer and the
//! configured intermediates up to a root of `trustBundleFile`; what comes back (key, names,
//! profile, chain) is verified centrally by [`crate::backend::checked`], not here.
//!
//! - `client`: HTTP, credentials, the reading of DigiCert's answers and errors;
//! - `signer`: [`Digicert`], the [`Signer`]: enrollment, pickup, chain layout, readiness.

mod client;
mod config;
mod signer;

pub use client::DigicertError;
pub use config::*;
pub use signer::Digicert;

use std::sync::Arc;

use async_trait::async_trait;

use super::{BuildContext, BuildError, Plugin, Signer};
#[cfg(doc)]
use super::{SignError, remote};
use crate::validate::{FieldError, Shared};

const KIND: &str = "digicert";

#[async_trait]
impl Plugin for DigicertConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        DigicertConfig::problems(self, shared)
    }

    /// Reads the local material only: DigiCert is first reached by the first enrollment.
    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Signer>, BuildError> {
        let d = Digicert::connect(self, ctx.metrics.clone())
            .map_err(|e| BuildError::new("DigiCert", e))?;
        let d = Arc::new(d);
        signer::spawn_bundle_refresh(Arc::downgrade(&d), self.trust_bundle_refresh_interval);
        Ok(d)
    }
}
