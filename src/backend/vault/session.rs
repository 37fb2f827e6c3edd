//! The session with Vault, kept up by background tasks so that a sign call only reads it:
//! - the token: renewed at 2/3 of each lease (`auth/token/renew-self`), replaced by a new
//!   login when a renewal hits the token's max TTL, when it is not renewable or when Vault
//!   refuses it; the current token sits in an `ArcSwap`, so a slow or failing renewal never
//!   stalls a call, and concurrent callers that saw a token refused log in once;
//! - the trust bundle: the self-signed certificates of the mount's (or issuer's) CA chain
//!   and/or a bundle file, re-read every `rootRefreshInterval` and on demand, published on
//!   the watch channel;
//! - health: not ready while Vault is unreachable or sealed (probed every second until it
//!   answers), while the bridge cannot log in, or for a while after Vault refused a fresh
//!   token (policy).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::client::{CallError, Conn, Lifetime, LoginError, Session, VaultError};
use super::{KIND, VaultConfig};
use crate::backend::{Health, remote};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{SharedBundle, TrustBundle};

/// How often an unhealthy backend probes `sys/health` to notice Vault is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The retry backoff for renewals and logins: the first delay and the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a refused fresh token (policy problem) keeps the backend not ready.
const DENIED_NOT_READY: Duration = Duration::from_secs(30);
/// A failed login is reused for this long by callers that queued behind it, so a burst
/// of requests with broken credentials makes one login attempt, not one each.
const LOGIN_FAILURE_REUSE: Duration = Duration::from_secs(1);
/// Never schedule token work closer than this (tokens with tiny TTLs).
const MIN_WAIT: Duration = Duration::from_millis(250);

/// The token task's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Renew,
    Login,
}

impl Lifetime {
    fn expires_at(&self) -> Option<Instant> {
        self.lease.map(|l| self.refreshed_at + l)
    }

    /// What to do next and when (`None`: nothing until something happens). Renew at 2/3
    /// of the lease; log in instead when the token cannot be renewed or renewals have
    /// started to shrink (max TTL in sight); after failures, retry with backoff, logging
    /// in if the token has expired meanwhile or logins are what failed.
    fn plan(&self, now: Instant, login_broken: bool, failures: u32) -> Option<(Step, Instant)> {
        if login_broken || failures > 0 {
            let expired = self.expires_at().is_some_and(|e| e <= now);
            let step = if login_broken || expired {
                Step::Login
            } else {
                Step::Renew
            };
            let delay = remote::backoff(failures.saturating_sub(1), FIRST_BACKOFF, MAX_BACKOFF);
            return Some((step, now + delay));
        }
        let lease = self.lease?;
        let capped = self.full_lease.is_some_and(|full| lease < full);
        let at = (self.refreshed_at + (lease * 2 / 3).max(MIN_WAIT)).max(now + MIN_WAIT);
        let step = if !self.renewable || capped {
            Step::Login
        } else {
            Step::Renew
        };
        Some((step, at))
    }
}

/// Why the backend is not ready; cleared by the event that proves the opposite.
#[derive(Default)]
struct HealthState {
    /// Logging in fails with refused or unreadable credentials (cleared by a login).
    login: Option<String>,
    /// A fresh token was refused by the sign endpoint: policy (cleared by a signature).
    /// Time-bounded: a not-ready bridge gets no traffic to prove a fixed policy with.
    denied: Option<(Instant, String)>,
    /// Vault cannot be reached or is sealed (cleared by any answer).
    unreachable: Option<String>,
}

/// What the signer and the background tasks share.
pub(super) struct Shared {
    pub(super) conn: Conn,
    pub(super) session: ArcSwap<Session>,
    /// Serializes logins; callers that waited find a newer generation and skip theirs,
    /// or a fresh failure and return it. Holds the last failure and when it happened.
    login_lock: tokio::sync::Mutex<Option<(Instant, LoginError)>>,
    bundle: watch::Sender<SharedBundle>,
    /// The issuers of the mount that can sign, by the root their chain ends in (the
    /// default issuer first for its root): how a sign call is pinned to a root during a
    /// rotation of Vault's root.
    pub(super) issuers: ArcSwap<Vec<(CertificateDer<'static>, String)>>,
    health: Mutex<HealthState>,
    pub(super) metrics: Arc<Metrics>,
    /// Wakes the token task (a login happened or was asked for).
    token_event: Notify,
}

impl Shared {
    /// Logs in, fetches the trust bundle and starts the token, bundle and health tasks,
    /// which stop when the guard is dropped.
    pub(super) async fn connect(
        cfg: &VaultConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, DropGuard), VaultError> {
        let conn = Conn::new(cfg)?;
        let login = conn.login().await;
        count(&metrics.backend_logins, login.is_ok());
        let session = login?;
        let (roots, issuers) = fetch_roots(&conn, session.token())
            .await
            .map_err(VaultError::Bundle)?;
        let bundle = TrustBundle::new(roots).map_err(|e| VaultError::Bundle(e.to_string()))?;
        tracing::info!(
            backend = KIND,
            address = %cfg.address,
            mount = %cfg.mount,
            role = %cfg.role,
            roots = bundle.roots().len(),
            lease_secs = session.life.lease.map(|l| l.as_secs()),
            renewable = session.life.renewable,
            "connected to vault"
        );
        let shared = Arc::new(Shared {
            conn,
            session: ArcSwap::from_pointee(Session {
                generation: 1,
                ..session
            }),
            login_lock: tokio::sync::Mutex::new(None),
            bundle: watch::channel(Arc::new(bundle)).0,
            issuers: ArcSwap::from_pointee(issuers),
            health: Mutex::new(HealthState::default()),
            metrics,
            token_event: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(token_task(shared.clone(), stop.clone()));
        tokio::spawn(bundle_task(shared.clone(), stop.clone()));
        tokio::spawn(probe_task(shared.clone(), stop.clone()));
        Ok((shared, stop.drop_guard()))
    }

    /// The backend's name (the signer's `Authority` is this session's).
    pub(super) fn kind(&self) -> &'static str {
        super::KIND
    }

    pub(super) fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }

    /// The roots an issuer of the mount (or `issuerRef`) signs under; `rootBundleFile`'s
    /// other roots are only trusted.
    pub(super) fn signing_roots(&self) -> Option<Vec<CertificateDer<'static>>> {
        let issuers = self.issuers.load();
        (self.conn.cfg.roots_from_mount && !issuers.is_empty())
            .then(|| issuers.iter().map(|(r, _)| r.clone()).collect())
    }

    pub(super) fn health(&self) -> Health {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &h.login {
            Health::NotReady(format!("vault login failing: {m}"))
        } else if let Some((at, m)) = &h.denied
            && at.elapsed() < DENIED_NOT_READY
        {
            Health::NotReady(format!("vault permission denied: {m}"))
        } else if let Some(m) = &h.unreachable {
            Health::NotReady(format!("vault unavailable: {m}"))
        } else {
            Health::Ready
        }
    }

    /// Reads or changes the health state.
    fn with_health<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut h)
    }

    /// A fresh token was refused (`Some`: not ready for a while), or a call succeeded.
    pub(super) fn set_denied(&self, why: Option<String>) {
        self.with_health(|h| h.denied = why.map(|m| (Instant::now(), m)));
    }

    pub(super) fn mark_unreachable(&self, why: &dyn std::fmt::Display) {
        let msg = why.to_string();
        self.with_health(|h| {
            if h.unreachable.is_none() {
                tracing::warn!(backend = KIND, error = %msg, "vault unreachable; not ready until it answers again");
            }
            h.unreachable = Some(msg);
        });
    }

    pub(super) fn mark_reachable(&self) {
        self.with_health(|h| {
            if h.unreachable.take().is_some() {
                tracing::info!(backend = KIND, "vault reachable again");
            }
        });
    }

    /// Logs in again unless someone already did since `seen` was current.
    pub(super) async fn relogin(&self, seen: u64) -> Result<(), LoginError> {
        let mut last_failure = self.login_lock.lock().await;
        let current = self.session.load().generation;
        if current != seen {
            return Ok(());
        }
        if let Some((at, e)) = &*last_failure
            && at.elapsed() < LOGIN_FAILURE_REUSE
        {
            return Err(e.clone());
        }
        let res = self.conn.login().await;
        *last_failure = match &res {
            Ok(_) => None,
            Err(e) => Some((Instant::now(), e.clone())),
        };
        count(&self.metrics.backend_logins, res.is_ok());
        match res {
            Ok(mut s) => {
                s.generation = current + 1;
                tracing::info!(
                    backend = KIND,
                    generation = s.generation,
                    lease_secs = s.life.lease.map(|l| l.as_secs()),
                    renewable = s.life.renewable,
                    "logged in to vault"
                );
                self.session.store(Arc::new(s));
                self.with_health(|h| {
                    if h.login.take().is_some() {
                        tracing::info!(backend = KIND, "vault login works again");
                    }
                });
                self.mark_reachable();
                self.token_event.notify_one();
                Ok(())
            }
            Err(LoginError::Transient(e)) => {
                self.mark_unreachable(&e);
                Err(LoginError::Transient(e))
            }
            Err(LoginError::Credentials(m)) => {
                tracing::error!(
                    backend = KIND,
                    error = %m,
                    "VAULT LOGIN FAILED: the bridge cannot obtain a token; no certificate can be issued until the credentials are fixed"
                );
                self.mark_reachable();
                self.with_health(|h| h.login = Some(m.clone()));
                Err(LoginError::Credentials(m))
            }
        }
    }

    /// Renews the current token. On a refused token, logs in again.
    async fn renew(&self, session: &Session) -> Result<(), LoginError> {
        let res = self.conn.renew(session).await;
        count(&self.metrics.backend_token_renewals, res.is_ok());
        match res {
            Ok((lease, renewable)) => {
                self.mark_reachable();
                let renewed = Session {
                    client: self.conn.vaultrs(session.token()),
                    generation: session.generation,
                    life: Lifetime {
                        refreshed_at: Instant::now(),
                        lease,
                        renewable,
                        full_lease: match (session.life.full_lease, lease) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        },
                    },
                };
                let _g = self.login_lock.lock().await;
                // Store only if no login replaced the token meanwhile.
                if self.session.load().generation == session.generation {
                    tracing::debug!(
                        backend = KIND,
                        lease_secs = lease.map(|l| l.as_secs()),
                        "vault token renewed"
                    );
                    self.session.store(Arc::new(renewed));
                }
                Ok(())
            }
            Err(e) => {
                // Down, sealed or busy: keep the token and retry. Any other answer (403
                // revoked, 400, and the 500 "past the max TTL, cannot renew" Vault and
                // OpenBao give for a token at its max TTL) means: log in again.
                if matches!(e, CallError::Transport(_)) || matches!(e.code(), Some(429 | 503)) {
                    if e.code() != Some(429) {
                        self.mark_unreachable(&e);
                    }
                    return Err(LoginError::Transient(e));
                }
                tracing::info!(backend = KIND, error = %e, "vault refused to renew the token; logging in again");
                self.relogin(session.generation).await
            }
        }
    }

    /// Re-reads the roots now and publishes them if they changed; true if they did.
    pub(super) async fn refresh_bundle(&self) -> Result<bool, String> {
        let token = self.session.load().token().to_string();
        let (roots, issuers) = fetch_roots(&self.conn, &token).await?;
        self.mark_reachable();
        self.issuers.store(Arc::new(issuers));
        if roots.as_slice() == self.bundle.borrow().roots() {
            return Ok(false);
        }
        let bundle = TrustBundle::new(roots).map_err(|e| e.to_string())?;
        tracing::info!(
            backend = KIND,
            roots = bundle.roots().len(),
            "trust bundle changed in vault"
        );
        self.bundle.send_replace(Arc::new(bundle));
        Ok(true)
    }
}

fn count(which: &prometheus::IntCounterVec, ok: bool) {
    which
        .with_label_values(&[KIND, if ok { "success" } else { "failure" }])
        .inc();
}

/// An issuer of the mount that can sign under the root its chain ends in.
pub(super) type RootIssuer = (CertificateDer<'static>, String);

/// The roots to trust, the default issuer's first: the self-signed certificates of the
/// mount's (or issuer's) CA chain, those of every other issuer of the mount (a new root
/// issuer is how Vault rotates its root, and the bridge follows it; see
/// `backend::follow`), and/or the configured bundle file. Also which issuer signs under
/// each root.
async fn fetch_roots(
    conn: &Conn,
    token: &str,
) -> Result<(Vec<CertificateDer<'static>>, Vec<RootIssuer>), String> {
    let cfg = &conn.cfg;
    let mut roots = Vec::new();
    let mut issuers = Vec::new();
    let mount = &cfg.mount;
    let add_roots = |pem: &[u8], roots: &mut Vec<CertificateDer<'static>>| {
        let certs =
            pki::parse_certs_pem(pem).map_err(|e| format!("the CA chain of mount {mount}: {e}"))?;
        let mut found = None;
        for c in certs {
            let info = pki::cert_info(&c).map_err(|e| e.to_string())?;
            if info.self_signed {
                if !roots.contains(&c) {
                    roots.push(c.clone());
                }
                found.get_or_insert(c);
            }
        }
        Ok::<_, String>(found)
    };
    if cfg.roots_from_mount {
        match &cfg.issuer_ref {
            None => {
                let pem = conn
                    .call(
                        Some(token),
                        reqwest::Method::GET,
                        &format!("{mount}/ca_chain"),
                        None,
                    )
                    .await
                    .map_err(|e| format!("{mount}/ca_chain: {e}"))?;
                add_roots(&pem, &mut roots)?;
                match list_issuers(conn, token).await {
                    Ok(list) => {
                        // The default issuer first: it signs when nothing is pinned.
                        let default_cert = pki::parse_certs_pem(&pem)
                            .ok()
                            .and_then(|v| v.into_iter().next());
                        let mut list = list;
                        list.sort_by_key(|i| {
                            Some(i.certificate.as_ref())
                                != default_cert.as_ref().map(|c| c.as_ref())
                        });
                        for i in list {
                            if let Some(root) = add_roots(i.chain_pem.as_bytes(), &mut roots)?
                                && i.can_sign
                            {
                                issuers.push((root, i.id));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(backend = KIND, mount = %mount, error = %e, "cannot list the mount's issuers; following the default issuer's chain only");
                    }
                }
            }
            Some(r) => {
                let i = read_issuer(conn, token, r).await?;
                if let Some(root) = add_roots(i.chain_pem.as_bytes(), &mut roots)? {
                    issuers.push((root, r.clone()));
                }
            }
        }
        if roots.is_empty() && cfg.root_bundle_file.is_none() {
            return Err(format!(
                "the CA chain of mount {mount} does not include a root (self-signed) certificate; \
                 import the issuer with its full chain or set backend.rootBundleFile"
            ));
        }
    }
    if let Some(f) = &cfg.root_bundle_file {
        let pem = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for c in pki::parse_certs_pem(&pem).map_err(|e| format!("{}: {e}", f.display()))? {
            if !roots.contains(&c) {
                roots.push(c);
            }
        }
    }
    Ok((roots, issuers))
}

/// One issuer of the mount as the bridge needs it.
struct IssuerInfo {
    id: String,
    certificate: CertificateDer<'static>,
    /// Its certificate and CA chain, PEM.
    chain_pem: String,
    /// It has a key and may issue certificates.
    can_sign: bool,
}

/// `GET <mount>/issuer/<ref>`.
async fn read_issuer(conn: &Conn, token: &str, r: &str) -> Result<IssuerInfo, String> {
    #[derive(Deserialize)]
    struct Issuer {
        certificate: String,
        #[serde(default)]
        ca_chain: Vec<String>,
        #[serde(default)]
        key_id: String,
        #[serde(default)]
        usage: String,
    }
    let path = format!("{}/issuer/{r}", conn.cfg.mount);
    let i: Issuer = conn
        .call_data(Some(token), reqwest::Method::GET, &path, None)
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let certificate = pki::parse_certs_pem(i.certificate.as_bytes())
        .map_err(|e| format!("{path}: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{path}: no certificate"))?;
    let mut chain_pem = i.certificate;
    chain_pem.push('\n');
    chain_pem.push_str(&i.ca_chain.join("\n"));
    Ok(IssuerInfo {
        id: r.to_string(),
        certificate,
        chain_pem,
        can_sign: !i.key_id.is_empty()
            && (i.usage.is_empty() || i.usage.contains("issuing-certificates")),
    })
}

/// `LIST <mount>/issuers`, each read.
async fn list_issuers(conn: &Conn, token: &str) -> Result<Vec<IssuerInfo>, String> {
    #[derive(Deserialize)]
    struct Keys {
        #[serde(default)]
        keys: Vec<String>,
    }
    let path = format!("{}/issuers", conn.cfg.mount);
    let list = reqwest::Method::from_bytes(b"LIST").expect("a method name");
    let keys: Keys = conn
        .call_data(Some(token), list, &path, None)
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::with_capacity(keys.keys.len());
    for id in keys.keys {
        out.push(read_issuer(conn, token, &id).await?);
    }
    Ok(out)
}

/// Keeps a valid token: renews at 2/3 of each lease, logs in again when renewal stops
/// extending the token (max TTL reached), when it is not renewable, when Vault refuses
/// it, or after a failed login (with backoff).
async fn token_task(sh: Arc<Shared>, stop: CancellationToken) {
    let mut failures = 0u32;
    let mut last_error: Option<String> = None;
    loop {
        let session = sh.session.load_full();
        let plan = session.life.plan(
            Instant::now(),
            sh.with_health(|h| h.login.is_some()),
            failures,
        );
        if let Some(error) = last_error.take() {
            let retry_in = plan.map(|(_, at)| at.saturating_duration_since(Instant::now()));
            tracing::warn!(backend = KIND, error = %error, retry_in = ?retry_in, "vault token maintenance failed; the current token stays in use");
        }
        let woken = tokio::select! {
            _ = stop.cancelled() => return,
            _ = sh.token_event.notified() => true,
            _ = async {
                match plan {
                    Some((_, at)) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => false,
        };
        if woken {
            // A login happened (or was asked for); recompute the schedule.
            failures = 0;
            continue;
        }
        let session = sh.session.load_full();
        let res = match plan {
            Some((Step::Login, _)) => sh.relogin(session.generation).await,
            Some((Step::Renew, _)) => sh.renew(&session).await,
            None => continue,
        };
        match res {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                last_error = Some(e.to_string());
            }
        }
    }
}

/// Re-reads the roots periodically and publishes changes.
async fn bundle_task(sh: Arc<Shared>, stop: CancellationToken) {
    let every = sh.conn.cfg.root_refresh_interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sh.refresh_bundle().await {
            tracing::warn!(backend = KIND, error = %e, "trust bundle refresh failed; keeping the current roots");
        }
    }
}

/// While Vault is marked unreachable, asks `sys/health` every second so readiness
/// comes back without waiting for traffic (a not-ready pod gets none).
async fn probe_task(sh: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        if sh.with_health(|h| h.unreachable.is_none()) {
            continue;
        }
        match sh.conn.probe().await {
            Ok(()) => {
                sh.mark_reachable();
                // The token may have expired during the outage.
                sh.token_event.notify_one();
            }
            Err(e) => sh.with_health(|h| h.unreachable = Some(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn life(now: Instant, lease: Option<u64>, renewable: bool, full: Option<u64>) -> Lifetime {
        Lifetime {
            refreshed_at: now,
            lease: lease.map(S),
            renewable,
            full_lease: full.map(S),
        }
    }

    /// The planned step, and that its time lies within the jittered backoff for `base`
    /// (between half of it and all of it).
    fn backed_off(plan: Option<(Step, Instant)>, now: Instant, base: Duration) -> Step {
        let (step, at) = plan.expect("a plan");
        assert!(
            at >= now + base / 2 && at <= now + base,
            "{:?} outside [{:?}, {base:?}]",
            at - now,
            base / 2
        );
        step
    }

    #[test]
    fn renews_at_two_thirds_of_the_lease_while_renewals_grant_the_full_lease() {
        let now = Instant::now();
        let l = life(now, Some(3600), true, Some(3600));
        assert_eq!(l.plan(now, false, 0), Some((Step::Renew, now + S(2400))));
    }

    #[test]
    fn logs_in_when_renewals_shrink_or_the_token_is_not_renewable() {
        let now = Instant::now();
        // max TTL in sight: the renewal granted 2 s of a 3 s token.
        let capped = life(now, Some(2), true, Some(3));
        assert_eq!(capped.plan(now, false, 0).unwrap().0, Step::Login);
        let fixed = life(now, Some(60), false, Some(60));
        assert_eq!(fixed.plan(now, false, 0), Some((Step::Login, now + S(40))));
    }

    #[test]
    fn a_token_given_to_the_bridge_is_renewed_before_its_full_lease_is_known() {
        let now = Instant::now();
        let given = life(now, Some(1), true, None);
        let (step, at) = given.plan(now, false, 0).unwrap();
        assert_eq!(step, Step::Renew);
        assert!(at <= now + S(1));
    }

    #[test]
    fn tokens_without_expiry_need_nothing() {
        let now = Instant::now();
        assert_eq!(life(now, None, false, None).plan(now, false, 0), None);
    }

    #[test]
    fn failures_back_off_and_log_in_once_the_token_is_gone() {
        let now = Instant::now();
        let l = life(now, Some(10), true, Some(10));
        let step = backed_off(l.plan(now, false, 1), now, Duration::from_millis(500));
        assert_eq!(step, Step::Renew);
        let step = backed_off(l.plan(now, false, 2), now, S(1));
        assert_eq!(step, Step::Renew);
        let later = now + S(11);
        let step = backed_off(l.plan(later, false, 3), later, S(2));
        assert_eq!(step, Step::Login);
        assert_eq!(
            backed_off(l.plan(now, false, 20), now, MAX_BACKOFF),
            Step::Renew
        );
        assert_eq!(l.plan(now, true, 0).unwrap().0, Step::Login);
    }

    #[test]
    fn never_schedules_in_a_tight_loop() {
        let now = Instant::now();
        let expired = life(now - S(100), Some(0), true, Some(3));
        let (_, at) = expired.plan(now, false, 0).unwrap();
        assert!(at >= now + MIN_WAIT);
    }
}
