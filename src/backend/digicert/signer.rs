//! [`Digicert`]: one enrollment per certificate (polled while PENDING) through
//! [`Retry`], the chain laid out from the answer and `intermediatesFile`, readiness from
//! whether DigiCert accepts the credentials.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::time::Instant;
use x509_parser::prelude::*;

use super::client::{Answer, Client, DigicertError, file_err};
use super::{DigicertConfig, DigicertSeatStrategy, KIND};
use crate::backend::remote::{self, Backoff, Failure, Polling, Retry, TokenBucket};
use crate::backend::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject,
};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{SharedBundle, TrustBundle};

/// While DigiCert refuses the credentials, how often `GET /hello` checks whether they work
/// again (so readiness recovers without traffic).
const DENIED_PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Digicert {
    client: Arc<Client>,
    cfg: DigicertConfig,
    bucket: TokenBucket,
    bundle: watch::Sender<SharedBundle>,
    /// Raw subjects of the trust bundle's roots (chain layout stops at one of them).
    root_subjects: arc_swap::ArcSwap<Vec<Vec<u8>>>,
    intermediates: Vec<CertificateDer<'static>>,
    issuing_ca_not_after: AtomicI64,
    metrics: Arc<Metrics>,
}

impl Digicert {
    /// Reads the credentials, TLS material, trust bundle and intermediates; fails at start
    /// with a clear error when any of them is unusable. DigiCert itself is first reached by
    /// the first enrollment (the bridge's serving certificate, in most set-ups).
    pub fn connect(cfg: &DigicertConfig, metrics: Arc<Metrics>) -> Result<Self, DigicertError> {
        let client = Arc::new(Client::new(cfg)?);
        let bundle_path = cfg
            .trust_bundle_file
            .as_deref()
            .ok_or_else(|| DigicertError::Config("backend.trustBundleFile is required".into()))?;
        let (bundle, root_subjects) = read_bundle(bundle_path)?;
        let intermediates = match &cfg.intermediates_file {
            Some(p) => {
                let text = std::fs::read(p).map_err(|e| file_err(p, e))?;
                pki::parse_certs_pem(&text).map_err(|e| file_err(p, e))?
            }
            None => Vec::new(),
        };
        spawn_denied_probe(Arc::downgrade(&client), cfg.request_timeout);
        Ok(Self {
            client,
            bucket: TokenBucket::new(cfg.rate_limit, cfg.rate_burst),
            cfg: cfg.clone(),
            bundle: watch::channel(Arc::new(bundle)).0,
            root_subjects: arc_swap::ArcSwap::from_pointee(root_subjects),
            intermediates,
            issuing_ca_not_after: AtomicI64::new(0),
            metrics,
        })
    }

    fn enrollment_body(&self, req: &SignRequest) -> serde_json::Value {
        let (san, derived_seat) = match &req.subject {
            Subject::Workload(id) => (serde_json::json!({ "uris": [id.uri()] }), id.uri()),
            Subject::Server { dns_names } => {
                let (ips, dns): (Vec<&String>, Vec<&String>) = dns_names
                    .iter()
                    .partition(|n| n.parse::<std::net::IpAddr>().is_ok());
                let mut san = serde_json::json!({ "dns_names": dns });
                if !ips.is_empty() {
                    san["ip_addresses"] = serde_json::json!(ips);
                }
                (san, dns_names.first().cloned().unwrap_or_default())
            }
        };
        let seat = match self.cfg.seat.strategy {
            DigicertSeatStrategy::SpiffeId => derived_seat,
            DigicertSeatStrategy::Fixed => self.cfg.seat.id.clone(),
        };
        let unit = self.cfg.validity_unit;
        serde_json::json!({
            "profile": { "id": self.cfg.profile_id },
            "seat": { "seat_id": seat },
            "csr": pki::pem_encode("CERTIFICATE REQUEST", &req.csr_der),
            "validity": { "unit": unit.as_str(), "duration": unit.duration_for(req.ttl) },
            "delivery_format": "x509",
            "include_ca_chain": true,
            "attributes": { "extensions": { "san": san } },
        })
    }

    /// Enrolls and, when DigiCert answers PENDING, picks the certificate up, polled from
    /// `pollInitialInterval` doubling to `pollMaxInterval` (each poll counted as `pending`).
    /// Every call waits for the token bucket, keeping a quarter of `requestTimeout`, at
    /// most 1 s, for itself; 429s and transient failures are retried. An enrollment that
    /// may have reached DigiCert is never sent again (no idempotency key); pickups are.
    /// Returns the certificate PEM (leaf first, chain after it).
    async fn enroll(&self, req: &SignRequest, deadline: Instant) -> Result<String, SignError> {
        let retry = Retry {
            kind: KIND,
            metrics: &self.metrics,
            bucket: Some(&self.bucket),
            keep: (self.cfg.request_timeout / 4).min(Duration::from_secs(1)),
            throttled: Backoff::THROTTLED,
            transient: Backoff::TRANSIENT,
        };
        let polling = Polling {
            reason: "pending",
            every: Backoff {
                first: self.cfg.poll_initial_interval,
                cap: self.cfg.poll_max_interval,
            },
            jitter: false,
        };
        let body = &self.enrollment_body(req);
        let pickup_body = &serde_json::json!({ "profile": { "id": self.cfg.profile_id } });
        // The request id once DigiCert answered PENDING: from then on, pickups.
        let pending = &Mutex::new(None::<String>);
        let client = &self.client;
        retry
            .run_polling("DigiCert enrollment", deadline, polling, move |_| async move {
                let id = pending.lock().expect("lock").clone();
                let answer = match &id {
                    None => client
                        .post("enroll", "certificate", body, false)
                        .await?
                        .answer("enroll"),
                    Some(id) => client
                        .post("pickup", &format!("certificate-pickup/{id}"), pickup_body, true)
                        .await?
                        .answer("pickup"),
                };
                match answer.map_err(Failure::Final)? {
                    Answer::Issued(pem) => Ok(pem),
                    Answer::Pending(new) => {
                        if id.is_none() {
                            tracing::debug!(backend = KIND, request_id = %new, "DigiCert enrollment pending; polling the pickup");
                        }
                        let m = format!("DigiCert request {new} is PENDING");
                        *pending.lock().expect("lock") = Some(new);
                        Err(Failure::Pending(m))
                    }
                }
            })
            .await
    }

    /// Lays out the chain: certificates from DigiCert's answer, then the configured
    /// intermediates, linked by issuer name up to a root of the bundle (roots themselves
    /// are dropped). Whether it verifies is the central check's business.
    fn chain(&self, pem: &str) -> Result<IssuedChain, SignError> {
        let bad = |m: String| {
            tracing::error!(backend = KIND, error = %m, "DigiCert returned an unusable certificate");
            SignError::Internal(format!("DigiCert returned an unusable certificate: {m}"))
        };
        let answer = remote::issued_chain(pem, [pem]).map_err(|e| bad(e.to_string()))?;
        let (_, leaf) = parse_x509_certificate(&answer.leaf).map_err(|e| bad(e.to_string()))?;
        let candidates: Vec<&CertificateDer<'static>> = answer
            .intermediates
            .iter()
            .chain(&self.intermediates)
            .collect();
        let mut links: Vec<CertificateDer<'static>> = Vec::new();
        let mut issuer = leaf.issuer().as_raw().to_vec();
        // Bounded: a chain longer than this is not a chain.
        for _ in 0..8 {
            if self.root_subjects.load().contains(&issuer) {
                break;
            }
            let next = candidates.iter().find_map(|c| {
                let (_, p) = parse_x509_certificate(c).ok()?;
                let self_signed = p.subject() == p.issuer();
                (p.subject().as_raw() == issuer.as_slice() && !self_signed && !links.contains(c))
                    .then(|| ((*c).clone(), p.issuer().as_raw().to_vec()))
            });
            match next {
                Some((c, up)) => {
                    links.push(c);
                    issuer = up;
                }
                // The central check reports what is missing.
                None => break,
            }
        }
        if let Some(first) = links.first()
            && let Ok(info) = pki::cert_info(first)
        {
            self.issuing_ca_not_after
                .store(info.not_after, Ordering::Relaxed);
        }
        Ok(IssuedChain::new(answer.leaf.clone(), links))
    }
}

/// The trust bundle file's roots, and their raw subjects.
fn read_bundle(path: &std::path::Path) -> Result<(TrustBundle, Vec<Vec<u8>>), DigicertError> {
    let text = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let bundle = TrustBundle::from_pem(&text).map_err(|e| file_err(path, e))?;
    let mut subjects = Vec::new();
    for r in bundle.roots() {
        let (_, c) = parse_x509_certificate(r).map_err(|e| file_err(path, e))?;
        subjects.push(c.subject().as_raw().to_vec());
    }
    Ok((bundle, subjects))
}

impl Digicert {
    /// Re-reads `trustBundleFile`; publishes its roots if they changed (true). A file that
    /// does not parse changes nothing.
    fn reload_bundle(&self) -> Result<bool, DigicertError> {
        let path = self
            .cfg
            .trust_bundle_file
            .as_deref()
            .expect("checked at connect");
        let (bundle, subjects) = read_bundle(path)?;
        if bundle.roots() == self.bundle.borrow().roots() {
            return Ok(false);
        }
        tracing::info!(backend = KIND, roots = bundle.roots().len(), file = %path.display(), "trust bundle changed");
        self.root_subjects.store(Arc::new(subjects));
        self.bundle.send_replace(Arc::new(bundle));
        Ok(true)
    }
}

/// Re-reads the trust bundle file every `trustBundleRefreshInterval`, for as long as the
/// backend lives.
pub(super) fn spawn_bundle_refresh(me: Weak<Digicert>, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(d) = me.upgrade() else { return };
            if let Err(e) = d.reload_bundle() {
                tracing::warn!(backend = KIND, error = %e, "re-reading the trust bundle failed; keeping the current roots");
            }
        }
    });
}

fn spawn_denied_probe(client: Weak<Client>, timeout: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(DENIED_PROBE_INTERVAL).await;
            let Some(c) = client.upgrade() else { return };
            if c.denied().is_some() && c.probe(timeout).await {
                tracing::info!(backend = KIND, "DigiCert accepts the credentials again");
                c.set_denied(None);
            }
        }
    });
}

impl Authority for Digicert {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }
    fn health(&self) -> Health {
        match self.client.denied() {
            Some(why) => Health::NotReady(format!("DigiCert refuses the credentials: {why}")),
            None => Health::Ready,
        }
    }
}

#[async_trait]
impl Signer for Digicert {
    /// The answer is checked centrally (backend::checked), against the lifetime really
    /// asked for ([`Signer::asked_lifetime`]).
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let deadline = Instant::now() + self.cfg.request_timeout;
        let pem = self.enroll(req, deadline).await?;
        // DigiCert answered with a certificate: the credentials work.
        self.client.set_denied(None);
        let issued = self.chain(&pem)?;
        Ok(issued)
    }

    async fn refresh_trust_bundle(&self) -> bool {
        match self.reload_bundle() {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(backend = KIND, error = %e, "re-reading the trust bundle failed; keeping the current roots");
                false
            }
        }
    }

    /// Whole validity units, rounded down, at least one: a TTL under one unit is asked
    /// for as one unit.
    fn asked_lifetime(&self, ttl: std::time::Duration) -> std::time::Duration {
        let unit = self.cfg.validity_unit;
        std::time::Duration::from_secs(unit.duration_for(ttl) * unit.seconds())
    }

    fn signing_ca(&self) -> SigningCaInfo {
        let t = self.issuing_ca_not_after.load(Ordering::Relaxed);
        SigningCaInfo {
            not_after: (t != 0).then_some(t),
        }
    }
}
