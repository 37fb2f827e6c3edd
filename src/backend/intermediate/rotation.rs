//! Rotation: when the successor of the current intermediate is prepared and when it
//! takes over ([`schedule`]), how failed preparations are retried ([`retry_delay`]), and
//! the task that does both, and replaces an intermediate at once when the trust bundle
//! drops its root ([`run`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::generation::{Generation, prepare, probe};
use super::{IntermediateConfig, IntermediateError, UpstreamAuthority, now_secs, state};
use crate::backend::{RootChoice, remote};
use crate::metrics::Metrics;
use crate::trust::SharedBundle;

const MIN_PREPARE_INTERVAL: Duration = Duration::from_secs(1);

/// The generations of one signer and what rotating them needs: shared by the
/// [`super::IntermediateSigner`] (which signs with `current`) and its rotation task.
pub(super) struct Rotation {
    pub(super) upstream: Arc<dyn UpstreamAuthority>,
    pub(super) cfg: IntermediateConfig,
    pub(super) trust_domain: String,
    /// Longest leaf the policy allows: the successor takes over while the current one can
    /// still cover it.
    pub(super) max_leaf_ttl: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) current: ArcSwap<Generation>,
    pub(super) next: Mutex<Option<Arc<Generation>>>,
    /// A generation under the root an upstream rotation is publishing (see `choice`).
    pub(super) staged: Mutex<Option<Arc<Generation>>>,
    /// The last failed preparation, for `/readyz` and logs.
    pub(super) last_error: Mutex<Option<String>>,
    /// Which upstream root to sign under, during and after a rotation of the upstream's root
    /// (set once by [`crate::backend::follow`]); the task re-plans when it changes.
    pub(super) choice: std::sync::OnceLock<watch::Receiver<RootChoice>>,
    pub(super) choice_set: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Prepare,
    Activate,
    /// Prepare a generation under the root a rotation moves to, held apart from `next`.
    Stage,
    /// Switch to the staged generation.
    ActivateStaged,
}

/// What a root choice asks of the generations now, if anything. The generation that signs
/// must be under `sign_under`: the staged one takes over if it is under it (prepared while
/// the new root was being published), else a next one under it, else one is prepared at
/// once. And while `prepare_under` names another root, a generation under it is staged,
/// ready for that switch, without disturbing the regular successor.
fn choice_step(
    choice: &RootChoice,
    current: &Generation,
    next: Option<&Generation>,
    staged: Option<&Generation>,
    fresh: impl Fn(&Generation) -> bool,
) -> Option<(Step, Option<rustls_pki_types::CertificateDer<'static>>)> {
    if let Some(r) = &choice.sign_under
        && !current.under(r)
    {
        return Some(match (staged, next) {
            (Some(s), _) if s.under(r) && fresh(s) => (Step::ActivateStaged, None),
            (_, Some(n)) if n.under(r) => (Step::Activate, None),
            _ => (Step::Prepare, Some(r.clone())),
        });
    }
    if let Some(r) = &choice.prepare_under
        && !current.under(r)
        && !staged.is_some_and(|s| s.under(r) && fresh(s))
    {
        return Some((Step::Stage, Some(r.clone())));
    }
    None
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

/// Wait after `failures` failed preparations: [`remote::backoff`] from `retryBackoff`
/// doubling up to `retryMaxBackoff` (jittered, so replicas that failed together do not
/// retry together), never longer than a quarter of what is left of the current
/// intermediate (so a short outage near the end is retried often), never shorter than
/// `retryBackoff`.
fn retry_delay(cfg: &IntermediateConfig, failures: u32, remaining: i64) -> Duration {
    let quarter = Duration::from_secs((remaining.max(0) / 4) as u64);
    remote::backoff(
        failures.saturating_sub(1),
        cfg.retry_backoff,
        cfg.retry_max_backoff,
    )
    .min(quarter)
    .max(cfg.retry_backoff)
}

impl Rotation {
    pub(super) fn kind(&self) -> &'static str {
        self.upstream.kind()
    }

    pub(super) fn observe(&self) {
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
            && let Err(e) = state::save(dir, &next, &self.upstream.trust_bundle().borrow())
        {
            tracing::warn!(error = %remote::error_chain(&e), "could not store the intermediate CA; a restart will ask the backend again");
        }
    }

    /// The root choice now (the upstream's default until one is set).
    pub(super) fn choice(&self) -> RootChoice {
        self.choice
            .get()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default()
    }

    /// Prepares the successor, or (`stage`) a generation under the root a rotation moves to.
    async fn prepare_next(
        &self,
        under: Option<rustls_pki_types::CertificateDer<'static>>,
        stage: bool,
    ) -> Result<(), IntermediateError> {
        let under = under.or_else(|| self.choice().sign_under);
        let g = prepare(
            self.upstream.as_ref(),
            &self.cfg,
            &self.trust_domain,
            &self.metrics,
            under,
        )
        .await?;
        tracing::info!(
            backend = self.kind(),
            serial = %g.serial(),
            not_after = g.not_after(),
            staged = stage,
            "prepared the next intermediate CA"
        );
        let slot = if stage { &self.staged } else { &self.next };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(g));
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.observe();
        Ok(())
    }
}

/// The rotation task: prepares successors, switches to them, and reacts to trust-bundle
/// changes, until `stop`.
pub(super) async fn run(
    inner: Arc<Rotation>,
    mut bundle_rx: watch::Receiver<SharedBundle>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    bundle_rx.borrow_and_update();
    // The bundle may have changed between the first intermediate's check and this task.
    let mut urgent = inner.current_untrusted();
    let mut last_prepare: Option<std::time::Instant> = None;
    let mut choice_rx: Option<watch::Receiver<RootChoice>> = None;
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
        let until = |at: i64| Duration::from_secs((at - now).max(0) as u64);
        if choice_rx.is_none()
            && let Some(rx) = inner.choice.get()
        {
            let mut rx = rx.clone();
            rx.borrow_and_update();
            choice_rx = Some(rx);
        }
        let chosen = {
            let next = inner.next.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let staged = inner
                .staged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let fresh = |g: &Generation| {
                now < schedule(
                    g.not_before(),
                    g.not_after(),
                    &inner.cfg,
                    inner.max_leaf_ttl,
                )
                .0
            };
            choice_step(
                &inner.choice(),
                &cur,
                next.as_deref(),
                staged.as_deref(),
                fresh,
            )
        };
        let mut under = None;
        let (step, wait) = match (has_next, urgent) {
            _ if chosen.is_some() => {
                let (step, root) = chosen.expect("some");
                under = root;
                let wait = if failures > 0 && matches!(step, Step::Prepare | Step::Stage) {
                    retry_delay(&inner.cfg, failures, cur.remaining(now))
                } else {
                    Duration::ZERO
                };
                (step, wait)
            }
            (true, true) => (Step::Activate, Duration::ZERO),
            (true, false) => (Step::Activate, until(activate_at)),
            (false, _) if failures > 0 => (
                Step::Prepare,
                retry_delay(&inner.cfg, failures, cur.remaining(now)),
            ),
            (false, true) => (Step::Prepare, Duration::ZERO),
            (false, false) => (Step::Prepare, until(prepare_at)),
        };
        // Never two preparations closer than a second: a backend that grants far less
        // than asked must not be asked in a tight loop.
        let wait = match (step, last_prepare) {
            (Step::Prepare | Step::Stage, Some(t)) => {
                wait.max(MIN_PREPARE_INTERVAL.saturating_sub(t.elapsed()))
            }
            _ => wait,
        };
        let choice_changed = async {
            match choice_rx.as_mut() {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                    rx.borrow_and_update();
                }
                None => inner.choice_set.notified().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = choice_changed => {
                tracing::info!(backend = inner.kind(), "the root to sign under changed; re-planning the intermediate CA");
                continue;
            }
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
            Step::ActivateStaged => {
                let staged = inner
                    .staged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                *inner.next.lock().unwrap_or_else(|e| e.into_inner()) = staged;
                inner.activate();
                urgent = false;
            }
            Step::Prepare | Step::Stage => {
                last_prepare = Some(std::time::Instant::now());
                match inner.prepare_next(under, step == Step::Stage).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        let left = inner.current.load().remaining(now_secs());
                        let e = remote::error_chain(&e);
                        tracing::warn!(
                            backend = inner.kind(),
                            error = %e,
                            failures,
                            remaining_secs = left,
                            "preparing the next intermediate CA failed; still signing with the current one, retrying"
                        );
                        *inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Signer;
    use crate::backend::intermediate::IntermediateSigner;
    use crate::backend::intermediate::test_support::{StubUpstream, cfg, eventually, workload};
    use std::time::SystemTime;

    use crate::trust::verify_path;

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
        let secs = Duration::from_secs;
        for _ in 0..200 {
            // The first retry waits retryBackoff: jitter never takes a wait below it.
            assert_eq!(retry_delay(&c, 1, 86400), secs(1));
            // Doubling, jittered into the upper half: 8 s after 4 failures, the 5 min cap
            // after many.
            let d = retry_delay(&c, 4, 86400);
            assert!((secs(4)..=secs(8)).contains(&d), "{d:?}");
            let d = retry_delay(&c, 30, 86400);
            assert!((secs(150)..=secs(300)).contains(&d), "{d:?}");
            // Near the end: a quarter of what is left, and never below retryBackoff.
            assert_eq!(retry_delay(&c, 30, 40), secs(10));
            assert_eq!(retry_delay(&c, 30, 0), secs(1));
        }
    }

    #[test]
    fn replicas_that_failed_together_do_not_retry_together() {
        let draws: std::collections::HashSet<Duration> =
            (0..20).map(|_| retry_delay(&cfg(), 4, 86400)).collect();
        assert!(draws.len() > 1, "{draws:?}");
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
}
