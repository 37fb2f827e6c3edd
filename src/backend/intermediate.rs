//! Intermediate mode: the enterprise CA signs an intermediate CA for this replica, and the
//! replica signs workload certificates locally with it.
//!
//! Per-certificate forwarding ties every pod start to the enterprise CA's quota, latency
//! and uptime. Here a backend call happens once per intermediate lifetime instead:
//! - The key is generated in the process ([`IntermediateConfig::key_type`]) and never
//!   leaves it, unless a state directory is configured (key file mode 0600).
//! - What comes back is checked before use: a CA certificate for our key, with
//!   pathLenConstraint 0 when asked, still valid, and chaining to the trust bundle. The last
//!   check signs a probe leaf and verifies it the way clients do (rustls-webpki), so an
//!   intermediate that clients would refuse is never used.
//! - Rotation: the successor is prepared at `prepareAt` of the lifetime (SPIRE's 1/2) and
//!   takes over at `activateAt` (5/6) or earlier, once the current one has less than
//!   `policy.maxTtl` left, so leaves are not cut short. A leaf never outlives the
//!   intermediate that signed it ([`SigningCa::sign`] clamps), and its chain always carries
//!   that intermediate: each call reads one generation, so no call fails across a switch.
//! - Outage: while the backend is down the current intermediate keeps signing; preparation
//!   is retried with backoff. `/readyz` stays true until less than `readyMargin` is left.
//! - A trust-bundle change that the current intermediate no longer chains to (a root
//!   removed) makes the successor take over, or one be prepared, at once.
//!
//! Backends take part through the small [`UpstreamAuthority`] trait: Vault/OpenBao
//! (`root/sign-intermediate`) and AWS Private CA (a SubordinateCACertificate template).

mod config;

pub use config::*;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use x509_parser::prelude::*;

use super::local::{self, SigningCa};
use super::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject,
};
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::verify_path;
use crate::trust::{SharedBundle, TrustBundle};

const KEY_FILE: &str = "intermediate-key.pem";
const CHAIN_FILE: &str = "intermediate-chain.pem";
/// The trust bundle when the intermediate was stored: lets a replica restarted during a
/// backend outage start with its stored intermediate ([`stored_bundle`]).
const ROOTS_FILE: &str = "roots.pem";
/// One preparation (the backend call) may take this long before it counts as failed.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
const MIN_PREPARE_INTERVAL: Duration = Duration::from_secs(1);

/// What the bridge asks its backend to sign: a CA certificate for `public_key_der`.
#[derive(Debug, Clone)]
pub struct IntermediateRequest {
    /// A CSR for the key, with the subject below (some APIs take only CSRs).
    pub csr_der: Vec<u8>,
    pub public_key_der: Vec<u8>,
    pub common_name: String,
    pub ttl: Duration,
    /// Ask for pathLenConstraint 0.
    pub path_len_zero: bool,
}

/// A backend that can sign the bridge's intermediate CA.
#[async_trait]
pub trait UpstreamAuthority: Authority {
    /// Signs a CA certificate for `req`. `leaf` of the answer is the intermediate;
    /// `intermediates` link it to a root of the trust bundle (roots excluded).
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError>;
}

/// Connects to a backend, for [`LazyUpstream`].
pub type Connect = Box<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<Arc<dyn UpstreamAuthority>, String>>
        + Send
        + Sync,
>;

/// An upstream that is not connected yet: a replica restarted during a backend outage
/// starts with its stored intermediate and this, which keeps trying to connect (with
/// backoff) and answers UNAVAILABLE to preparations until it has. The trust bundle is the
/// stored one until the backend's own takes over.
pub struct LazyUpstream {
    kind: &'static str,
    inner: std::sync::OnceLock<Arc<dyn UpstreamAuthority>>,
    bundle: watch::Sender<SharedBundle>,
    last_error: Mutex<String>,
    _stop: DropGuard,
}

impl LazyUpstream {
    pub fn start(
        kind: &'static str,
        stored: TrustBundle,
        first_error: String,
        connect: Connect,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(Arc::new(stored));
        let stop = CancellationToken::new();
        let me = Arc::new(Self {
            kind,
            inner: std::sync::OnceLock::new(),
            bundle: tx,
            last_error: Mutex::new(first_error),
            _stop: stop.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                let delay = super::remote::backoff(
                    attempt,
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                attempt += 1;
                match connect().await {
                    Ok(up) => {
                        let Some(me) = weak.upgrade() else { return };
                        tracing::info!(
                            backend = kind,
                            attempts = attempt,
                            "connected to the backend"
                        );
                        let mut rx = up.trust_bundle();
                        let _ = me.inner.set(up);
                        drop(me);
                        // From now on the backend's bundle is the bundle.
                        loop {
                            let current = rx.borrow_and_update().clone();
                            match weak.upgrade() {
                                Some(me) => {
                                    me.bundle.send_replace(current);
                                }
                                None => return,
                            }
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                r = rx.changed() => if r.is_err() { return },
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(backend = kind, error = %e, attempts = attempt, "backend still unreachable; signing with the stored intermediate CA");
                        match weak.upgrade() {
                            Some(me) => {
                                *me.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e
                            }
                            None => return,
                        }
                    }
                }
            }
        });
        me
    }
}

impl Authority for LazyUpstream {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }
    fn health(&self) -> Health {
        match self.inner.get() {
            Some(up) => up.health(),
            None => Health::NotReady("not connected to the backend yet".into()),
        }
    }
}

#[async_trait]
impl UpstreamAuthority for LazyUpstream {
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        match self.inner.get() {
            Some(up) => up.sign_intermediate(req).await,
            None => Err(SignError::Unavailable(format!(
                "not connected to the backend yet: {}",
                self.last_error.lock().unwrap_or_else(|p| p.into_inner())
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntermediateError {
    #[error("the backend could not sign the bridge's intermediate CA: {0}")]
    Sign(#[from] SignError),
    #[error("the backend's intermediate CA certificate is unusable: {0}")]
    Unusable(String),
    #[error("intermediate state directory {path}: {message}")]
    State { path: PathBuf, message: String },
}

/// One intermediate CA, and what the state directory keeps of it.
struct Generation {
    ca: SigningCa,
    /// The certificate and its chain as PEM, and the key, for the state directory.
    chain_pem: String,
    key_pem: String,
}

impl Generation {
    fn not_before(&self) -> i64 {
        self.ca.not_before().unix_timestamp()
    }
    fn not_after(&self) -> i64 {
        self.ca.not_after().unix_timestamp()
    }
    fn serial(&self) -> &str {
        self.ca.serial_hex()
    }
    fn remaining(&self, now: i64) -> i64 {
        self.not_after() - now
    }
}

struct Inner {
    upstream: Arc<dyn UpstreamAuthority>,
    cfg: IntermediateConfig,
    trust_domain: String,
    /// Longest leaf the policy allows: the successor takes over while the current one can
    /// still cover it.
    max_leaf_ttl: Duration,
    metrics: Arc<Metrics>,
    current: ArcSwap<Generation>,
    next: Mutex<Option<Arc<Generation>>>,
    /// The last failed preparation, for `/readyz` and logs.
    last_error: Mutex<Option<String>>,
}

/// The signer of intermediate mode. Dropping it stops the rotation task.
pub struct IntermediateSigner {
    inner: Arc<Inner>,
    _stop: DropGuard,
}

fn now_secs() -> i64 {
    pki::unix_secs(SystemTime::now())
}

impl IntermediateSigner {
    /// Obtains the first intermediate (from the state directory if one is configured and
    /// holds a usable one, else from the backend) and starts the rotation task. Fails with
    /// a clear error if the backend's answer is not a usable CA.
    pub async fn start(
        upstream: Arc<dyn UpstreamAuthority>,
        cfg: &IntermediateConfig,
        trust_domain: &str,
        max_leaf_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IntermediateError> {
        let kind = upstream.kind();
        let bundle = upstream.trust_bundle().borrow().clone();
        let from_state = match &cfg.state_dir {
            Some(dir) => load_state(dir, cfg, trust_domain, &bundle)?,
            None => None,
        };
        let first = match from_state {
            Some(g) => {
                tracing::info!(
                    backend = kind,
                    serial = %g.serial(),
                    not_after = g.not_after(),
                    "reusing the intermediate CA from the state directory"
                );
                g
            }
            None => {
                let r = prepare(upstream.as_ref(), cfg, trust_domain).await;
                count_preparation(&metrics, kind, r.is_ok());
                let g = r?;
                if let Some(dir) = &cfg.state_dir {
                    save_state(dir, &g, &upstream.trust_bundle().borrow())?;
                }
                g
            }
        };
        tracing::info!(
            backend = kind,
            serial = %first.serial(),
            not_before = first.not_before(),
            not_after = first.not_after(),
            "signing with the bridge's intermediate CA"
        );
        let inner = Arc::new(Inner {
            upstream,
            cfg: cfg.clone(),
            trust_domain: trust_domain.to_string(),
            max_leaf_ttl,
            metrics,
            current: ArcSwap::from_pointee(first),
            next: Mutex::new(None),
            last_error: Mutex::new(None),
        });
        inner.observe();
        let stop = CancellationToken::new();
        let bundle_rx = inner.upstream.trust_bundle();
        tokio::spawn(rotation_task(inner.clone(), bundle_rx, stop.clone()));
        Ok(Self {
            inner,
            _stop: stop.drop_guard(),
        })
    }

    /// Serial of the intermediate that signs now (tests, admin).
    pub fn current_serial(&self) -> String {
        self.inner.current.load().serial().to_string()
    }
}

fn count_preparation(metrics: &Metrics, kind: &str, ok: bool) {
    metrics
        .intermediate_preparations
        .with_label_values(&[kind, if ok { "success" } else { "failure" }])
        .inc();
}

/// The subject of our intermediates: the trust domain and this replica's name, so an
/// operator can tell replicas apart in the enterprise CA's records.
fn common_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    let mut cn = format!("istio-ca-bridge {host}");
    cn.truncate(64);
    cn
}

/// Generates a key, has the backend sign it as a CA and checks the answer.
async fn prepare(
    upstream: &dyn UpstreamAuthority,
    cfg: &IntermediateConfig,
    trust_domain: &str,
) -> Result<Generation, IntermediateError> {
    let key = pki::generate_key(cfg.key_type)
        .map_err(|e| IntermediateError::Unusable(format!("key generation: {e}")))?;
    let cn = common_name();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn.as_str());
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IntermediateError::Unusable(format!("CSR: {e}")))?;
    let req = IntermediateRequest {
        csr_der: csr.der().to_vec(),
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        common_name: cn,
        ttl: cfg.ttl,
        path_len_zero: cfg.path_len_zero,
    };
    let issued = match tokio::time::timeout(PREPARE_TIMEOUT, upstream.sign_intermediate(&req)).await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(
                SignError::Unavailable(format!("no answer within {PREPARE_TIMEOUT:?}")).into(),
            );
        }
    };
    // The bundle as it is now: it may have changed while we waited (a root added with the
    // backend's new issuer).
    let bundle = upstream.trust_bundle().borrow().clone();
    check_and_build(issued, key, cfg, trust_domain, &bundle)
}

/// Checks what the backend returned and turns it into a signing generation.
fn check_and_build(
    issued: IssuedChain,
    key: KeyPair,
    cfg: &IntermediateConfig,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<Generation, IntermediateError> {
    let bad = |m: String| IntermediateError::Unusable(m);
    let (_, cert) =
        parse_x509_certificate(&issued.leaf).map_err(|e| bad(format!("unparsable: {e}")))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(bad("it certifies another public key than ours".into()));
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if cfg.path_len_zero && bc.value.path_len_constraint != Some(0) {
                return Err(bad(format!(
                    "pathLenConstraint is {:?}, expected 0 (intermediate.pathLenZero is set; \
                     use a template/role that sets it, or set pathLenZero: false)",
                    bc.value.path_len_constraint
                )));
            }
        }
        Ok(_) => {
            return Err(bad(
                "it is not a CA certificate (basicConstraints CA:TRUE is missing); the backend \
                 ignored the CA template or role (moto's acm-pca does this), so the bridge will \
                 not sign with it"
                    .into(),
            ));
        }
        Err(e) => return Err(bad(format!("basicConstraints: {e}"))),
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(bad("keyUsage lacks keyCertSign".into()));
    }
    let not_after = cert.validity().not_after.timestamp();
    let now = now_secs();
    // Usable means: longer than the readiness margin, and not a sliver of what was asked.
    let min_left = cfg
        .ready_margin
        .max((cfg.ttl / 4).min(Duration::from_secs(60)));
    if not_after - now <= min_left.as_secs() as i64 {
        return Err(bad(format!(
            "it expires in {}s (at least {}s needed: readyMargin, a quarter of the ttl asked); \
             the backend capped its lifetime (Vault: the mount's max_lease_ttl or the issuer's \
             expiry)",
            not_after - now,
            min_left.as_secs()
        )));
    }
    let mut chain_pem = pki::cert_pem(&issued.leaf);
    for c in &issued.intermediates {
        chain_pem.push_str(&pki::cert_pem(c));
    }
    let key_pem = key.serialize_pem();
    let (ca, _roots) = SigningCa::new(issued.leaf.clone(), key, issued.intermediates.clone())
        .map_err(|e| bad(e.to_string()))?;
    probe(&ca, trust_domain, bundle)?;
    Ok(Generation {
        ca,
        chain_pem,
        key_pem,
    })
}

/// Signs a throwaway leaf and verifies it as clients will: the chain must reach the
/// bundle's roots and every constraint on the way must admit a SPIFFE workload.
fn probe(
    ca: &SigningCa,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<(), IntermediateError> {
    let key = pki::generate_key(crate::pki::KeyType::EcdsaP256)
        .map_err(|e| IntermediateError::Unusable(format!("probe key: {e}")))?;
    let id = SpiffeId::parse(&format!(
        "spiffe://{trust_domain}/ns/istio-system/sa/istio-ca-bridge-probe"
    ))
    .map_err(|e| IntermediateError::Unusable(format!("probe identity: {e}")))?;
    let issued = ca
        .sign(&SignRequest {
            subject: Subject::Workload(id),
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            csr_der: Vec::new(),
            ttl: Duration::from_secs(60),
            caller: None,
        })
        .map_err(|e| IntermediateError::Unusable(format!("probe leaf: {e}")))?;
    verify_path(
        &issued.leaf,
        &issued.intermediates,
        bundle,
        webpki::KeyUsage::client_auth(),
        SystemTime::now(),
    )
    .map_err(|e| {
        IntermediateError::Unusable(format!(
            "a leaf it signs does not verify against the trust bundle: {e}"
        ))
    })
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> IntermediateError {
    IntermediateError::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Loads a still-usable intermediate from the state directory; `None` when there is none,
/// it expires within `readyMargin`, or no longer chains to the bundle.
fn load_state(
    dir: &Path,
    cfg: &IntermediateConfig,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<Option<Generation>, IntermediateError> {
    let (kp, cp) = (dir.join(KEY_FILE), dir.join(CHAIN_FILE));
    if !kp.exists() || !cp.exists() {
        return Ok(None);
    }
    let key = pki::load_key_pair(&std::fs::read(&kp).map_err(|e| state_err(&kp, e))?)
        .map_err(|e| state_err(&kp, e))?;
    let mut certs = pki::parse_certs_pem(&std::fs::read(&cp).map_err(|e| state_err(&cp, e))?)
        .map_err(|e| state_err(&cp, e))?;
    let leaf = certs.remove(0);
    let issued = IssuedChain::new(leaf, certs);
    match check_and_build(issued, key, cfg, trust_domain, bundle) {
        Ok(g) if g.remaining(now_secs()) > cfg.ready_margin.as_secs() as i64 => Ok(Some(g)),
        Ok(g) => {
            tracing::info!(serial = %g.serial(), "the stored intermediate CA is about to expire; getting a new one");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the stored intermediate CA is unusable; getting a new one");
            Ok(None)
        }
    }
}

/// The roots stored beside a usable intermediate in `dir`, if there is one: a replica
/// restarted while the backend is down can then start from its stored intermediate.
pub fn stored_bundle(
    dir: &Path,
    cfg: &IntermediateConfig,
    trust_domain: &str,
) -> Option<TrustBundle> {
    let roots = std::fs::read(dir.join(ROOTS_FILE)).ok()?;
    let bundle = TrustBundle::from_pem(&roots).ok()?;
    load_state(dir, cfg, trust_domain, &bundle).ok()??;
    Some(bundle)
}

fn save_state(dir: &Path, g: &Generation, bundle: &TrustBundle) -> Result<(), IntermediateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| state_err(dir, e))?;
    local::write_private(&dir.join(KEY_FILE), g.key_pem.as_bytes())
        .map_err(|e| state_err(dir, e))?;
    local::write_file(&dir.join(CHAIN_FILE), g.chain_pem.as_bytes(), 0o644)
        .map_err(|e| state_err(dir, e))?;
    local::write_file(&dir.join(ROOTS_FILE), bundle.pem().as_bytes(), 0o644)
        .map_err(|e| state_err(dir, e))
}

/// What the rotation task does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Prepare,
    Activate,
}

/// When to prepare and when to activate, for a generation valid from `nb` to `na`.
/// Activation: at `activateAt`, or earlier once less than the longest leaf (and the
/// readiness margin) is left, but never before the preparation point.
fn schedule(nb: i64, na: i64, cfg: &IntermediateConfig, max_leaf: Duration) -> (i64, i64) {
    let life = (na - nb).max(1) as f64;
    let prepare = nb + (life * cfg.prepare_at) as i64;
    let latest = (nb + (life * cfg.activate_at) as i64)
        .min(na - max_leaf.as_secs() as i64)
        .min(na - cfg.ready_margin.as_secs() as i64);
    (prepare, latest.max(prepare))
}

/// Backoff after `failures` failed preparations, never longer than a quarter of what is
/// left of the current intermediate (so a short outage near the end is retried often).
fn retry_delay(cfg: &IntermediateConfig, failures: u32, remaining: i64) -> Duration {
    let exp = cfg
        .retry_backoff
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)))
        .min(cfg.retry_max_backoff);
    let quarter = Duration::from_secs((remaining.max(0) / 4) as u64);
    exp.min(quarter.max(cfg.retry_backoff))
}

impl Inner {
    fn kind(&self) -> &'static str {
        self.upstream.kind()
    }

    fn observe(&self) {
        let g = self.current.load();
        let kind = self.kind();
        let t = g.not_after() as f64;
        self.metrics
            .intermediate_expiry
            .with_label_values(&[kind])
            .set(t);
        self.metrics
            .signing_ca_expiry
            .with_label_values(&[kind])
            .set(t);
        self.metrics.citadel_chain_expiry.set(t);
        let ready = self
            .next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        self.metrics
            .intermediate_successor_ready
            .with_label_values(&[kind])
            .set(ready as i64);
    }

    /// True when the current intermediate no longer chains to the trust bundle.
    fn current_untrusted(&self) -> bool {
        let bundle = self.upstream.trust_bundle().borrow().clone();
        probe(&self.current.load().ca, &self.trust_domain, &bundle).is_err()
    }

    fn activate(&self) {
        let Some(next) = self.next.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let old = self.current.swap(next.clone());
        self.metrics
            .intermediate_rotations
            .with_label_values(&[self.kind()])
            .inc();
        self.observe();
        tracing::info!(
            backend = self.kind(),
            old_serial = %old.serial(),
            old_not_after = old.not_after(),
            serial = %next.serial(),
            not_after = next.not_after(),
            "switched to the next intermediate CA"
        );
        if let Some(dir) = &self.cfg.state_dir
            && let Err(e) = save_state(dir, &next, &self.upstream.trust_bundle().borrow())
        {
            tracing::warn!(error = %e, "could not store the intermediate CA; a restart will ask the backend again");
        }
    }

    async fn prepare_next(&self) -> Result<(), IntermediateError> {
        let r = prepare(self.upstream.as_ref(), &self.cfg, &self.trust_domain).await;
        count_preparation(&self.metrics, self.kind(), r.is_ok());
        let g = r?;
        tracing::info!(
            backend = self.kind(),
            serial = %g.serial(),
            not_after = g.not_after(),
            "prepared the next intermediate CA"
        );
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(g));
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.observe();
        Ok(())
    }
}

async fn rotation_task(
    inner: Arc<Inner>,
    mut bundle_rx: watch::Receiver<SharedBundle>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    bundle_rx.borrow_and_update();
    // The bundle may have changed between the first intermediate's check and this task.
    let mut urgent = inner.current_untrusted();
    let mut last_prepare: Option<std::time::Instant> = None;
    loop {
        let now = now_secs();
        let cur = inner.current.load_full();
        let has_next = inner
            .next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let (prepare_at, activate_at) = schedule(
            cur.not_before(),
            cur.not_after(),
            &inner.cfg,
            inner.max_leaf_ttl,
        );
        let (step, at) = match (has_next, urgent) {
            (true, true) => (Step::Activate, now),
            (true, false) => (Step::Activate, activate_at),
            (false, _) if failures > 0 => (
                Step::Prepare,
                now + retry_delay(&inner.cfg, failures, cur.remaining(now)).as_secs() as i64,
            ),
            (false, true) => (Step::Prepare, now),
            (false, false) => (Step::Prepare, prepare_at),
        };
        let wait = Duration::from_secs((at - now).max(0) as u64);
        // Whole seconds are coarse for short test lifetimes; a failed attempt always waits
        // at least the configured backoff.
        let wait = if step == Step::Prepare && failures > 0 {
            wait.max(inner.cfg.retry_backoff)
        } else {
            wait
        };
        // Never two preparations closer than a second: a backend that grants far less
        // than asked must not be asked in a tight loop.
        let wait = match (step, last_prepare) {
            (Step::Prepare, Some(t)) => wait.max(MIN_PREPARE_INTERVAL.saturating_sub(t.elapsed())),
            _ => wait,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            r = bundle_rx.changed() => {
                if r.is_err() { return; }
                bundle_rx.borrow_and_update();
                if inner.current_untrusted() {
                    tracing::warn!(backend = inner.kind(), "the trust bundle changed and the current intermediate CA no longer chains to it; replacing it now");
                    urgent = true;
                }
                continue;
            }
        }
        match step {
            Step::Activate => {
                inner.activate();
                urgent = false;
            }
            Step::Prepare => {
                last_prepare = Some(std::time::Instant::now());
                match inner.prepare_next().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        let left = inner.current.load().remaining(now_secs());
                        tracing::warn!(
                            backend = inner.kind(),
                            error = %e,
                            failures,
                            remaining_secs = left,
                            "preparing the next intermediate CA failed; still signing with the current one, retrying"
                        );
                        *inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(e.to_string());
                    }
                }
            }
        }
    }
}

impl Authority for IntermediateSigner {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.inner.upstream.trust_bundle()
    }
    fn health(&self) -> Health {
        let g = self.inner.current.load();
        let left = g.remaining(now_secs());
        if left > self.inner.cfg.ready_margin.as_secs() as i64 {
            return Health::Ready;
        }
        let why = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "no successor prepared yet".into());
        Health::NotReady(format!(
            "the intermediate CA expires in {left}s (readyMargin {:?}): {why}",
            self.inner.cfg.ready_margin
        ))
    }
}

#[async_trait]
impl Signer for IntermediateSigner {
    fn mode(&self) -> &'static str {
        "intermediate"
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        // One generation per call: the leaf and its chain come from the same intermediate
        // even if a switch happens meanwhile.
        let g = self.inner.current.load_full();
        g.ca.sign(req)
    }

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo {
            not_after: Some(self.inner.current.load().not_after()),
        }
    }
}

/// Connects to the upstream of intermediate mode (again, if the first try fails).
pub type UpstreamConnect = Arc<
    dyn Fn() -> futures::future::BoxFuture<
            'static,
            Result<Arc<dyn UpstreamAuthority>, super::BuildError>,
        > + Send
        + Sync,
>;

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
            LazyUpstream::start(
                kind,
                bundle,
                msg,
                Box::new(move || {
                    let c = connect();
                    Box::pin(async move { c.await.map_err(|e| super::remote::error_chain(&e)) })
                }),
            )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyType;

    fn cfg() -> IntermediateConfig {
        IntermediateConfig {
            ttl: Duration::from_secs(7 * 86400),
            ready_margin: Duration::from_secs(3600),
            ..Default::default()
        }
    }

    #[test]
    fn a_week_long_intermediate_is_prepared_at_half_and_switched_at_five_sixths() {
        let day = 86400;
        let (p, a) = schedule(0, 7 * day, &cfg(), Duration::from_secs(day as u64));
        assert_eq!(p, 7 * day / 2);
        assert_eq!(a, 7 * day * 5 / 6);
        // A leaf issued just before the switch ends before the intermediate.
        assert!(a + day < 7 * day);
    }

    #[test]
    fn switches_early_enough_for_the_longest_leaf() {
        let day = 86400;
        // 2-day intermediate, 1-day leaves: 5/6 would leave only 8 h.
        let (p, a) = schedule(0, 2 * day, &cfg(), Duration::from_secs(day as u64));
        assert_eq!(p, day);
        assert_eq!(a, day);
    }

    #[test]
    fn short_intermediates_switch_as_soon_as_the_successor_exists() {
        // 2 minutes, 24 h leaves: every leaf is clamped anyway; switch at preparation.
        let (p, a) = schedule(1000, 1120, &cfg(), Duration::from_secs(86400));
        assert_eq!((p, a), (1060, 1060));
    }

    #[test]
    fn retries_back_off_but_stay_frequent_near_expiry() {
        let c = cfg();
        assert_eq!(retry_delay(&c, 1, 86400), Duration::from_secs(1));
        assert_eq!(retry_delay(&c, 4, 86400), Duration::from_secs(8));
        assert_eq!(retry_delay(&c, 30, 86400), Duration::from_secs(300));
        assert_eq!(retry_delay(&c, 30, 40), Duration::from_secs(10));
        assert_eq!(retry_delay(&c, 30, 0), Duration::from_secs(1));
    }

    /// A root and an intermediate it signs, with the given constraints.
    fn chain(path_len: Option<u8>, ca: bool) -> (TrustBundle, IssuedChain, KeyPair) {
        let root_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut rp = CertificateParams::default();
        rp.distinguished_name.push(DnType::CommonName, "root");
        rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = rp.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), root_key).unwrap();
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut ip = CertificateParams::default();
        ip.distinguished_name.push(DnType::CommonName, "int");
        ip.is_ca = match (ca, path_len) {
            (false, _) => rcgen::IsCa::ExplicitNoCa,
            (true, Some(n)) => rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(n)),
            (true, None) => rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
        };
        let int = ip.signed_by(&key, &issuer).unwrap();
        (
            TrustBundle::new(vec![root.der().clone()]).unwrap(),
            IssuedChain::new(int.der().clone(), vec![]),
            key,
        )
    }

    #[test]
    fn a_proper_intermediate_is_accepted_and_its_leaves_verify() {
        let (bundle, issued, key) = chain(Some(0), true);
        let g = check_and_build(issued, key, &cfg(), "cluster.local", &bundle).unwrap();
        assert_eq!(g.ca.chain().len(), 1);
    }

    #[test]
    fn a_certificate_without_ca_true_is_refused_naming_the_reason() {
        let (bundle, issued, key) = chain(None, false);
        let e = check_and_build(issued, key, &cfg(), "cluster.local", &bundle)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a CA certificate"), "{e}");
    }

    #[test]
    fn a_missing_path_length_is_refused_when_asked_for() {
        let (bundle, issued, key) = chain(None, true);
        let e = check_and_build(issued, key, &cfg(), "cluster.local", &bundle)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pathLenConstraint"), "{e}");
        let (bundle, issued, key) = chain(None, true);
        let lax = IntermediateConfig {
            path_len_zero: false,
            ..cfg()
        };
        check_and_build(issued, key, &lax, "cluster.local", &bundle).unwrap();
    }

    #[test]
    fn an_intermediate_for_another_key_or_root_is_refused() {
        let (bundle, issued, _key) = chain(Some(0), true);
        let other = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let e = check_and_build(issued, other, &cfg(), "cluster.local", &bundle)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("another public key"), "{e}");
        let (_, issued, key) = chain(Some(0), true);
        let (other_bundle, _, _) = chain(Some(0), true);
        let e = check_and_build(issued, key, &cfg(), "cluster.local", &other_bundle)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");
    }

    /// Why there is no URI name-constraint option: rustls-webpki (ztunnel's verifier and
    /// ours) fails closed on URI name constraints, so every SPIFFE leaf below such a CA is
    /// refused.
    #[test]
    fn uri_name_constraints_break_rustls() {
        let root_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut rp = CertificateParams::default();
        rp.distinguished_name.push(DnType::CommonName, "root");
        rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // nameConstraints { permittedSubtrees [ URI "cluster.local" ] }
        let uri = b"cluster.local";
        let mut subtree = vec![0x86, uri.len() as u8];
        subtree.extend_from_slice(uri);
        let mut gs = vec![0x30, subtree.len() as u8];
        gs.extend(subtree);
        let mut permitted = vec![0xa0, gs.len() as u8];
        permitted.extend(gs);
        let mut value = vec![0x30, permitted.len() as u8];
        value.extend(permitted);
        let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], value);
        ext.set_criticality(true);
        rp.custom_extensions = vec![ext];
        let root = rp.self_signed(&root_key).unwrap();
        let bundle = TrustBundle::new(vec![root.der().clone()]).unwrap();
        let (ca, _) = SigningCa::new(root.der().clone(), root_key, vec![]).unwrap();
        let e = probe(&ca, "cluster.local", &bundle)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("NameConstraintViolation"), "{e}");
    }

    /// An upstream signing intermediates with an rcgen root that the test can swap (a root
    /// rotation in the backend) or switch off (an outage).
    struct StubUpstream {
        root: Mutex<(rcgen::Issuer<'static, KeyPair>, TrustBundle)>,
        bundle: watch::Sender<SharedBundle>,
        down: std::sync::atomic::AtomicBool,
    }

    fn new_root(name: &str) -> (rcgen::Issuer<'static, KeyPair>, TrustBundle) {
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        let bundle = TrustBundle::new(vec![cert.der().clone()]).unwrap();
        (rcgen::Issuer::new(p, key), bundle)
    }

    impl StubUpstream {
        fn new() -> Arc<Self> {
            let (issuer, bundle) = new_root("root A");
            let (tx, _) = watch::channel(Arc::new(bundle.clone()));
            Arc::new(Self {
                root: Mutex::new((issuer, bundle)),
                bundle: tx,
                down: false.into(),
            })
        }

        /// The backend now signs under a new root, and the bundle holds only that root.
        fn rotate_root(&self) -> TrustBundle {
            let (issuer, bundle) = new_root("root B");
            *self.root.lock().unwrap() = (issuer, bundle.clone());
            self.bundle.send_replace(Arc::new(bundle.clone()));
            bundle
        }
    }

    impl Authority for StubUpstream {
        fn kind(&self) -> &'static str {
            "stub"
        }

        fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
            self.bundle.subscribe()
        }

        fn health(&self) -> Health {
            Health::Ready
        }
    }

    #[async_trait]
    impl UpstreamAuthority for StubUpstream {
        async fn sign_intermediate(
            &self,
            req: &IntermediateRequest,
        ) -> Result<IssuedChain, SignError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(SignError::Unavailable("stub is down".into()));
            }
            let mut p = CertificateParams::default();
            p.distinguished_name
                .push(DnType::CommonName, req.common_name.as_str());
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            let now = ::time::OffsetDateTime::now_utc();
            p.not_before = now - ::time::Duration::seconds(1);
            p.not_after = now + ::time::Duration::try_from(req.ttl).unwrap();
            let spki = rcgen::SubjectPublicKeyInfo::from_der(&req.public_key_der).unwrap();
            let root = self.root.lock().unwrap();
            let cert = p.signed_by(&spki, &root.0).unwrap();
            Ok(IssuedChain::new(cert.der().clone(), vec![]))
        }
    }

    fn workload() -> SignRequest {
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        SignRequest {
            subject: Subject::Workload(
                SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            ),
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            csr_der: Vec::new(),
            ttl: Duration::from_secs(3600),
            caller: None,
        }
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_root_removed_from_the_bundle_replaces_the_intermediate_at_once() {
        let up = StubUpstream::new();
        let metrics = Arc::new(Metrics::new(false));
        let s = IntermediateSigner::start(
            up.clone(),
            &cfg(),
            "cluster.local",
            Duration::from_secs(86400),
            metrics,
        )
        .await
        .unwrap();
        let first = s.current_serial();
        // A week-long intermediate would not rotate for days; the root change forces it.
        let new_bundle = up.rotate_root();
        eventually("replaced after the root change", || {
            s.current_serial() != first
        })
        .await;
        let issued = s.sign(&workload()).await.unwrap();
        verify_path(
            &issued.leaf,
            &issued.intermediates,
            &new_bundle,
            webpki::KeyUsage::client_auth(),
            SystemTime::now(),
        )
        .expect("leaves chain to the new root");
    }

    #[tokio::test]
    async fn an_outage_keeps_signing_then_readiness_fails_inside_the_margin() {
        let up = StubUpstream::new();
        let metrics = Arc::new(Metrics::new(false));
        // 6 s intermediates, successor at half, not ready with less than 3 s left.
        let c = IntermediateConfig {
            ttl: Duration::from_secs(6),
            ready_margin: Duration::from_secs(2),
            retry_backoff: Duration::from_millis(200),
            retry_max_backoff: Duration::from_millis(400),
            ..Default::default()
        };
        let s = IntermediateSigner::start(
            up.clone(),
            &c,
            "cluster.local",
            Duration::from_secs(86400),
            metrics.clone(),
        )
        .await
        .unwrap();
        up.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let failures = || {
            metrics
                .intermediate_preparations
                .with_label_values(&["stub", "failure"])
                .get()
        };
        eventually("a failed preparation", || failures() >= 1).await;
        assert_eq!(s.health(), Health::Ready);
        s.sign(&workload())
            .await
            .expect("signs while the backend is down");
        eventually("not ready inside the margin", || {
            s.health() != Health::Ready
        })
        .await;
        let Health::NotReady(why) = s.health() else {
            unreachable!()
        };
        assert!(why.contains("stub is down"), "{why}");
        assert!(failures() >= 2, "retried");
        up.down.store(false, std::sync::atomic::Ordering::Relaxed);
        eventually("ready again with a successor", || {
            s.health() == Health::Ready
        })
        .await;
        assert_eq!(
            metrics
                .intermediate_rotations
                .with_label_values(&["stub"])
                .get(),
            1
        );
    }

    #[test]
    fn state_round_trips_with_a_private_key_file() {
        let (bundle, issued, key) = chain(Some(0), true);
        let g = check_and_build(issued, key, &cfg(), "cluster.local", &bundle).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("int");
        save_state(&state, &g, &bundle).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&state), 0o700);
        let back = load_state(&state, &cfg(), "cluster.local", &bundle)
            .unwrap()
            .unwrap();
        assert_eq!(back.serial(), g.serial());
        assert_eq!(
            stored_bundle(&state, &cfg(), "cluster.local")
                .unwrap()
                .roots(),
            bundle.roots()
        );
        // Another root: the stored one is not used.
        let (other, _, _) = chain(Some(0), true);
        assert!(
            load_state(&state, &cfg(), "cluster.local", &other)
                .unwrap()
                .is_none()
        );
    }
}
