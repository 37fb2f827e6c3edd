//! The local CA's side of root rotation: applies the shared [`CaDocument`] to this
//! replica's signer (which root signs, which roots are trusted), re-reads it every
//! `rotation.pollInterval`, advances a phase whose wait is over, and carries out the
//! operator's start, advance and abort. Every change is one conditional write to the
//! [`CaStore`], so of several replicas exactly one makes each transition; the others apply
//! it at their next read.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use super::store::{CaDocument, CaStore, KeyedCert, StoreError, Stored};
use super::{Core, LocalConfig, LocalError, SigningCa};
use crate::backend::{RootRotation, RotationError};
use crate::metrics::Metrics;
use crate::pki;
use crate::rotation::{
    Phase, RootSummary, RotationConfig, RotationState, RotationStatus, Step, Timing, Transition,
};
use crate::trust::TrustBundle;

/// What this replica last applied.
struct Applied {
    stored: Stored,
    /// The latest NotAfter this replica had signed when the phase began (see
    /// [`Timing::seen_until`]); `None` when the phase began before this process started.
    seen_at_phase_start: Option<i64>,
}

pub struct Controller {
    core: Arc<Core>,
    store: Arc<dyn CaStore>,
    cfg: LocalConfig,
    trust_domain: String,
    settings: RotationConfig,
    max_ttl: Duration,
    me: String,
    metrics: Arc<Metrics>,
    applied: Mutex<Applied>,
    transitions: broadcast::Sender<Transition>,
}

fn now() -> i64 {
    pki::unix_secs(SystemTime::now())
}

fn store_err(e: StoreError) -> RotationError {
    e.into()
}

/// The signing CA and the bundle a document means in its phase.
fn material(doc: &CaDocument) -> Result<(SigningCa, TrustBundle, Vec<Vec<u8>>), LocalError> {
    let phase = doc.rotation.phase;
    let current = parse(&doc.current)?;
    let next = match (&doc.next, phase.has_next()) {
        (Some(n), true) => Some(parse(n)?),
        (None, true) => {
            return Err(LocalError::Invalid(format!(
                "phase {phase} needs the next root, which the state does not hold"
            )));
        }
        _ => None,
    };
    let mut roots = Vec::new();
    let mut renewable = Vec::new();
    if phase.trusts_current() {
        roots.push(current.0.clone());
    }
    if let Some(n) = &next {
        roots.push(n.0.clone());
    }
    let (cert, key) = match (phase.signs_with_next(), next) {
        (true, Some(n)) => n,
        _ => current,
    };
    let (ca, _) = SigningCa::new(cert, key, Vec::new())?;
    let bundle = TrustBundle::new(roots).map_err(|e| LocalError::Invalid(e.to_string()))?;
    for f in bundle.root_facts() {
        renewable.push(f.spki.clone());
    }
    Ok((ca, bundle, renewable))
}

fn parse(
    k: &KeyedCert,
) -> Result<(rustls_pki_types::CertificateDer<'static>, rcgen::KeyPair), LocalError> {
    let cert = pki::parse_certs_pem(k.cert_pem.as_bytes())
        .map_err(|e| LocalError::Invalid(format!("stored root: {e}")))?
        .into_iter()
        .next()
        .expect("at least one");
    let key = pki::load_key_pair(k.key_pem.as_bytes())
        .map_err(|e| LocalError::Invalid(format!("stored root key: {e}")))?;
    Ok((cert, key))
}

impl Controller {
    /// Reads the shared state, creating it when there is none (the first replica) from
    /// `import_from` if that holds a CA, else with a new root.
    pub(super) async fn open(
        store: Arc<dyn CaStore>,
        import_from: Option<&dyn CaStore>,
        cfg: &LocalConfig,
        trust_domain: &str,
        settings: RotationConfig,
        max_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, LocalError> {
        let unavailable = |e: StoreError| LocalError::Invalid(format!("{}: {e}", store.describe()));
        let stored = match store.load().await.map_err(unavailable)? {
            Some(s) => {
                tracing::info!(store = %store.describe(), phase = %s.doc.rotation.phase, "loaded the local CA");
                s
            }
            None => {
                // A root this replica kept before the state was shared (an upgrade from a
                // single replica with a persistent stateDir) is carried over, never replaced.
                let imported = match import_from {
                    Some(old) => old.load().await.map_err(unavailable)?,
                    None => None,
                };
                let doc = match imported {
                    Some(old) => {
                        tracing::warn!(from = %import_from.map(|s| s.describe()).unwrap_or_default(), to = %store.describe(), "carrying the existing local CA root over into the shared store");
                        old.doc
                    }
                    None => CaDocument {
                        current: super::generate_root(cfg, trust_domain, None)?,
                        next: None,
                        rotation: RotationState::default(),
                    },
                };
                match store.create(&doc).await {
                    Ok(s) => {
                        tracing::warn!(store = %store.describe(), "stored the local CA root; every workload must trust it");
                        s
                    }
                    // Another replica was first: use its root, never ours.
                    Err(StoreError::Conflict) => {
                        tracing::info!(store = %store.describe(), "another replica created the local CA first; using it");
                        store.load().await.map_err(unavailable)?.ok_or_else(|| {
                            LocalError::Invalid(format!(
                                "{}: created by another replica, then gone",
                                store.describe()
                            ))
                        })?
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
        };
        let (ca, bundle, renewable) = material(&stored.doc)?;
        let core = Arc::new(Core::new(ca, bundle, renewable));
        let (transitions, _) = broadcast::channel(64);
        let me = Self {
            core,
            store,
            cfg: cfg.clone(),
            trust_domain: trust_domain.to_string(),
            settings,
            max_ttl,
            me: crate::rotation::replica_name(),
            metrics,
            applied: Mutex::new(Applied {
                stored,
                seen_at_phase_start: None,
            }),
            transitions,
        };
        me.observe(&me.applied.lock().await.stored.doc.rotation);
        Ok(Arc::new(me))
    }

    pub(super) fn core(&self) -> Arc<Core> {
        self.core.clone()
    }

    /// Re-reads the state every poll interval, and advances a due phase, until `stop`.
    pub(super) fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(me.settings.poll_interval) => {}
                }
                if let Err(e) = me.tick().await {
                    tracing::warn!(error = %e, "root rotation: reading or advancing the shared state failed; keeping the last good state");
                }
            }
        });
    }

    async fn tick(&self) -> Result<(), RotationError> {
        let mut applied = self.applied.lock().await;
        self.refresh(&mut applied).await?;
        let timing = self.timing(&applied);
        if self.settings.auto_advance && applied.stored.doc.rotation.due(now(), &timing) {
            match self
                .write_step(
                    &mut applied,
                    Step::Advance {
                        force: false,
                        auto: true,
                    },
                )
                .await
            {
                Ok(()) | Err(RotationError::Conflict) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn timing(&self, applied: &Applied) -> Timing {
        Timing {
            max_ttl: self.max_ttl,
            skew: self.settings.skew,
            seen_until: applied.seen_at_phase_start,
        }
    }

    /// Loads the state and applies it if another replica changed it.
    async fn refresh(&self, applied: &mut Applied) -> Result<(), RotationError> {
        let stored = match self.store.load().await {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Deleted (by hand, or with its namespace): written back from memory at
                // once, before a restarting replica would find nothing and make a new root.
                self.metrics
                    .rotation_state_errors
                    .with_label_values(&["read"])
                    .inc();
                match self.store.create(&applied.stored.doc).await {
                    Ok(s) => {
                        tracing::error!(store = %self.store.describe(), "the CA state was deleted; restored it from this replica's memory");
                        s
                    }
                    // Another replica restored it first: read that.
                    Err(StoreError::Conflict) => match self.store.load().await {
                        Ok(Some(s)) => s,
                        Ok(None) => {
                            return Err(RotationError::Unavailable(format!(
                                "{}: the CA state was deleted again",
                                self.store.describe()
                            )));
                        }
                        Err(e) => return Err(store_err(e)),
                    },
                    Err(e) => {
                        self.metrics
                            .rotation_state_errors
                            .with_label_values(&["write"])
                            .inc();
                        return Err(store_err(e));
                    }
                }
            }
            Err(e) => {
                self.metrics
                    .rotation_state_errors
                    .with_label_values(&["read"])
                    .inc();
                return Err(store_err(e));
            }
        };
        if stored.version != applied.stored.version {
            self.apply(applied, stored)?;
        }
        Ok(())
    }

    fn apply(&self, applied: &mut Applied, stored: Stored) -> Result<(), RotationError> {
        let (ca, bundle, renewable) = material(&stored.doc).map_err(|e| {
            self.metrics
                .rotation_state_errors
                .with_label_values(&["read"])
                .inc();
            RotationError::Unavailable(format!("{}: {e}", self.store.describe()))
        })?;
        let old = applied.stored.doc.rotation.phase;
        let new = stored.doc.rotation.phase;
        if old != new || applied.stored.doc.rotation.since != stored.doc.rotation.since {
            applied.seen_at_phase_start =
                Some(self.core.signed_until.load(Ordering::Relaxed)).filter(|t| *t > 0);
            tracing::info!(from = %old, to = %new, roots = bundle.roots().len(), "root rotation: applying phase");
        }
        self.core.install(ca, bundle, renewable);
        self.observe(&stored.doc.rotation);
        applied.stored = stored;
        Ok(())
    }

    fn observe(&self, r: &RotationState) {
        self.metrics.observe_rotation(r);
    }

    /// Computes and writes one step from the applied state; on success applies it here.
    async fn write_step(&self, applied: &mut Applied, step: Step) -> Result<(), RotationError> {
        let doc = &applied.stored.doc;
        let timing = self.timing(applied);
        let rotation = doc
            .rotation
            .step(step, now(), &timing, &self.me)
            .map_err(|r| RotationError::Refused(r.0))?;
        let mut next = doc.clone();
        next.rotation = rotation;
        match next.rotation.phase {
            Phase::Done => {
                next.current = next.next.take().expect("retiring has a next root");
            }
            Phase::Idle => next.next = None,
            _ => {}
        }
        self.write(applied, next).await
    }

    async fn write(&self, applied: &mut Applied, next: CaDocument) -> Result<(), RotationError> {
        // Never write what this replica could not apply.
        material(&next).map_err(|e| RotationError::Unavailable(e.to_string()))?;
        let stored = match self.store.replace(&next, &applied.stored.version).await {
            Ok(s) => s,
            Err(e) => {
                if !matches!(e, StoreError::Conflict) {
                    self.metrics
                        .rotation_state_errors
                        .with_label_values(&["write"])
                        .inc();
                }
                return Err(store_err(e));
            }
        };
        if let Some(t) = stored.doc.rotation.last().cloned() {
            self.metrics.count_transition(&t);
            let _ = self.transitions.send(t);
        }
        self.apply(applied, stored)
    }

    fn status_of(&self, applied: &Applied) -> RotationStatus {
        let doc = &applied.stored.doc;
        let r = &doc.rotation;
        let timing = self.timing(applied);
        let phase = r.phase;
        let mut roots = vec![summary(
            &doc.current,
            "current",
            phase.trusts_current(),
            !phase.signs_with_next(),
        )];
        if let Some(n) = &doc.next {
            roots.push(summary(n, "next", true, phase.signs_with_next()));
        }
        RotationStatus::new(
            r,
            &timing,
            now(),
            self.settings.auto_advance,
            roots,
            self.store.describe(),
            &self.me,
        )
    }
}

fn summary(k: &KeyedCert, role: &'static str, trusted: bool, signing: bool) -> RootSummary {
    match pki::parse_certs_pem(k.cert_pem.as_bytes())
        .ok()
        .and_then(|v| v.into_iter().next())
    {
        Some(der) => RootSummary::of(&der, role, trusted, signing),
        None => RootSummary {
            role,
            common_name: None,
            serial: None,
            not_after: None,
            trusted,
            signing,
        },
    }
}

#[async_trait]
impl RootRotation for Controller {
    async fn status(&self) -> Result<RotationStatus, RotationError> {
        let mut applied = self.applied.lock().await;
        // A stale answer is better than none while the store is down.
        if let Err(e) = self.refresh(&mut applied).await {
            tracing::warn!(error = %e, "root rotation status: the shared state could not be read; showing the last applied");
        }
        Ok(self.status_of(&applied))
    }

    async fn start(&self, reason: &str) -> Result<RotationStatus, RotationError> {
        let mut applied = self.applied.lock().await;
        self.refresh(&mut applied).await?;
        let doc = &applied.stored.doc;
        let rotation = doc
            .rotation
            .start(now(), &self.timing(&applied), reason, &self.me)
            .map_err(|r| RotationError::Refused(r.0))?;
        let next_root = super::generate_root(&self.cfg, &self.trust_domain, Some(now()))
            .map_err(|e| RotationError::Unavailable(e.to_string()))?;
        let mut next = doc.clone();
        next.rotation = rotation;
        next.next = Some(next_root);
        self.write(&mut applied, next).await?;
        Ok(self.status_of(&applied))
    }

    async fn step(&self, step: Step) -> Result<RotationStatus, RotationError> {
        let mut applied = self.applied.lock().await;
        self.refresh(&mut applied).await?;
        self.write_step(&mut applied, step).await?;
        Ok(self.status_of(&applied))
    }

    fn transitions(&self) -> broadcast::Receiver<Transition> {
        self.transitions.subscribe()
    }
}
