//! [`VaultSigner`]: workload and serving certificates from a PKI role (direct mode), the
//! bridge's intermediate from the mount's issuer (intermediate mode).
//!
//! Every sign call is one `POST` with the session's current token, run by the remote kit
//! ([`Retry::run`]) until `requestTimeout` after it started:
//! - 429: retried after the answer's `Retry-After` while the deadline allows (after the
//!   kit's backoff for a `Retry-After: 0`, which OpenBao sends in the last second of a
//!   quota interval). Vault sends it only with `enable_rate_limit_response_headers`;
//!   without it the call is answered RESOURCE_EXHAUSTED at once, so that the clients' own
//!   backoff spreads the retries instead of the bridge pressing on a Vault that is
//!   shedding load;
//! - 412 (a standby not caught up yet), 500, 502 and 504: retried with jittered backoff,
//!   UNAVAILABLE at the deadline (and not ready until Vault answers again);
//! - refused or broken connections and a sealed Vault (503): UNAVAILABLE at once and
//!   not ready, since waiting out the deadline would only hold the caller; a Vault that
//!   does not answer at all: UNAVAILABLE at the deadline, not ready;
//! - 403: the token was refused (expired, revoked): one coalesced re-login and one more
//!   try; a fresh token refused too is a policy problem: UNAVAILABLE, logged loudly, not
//!   ready for a while;
//! - other 4xx: INVALID_ARGUMENT for what the role refuses (400), INTERNAL for an unknown
//!   role, issuer or mount, logged.
//!
//! What comes back is verified by the central check (`backend::checked`), which asks
//! [`Signer::refresh_trust_bundle`] to re-read the roots when an answer does not chain to
//! the bundle. Here only the lifetime is looked at: Vault silently caps the TTL at the
//! role's `max_ttl`, which is accepted, counted and logged once.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;

use super::client::{CallError, Session, VaultError};
use super::session::Shared;
use super::{KIND, VaultConfig};
use crate::backend::intermediate::{IntermediateRequest, UpstreamAuthority};
use crate::backend::remote::{self, Backoff, Failure, Retry};
use crate::backend::{IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject};
use crate::metrics::Metrics;
use crate::pki;

/// What a sign call returned (the same shape for the role and the issuer path, and for
/// `sign-intermediate`).
#[derive(Debug, Deserialize)]
struct SignData {
    certificate: String,
    #[serde(default)]
    issuing_ca: String,
    #[serde(default)]
    ca_chain: Option<Vec<String>>,
}

impl SignData {
    /// The CA certificates of the answer: `ca_chain` when Vault sent one, else `issuing_ca`.
    fn chain_pems(&self) -> Vec<&str> {
        match &self.ca_chain {
            Some(c) if !c.is_empty() => c.iter().map(String::as_str).collect(),
            _ => vec![self.issuing_ca.as_str()],
        }
    }
}

/// The Vault PKI signer. Dropping it stops its background tasks.
pub struct VaultSigner {
    shared: Arc<Shared>,
    /// NotAfter of the CA that signed the last leaf (0: unknown).
    issuing_ca_not_after: AtomicI64,
    /// Whether the TTL cap was logged at WARN already.
    capped_warned: AtomicBool,
    /// The root to sign under during and after a rotation of the mount's root.
    choice: std::sync::OnceLock<tokio::sync::watch::Receiver<crate::backend::RootChoice>>,
    /// When the issuers were last re-read for a root not found among them.
    issuers_read: tokio::sync::Mutex<Option<Instant>>,
    _stop: DropGuard,
}

impl VaultSigner {
    /// Logs in, fetches the trust bundle and starts the token and bundle maintenance.
    pub async fn connect(cfg: &VaultConfig, metrics: Arc<Metrics>) -> Result<Self, VaultError> {
        let (shared, stop) = Shared::connect(cfg, metrics).await?;
        Ok(Self {
            shared,
            issuing_ca_not_after: AtomicI64::new(0),
            capped_warned: AtomicBool::new(false),
            choice: std::sync::OnceLock::new(),
            issuers_read: tokio::sync::Mutex::new(None),
            _stop: stop,
        })
    }

    /// The issuer that signs under `root` (the rotation's choice), if the mount has one;
    /// `None`: the mount's default issuer (or `issuerRef`). Another replica may have moved
    /// the shared rotation state on before this one last read the mount's issuers, so an
    /// unknown root makes it read them again (at most once a second) before giving up.
    async fn issuer_under(
        &self,
        root: Option<&rustls_pki_types::CertificateDer<'_>>,
    ) -> Option<String> {
        let root = root?;
        let find = || {
            self.shared
                .issuers
                .load()
                .iter()
                .find(|(r, _)| r.as_ref() == root.as_ref())
                .map(|(_, id)| id.clone())
        };
        if let Some(id) = find() {
            return Some(id);
        }
        {
            let mut last = self.issuers_read.lock().await;
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last = Some(Instant::now());
                if let Err(e) = self.shared.refresh_bundle().await {
                    tracing::warn!(backend = KIND, error = %e, "reading the mount's issuers failed");
                }
            }
        }
        find()
    }

    fn chosen_root(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.choice
            .get()
            .and_then(|rx| rx.borrow().sign_under.clone())
    }

    /// POSTs `body` to `path` with the current token, retried as the module docs say
    /// until `requestTimeout` from now. `role` names the call in logs.
    async fn post(
        &self,
        path: &str,
        role: &str,
        body: &serde_json::Value,
    ) -> Result<SignData, SignError> {
        let sh = &self.shared;
        // Why Vault counts as down if the call ends UNAVAILABLE: set when an attempt starts
        // (a hung Vault: the deadline cuts the attempt short), then what the attempt found.
        let down = Mutex::new(None);
        let retry = Retry {
            kind: KIND,
            metrics: &sh.metrics,
            bucket: None,
            keep: Duration::ZERO,
            throttled: Backoff::THROTTLED,
            transient: Backoff::TRANSIENT,
        };
        let deadline = Instant::now() + sh.conn.cfg.request_timeout;
        let res = retry
            .run(path, deadline, |_| self.attempt(path, role, body, &down))
            .await;
        match &res {
            Ok(_) => {
                sh.mark_reachable();
                sh.set_denied(None);
            }
            Err(SignError::Unavailable(_)) => {
                if let Some(why) = set(&down, None) {
                    sh.mark_unreachable(&why);
                }
            }
            Err(_) => {}
        }
        res
    }

    /// One try of [`Self::post`]; when Vault refuses the token, logs in again (once for
    /// all callers that saw that token refused) and tries once more.
    async fn attempt(
        &self,
        path: &str,
        role: &str,
        body: &serde_json::Value,
        down: &Mutex<Option<String>>,
    ) -> Result<SignData, Failure> {
        let sh = &self.shared;
        set(
            down,
            Some(format!(
                "no answer to {path} within requestTimeout ({:?})",
                sh.conn.cfg.request_timeout
            )),
        );
        let post = |s: Arc<Session>| async move {
            sh.conn
                .call_data(Some(s.token()), reqwest::Method::POST, path, Some(body))
                .await
        };
        let session = sh.session.load_full();
        let generation = session.generation;
        let res = match post(session).await {
            Err(e) if e.code() == Some(403) => {
                tracing::info!(backend = KIND, error = %e, "vault refused the token; logging in again");
                if let Err(le) = sh.relogin(generation).await {
                    set(down, None);
                    return Err(Failure::Final(SignError::Unavailable(format!(
                        "vault login failed: {le}"
                    ))));
                }
                match post(sh.session.load_full()).await {
                    Err(e) if e.code() == Some(403) => {
                        let m = format!(
                            "vault refused a fresh token for {path}: {e}; check the bridge's policy"
                        );
                        tracing::error!(backend = KIND, error = %m, "VAULT PERMISSION DENIED");
                        sh.set_denied(Some(m.clone()));
                        set(down, None);
                        return Err(Failure::Final(SignError::Unavailable(m)));
                    }
                    other => other,
                }
            }
            other => other,
        };
        match res {
            Ok(data) => {
                set(down, None);
                Ok(data)
            }
            Err(e) => {
                let msg = e.to_string();
                let (failure, health) = classify(e, role);
                if let Failure::Final(SignError::Throttled { .. }) = failure {
                    // Retry counts the throttles it waits out; this one it will not see.
                    sh.metrics
                        .backend_throttles
                        .with_label_values(&[KIND, "remote"])
                        .inc();
                }
                match health {
                    Down::No => set(down, None),
                    Down::Now => {
                        sh.mark_unreachable(&msg);
                        set(down, None)
                    }
                    Down::IfLast => set(down, Some(msg)),
                };
                Err(failure)
            }
        }
    }

    /// Reports a leaf shorter than asked for: Vault caps the TTL at the role's max_ttl
    /// (and the issuer's NotAfter) with only a warning. The shorter certificate is
    /// accepted (clients renew at half-life anyway), counted, and logged once. A leaf
    /// living longer than asked for is refused by the central check (backend::checked).
    fn note_lifetime(
        &self,
        issued: &IssuedChain,
        req: &SignRequest,
        asked_at: SystemTime,
    ) -> Result<(), SignError> {
        if let Some(first) = issued.intermediates.first()
            && let Ok(info) = pki::cert_info(first)
        {
            self.issuing_ca_not_after
                .store(info.not_after, Ordering::Relaxed);
        }
        // An unreadable leaf is refused by the central check, with the reason.
        let Ok(leaf) = pki::cert_info(&issued.leaf) else {
            return Ok(());
        };
        let asked = pki::unix_secs(asked_at);
        let asked_until = asked + req.ttl.as_secs() as i64;
        let tolerance = (req.ttl.as_secs() as i64 / 10).clamp(1, 60);
        if leaf.not_after + tolerance >= asked_until {
            return Ok(());
        }
        self.shared
            .metrics
            .backend_ttl_capped
            .with_label_values(&[KIND])
            .inc();
        let requested_secs = req.ttl.as_secs();
        let issued_secs = leaf.not_after - asked;
        if !self.capped_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                backend = KIND,
                requested_secs,
                issued_secs,
                "vault issued a shorter certificate than requested (the role's max_ttl or the issuer's expiry caps it); \
                 raise the role's max_ttl or lower policy.maxTtl (logged once, counted in istio_ca_bridge_backend_ttl_capped_total)"
            );
        } else {
            tracing::debug!(
                backend = KIND,
                requested_secs,
                issued_secs,
                "vault capped the TTL"
            );
        }
        Ok(())
    }
}

/// What a failed call says about Vault's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// Nothing: Vault answered.
    No,
    /// Vault is unreachable or sealed: not ready until it answers again.
    Now,
    /// Vault is in trouble: not ready if the call ends on this failure.
    IfLast,
}

/// What a failed sign call means for the caller and for readiness, logging what an
/// operator needs to see. (A refused token, 403, is handled before this.)
fn classify(e: CallError, role: &str) -> (Failure, Down) {
    let msg = e.to_string();
    let fin = |e: SignError| (Failure::Final(e), Down::No);
    match e {
        // OpenBao says `Retry-After: 0` within the last second of a quota interval:
        // then the kit's throttle backoff paces the retries.
        CallError::Status {
            code: 429,
            retry_after: Some(d),
            ..
        } => (
            Failure::Throttled {
                message: msg,
                retry_after: Some(d).filter(|d| !d.is_zero()),
            },
            Down::No,
        ),
        CallError::Status { code: 429, .. } => fin(SignError::Throttled {
            reason: msg,
            retry_after: None,
        }),
        CallError::Status {
            code: 412 | 500 | 502 | 504,
            ..
        } => (Failure::Transient(msg), Down::IfLast),
        CallError::Transport(_) | CallError::Status { code: 503, .. } => {
            (Failure::Final(SignError::Unavailable(msg)), Down::Now)
        }
        CallError::Status {
            code: 400, errors, ..
        } if errors.iter().any(|m| {
            let m = m.to_ascii_lowercase();
            m.contains("unknown role") || m.contains("issuer")
        }) =>
        {
            tracing::error!(backend = KIND, role, error = %msg, "vault PKI misconfigured (role or issuer)");
            fin(SignError::Internal(msg))
        }
        CallError::Status { code: 400, .. } => {
            tracing::info!(backend = KIND, role, vault_error = %msg, "vault rejected the request");
            fin(SignError::Rejected(msg))
        }
        CallError::Status { code: 404, .. } => {
            tracing::error!(backend = KIND, role, error = %msg, "vault PKI mount or role not found");
            fin(SignError::Internal(msg))
        }
        _ => fin(SignError::Internal(msg)),
    }
}

/// Replaces what `slot` holds, returning the old value.
fn set(slot: &Mutex<Option<String>>, value: Option<String>) -> Option<String> {
    std::mem::replace(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()), value)
}

/// The role that signs for `subject`.
fn role_for<'a>(cfg: &'a VaultConfig, subject: &Subject) -> &'a str {
    match subject {
        Subject::Workload(_) => &cfg.role,
        Subject::Server { .. } => cfg.server_role.as_deref().unwrap_or(&cfg.role),
    }
}

/// The path and body of the sign call for `req`: `<mount>/sign/<role>` (or
/// `<mount>/issuer/<ref>/sign/<role>`) with exactly the names of `req.subject`. Never
/// `sign-verbatim`, which would copy whatever the CSR asks for.
fn sign_call(
    cfg: &VaultConfig,
    req: &SignRequest,
    issuer: Option<&str>,
) -> (String, serde_json::Value) {
    let mut body = serde_json::json!({
        "csr": pki::pem_encode("CERTIFICATE REQUEST", &req.csr_der),
        "ttl": format!("{}s", req.ttl.as_secs().max(1)),
        "format": "pem",
    });
    match &req.subject {
        Subject::Workload(id) => {
            // The identity goes in as uri_sans, and only it: with the recommended role
            // (use_csr_sans=false) Vault ignores whatever names the CSR carries.
            body["uri_sans"] = id.uri().into();
            body["exclude_cn_from_sans"] = true.into();
        }
        Subject::Server { dns_names } => {
            let (ips, names): (Vec<&str>, Vec<&str>) = dns_names
                .iter()
                .map(String::as_str)
                .partition(|n| n.parse::<std::net::IpAddr>().is_ok());
            if let Some(first) = names.first() {
                body["common_name"] = (*first).into();
            }
            if names.len() > 1 {
                body["alt_names"] = names[1..].join(",").into();
            }
            if !ips.is_empty() {
                body["ip_sans"] = ips.join(",").into();
            }
            body["exclude_cn_from_sans"] = false.into();
        }
    }
    let (mount, role) = (&cfg.mount, role_for(cfg, &req.subject));
    let path = match cfg.issuer_ref.as_deref().or(issuer) {
        Some(r) => format!("{mount}/issuer/{r}/sign/{role}"),
        None => format!("{mount}/sign/{role}"),
    };
    (path, body)
}

// Kind, trust bundle and health are the session's.
crate::backend::forward_authority!(VaultSigner, shared);

#[async_trait]
impl Signer for VaultSigner {
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let cfg = &self.shared.conn.cfg;
        let chosen = self.chosen_root().filter(|_| cfg.issuer_ref.is_none());
        let issuer = self.issuer_under(chosen.as_ref()).await;
        if chosen.is_some() && issuer.is_none() {
            // Availability first: the mount's default issuer signs, and the rotation
            // notices (and waits) if that is under the other root.
            tracing::warn!(
                backend = KIND,
                "no issuer of the mount signs under the root the rotation chose; the mount's default issuer signs"
            );
        }
        let (path, body) = sign_call(cfg, req, issuer.as_deref());
        let asked_at = SystemTime::now();
        let data = self.post(&path, role_for(cfg, &req.subject), &body).await?;
        let issued = remote::issued_chain(&data.certificate, data.chain_pems()).map_err(|e| {
            tracing::error!(backend = KIND, error = %e, "vault returned an unusable certificate");
            SignError::Internal(format!("vault returned an unusable certificate: {e}"))
        })?;
        self.note_lifetime(&issued, req, asked_at)?;
        Ok(issued)
    }

    /// Re-reads the roots from Vault (and the bundle file) now.
    async fn refresh_trust_bundle(&self) -> bool {
        match self.shared.refresh_bundle().await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(backend = KIND, error = %e, "trust bundle refresh failed; keeping the current roots");
                false
            }
        }
    }

    fn signing_ca(&self) -> SigningCaInfo {
        let t = self.issuing_ca_not_after.load(Ordering::Relaxed);
        SigningCaInfo {
            not_after: (t != 0).then_some(t),
        }
    }

    fn follow_root_choice(
        &self,
        choice: tokio::sync::watch::Receiver<crate::backend::RootChoice>,
    ) -> bool {
        if !self.can_choose_root() {
            return false;
        }
        let _ = self.choice.set(choice);
        true
    }
}

/// Intermediate mode: the mount's issuer (or `issuerRef`) signs the bridge's intermediate
/// through `root/sign-intermediate` (`issuer/<ref>/sign-intermediate`), the endpoint SPIRE's
/// Vault upstream authority uses. `use_csr_values=false`: the subject is ours, not the
/// CSR's; `max_path_length=0` when asked. Vault caps the TTL at the mount's
/// max_lease_ttl; the intermediate mode reads the real NotAfter from the certificate.
#[async_trait]
impl UpstreamAuthority for VaultSigner {
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        let mount = &self.shared.conn.cfg.mount;
        let under = req
            .under_root
            .as_ref()
            .filter(|_| self.shared.conn.cfg.issuer_ref.is_none());
        let chosen = self.issuer_under(under).await;
        if let Some(root) = under
            && chosen.is_none()
        {
            // The current intermediate keeps signing; the preparation is retried.
            return Err(SignError::Unavailable(format!(
                "no issuer of {mount} signs under the root the rotation chose ({}); retrying once it has one",
                pki::cert_info(root).map(|i| i.subject).unwrap_or_default()
            )));
        }
        let path = match self
            .shared
            .conn
            .cfg
            .issuer_ref
            .as_deref()
            .or(chosen.as_deref())
        {
            Some(r) => format!("{mount}/issuer/{r}/sign-intermediate"),
            None => format!("{mount}/root/sign-intermediate"),
        };
        let mut body = serde_json::json!({
            "csr": pki::pem_encode("CERTIFICATE REQUEST", &req.csr_der),
            "common_name": req.common_name,
            "ttl": format!("{}s", req.ttl.as_secs().max(1)),
            "format": "pem",
            "use_csr_values": false,
            "exclude_cn_from_sans": true,
        });
        if req.path_len_zero {
            body["max_path_length"] = 0.into();
        }
        let data = self.post(&path, &path, &body).await?;
        remote::issued_chain(&data.certificate, data.chain_pems())
            .map_err(|e| SignError::Internal(format!("{path}: {e}")))
    }

    /// Without `issuerRef`, every issuer of the mount can be named per call.
    fn can_choose_root(&self) -> bool {
        self.shared.conn.cfg.issuer_ref.is_none() && self.shared.conn.cfg.roots_from_mount
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    fn status(code: u16, errors: &[&str], retry_after: Option<Duration>) -> CallError {
        CallError::Status {
            code,
            errors: errors.iter().map(|e| e.to_string()).collect(),
            retry_after,
        }
    }

    /// The error a caller gets at once, and what it does to readiness.
    fn final_kind(e: CallError) -> (&'static str, Down) {
        match classify(e, "spiffe") {
            (Failure::Final(e), down) => (e.kind(), down),
            (other, _) => panic!("not final: {other:?}"),
        }
    }

    #[test]
    fn throttling_is_retried_only_when_vault_says_when() {
        for (header, wait) in [
            (Duration::from_secs(1), Some(Duration::from_secs(1))),
            // "Now": left to the kit's backoff, not a busy loop.
            (Duration::ZERO, None),
        ] {
            match classify(
                status(429, &["rate limit quota exceeded"], Some(header)),
                "r",
            ) {
                (Failure::Throttled { retry_after, .. }, Down::No) => assert_eq!(retry_after, wait),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            final_kind(status(429, &["rate limit quota exceeded"], None)),
            ("throttled", Down::No)
        );
    }

    #[test]
    fn a_down_or_sealed_vault_fails_at_once_and_a_troubled_one_is_retried() {
        assert_eq!(
            final_kind(CallError::Transport("connection refused".into())),
            ("unavailable", Down::Now)
        );
        assert_eq!(
            final_kind(status(503, &["Vault is sealed"], None)),
            ("unavailable", Down::Now)
        );
        for code in [412, 500, 502, 504] {
            match classify(status(code, &[], None), "r") {
                (Failure::Transient(m), Down::IfLast) => assert!(m.contains(&code.to_string())),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn refusals_are_final_and_say_whose_fault_they_are() {
        let refused = status(400, &["URI Subject Alternative Names not allowed"], None);
        assert_eq!(final_kind(refused), ("rejected", Down::No));
        let no_role = status(400, &["unknown role: spiffe"], None);
        assert_eq!(final_kind(no_role), ("internal", Down::No));
        let no_issuer = status(400, &["unable to find PKI issuer for reference: x"], None);
        assert_eq!(final_kind(no_issuer), ("internal", Down::No));
        assert_eq!(final_kind(status(404, &[], None)), ("internal", Down::No));
        assert_eq!(
            final_kind(CallError::Malformed("no data".into())),
            ("internal", Down::No)
        );
    }

    fn config(issuer_ref: Option<&str>, server_role: Option<&str>) -> VaultConfig {
        serde_json::from_value(serde_json::json!({
            "address": "https://vault:8200",
            "mount": "pki_int",
            "role": "spiffe",
            "serverRole": server_role,
            "issuerRef": issuer_ref,
            "auth": {"method": "token", "tokenEnv": "VAULT_TOKEN"},
        }))
        .unwrap()
    }

    fn request(subject: Subject) -> SignRequest {
        SignRequest {
            subject,
            public_key_der: Vec::new(),
            csr_der: vec![1, 2, 3],
            ttl: Duration::from_secs(3600),
            caller: None,
        }
    }

    #[test]
    fn workloads_are_signed_by_the_role_with_only_their_spiffe_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/app").unwrap();
        let req = request(Subject::Workload(id));
        let (path, body) = sign_call(&config(None, Some("serving")), &req, None);
        assert_eq!(path, "pki_int/sign/spiffe");
        assert_eq!(
            body,
            serde_json::json!({
                "csr": pki::pem_encode("CERTIFICATE REQUEST", &[1, 2, 3]),
                "ttl": "3600s",
                "format": "pem",
                "uri_sans": "spiffe://cluster.local/ns/default/sa/app",
                "exclude_cn_from_sans": true,
            })
        );
        let (path, _) = sign_call(&config(Some("default"), None), &req, None);
        assert_eq!(path, "pki_int/issuer/default/sign/spiffe");
    }

    #[test]
    fn serving_certificates_carry_every_name_asked_for() {
        let req = request(Subject::Server {
            dns_names: vec![
                "bridge.istio-system.svc".into(),
                "10.0.0.7".into(),
                "bridge".into(),
                "::1".into(),
            ],
        });
        let (path, body) = sign_call(&config(None, Some("serving")), &req, None);
        assert_eq!(path, "pki_int/sign/serving");
        assert_eq!(body["common_name"], "bridge.istio-system.svc");
        assert_eq!(body["alt_names"], "bridge");
        assert_eq!(body["ip_sans"], "10.0.0.7,::1");
        assert_eq!(body["exclude_cn_from_sans"], false);
        assert!(body.get("uri_sans").is_none());
        // Without a serverRole, the workload role signs (and must allow the names).
        let (path, _) = sign_call(&config(None, None), &req, None);
        assert_eq!(path, "pki_int/sign/spiffe");
    }
}
