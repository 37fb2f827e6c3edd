//! Kubernetes API access: one client per configured cluster, the TokenReview call with its
//! rate limit and deadline, (in [`issuer_keys`]) the service-account keys that every token's
//! signature is checked against before a review is spent on it, (in [`pods`]) the watch-fed pod caches that authorize ztunnel
//! impersonation, and (in [`leader`]) Lease-based leader election for cluster writes.
//!
//! Every call made while a CreateCertificate request waits is bounded: it first needs a
//! slot from the cluster's client-side rate limiter and then an answer, both within
//! `authn.kubernetes.requestTimeout`; whatever goes wrong on the way (no slot, connection
//! refused, timeout, an API error such as missing RBAC) is [`K8sError`], which the
//! authenticator reports as UNAVAILABLE: our problem, the caller should retry.
//!
//! Named `k8s` rather than `kube` so that paths into the `kube` crate stay unambiguous.

pub mod ca_secret;
pub mod issuer_keys;
pub mod leader;
pub mod pods;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;

use crate::config::{KubeClusterConfig, KubernetesAuthnConfig};

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("cluster {cluster}: loading client config: {message}")]
    Config { cluster: String, message: String },
    #[error("cluster {cluster}: client-side rate limit: no slot within {wait:?}")]
    RateLimited { cluster: String, wait: Duration },
    #[error("cluster {cluster}: API call timed out after {0:?}", .timeout)]
    Timeout { cluster: String, timeout: Duration },
    #[error("cluster {cluster}: API call failed: {message}")]
    Api { cluster: String, message: String },
}

/// Token bucket: `burst` slots, refilled at `qps` per second. Waiters sleep until a slot
/// is due, but never past their deadline.
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a slot, waiting as long as it takes (for background writers, which have no
    /// caller waiting; cancel by dropping the future).
    pub async fn wait_slot(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a slot, waiting until `deadline` at most. Returns false if none came in time.
    async fn acquire(&self, deadline: Instant) -> bool {
        loop {
            let wait = match self.try_take() {
                Ok(()) => return true,
                Err(wait) => wait,
            };
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|t| t > deadline)
            {
                return false;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a slot if one is there; otherwise how long until the next one is due.
    fn try_take(&self) -> Result<(), Duration> {
        let mut st = self.state.lock().expect("rate limiter lock");
        let now = Instant::now();
        let (tokens, last) = *st;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.qps).min(self.burst);
        if tokens >= 1.0 {
            *st = (tokens - 1.0, now);
            return Ok(());
        }
        *st = (tokens, now);
        // A tiny qps makes this huge, never a panic.
        Err(Duration::try_from_secs_f64((1.0 - tokens) / self.qps).unwrap_or(Duration::MAX))
    }
}

/// Which share of a cluster's API budget a TokenReview may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The token's signature verified against the cluster's published keys: the whole
    /// budget.
    Verified,
    /// The keys could not be fetched, so the token is unchecked: at most
    /// 1/[`UNVERIFIED_SHARE`] of the budget, so a flood of junk cannot use up what tokens that
    /// did verify need.
    Unverified,
}

/// Unverified tokens get at most 1/`UNVERIFIED_SHARE` of a cluster's QPS and burst.
pub const UNVERIFIED_SHARE: u32 = 4;

/// One cluster's API server.
pub struct Cluster {
    /// What clients send in the `clusterid` header.
    pub id: String,
    /// Identities authenticated by this cluster are `spiffe://<trust_domain>/...`.
    pub trust_domain: String,
    client: kube::Client,
    limiter: RateLimiter,
    /// The extra bucket a [`Lane::Unverified`] review must also get a slot from.
    unverified: RateLimiter,
    /// The bucket of the writes the Lease holder makes in bulk (the root ConfigMap in every
    /// namespace): the same `qps` and `burst` as TokenReviews, but a bucket of its own, so
    /// a bundle change in a big cluster never takes slots that authentication needs.
    writes: Arc<RateLimiter>,
    timeout: Duration,
    /// The cluster's service-account issuer keys.
    pub keys: Arc<issuer_keys::IssuerKeys>,
    /// Pods of this cluster, kept current by a watch (only when impersonation is enabled).
    pub pods: Option<Arc<pods::PodCache>>,
}

impl Cluster {
    async fn build(
        c: &KubeClusterConfig,
        k: &KubernetesAuthnConfig,
        default_trust_domain: &str,
        watch_pods: bool,
    ) -> Result<Self, K8sError> {
        let config_err = |message: String| K8sError::Config {
            cluster: c.id.clone(),
            message,
        };
        let mut config = match &c.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| config_err(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| config_err(format!("{}: {e}", path.display())))?
            }
            None => kube::Config::incluster().map_err(|e| config_err(e.to_string()))?,
        };
        // Requests made for a waiting caller are bounded by `timeout` (below); the watch
        // needs long reads, so the client itself only bounds connecting. No automatic
        // retries either: they would hide an outage behind our deadline, and Istio's
        // clients retry UNAVAILABLE themselves.
        config.connect_timeout = Some(k.request_timeout);
        config.default_retry = false;
        let client = kube::Client::try_from(config).map_err(|e| config_err(e.to_string()))?;
        Ok(Self {
            id: c.id.clone(),
            trust_domain: c
                .trust_domain
                .clone()
                .unwrap_or_else(|| default_trust_domain.to_string()),
            keys: Arc::new(issuer_keys::IssuerKeys::new(
                c.id.clone(),
                client.clone(),
                k.request_timeout,
            )),
            client,
            limiter: RateLimiter::new(c.qps, c.burst),
            unverified: RateLimiter::new(
                c.qps / f64::from(UNVERIFIED_SHARE),
                (c.burst / UNVERIFIED_SHARE).max(1),
            ),
            writes: Arc::new(RateLimiter::new(c.qps, c.burst)),
            timeout: k.request_timeout,
            pods: watch_pods.then(|| Arc::new(pods::PodCache::new())),
        })
    }

    /// Checks `token`'s signature against the cluster's issuer keys (fetching them when
    /// needed).
    pub async fn precheck(&self, token: &str) -> issuer_keys::Precheck {
        self.keys.check(token).await
    }

    /// `POST /apis/authentication.k8s.io/v1/tokenreviews` with `spec.audiences`; returns
    /// the review's status (authenticated or not). Bounded by the request timeout,
    /// including the wait for a rate-limiter slot (two, in the unverified lane).
    pub async fn token_review(
        &self,
        token: &str,
        audiences: &[String],
        lane: Lane,
    ) -> Result<TokenReviewStatus, K8sError> {
        let deadline = Instant::now() + self.timeout;
        let slot = match lane {
            Lane::Verified => true,
            Lane::Unverified => self.unverified.acquire(deadline).await,
        };
        if !slot || !self.limiter.acquire(deadline).await {
            return Err(K8sError::RateLimited {
                cluster: self.id.clone(),
                wait: self.timeout,
            });
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(audiences.to_vec()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let params = PostParams::default();
        let call = api.create(&params, &review);
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, call).await {
            Err(_) => Err(K8sError::Timeout {
                cluster: self.id.clone(),
                timeout: self.timeout,
            }),
            Ok(Err(e)) => Err(K8sError::Api {
                cluster: self.id.clone(),
                message: e.to_string(),
            }),
            Ok(Ok(r)) => Ok(r.status.unwrap_or_default()),
        }
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The rate limit of bulk writes (see the field).
    pub fn writes(&self) -> Arc<RateLimiter> {
        self.writes.clone()
    }
}

/// Every configured cluster; the first is the local one.
pub struct Clusters {
    list: Vec<Arc<Cluster>>,
}

impl Clusters {
    /// Builds the clients (reads kubeconfig files; contacts nothing). With `watch_pods`,
    /// each cluster gets a pod cache, filled once [`Clusters::spawn_watchers`] runs.
    pub async fn build(
        cfg: &KubernetesAuthnConfig,
        default_trust_domain: &str,
        watch_pods: bool,
    ) -> Result<Self, K8sError> {
        let mut list = Vec::new();
        for c in &cfg.clusters {
            list.push(Arc::new(
                Cluster::build(c, cfg, default_trust_domain, watch_pods).await?,
            ));
        }
        Ok(Self { list })
    }

    /// The cluster a request's `clusterid` names: absent, empty or the local id mean the
    /// local (first) cluster; an id nobody configured is `None`.
    pub fn select(&self, cluster_id: Option<&str>) -> Option<&Arc<Cluster>> {
        match cluster_id.filter(|c| !c.is_empty()) {
            None => self.list.first(),
            Some(id) => self.list.iter().find(|c| c.id == id),
        }
    }

    pub fn all(&self) -> &[Arc<Cluster>] {
        &self.list
    }

    pub fn ids(&self) -> Vec<&str> {
        self.list.iter().map(|c| c.id.as_str()).collect()
    }

    /// Starts, until `stop`, the refresh of every cluster's issuer keys and one pod watch
    /// per cluster (those with a pod cache).
    pub fn spawn_watchers(&self, stop: CancellationToken) {
        for c in &self.list {
            c.keys.clone().spawn_refresh(stop.clone());
            if let Some(cache) = &c.pods {
                pods::spawn_watch(c.id.clone(), c.client(), cache.clone(), stop.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rate_limiter_gives_burst_then_refuses_past_deadline() {
        let l = RateLimiter::new(10.0, 3);
        let soon = Instant::now() + Duration::from_millis(20);
        for _ in 0..3 {
            assert!(l.acquire(soon).await);
        }
        // The next slot is ~100 ms away: not within 20 ms...
        assert!(!l.acquire(Instant::now() + Duration::from_millis(20)).await);
        // ...but within 500 ms.
        let t = Instant::now();
        assert!(l.acquire(Instant::now() + Duration::from_millis(500)).await);
        assert!(t.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test]
    async fn a_tiny_rate_waits_instead_of_spinning_or_panicking() {
        let l = RateLimiter::new(1e-300, 1);
        assert!(l.acquire(Instant::now()).await, "the burst");
        // The next slot is further away than any Instant: refused at once, no panic.
        assert!(!l.acquire(Instant::now() + Duration::from_secs(3600)).await);
        // A background writer waits (it would spin or panic if the wait were not bounded
        // and representable).
        let w = tokio::time::timeout(Duration::from_millis(50), l.wait_slot()).await;
        assert!(w.is_err(), "no slot, so still waiting");
    }
}
