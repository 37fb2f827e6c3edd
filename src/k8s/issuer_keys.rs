//! The cluster's service-account issuer keys (`GET /openid/v1/jwks`), so that a token's
//! signature is checked here before a TokenReview is spent on it.
//!
//! Without this, anyone who can reach the gRPC port could send JWT-shaped junk and make the
//! bridge spend its API budget (client-side QPS, and the API server's priority-and-fairness
//! share) on reviews, starving real workloads. Every service account may read the path
//! through the default `system:service-account-issuer-discovery` binding; the chart also
//! grants it.
//!
//! The check answers one of:
//! - [`Precheck::Verified`]: a published key verifies the signature; TokenReview still decides
//!   validity (expiry, revocation, the bound pod);
//! - [`Precheck::Forged`]: a key with the token's `kid` exists but does not verify it, or the
//!   token is not signed the way the API server signs: refused, no review;
//! - [`Precheck::UnknownKey`]: the keys are current (fetched successfully, refreshed once for
//!   this token if the last fetch is older than [`MIN_ON_DEMAND_REFRESH`]) and none fits: refused;
//! - [`Precheck::KeysUnavailable`]: the keys cannot be fetched (no RBAC, API down, the path
//!   not served). The review is sent, but in a reduced lane of the rate limiter (see
//!   `Cluster::token_review`), so that junk cannot take the capacity of tokens whose
//!   signature did verify against the last keys seen.
//!
//! Keys are kept after a failed refresh (the last good set stays in use), refreshed every
//! [`REFRESH_INTERVAL`], sooner while failing, and on demand (rate limited) when a token
//! names an unknown `kid`, which is how an API server's key rotation is picked up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

use super::K8sError;
use crate::jwks::{KeySet, Signature, check_signature};

/// The path every conformant API server serves (service-account issuer discovery).
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// Routine refresh.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// While fetching fails, or before the first success.
const RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// A token naming an unknown key refreshes the keys at most this often.
pub const MIN_ON_DEMAND_REFRESH: Duration = Duration::from_secs(10);

/// What the local signature check says about a token (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precheck {
    Verified,
    Forged(String),
    UnknownKey,
    KeysUnavailable,
}

impl Precheck {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Precheck::Verified => "verified",
            Precheck::Forged(_) => "bad_signature",
            Precheck::UnknownKey => "unknown_key",
            Precheck::KeysUnavailable => "keys_unavailable",
        }
    }
}

struct Fetched {
    at: Instant,
    ok: bool,
}

/// One cluster's issuer keys.
pub struct IssuerKeys {
    cluster: String,
    client: kube::Client,
    timeout: Duration,
    keys: ArcSwapOption<KeySet>,
    /// The last fetch attempt; the lock also makes concurrent refreshes share one fetch.
    last: tokio::sync::Mutex<Option<Fetched>>,
}

impl IssuerKeys {
    pub fn new(cluster: String, client: kube::Client, timeout: Duration) -> Self {
        Self {
            cluster,
            client,
            timeout,
            keys: ArcSwapOption::empty(),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Number of keys in use (0: none fetched yet).
    pub fn loaded(&self) -> usize {
        self.keys.load().as_ref().map_or(0, |k| k.len())
    }

    /// One `GET /openid/v1/jwks`. It needs no slot of the TokenReview rate limiter: it is
    /// rate limited by itself (at most one per [`MIN_ON_DEMAND_REFRESH`], plus the routine
    /// refresh), and must not compete with reviews.
    async fn fetch(&self) -> Result<KeySet, K8sError> {
        let deadline = Instant::now() + self.timeout;
        let api = |message: String| K8sError::Api {
            cluster: self.cluster.clone(),
            message,
        };
        let req = http::Request::get(JWKS_PATH)
            .body(Vec::new())
            .map_err(|e| api(e.to_string()))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let text = match tokio::time::timeout(remaining, self.client.request_text(req)).await {
            Err(_) => {
                return Err(K8sError::Timeout {
                    cluster: self.cluster.clone(),
                    timeout: self.timeout,
                });
            }
            Ok(Err(e)) => return Err(api(format!("GET {JWKS_PATH}: {e}"))),
            Ok(Ok(t)) => t,
        };
        KeySet::parse(text.as_bytes()).map_err(|e| api(format!("GET {JWKS_PATH}: {e}")))
    }

    /// Fetches now unless the last attempt is younger than `min_age`; concurrent callers
    /// share one fetch. Returns whether the keys in use are current (the last attempt,
    /// this one or a recent one, succeeded).
    async fn refresh(&self, min_age: Duration) -> bool {
        let mut last = self.last.lock().await;
        if let Some(f) = last.as_ref().filter(|f| f.at.elapsed() < min_age) {
            return f.ok;
        }
        let result = self.fetch().await;
        let ok = result.is_ok();
        match result {
            Ok(keys) => {
                tracing::debug!(cluster = %self.cluster, keys = keys.len(), "service-account issuer keys loaded");
                self.keys.store(Some(Arc::new(keys)));
            }
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, error = %e, kept = self.loaded(),
                    "cannot fetch the service-account issuer keys; TokenReviews of tokens not verified locally run in a reduced lane");
            }
        }
        *last = Some(Fetched {
            at: Instant::now(),
            ok,
        });
        ok
    }

    /// Checks `token`'s signature against the keys, refreshing them (rate limited) when
    /// none are loaded or none fits.
    pub async fn check(&self, token: &str) -> Precheck {
        let mut refreshed = None;
        loop {
            let verdict = match self.keys.load_full() {
                Some(keys) => check_signature(token, &keys),
                None => Signature::UnknownKey,
            };
            match verdict {
                Signature::Valid => return Precheck::Verified,
                Signature::Invalid(why) => return Precheck::Forged(why),
                Signature::UnknownKey => match refreshed {
                    None => {
                        refreshed = Some(self.refresh(MIN_ON_DEMAND_REFRESH).await);
                    }
                    Some(true) if self.loaded() > 0 => return Precheck::UnknownKey,
                    Some(_) => return Precheck::KeysUnavailable,
                },
            }
        }
    }

    /// Refreshes every [`REFRESH_INTERVAL`] (every [`RETRY_INTERVAL`] while failing)
    /// until `stop`; the first fetch happens at once.
    pub fn spawn_refresh(self: Arc<Self>, stop: CancellationToken) {
        tokio::spawn(async move {
            loop {
                let ok = self.refresh(Duration::ZERO).await;
                let wait = if ok { REFRESH_INTERVAL } else { RETRY_INTERVAL };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }
}
