//! Kubernetes TokenReview (`authentication.k8s.io/v1`): the API server of the caller's
//! cluster says whether a service-account token is valid (protocol doc section 4.3).
//!
//! The cluster is the one the `clusterid` header names (absent or empty: the local, first
//! configured cluster; an unknown id is refused). The review is sent with
//! `spec.audiences` and must come back authenticated, for a user
//! `system:serviceaccount:<ns>:<sa>` in the group `system:serviceaccounts`, with one of our
//! audiences in `status.audiences` (the API docs ask audience-setting clients to check
//! this; an empty list would mean the token is only good for the API server itself). The
//! pod the token is bound to (`user.extra` pod-name / pod-uid) is kept for the
//! impersonation check.
//!
//! Cost control (users hit API throttling with one review per request, istio-csr#144):
//! - successful reviews are cached until the token's `exp` (read from the unverified
//!   payload; the review itself vouches for the token), capped at `cacheMaxTtl`, in a
//!   bounded map keyed by SHA-256(cluster, token): the token itself is never stored or
//!   logged;
//! - concurrent requests with the same token share one in-flight review;
//! - rejections are remembered for [`NEGATIVE_TTL`] only; API failures not at all;
//! - tokens that cannot be Kubernetes service-account tokens never reach the API server:
//!   not JWT-shaped, already expired, or from an issuer configured under `authn.jwt`
//!   (those belong to the JWT authenticator, whose verdict stands);
//! - the signature is checked first against the cluster's service-account issuer keys
//!   (`/openid/v1/jwks`, [`crate::k8s::issuer_keys`]): a forged token, or one signed by a
//!   key the cluster does not publish, is refused without a review, so junk cannot use up
//!   the API budget. When the keys cannot be fetched, reviews of unchecked tokens run in a
//!   reduced lane ([`Lane::Unverified`]), which leaves the rest of the budget to tokens that
//!   verified against the last keys seen.
//!
//! When the API server cannot be asked (down, timed out, rate limit, RBAC), an uncached
//! token is [`AuthnError::Unavailable`] (UNAVAILABLE: retry), while cached ones keep
//! working.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuthMethod, Authenticator, AuthnError, Caller, PodRef, RequestContext};
use crate::identity::{ServiceAccount, SpiffeId};
use crate::k8s::issuer_keys::Precheck;
use crate::k8s::{Cluster, Clusters, Lane};
use crate::metrics::Metrics;

/// How long a rejected token is answered from memory (a burst of retries with a bad token
/// costs one review); short, so a token that just became valid is not refused for long.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// A token whose `exp` is this far in the past is refused without asking.
const EXPIRY_LEEWAY_SECS: u64 = 30;
/// Service-account tokens are ~1 KiB; anything this large is not one.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The group every service-account user is in.
const SA_GROUP: &str = "system:serviceaccounts";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

type Key = [u8; 32];
type Verdict = Result<Caller, AuthnError>;
type InFlight = Shared<BoxFuture<'static, Verdict>>;

struct Entry {
    verdict: Verdict,
    until: Instant,
}

/// Bounded map of verdicts. When full, expired entries go first, then the ones expiring
/// soonest; the scan happens only at capacity.
struct Cache {
    map: HashMap<Key, Entry>,
    capacity: usize,
}

impl Cache {
    fn get(&mut self, key: &Key, now: Instant) -> Option<Verdict> {
        match self.map.get(key) {
            Some(e) if e.until > now => Some(e.verdict.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: Key, verdict: Verdict, until: Instant, now: Instant) {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.map.retain(|_, e| e.until > now);
            while self.map.len() >= self.capacity {
                let Some(victim) = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                self.map.remove(&victim);
            }
        }
        self.map.insert(key, Entry { verdict, until });
    }
}

struct Inner {
    clusters: Arc<Clusters>,
    audiences: Vec<String>,
    /// Issuers configured under `authn.jwt`: their tokens are not ours.
    jwt_issuers: HashSet<String>,
    max_ttl: Duration,
    cache: Mutex<Cache>,
    in_flight: Mutex<HashMap<Key, InFlight>>,
    metrics: Arc<Metrics>,
}

pub struct TokenReviewAuthenticator {
    inner: Arc<Inner>,
}

/// Settings of [`TokenReviewAuthenticator`].
pub struct Settings {
    pub audiences: Vec<String>,
    pub cache_size: usize,
    pub cache_max_ttl: Duration,
    pub jwt_issuers: HashSet<String>,
    pub metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
    exp: Option<u64>,
}

impl TokenReviewAuthenticator {
    pub fn new(clusters: Arc<Clusters>, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                clusters,
                audiences: settings.audiences,
                jwt_issuers: settings.jwt_issuers,
                max_ttl: settings.cache_max_ttl,
                cache: Mutex::new(Cache {
                    map: HashMap::new(),
                    capacity: settings.cache_size.max(1),
                }),
                in_flight: Mutex::new(HashMap::new()),
                metrics: settings.metrics,
            }),
        }
    }

    /// Number of cached verdicts (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.inner.cache.lock().expect("cache").map.len()
    }
}

/// The payload of a JWT-shaped token (three base64url parts, JSON payload), unverified.
fn unverified_payload(token: &str) -> Option<Unverified> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if h.is_empty() || s.is_empty() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(p)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn cache_key(cluster: &str, token: &str) -> Key {
    let mut h = Sha256::new();
    h.update(cluster.as_bytes());
    h.update([0u8]);
    h.update(token.as_bytes());
    h.finalize().into()
}

/// Turns an answered review into a caller, or the reason it is refused.
fn judge(status: &TokenReviewStatus, cluster: &Cluster, audiences: &[String]) -> Verdict {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().filter(|e| !e.is_empty());
        return Err(AuthnError::Invalid(match why {
            Some(e) => format!(
                "token review in cluster {}: not authenticated: {e}",
                cluster.id
            ),
            None => format!("token review in cluster {}: not authenticated", cluster.id),
        }));
    }
    let returned = status.audiences.as_deref().unwrap_or_default();
    if !returned.iter().any(|a| audiences.contains(a)) {
        return Err(AuthnError::Invalid(format!(
            "token review in cluster {}: token not valid for audiences {audiences:?} (review confirmed {returned:?})",
            cluster.id
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let groups = user.and_then(|u| u.groups.as_deref()).unwrap_or_default();
    if !groups.iter().any(|g| g == SA_GROUP) {
        return Err(AuthnError::Invalid(format!(
            "token review in cluster {}: user is not in group {SA_GROUP}",
            cluster.id
        )));
    }
    let sa = ServiceAccount::from_k8s_username(username).map_err(|_| {
        AuthnError::Invalid(format!(
            "token review in cluster {}: user is not a service account",
            cluster.id
        ))
    })?;
    let identity =
        SpiffeId::new(&cluster.trust_domain, sa).map_err(|e| AuthnError::Invalid(e.to_string()))?;
    let extra = |k: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|x| x.get(k))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let pod = match (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Some(PodRef { name, uid }),
        _ => None,
    };
    Ok(Caller {
        identity,
        cluster: Some(cluster.id.clone()),
        via: AuthMethod::TokenReview,
        pod,
    })
}

impl Inner {
    /// Asks the API server, caches the verdict and retires the in-flight entry. Runs in
    /// its own task so that it completes (and fills the cache) even if every waiting
    /// request gave up.
    async fn review(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        token: String,
        key: Key,
        exp: Option<u64>,
        lane: Lane,
    ) -> Verdict {
        let verdict = match cluster.token_review(&token, &self.audiences, lane).await {
            Ok(status) => judge(&status, &cluster, &self.audiences),
            Err(e) => Err(AuthnError::Unavailable(e.to_string())),
        };
        let result = match &verdict {
            Ok(_) => "authenticated",
            Err(AuthnError::Unavailable(_)) => "error",
            Err(_) => "refused",
        };
        self.metrics
            .token_reviews
            .with_label_values(&[cluster.id.as_str(), result])
            .inc();
        let now = Instant::now();
        let ttl = match &verdict {
            Ok(_) => {
                let left = exp.map_or(self.max_ttl, |exp| {
                    Duration::from_secs(exp.saturating_sub(unix_now()))
                });
                Some(left.min(self.max_ttl))
            }
            Err(AuthnError::Invalid(_)) => Some(NEGATIVE_TTL),
            Err(_) => None,
        };
        match (&verdict, ttl) {
            (Ok(c), _) => {
                tracing::debug!(cluster = %cluster.id, identity = %c.identity, "token review: authenticated")
            }
            (Err(e), _) => {
                tracing::debug!(cluster = %cluster.id, error = %e, "token review: refused")
            }
        }
        if let Some(ttl) = ttl.filter(|t| !t.is_zero()) {
            self.cache
                .lock()
                .expect("cache")
                .insert(key, verdict.clone(), now + ttl, now);
        }
        self.in_flight.lock().expect("in-flight").remove(&key);
        verdict
    }
}

#[async_trait]
impl Authenticator for TokenReviewAuthenticator {
    fn name(&self) -> &'static str {
        "token_review"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(token) = ctx.bearer()? else {
            return Ok(None);
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthnError::Malformed("token too large".into()));
        }
        let Some(claims) = unverified_payload(token) else {
            return Err(AuthnError::Malformed(
                "bearer token is not a JWT (no TokenReview sent)".into(),
            ));
        };
        if claims
            .iss
            .as_ref()
            .is_some_and(|i| self.inner.jwt_issuers.contains(i))
        {
            return Ok(None);
        }
        if long_expired(claims.exp, unix_now()) {
            return Err(AuthnError::Invalid(
                "token expired (no TokenReview sent)".into(),
            ));
        }
        let inner = &self.inner;
        let cluster = inner.clusters.select(ctx.cluster()).ok_or_else(|| {
            AuthnError::Invalid(format!(
                "unknown cluster id {:?} (configured: {:?})",
                ctx.cluster().unwrap_or(""),
                inner.clusters.ids()
            ))
        })?;
        let key = cache_key(&cluster.id, token);
        let hit = |v: Verdict| {
            inner
                .metrics
                .token_review_cache_hits
                .with_label_values(&[cluster.id.as_str()])
                .inc();
            v.map(Some)
        };
        if let Some(v) = inner.cache.lock().expect("cache").get(&key, Instant::now()) {
            return hit(v);
        }
        let check = cluster.precheck(token).await;
        inner
            .metrics
            .token_prechecks
            .with_label_values(&[cluster.id.as_str(), check.label()])
            .inc();
        let lane = match check {
            Precheck::Verified => Lane::Verified,
            Precheck::KeysUnavailable => Lane::Unverified,
            Precheck::Forged(why) => {
                return Err(AuthnError::Invalid(format!(
                    "token not signed by cluster {}: {why} (no TokenReview sent)",
                    cluster.id
                )));
            }
            Precheck::UnknownKey => {
                return Err(AuthnError::Invalid(format!(
                    "token signed by a key cluster {} does not publish (no TokenReview sent)",
                    cluster.id
                )));
            }
        };
        let fut = {
            let mut in_flight = inner.in_flight.lock().expect("in-flight");
            // Re-check under the in-flight lock: a review may have finished meanwhile.
            if let Some(v) = inner.cache.lock().expect("cache").get(&key, Instant::now()) {
                return hit(v);
            }
            in_flight
                .entry(key)
                .or_insert_with(|| {
                    let task = tokio::spawn(inner.clone().review(
                        cluster.clone(),
                        token.to_string(),
                        key,
                        claims.exp,
                        lane,
                    ));
                    async move {
                        task.await.unwrap_or_else(|e| {
                            Err(AuthnError::Unavailable(format!(
                                "token review task failed: {e}"
                            )))
                        })
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        fut.await.map(Some)
    }
}

/// True when `exp` (unverified, so anything up to u64::MAX) is past by more than the
/// leeway. Saturating: a huge `exp` must not overflow.
fn long_expired(exp: Option<u64>, now: u64) -> bool {
    exp.is_some_and(|exp| exp.saturating_add(EXPIRY_LEEWAY_SECS) < now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_check_does_not_overflow() {
        let now = unix_now();
        assert!(!long_expired(Some(u64::MAX), now));
        assert!(!long_expired(Some(u64::MAX - 1), now));
        assert!(long_expired(Some(5), now));
        assert!(!long_expired(Some(now), now));
        assert!(!long_expired(None, now));
    }

    #[test]
    fn only_jwt_shaped_tokens_have_a_payload() {
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"x","exp":5}"#);
        let ok = unverified_payload(&format!("aGVhZA.{p}.c2ln")).unwrap();
        assert_eq!(ok.iss.as_deref(), Some("x"));
        assert_eq!(ok.exp, Some(5));
        for bad in [
            "garbage",
            "a.b",
            "a.b.c.d",
            &format!(".{p}.c2ln"),
            &format!("aGVhZA.{p}."),
            "aGVhZA.bm90IGpzb24.c2ln",
            "abcdef.0123456789abcdef",
        ] {
            assert!(unverified_payload(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cache_is_bounded_and_evicts_expired_then_soonest() {
        let now = Instant::now();
        let mut c = Cache {
            map: HashMap::new(),
            capacity: 2,
        };
        let v = || Err(AuthnError::Invalid("x".into()));
        c.insert([1; 32], v(), now + Duration::from_secs(10), now);
        c.insert([2; 32], v(), now + Duration::from_secs(5), now);
        c.insert([3; 32], v(), now + Duration::from_secs(20), now);
        assert_eq!(c.map.len(), 2);
        assert!(c.get(&[2; 32], now).is_none(), "soonest-expiring evicted");
        assert!(c.get(&[1; 32], now).is_some());
        assert!(c.get(&[3; 32], now + Duration::from_secs(21)).is_none());
        assert_eq!(c.map.len(), 1, "expired entry dropped on read");
    }

    #[test]
    fn key_depends_on_cluster_and_token() {
        assert_ne!(cache_key("a", "t"), cache_key("b", "t"));
        assert_ne!(cache_key("a", "t"), cache_key("a", "u"));
        assert_eq!(cache_key("a", "t"), cache_key("a", "t"));
    }
}
