//! Rotation of a remote backend's root: when the enterprise CA offers a new root (Vault: a
//! new root issuer on the mount; AWS Private CA: a new root at the top of the CA's chain; a
//! root added to AWS's `extraRootsFile` or to DigiCert's `trustBundleFile`), [`Follower`] takes
//! the mesh to it through the phases of [`crate::rotation`], as the local CA does with a
//! root it generates:
//! - **publishing**: the bundle is old + new; leaves are still signed under the old root
//!   (Vault: each sign call names the issuer under it, whatever the mount's default is;
//!   intermediate mode: the current intermediate keeps signing, and the next one, under
//!   the new root, is prepared now);
//! - **signingNew**: signed under the new root (intermediate mode switches to the prepared
//!   intermediate at once); both roots stay trusted;
//! - **retiring**: the bundle drops the old root, even if the CA still offers it;
//! - **done**: the new root is the current one; the old one is never followed again.
//!
//! A CA that decides itself which root signs (AWS Private CA, DigiCert) cannot be pinned:
//! the bridge publishes the new root the moment it appears, and signingNew ends only once
//! no leaf under the old root has been seen for its lifetime (so a CA that was not switched
//! stalls the rotation, visibly, instead of breaking workloads). docs/root-rotation.md
//! tells the operator to publish the new root first for such CAs.
//!
//! The state (current roots, the next one, the phase) is shared by the replicas through a
//! [`RootsStore`]: a Kubernetes Secret (`k8s::ca_secret::UpstreamRootsSecret`), a file in
//! `rotation.stateDir`, or memory. Every write names the version it was computed from, so of
//! several replicas exactly one makes each transition.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Mutex, broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::local::StoreError;
use super::{
    Authority, Health, IssuedChain, RootChoice, RootRotation, RotationError, SignError,
    SignRequest, Signer,
};
use crate::metrics::Metrics;
use crate::pki;
use crate::rotation::{
    Phase, RootSummary, RotationConfig, RotationState, RotationStatus, Step, Timing, Transition,
};
use crate::trust::{SharedBundle, TrustBundle};

mod store;
pub use store::{FileRootsStore, MemoryRootsStore, RootsDocument, RootsStore, StoredRoots};

/// Roots no longer followed by themselves (retired, or an aborted rotation's), kept so
/// that a CA still offering them does not start a rotation again.
const DECLINED: usize = 16;

fn der_of(pem: &str) -> Option<CertificateDer<'static>> {
    pki::parse_certs_pem(pem.as_bytes())
        .ok()
        .and_then(|v| v.into_iter().next())
}

/// The parsed document, as the sign path and the bundle need it.
#[derive(Debug, Clone)]
struct Material {
    phase: Phase,
    old: Option<CertificateDer<'static>>,
    new: Option<CertificateDer<'static>>,
    extras: Vec<CertificateDer<'static>>,
    /// Old and new root, parsed once: (subject, subjectKeyIdentifier) for telling which one
    /// a chain ends in without a signature check per call ([`Follower::note`]).
    names: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// A certificate's issuer name and authorityKeyIdentifier, or its own subject and
/// subjectKeyIdentifier (`own`).
fn name_and_key_id(der: &[u8], own: bool) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    use x509_parser::extensions::ParsedExtension;
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let id = c
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) if own => Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) if !own => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
    let name = if own { c.subject() } else { c.issuer() };
    Some((name.as_raw().to_vec(), id))
}

impl Material {
    fn of(doc: &RootsDocument) -> Result<Self, String> {
        let parse = |p: &str| der_of(p).ok_or_else(|| "a stored root does not parse".to_string());
        let mut current = doc.current.iter().map(|p| parse(p));
        let old = current.next().transpose()?;
        let extras = current.collect::<Result<Vec<_>, _>>()?;
        let new = doc.next.as_deref().map(parse).transpose()?;
        let phase = doc.rotation.phase;
        if phase.has_next() && new.is_none() {
            return Err(format!(
                "phase {phase} needs the next root, which the state does not hold"
            ));
        }
        let names = [&old, &new]
            .into_iter()
            .flatten()
            .filter_map(|r| name_and_key_id(r, true))
            .collect();
        Ok(Self {
            phase,
            old,
            new,
            extras,
            names,
        })
    }

    fn bundle(&self) -> Result<TrustBundle, String> {
        let mut roots = Vec::new();
        if self.phase.trusts_current()
            && let Some(a) = &self.old
        {
            roots.push(a.clone());
        }
        if self.phase.has_next()
            && let Some(b) = &self.new
        {
            roots.push(b.clone());
        }
        for e in &self.extras {
            if !roots.contains(e) {
                roots.push(e.clone());
            }
        }
        TrustBundle::new(roots).map_err(|e| e.to_string())
    }

    /// Which of old and new root `top` (a chain's last certificate) is under: by issuer
    /// name and key identifier, which the central check then verifies anyway; a signature
    /// check only when those cannot tell (roots with the same name and no identifiers).
    fn root_of(&self, top: &[u8]) -> Option<&CertificateDer<'static>> {
        let roots: Vec<&CertificateDer<'static>> =
            [&self.old, &self.new].into_iter().flatten().collect();
        let (issuer, aki) = name_and_key_id(top, false)?;
        let matching: Vec<usize> = self
            .names
            .iter()
            .enumerate()
            .filter(|(_, (subject, ski))| {
                *subject == issuer
                    && match (&aki, ski) {
                        (Some(a), Some(s)) => a == s,
                        _ => true,
                    }
            })
            .map(|(i, _)| i)
            .collect();
        match matching.as_slice() {
            [] => None,
            [i] if roots.len() == self.names.len() => Some(roots[*i]),
            _ => {
                let owned: Vec<CertificateDer<'static>> =
                    roots.iter().map(|r| (*r).clone()).collect();
                let found = pki::signing_root(top, &owned)?;
                roots.into_iter().find(|r| *r == found)
            }
        }
    }

    fn choice(&self) -> RootChoice {
        let signing = if self.phase.signs_with_next() {
            self.new.clone()
        } else {
            self.old.clone()
        };
        RootChoice {
            sign_under: signing,
            prepare_under: (self.phase == Phase::Publishing)
                .then(|| self.new.clone())
                .flatten(),
        }
    }
}

/// A remote backend whose roots are followed through rotations (module docs).
pub struct Follower {
    inner: Arc<dyn Signer>,
    /// The backend signs under the root it is told (Vault without `issuerRef`).
    chooses: bool,
    store: Arc<dyn RootsStore>,
    settings: RotationConfig,
    max_ttl: Duration,
    me: String,
    metrics: Arc<Metrics>,
    published: watch::Sender<SharedBundle>,
    choice: watch::Sender<RootChoice>,
    material: ArcSwap<Material>,
    applied: Mutex<StoredRoots>,
    /// The latest NotAfter of a leaf seen under the old root since this process started.
    old_signed_until: AtomicI64,
    transitions: broadcast::Sender<Transition>,
    /// Itself, for the admin port's handle ([`Signer::root_rotation`]).
    this: std::sync::OnceLock<std::sync::Weak<Follower>>,
    _stop: DropGuard,
}

fn now() -> i64 {
    pki::unix_secs(SystemTime::now())
}

fn common_name(der: &[u8]) -> String {
    pki::common_name(der).unwrap_or_else(|| "(no common name)".into())
}

impl Follower {
    /// Loads the shared state (or creates it from the roots the backend offers now),
    /// applies it and starts following. The backend is told which root to sign under.
    pub async fn open(
        inner: Arc<dyn Signer>,
        store: Arc<dyn RootsStore>,
        settings: RotationConfig,
        max_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let describe = store.describe();
        let unavailable = |e: StoreError| format!("{describe}: {e}");
        let stored = match store.load().await.map_err(unavailable)? {
            Some(s) => s,
            None => {
                // The root the backend signs under first: it is the current one.
                let mut roots = inner.trust_bundle().borrow().roots().to_vec();
                if let Some(signing) = inner.signing_roots() {
                    roots.sort_by_key(|r| !signing.contains(r));
                }
                let doc = RootsDocument {
                    current: roots.iter().map(|c| pki::cert_pem(c)).collect(),
                    ..Default::default()
                };
                match store.create(&doc).await {
                    Ok(s) => s,
                    Err(StoreError::Conflict) => store
                        .load()
                        .await
                        .map_err(unavailable)?
                        .ok_or_else(|| format!("{describe}: created, then gone"))?,
                    Err(e) => return Err(unavailable(e)),
                }
            }
        };
        let material = Material::of(&stored.doc).map_err(|e| format!("{describe}: {e}"))?;
        let bundle = material.bundle().map_err(|e| format!("{describe}: {e}"))?;
        let (choice, choice_rx) = watch::channel(material.choice());
        let chooses = inner.follow_root_choice(choice_rx);
        tracing::info!(backend = inner.kind(), store = %describe, phase = %stored.doc.rotation.phase, pinned = chooses, "following the backend's roots through rotations");
        let stop = CancellationToken::new();
        let me = Arc::new(Self {
            inner,
            chooses,
            store,
            settings,
            max_ttl,
            me: crate::rotation::replica_name(),
            metrics,
            published: watch::channel(Arc::new(bundle)).0,
            choice,
            material: ArcSwap::from_pointee(material),
            applied: Mutex::new(stored),
            old_signed_until: AtomicI64::new(0),
            transitions: broadcast::channel(64).0,
            this: std::sync::OnceLock::new(),
            _stop: stop.clone().drop_guard(),
        });
        let _ = me.this.set(Arc::downgrade(&me));
        me.observe(&me.applied.lock().await.doc.rotation);
        if let Err(e) = me.reconcile().await {
            tracing::warn!(error = %e, "root rotation: the first look at the backend's roots failed");
        }
        let weak = Arc::downgrade(&me);
        let mut upstream = me.inner.trust_bundle();
        let poll = me.settings.poll_interval;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                    r = upstream.changed() => if r.is_err() { return },
                }
                upstream.borrow_and_update();
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.tick().await {
                    tracing::warn!(error = %e, "root rotation: reading or advancing the shared state failed; keeping the last good state");
                }
            }
        });
        Ok(me)
    }

    fn timing(&self, phase: Phase) -> Timing {
        let seen = self.old_signed_until.load(Ordering::Relaxed);
        Timing {
            max_ttl: self.max_ttl,
            skew: self.settings.skew,
            seen_until: (phase == Phase::SigningNew && seen > 0).then_some(seen),
        }
    }

    async fn tick(&self) -> Result<(), RotationError> {
        self.reconcile().await?;
        let mut applied = self.applied.lock().await;
        let timing = self.timing(applied.doc.rotation.phase);
        if self.settings.auto_advance && applied.doc.rotation.due(now(), &timing) {
            let step = Step::Advance {
                force: false,
                auto: true,
            };
            match self.write_step(&mut applied, step).await {
                Ok(()) | Err(RotationError::Conflict) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Re-reads the shared state, then compares it with the roots the backend offers: a
    /// new one starts a rotation; a further root the backend dropped is dropped.
    async fn reconcile(&self) -> Result<(), RotationError> {
        let mut applied = self.applied.lock().await;
        self.refresh(&mut applied).await?;
        let offered: Vec<CertificateDer<'static>> =
            self.inner.trust_bundle().borrow().roots().to_vec();
        let doc = &applied.doc;
        let known = |c: &CertificateDer<'_>| {
            let pem = pki::cert_pem(c);
            doc.current.contains(&pem) || doc.next.as_ref() == Some(&pem)
        };
        let declined = |c: &CertificateDer<'_>| doc.declined.contains(&pki::cert_pem(c));
        if doc.rotation.in_progress() {
            return Ok(());
        }
        let signing = self.inner.signing_roots();
        let can_sign =
            |c: &CertificateDer<'_>| signing.as_ref().is_none_or(|s| s.iter().any(|r| r == c));
        let fresh: Vec<&CertificateDer<'static>> = offered
            .iter()
            .filter(|c| !known(c) && !declined(c))
            .collect();
        // The CA was switched (AWS: a new caArn; Vault: a new issuerRef) to a root already
        // published beside the current one: rotate to it.
        let current: Vec<CertificateDer<'static>> =
            doc.current.iter().filter_map(|p| der_of(p)).collect();
        if signing.is_some()
            && current.first().is_some_and(|a| !can_sign(a))
            && let Some(b) = current.iter().skip(1).find(|c| can_sign(c))
        {
            let reason = format!(
                "{} now signs under {}, a root published beside the current one",
                self.inner.kind(),
                common_name(b)
            );
            return self.begin(&mut applied, b.clone(), &reason).await;
        }
        if let Some(b) = fresh.iter().find(|c| can_sign(c)) {
            let reason = format!(
                "{} offers a new root: {}",
                self.inner.kind(),
                common_name(b)
            );
            return self.begin(&mut applied, (*b).clone(), &reason).await;
        }
        // A root the backend only trusts (one it cannot sign under) is published at once,
        // and one it no longer offers is no longer published.
        let mut next = doc.clone();
        let offered_pem: Vec<String> = offered.iter().map(|c| pki::cert_pem(c)).collect();
        let first = next.current.first().cloned();
        next.current
            .retain(|p| Some(p) == first.as_ref() || offered_pem.contains(p));
        for c in &fresh {
            tracing::info!(backend = self.inner.kind(), root = %common_name(c), "the backend offers a further root it does not sign under; publishing it alongside");
            next.current.push(pki::cert_pem(c));
        }
        if next.current != doc.current {
            return self.write(&mut applied, next).await;
        }
        if first.is_some_and(|f| !offered_pem.contains(&f)) {
            tracing::error!(
                backend = self.inner.kind(),
                "the backend no longer offers the root the bridge signs under; still publishing it. Give the CA a new root (docs/root-rotation.md)"
            );
        }
        Ok(())
    }

    async fn begin(
        &self,
        applied: &mut StoredRoots,
        root: CertificateDer<'static>,
        reason: &str,
    ) -> Result<(), RotationError> {
        let timing = self.timing(Phase::Publishing);
        let rotation = applied
            .doc
            .rotation
            .start(now(), &timing, reason, &self.me)
            .map_err(|r| RotationError::Refused(r.0))?;
        let pem = pki::cert_pem(&root);
        let mut next = applied.doc.clone();
        next.rotation = rotation;
        next.declined.retain(|p| *p != pem);
        next.current.retain(|p| *p != pem);
        next.next = Some(pem);
        tracing::warn!(backend = self.inner.kind(), root = %common_name(&root), "root rotation: the backend offers a new root; publishing it");
        self.write(applied, next).await
    }

    /// Loads the state and applies it if another replica changed it; restores it from
    /// memory if it was deleted.
    async fn refresh(&self, applied: &mut StoredRoots) -> Result<(), RotationError> {
        let stored = match self.store.load().await {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.count_error("read");
                tracing::error!(store = %self.store.describe(), "the root rotation state was deleted; restoring it from this replica's memory");
                match self.store.create(&applied.doc).await {
                    Ok(s) => s,
                    Err(StoreError::Conflict) => return Ok(()),
                    Err(e) => {
                        self.count_error("write");
                        return Err(e.into());
                    }
                }
            }
            Err(e) => {
                self.count_error("read");
                return Err(e.into());
            }
        };
        if stored.version != applied.version {
            self.apply(applied, stored)?;
        }
        Ok(())
    }

    fn count_error(&self, op: &str) {
        self.metrics
            .rotation_state_errors
            .with_label_values(&[op])
            .inc();
    }

    fn apply(&self, applied: &mut StoredRoots, stored: StoredRoots) -> Result<(), RotationError> {
        let material = Material::of(&stored.doc).map_err(|e| {
            self.count_error("read");
            RotationError::Unavailable(format!("{}: {e}", self.store.describe()))
        })?;
        let bundle = material
            .bundle()
            .map_err(|e| RotationError::Unavailable(e.to_string()))?;
        let phase_changed = applied.doc.rotation.phase != stored.doc.rotation.phase;
        if phase_changed {
            tracing::info!(from = %applied.doc.rotation.phase, to = %stored.doc.rotation.phase, roots = bundle.roots().len(), "root rotation: applying phase");
        }
        self.choice.send_if_modified(|c| {
            let new = material.choice();
            let changed = *c != new;
            *c = new;
            changed
        });
        // Every phase change is announced, even with the same roots: what the bridge
        // serves with (its serving certificate) is re-issued under the phase's root.
        self.published.send_if_modified(|b| {
            let changed = b.roots() != bundle.roots();
            if changed {
                *b = Arc::new(bundle);
            }
            changed || phase_changed
        });
        self.material.store(Arc::new(material));
        self.observe(&stored.doc.rotation);
        *applied = stored;
        Ok(())
    }

    fn observe(&self, r: &RotationState) {
        self.metrics.observe_rotation(r);
    }

    async fn write_step(&self, applied: &mut StoredRoots, step: Step) -> Result<(), RotationError> {
        let doc = &applied.doc;
        let rotation = doc
            .rotation
            .step(step, now(), &self.timing(doc.rotation.phase), &self.me)
            .map_err(|r| RotationError::Refused(r.0))?;
        let mut next = doc.clone();
        next.rotation = rotation;
        match next.rotation.phase {
            Phase::Done => {
                let b = next.next.take().expect("retiring has a next root");
                let mut current = vec![b];
                if let Some(a) = next.current.first().cloned() {
                    next.declined.push(a);
                }
                current.extend(next.current.iter().skip(1).cloned());
                next.current = current;
            }
            Phase::Idle => {
                if let Some(b) = next.next.take() {
                    next.declined.push(b);
                }
            }
            _ => {}
        }
        let extra = next.declined.len().saturating_sub(DECLINED);
        next.declined.drain(..extra);
        self.write(applied, next).await
    }

    async fn write(
        &self,
        applied: &mut StoredRoots,
        next: RootsDocument,
    ) -> Result<(), RotationError> {
        Material::of(&next)
            .and_then(|m| m.bundle().map(|_| ()))
            .map_err(RotationError::Unavailable)?;
        let stored = match self.store.replace(&next, &applied.version).await {
            Ok(s) => s,
            Err(e) => {
                if !matches!(e, StoreError::Conflict) {
                    self.count_error("write");
                }
                return Err(e.into());
            }
        };
        if stored.doc.rotation.history != applied.doc.rotation.history
            && let Some(t) = stored.doc.rotation.last().cloned()
        {
            self.metrics.count_transition(&t);
            let _ = self.transitions.send(t);
        }
        self.apply(applied, stored)
    }

    fn status_of(&self, applied: &StoredRoots) -> RotationStatus {
        let m = self.material.load();
        let phase = m.phase;
        let mut roots = Vec::new();
        if let Some(a) = &m.old {
            roots.push(RootSummary::of(
                a,
                "current",
                phase.trusts_current(),
                !phase.signs_with_next(),
            ));
        }
        if let Some(b) = m.new.as_ref().filter(|_| phase.has_next()) {
            roots.push(RootSummary::of(b, "next", true, phase.signs_with_next()));
        }
        for e in &m.extras {
            roots.push(RootSummary::of(e, "other", true, false));
        }
        RotationStatus::new(
            &applied.doc.rotation,
            &self.timing(phase),
            now(),
            self.settings.auto_advance,
            roots,
            self.store.describe(),
            &self.me,
        )
    }

    /// Notes which root a leaf came under while a rotation is in progress: a CA that
    /// chooses itself keeps signingNew waiting for as long as leaves under the old root
    /// come back, and one that switched before the new root was published is reported.
    fn note(&self, req: &SignRequest, issued: &IssuedChain) {
        let m = self.material.load();
        if !m.phase.has_next() {
            return;
        }
        // Only workloads' leaves (at most maxTtl) are what signingNew waits out; the
        // bridge's own serving certificate is re-issued at every phase change.
        let workload = req.caller.is_some();
        if !(workload && m.phase.signs_with_next() || m.phase == Phase::Publishing) {
            return;
        }
        let top = issued.intermediates.last().unwrap_or(&issued.leaf);
        let (Some(old), Some(new)) = (&m.old, &m.new) else {
            return;
        };
        let under = m.root_of(top);
        match under {
            // Leaves issued before signingNew expire within its own wait.
            Some(r) if r == old && m.phase.signs_with_next() && workload => {
                if let Ok(info) = pki::cert_info(&issued.leaf) {
                    self.old_signed_until
                        .fetch_max(info.not_after, Ordering::Relaxed);
                }
                if !self.chooses {
                    tracing::warn!(backend = self.inner.kind(), phase = %m.phase, "the backend still signs under the old root; the rotation waits until it has switched (docs/root-rotation.md)");
                }
            }
            Some(r) if r == new && m.phase == Phase::Publishing => {
                tracing::error!(
                    backend = self.inner.kind(),
                    "the backend signs under the new root while it is still being published: workloads that have not renewed yet do not trust it (docs/root-rotation.md: publish the new root before switching the CA)"
                );
            }
            _ => {}
        }
    }
}

impl From<StoreError> for RotationError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => RotationError::Conflict,
            StoreError::Unavailable(m) | StoreError::Corrupt(m) => RotationError::Unavailable(m),
        }
    }
}

impl Authority for Follower {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.published.subscribe()
    }
    fn health(&self) -> Health {
        self.inner.health()
    }
}

#[async_trait]
impl Signer for Follower {
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let issued = self.inner.sign(req).await?;
        self.note(req, &issued);
        Ok(issued)
    }

    /// Re-reads the backend's roots, and follows a change at once.
    async fn refresh_trust_bundle(&self) -> bool {
        if !self.inner.refresh_trust_bundle().await {
            return false;
        }
        let before = self.published.borrow().roots().to_vec();
        if let Err(e) = self.reconcile().await {
            tracing::warn!(error = %e, "root rotation: following the backend's new roots failed");
        }
        self.published.borrow().roots() != before.as_slice()
    }

    fn signing_ca(&self) -> super::SigningCaInfo {
        self.inner.signing_ca()
    }
    fn issued_under(&self, issuer: &super::IssuerRef<'_>) -> bool {
        self.inner.issued_under(issuer)
    }
    fn asked_lifetime(&self, ttl: Duration) -> Duration {
        self.inner.asked_lifetime(ttl)
    }
    fn root_rotation(&self) -> Option<Arc<dyn RootRotation>> {
        let me = self.this.get()?.upgrade()?;
        Some(Arc::new(FollowerRotation(me)))
    }
}

/// The admin port's view: a [`Follower`] behind an `Arc`.
pub struct FollowerRotation(pub Arc<Follower>);

#[async_trait]
impl RootRotation for FollowerRotation {
    async fn status(&self) -> Result<RotationStatus, RotationError> {
        let f = &self.0;
        let mut applied = f.applied.lock().await;
        if let Err(e) = f.refresh(&mut applied).await {
            tracing::warn!(error = %e, "root rotation status: the shared state could not be read; showing the last applied");
        }
        Ok(f.status_of(&applied))
    }

    /// Starts with a root the backend offers besides the current ones (one declined
    /// before, after an abort, if there is no other).
    async fn start(&self, reason: &str) -> Result<RotationStatus, RotationError> {
        let f = &self.0;
        let mut applied = f.applied.lock().await;
        f.refresh(&mut applied).await?;
        let offered: Vec<CertificateDer<'static>> =
            f.inner.trust_bundle().borrow().roots().to_vec();
        let doc = &applied.doc;
        let candidate = offered
            .iter()
            .filter(|c| !doc.current.contains(&pki::cert_pem(c)))
            .min_by_key(|c| doc.declined.contains(&pki::cert_pem(c)))
            .cloned();
        let Some(root) = candidate else {
            return Err(RotationError::Refused(format!(
                "{} offers no root besides the current one: a rotation of its root starts by itself once the CA offers a new one (Vault: a new root issuer on the mount; AWS Private CA: the CA's new chain or extraRootsFile; DigiCert: trustBundleFile). See docs/root-rotation.md",
                f.inner.kind()
            )));
        };
        let reason = if reason.is_empty() {
            format!("started by the operator: {}", common_name(&root))
        } else {
            reason.to_string()
        };
        f.begin(&mut applied, root, &reason).await?;
        Ok(f.status_of(&applied))
    }

    async fn step(&self, step: Step) -> Result<RotationStatus, RotationError> {
        let f = &self.0;
        let mut applied = f.applied.lock().await;
        f.refresh(&mut applied).await?;
        f.write_step(&mut applied, step).await?;
        Ok(f.status_of(&applied))
    }

    fn transitions(&self) -> broadcast::Receiver<Transition> {
        self.0.transitions.subscribe()
    }
}
