//! Intermediate mode: the enterprise CA signs an intermediate CA for this replica, and the
//! replica signs workload certificates locally with it.
//!
//! Per-certificate forwarding ties every pod start to the enterprise CA's quota, latency
//! and uptime. Here a backend call happens once per intermediate lifetime instead:
//! - The key is generated in the process ([`IntermediateConfig::key_type`]) and never
//!   leaves it, unless a state directory is configured (key file mode 0600).
//! - What comes back is checked before use: a CA certificate for our key, with
//!   pathLenConstraint 0 when asked, still valid, and chaining to the trust bundle. The last
//!   check signs a probe leaf and puts it through the one leaf check
//!   ([`crate::trust::check_issued`], which verifies as clients do, with rustls-webpki), so
//!   an intermediate whose leaves clients or the bridge would refuse is never used. The
//!   leaves it then signs are checked once each, like every backend's, by
//!   [`super::checked`]; nothing here checks them again.
//! - Rotation: the successor is prepared at `prepareAt` of the lifetime (SPIRE's 1/2) and
//!   takes over at `activateAt` (5/6) or earlier, once the current one has less than
//!   `policy.maxTtl` left, so leaves are not cut short. A leaf never outlives the
//!   intermediate that signed it ([`super::local::SigningCa::sign`] clamps), and its chain
//!   always carries that intermediate: each call reads one generation, so no call fails
//!   across a switch.
//! - Outage: while the backend is down the current intermediate keeps signing; preparation
//!   is retried with jittered backoff. `/readyz` stays true until less than `readyMargin`
//!   is left.
//! - A trust-bundle change that the current intermediate no longer chains to (a root
//!   removed) makes the successor take over, or one be prepared, at once.
//!
//! Backends take part through the small [`UpstreamAuthority`] trait: Vault/OpenBao
//! (`root/sign-intermediate`) and AWS Private CA (a SubordinateCACertificate template).
//!
//! The pieces, one concern a file:
//! - `upstream`: the seam to the backend ([`UpstreamAuthority`], [`IntermediateRequest`],
//!   [`UpstreamConnect`]) and [`LazyUpstream`] for a start without the backend;
//! - `generation`: one intermediate (key, certificate, chain): preparing it, checking the
//!   backend's answer and the probe leaf;
//! - `state`: the state directory ([`stored_bundle`], file modes);
//! - `rotation`: when to prepare and when to switch, the retry delay, the rotation task;
//! - `signer`: [`IntermediateSigner`], the `Signer` that signs with the current generation;
//! - `config`: [`BackendMode`] and [`IntermediateConfig`];
//! - here: [`build`], which a backend's `Plugin::build` calls in intermediate mode.

mod config;
mod generation;
mod rotation;
mod signer;
mod state;
#[cfg(test)]
mod test_support;
mod upstream;

pub use config::*;
pub use signer::IntermediateSigner;
pub use state::stored_bundle;
pub use upstream::{IntermediateRequest, LazyUpstream, UpstreamAuthority, UpstreamConnect};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::{SignError, Signer};
use crate::pki;

/// Why no intermediate could be had. Causes are sources, not part of the message: log
/// and report these with [`super::remote::error_chain`] (or `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum IntermediateError {
    #[error("the backend could not sign the bridge's intermediate CA")]
    Sign(#[from] SignError),
    #[error("the backend's intermediate CA certificate is unusable: {0}")]
    Unusable(String),
    #[error("intermediate state directory {path}: {message}")]
    State { path: PathBuf, message: String },
}

fn now_secs() -> i64 {
    pki::unix_secs(SystemTime::now())
}

/// Builds intermediate mode over any upstream: the backend signs the bridge's first
/// intermediate here, so a backend whose answer is not a usable CA stops the start with
/// the reason. If the backend cannot be reached but `stateDir` holds a usable
/// intermediate, the bridge starts with it and connects later ([`LazyUpstream`]).
pub async fn build(
    kind: &'static str,
    connect: UpstreamConnect,
    icfg: &IntermediateConfig,
    ctx: &super::BuildContext,
) -> Result<Arc<dyn Signer>, super::BuildError> {
    let upstream = match connect().await {
        Ok(up) => up,
        Err(e) => {
            // A replica restarted during a backend outage starts from its stored
            // intermediate, if it has a usable one, and connects later.
            let stored = icfg
                .state_dir
                .as_deref()
                .and_then(|d| stored_bundle(d, icfg, &ctx.trust_domain));
            let Some(bundle) = stored else {
                return Err(e);
            };
            let msg = super::remote::error_chain(&e);
            tracing::error!(
                backend = kind,
                error = %msg,
                "BACKEND UNREACHABLE AT START: signing with the stored intermediate CA; no successor can be prepared until the backend answers"
            );
            LazyUpstream::start(kind, bundle, msg, connect)
        }
    };
    let signer = IntermediateSigner::start(
        upstream,
        icfg,
        &ctx.trust_domain,
        ctx.max_leaf_ttl,
        ctx.metrics.clone(),
    )
    .await
    .map_err(|e| super::BuildError::new("intermediate mode", e))?;
    Ok(Arc::new(signer))
}
