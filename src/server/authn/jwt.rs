//! OIDC/JWT bearer tokens (istiod's `JWT_RULE`), checked locally against each issuer's
//! JWKS: works without any Kubernetes API access, and for remote clusters.
//!
//! The issuer is chosen by the token's `iss`; the signing key by `kid` (or, without a kid,
//! every key of the right family). Only asymmetric algorithms are accepted, and the
//! algorithm must fit the key's family, which rules out `alg: none` and HMAC confusion.
//! JWKS documents are cached, refreshed periodically, and refreshed early (rate limited)
//! when a token names an unknown key, so issuer key rotation works without restarts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use base64::Engine;
use jsonwebtoken::Validation;
use serde::Deserialize;

use super::{AuthMethod, Authenticator, AuthnError, Caller, RequestContext};
use crate::config::JwtIssuerConfig;
use crate::identity::{ServiceAccount, SpiffeId};
use crate::jwks::{HeaderError, KeySet};

pub use crate::jwks::{JwksError, MAX_JWKS_BYTES};

/// Tokens are accepted this long past `exp` / before `nbf` (clock skew).
const LEEWAY_SECS: u64 = 30;
/// An unknown `kid` triggers at most one JWKS refresh per issuer in this interval.
const MIN_ON_DEMAND_REFRESH: Duration = Duration::from_secs(10);
/// Verified tokens are remembered for at most this long (and never past `exp`), so a
/// client's repeated calls cost one signature check, while a key removed from the JWKS
/// stops working soon.
const MAX_CACHE_TTL: Duration = Duration::from_secs(300);
/// Bound on remembered tokens (each ~200 bytes): a restart storm cannot grow memory
/// without limit.
const MAX_CACHED_TOKENS: usize = 65_536;

enum Source {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
        token_file: Option<PathBuf>,
    },
}

impl Source {
    async fn fetch(&self) -> Result<KeySet, JwksError> {
        let body = match self {
            Source::File(path) => {
                let read = |source| JwksError::Read {
                    path: path.clone(),
                    source,
                };
                let len = tokio::fs::metadata(path).await.map_err(read)?.len();
                if len > MAX_JWKS_BYTES as u64 {
                    return Err(JwksError::Parse(format!(
                        "{} is over {MAX_JWKS_BYTES} bytes",
                        path.display()
                    )));
                }
                tokio::fs::read(path).await.map_err(read)?
            }
            Source::Url {
                url,
                client,
                token_file,
            } => {
                let fetch = |message: String| JwksError::Fetch {
                    url: url.clone(),
                    message,
                };
                let mut req = client.get(url);
                if let Some(p) = token_file {
                    // Re-read each time: projected tokens are rotated on disk by the kubelet.
                    let token =
                        tokio::fs::read_to_string(p)
                            .await
                            .map_err(|source| JwksError::Read {
                                path: p.clone(),
                                source,
                            })?;
                    req = req.bearer_auth(token.trim());
                }
                let mut resp = req.send().await.map_err(|e| fetch(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(fetch(format!("HTTP {}", resp.status())));
                }
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    return Err(fetch(format!("answer over {MAX_JWKS_BYTES} bytes")));
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| fetch(e.to_string()))? {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(fetch(format!("answer over {MAX_JWKS_BYTES} bytes")));
                    }
                    body.extend_from_slice(&chunk);
                }
                body
            }
        };
        KeySet::parse(&body)
    }

    fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Url { url, .. } => url.clone(),
        }
    }
}

struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    trust_domain: String,
    cluster_id: Option<String>,
    refresh_interval: Duration,
    source: Source,
    keys: ArcSwapOption<KeySet>,
    last_on_demand: tokio::sync::Mutex<Option<Instant>>,
}

impl Issuer {
    async fn refresh(&self) -> Result<(), JwksError> {
        let keys = self.source.fetch().await?;
        tracing::debug!(issuer = %self.issuer, keys = keys.len(), "JWKS loaded");
        self.keys.store(Some(Arc::new(keys)));
        Ok(())
    }

    /// Refreshes because a token named an unknown key; rate limited, and concurrent callers
    /// share one fetch.
    async fn refresh_on_demand(&self) {
        let mut last = self.last_on_demand.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_ON_DEMAND_REFRESH) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.refresh().await {
            tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refresh failed");
        }
    }
}

#[derive(Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// A token that verified, remembered under the SHA-256 of the token (never the token).
struct Verified {
    issuer: Arc<Issuer>,
    identity: SpiffeId,
    until: Instant,
}

/// All configured JWT issuers.
pub struct JwtAuthenticator {
    issuers: HashMap<String, Arc<Issuer>>,
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
    /// When Kubernetes TokenReview follows in the chain, a token from an issuer not
    /// configured here is "not mine" (the API server may know it) instead of invalid.
    defer_unknown_issuers: bool,
}

impl JwtAuthenticator {
    /// Loads every issuer's keys once. A JWKS file that cannot be read is a startup error;
    /// a JWKS URL that cannot be fetched is retried in the background (its tokens are
    /// answered UNAVAILABLE until then).
    pub async fn new(
        configs: &[JwtIssuerConfig],
        default_trust_domain: &str,
    ) -> Result<Self, JwksError> {
        let mut issuers = HashMap::new();
        for c in configs {
            let source = match (&c.jwks_file, &c.jwks_uri) {
                (Some(p), _) => Source::File(p.clone()),
                (None, Some(u)) => Source::Url {
                    url: u.clone(),
                    client: http_client(c)?,
                    token_file: c.jwks_token_file.clone(),
                },
                (None, None) => unreachable!("validated: one of jwksFile/jwksUri"),
            };
            let iss = Arc::new(Issuer {
                issuer: c.issuer.clone(),
                audiences: c.audiences.clone(),
                trust_domain: c
                    .trust_domain
                    .clone()
                    .unwrap_or_else(|| default_trust_domain.to_string()),
                cluster_id: c.cluster_id.clone(),
                refresh_interval: c.refresh_interval,
                source,
                keys: ArcSwapOption::empty(),
                last_on_demand: tokio::sync::Mutex::new(None),
            });
            match iss.refresh().await {
                Ok(()) => {}
                Err(e) if matches!(iss.source, Source::Url { .. }) => {
                    tracing::error!(issuer = %c.issuer, error = %e, "cannot load JWKS; will retry");
                }
                Err(e) => return Err(e),
            }
            issuers.insert(c.issuer.clone(), iss);
        }
        Ok(Self {
            issuers,
            verified: std::sync::Mutex::new(HashMap::new()),
            defer_unknown_issuers: false,
        })
    }

    fn cached(
        &self,
        digest: &[u8; 32],
        ctx: &RequestContext<'_>,
    ) -> Option<Result<Caller, AuthnError>> {
        let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let v = cache.get(digest).filter(|v| v.until > Instant::now())?;
        Some(
            v.issuer
                .check_cluster(ctx)
                .map(|()| v.issuer.caller_for(v.identity.clone())),
        )
    }

    fn remember(&self, digest: [u8; 32], issuer: Arc<Issuer>, identity: SpiffeId, exp: u64) {
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let left = Duration::from_secs(exp.saturating_sub(now_unix)).min(MAX_CACHE_TTL);
        if left.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_TOKENS {
            cache.retain(|_, v| v.until > now);
            if cache.len() >= MAX_CACHED_TOKENS {
                cache.clear();
            }
        }
        cache.insert(
            digest,
            Verified {
                issuer,
                identity,
                until: now + left,
            },
        );
    }

    /// Leave tokens of unknown issuers to a later authenticator (TokenReview) instead of
    /// refusing them.
    pub fn defer_unknown_issuers(mut self, defer: bool) -> Self {
        self.defer_unknown_issuers = defer;
        self
    }

    /// Periodic JWKS refresh for every issuer until `shutdown` resolves.
    pub fn spawn_refresh(&self, shutdown: tokio_util::sync::CancellationToken) {
        for iss in self.issuers.values() {
            let iss = iss.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut failures = 0u32;
                loop {
                    let wait = if iss.keys.load().is_none() || failures > 0 {
                        // Not loaded or failing: retry sooner, with capped backoff.
                        Duration::from_secs(1 << failures.min(5)).min(iss.refresh_interval)
                    } else {
                        iss.refresh_interval
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    match iss.refresh().await {
                        Ok(()) => failures = 0,
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(issuer = %iss.issuer, source = %iss.source.describe(), error = %e, "JWKS refresh failed; keeping cached keys");
                        }
                    }
                }
            });
        }
    }

    async fn verify(&self, token: &str, ctx: &RequestContext<'_>) -> Result<Caller, AuthnError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cached(&digest, ctx) {
            return hit;
        }
        let header = crate::jwks::signed_header(token).map_err(|e| match e {
            HeaderError::Malformed(m) => AuthnError::Malformed(m),
            HeaderError::Refused(m) => AuthnError::Invalid(m),
        })?;
        let iss = unverified_issuer(token)?;
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or_else(|| AuthnError::Invalid("unknown token issuer".into()))?;
        issuer.check_cluster(ctx)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&issuer.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);

        let mut refreshed = false;
        loop {
            let Some(keys) = issuer.keys.load_full() else {
                if !refreshed {
                    issuer.refresh_on_demand().await;
                    refreshed = true;
                    continue;
                }
                return Err(AuthnError::Unavailable(format!(
                    "keys of issuer {} are not loaded",
                    issuer.issuer
                )));
            };
            let candidates: Vec<&crate::jwks::Key> = keys.candidates(&header).collect();
            if candidates.is_empty() {
                if !refreshed {
                    issuer.refresh_on_demand().await;
                    refreshed = true;
                    continue;
                }
                return Err(AuthnError::Invalid("token signed by an unknown key".into()));
            }
            let mut last_err = None;
            for k in candidates {
                match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                    Ok(data) => {
                        let identity = issuer.identity(&data.claims)?;
                        self.remember(digest, issuer.clone(), identity.clone(), data.claims.exp);
                        return Ok(issuer.caller_for(identity));
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            let e = last_err.expect("at least one candidate");
            use jsonwebtoken::errors::ErrorKind;
            let msg = match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".to_string(),
                ErrorKind::ImmatureSignature => "token not yet valid".to_string(),
                ErrorKind::InvalidAudience => "token audience not accepted".to_string(),
                ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
                ErrorKind::InvalidSignature => "bad token signature".to_string(),
                ErrorKind::MissingRequiredClaim(c) => format!("token lacks claim {c}"),
                other => format!("token rejected: {other:?}"),
            };
            return Err(AuthnError::Invalid(msg));
        }
    }
}

impl Issuer {
    fn identity(&self, claims: &Claims) -> Result<SpiffeId, AuthnError> {
        let sa = ServiceAccount::from_k8s_username(&claims.sub).map_err(|_| {
            AuthnError::Invalid("token subject is not a Kubernetes service account".into())
        })?;
        SpiffeId::new(&self.trust_domain, sa).map_err(|e| AuthnError::Invalid(e.to_string()))
    }

    /// A request naming another cluster than the one this issuer belongs to is refused.
    fn check_cluster(&self, ctx: &RequestContext<'_>) -> Result<(), AuthnError> {
        match (&self.cluster_id, ctx.cluster()) {
            (Some(want), Some(got)) if want != got => Err(AuthnError::Invalid(format!(
                "issuer belongs to cluster {want}, request names cluster {got}"
            ))),
            _ => Ok(()),
        }
    }

    fn caller_for(&self, identity: SpiffeId) -> Caller {
        Caller {
            identity,
            // Only a cluster the issuer is configured for is proven by the token; the
            // `clusterid` header alone is the caller's say-so.
            cluster: self.cluster_id.clone(),
            via: AuthMethod::Jwt,
            pod: None,
        }
    }
}

fn unverified_issuer(token: &str) -> Result<String, AuthnError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| AuthnError::Malformed("token is not a JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AuthnError::Malformed("token payload is not base64url".into()))?;
    let claims: UnverifiedClaims = serde_json::from_slice(&bytes)
        .map_err(|_| AuthnError::Malformed("token payload is not JSON".into()))?;
    claims
        .iss
        .ok_or_else(|| AuthnError::Invalid("token has no issuer".into()))
}

fn http_client(c: &JwtIssuerConfig) -> Result<reqwest::Client, JwksError> {
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(
            crate::pki::client_tls_config(c.jwks_ca_file.as_deref()).map_err(JwksError::Client)?,
        )
        .timeout(Duration::from_secs(10));
    b = b.user_agent(concat!("istio-ca-bridge/", env!("CARGO_PKG_VERSION")));
    b.build().map_err(|e| JwksError::Client(e.to_string()))
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "jwt"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(token) = ctx.bearer()? else {
            return Ok(None);
        };
        if token.len() > 16 * 1024 {
            return Err(AuthnError::Malformed("token too large".into()));
        }
        if self.defer_unknown_issuers
            && let Ok(iss) = unverified_issuer(token)
            && !self.issuers.contains_key(&iss)
        {
            return Ok(None);
        }
        self.verify(token, ctx).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEV_ISSUER;

    fn issuer_cfg(dir: &std::path::Path, cluster: Option<&str>) -> JwtIssuerConfig {
        JwtIssuerConfig {
            issuer: DEV_ISSUER.into(),
            jwks_file: Some(crate::dev::jwks_path(dir)),
            jwks_uri: None,
            jwks_ca_file: None,
            jwks_token_file: None,
            audiences: vec!["istio-ca".into()],
            trust_domain: None,
            cluster_id: cluster.map(str::to_string),
            refresh_interval: Duration::from_secs(300),
            insecure_http: false,
        }
    }

    fn ctx<'a>(auth: &'a str, cluster: Option<&'a str>) -> RequestContext<'a> {
        RequestContext {
            authorization: Some(auth),
            cluster_id: cluster,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn verified_tokens_are_cached_but_still_checked_per_request() {
        let dir = tempfile::tempdir().unwrap();
        crate::dev::ensure(dir.path()).unwrap();
        let a = JwtAuthenticator::new(&[issuer_cfg(dir.path(), Some("east"))], "cluster.local")
            .await
            .unwrap();
        let tok =
            crate::dev::mint(dir.path(), "ns", "sa", "istio-ca", Duration::from_secs(600)).unwrap();
        let h = format!("Bearer {tok}");
        let c = a
            .authenticate(&ctx(&h, Some("east")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.identity.to_string(), "spiffe://cluster.local/ns/ns/sa/sa");
        assert_eq!(a.verified.lock().unwrap().len(), 1);

        // Rotate the issuer key away: the cached token keeps working (bounded by
        // MAX_CACHE_TTL), a new token from the old key does not verify any more...
        let old = tempfile::tempdir().unwrap();
        for f in ["issuer-key.pem", "jwks.json"] {
            std::fs::copy(dir.path().join(f), old.path().join(f)).unwrap();
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
        crate::dev::ensure(dir.path()).unwrap();
        for i in a.issuers.values() {
            i.refresh().await.unwrap();
        }
        assert!(
            a.authenticate(&ctx(&h, Some("east")))
                .await
                .unwrap()
                .is_some()
        );
        let fresh =
            crate::dev::mint(old.path(), "ns", "sa", "istio-ca", Duration::from_secs(601)).unwrap();
        let e = a
            .authenticate(&ctx(&format!("Bearer {fresh}"), None))
            .await
            .unwrap_err();
        assert!(matches!(e, AuthnError::Invalid(_)), "{e:?}");
        // ...and the cluster check applies to cache hits too.
        let e = a.authenticate(&ctx(&h, Some("west"))).await.unwrap_err();
        assert!(e.to_string().contains("cluster"), "{e}");
    }

    #[tokio::test]
    async fn the_cluster_is_the_issuers_never_the_header() {
        let dir = tempfile::tempdir().unwrap();
        crate::dev::ensure(dir.path()).unwrap();
        let tok =
            crate::dev::mint(dir.path(), "ns", "sa", "istio-ca", Duration::from_secs(600)).unwrap();
        let h = format!("Bearer {tok}");
        for (configured, header, proven) in [
            (None, Some("east"), None),
            (None, None, None),
            (Some("east"), Some("east"), Some("east")),
            (Some("east"), None, Some("east")),
        ] {
            let a = JwtAuthenticator::new(&[issuer_cfg(dir.path(), configured)], "cluster.local")
                .await
                .unwrap();
            let c = a.authenticate(&ctx(&h, header)).await.unwrap().unwrap();
            assert_eq!(c.cluster.as_deref(), proven, "{configured:?} {header:?}");
        }
    }
}
