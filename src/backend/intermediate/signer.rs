//! [`IntermediateSigner`]: the `Signer` of intermediate mode. Each call signs with the
//! current generation; the rotation task (`rotation`) replaces it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::generation::prepare;
use super::rotation::{self, Rotation};
use super::{IntermediateConfig, IntermediateError, UpstreamAuthority, now_secs, state};
use crate::backend::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo,
};
use crate::metrics::Metrics;
use crate::trust::SharedBundle;

/// The signer of intermediate mode. Dropping it stops the rotation task.
pub struct IntermediateSigner {
    inner: Arc<Rotation>,
    _stop: DropGuard,
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
            Some(dir) => state::load(dir, cfg, trust_domain, &bundle)?,
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
                let g = prepare(upstream.as_ref(), cfg, trust_domain, &metrics, None).await?;
                if let Some(dir) = &cfg.state_dir {
                    state::save(dir, &g, &upstream.trust_bundle().borrow())?;
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
        let inner = Arc::new(Rotation {
            upstream,
            cfg: cfg.clone(),
            trust_domain: trust_domain.to_string(),
            max_leaf_ttl,
            metrics,
            current: ArcSwap::from_pointee(first),
            next: Mutex::new(None),
            staged: Mutex::new(None),
            last_error: Mutex::new(None),
            choice: std::sync::OnceLock::new(),
            choice_set: tokio::sync::Notify::new(),
        });
        inner.observe();
        let stop = CancellationToken::new();
        let bundle_rx = inner.upstream.trust_bundle();
        tokio::spawn(rotation::run(inner.clone(), bundle_rx, stop.clone()));
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

impl Authority for IntermediateSigner {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.inner.upstream.trust_bundle()
    }
    fn signing_roots(&self) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
        self.inner.upstream.signing_roots()
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
        crate::backend::local::sign_off_workers(&g.ca, req).await
    }

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo {
            not_after: Some(self.inner.current.load().not_after()),
        }
    }

    fn follow_root_choice(&self, choice: watch::Receiver<crate::backend::RootChoice>) -> bool {
        if self.inner.choice.set(choice).is_ok() {
            self.inner.choice_set.notify_one();
        }
        self.inner.upstream.can_choose_root()
    }

    fn issued_under(&self, issuer: &crate::backend::IssuerRef<'_>) -> bool {
        // The chain to the upstream's roots is verified by the caller; what is ours is
        // the name the bridge gives every intermediate it asks for.
        issuer
            .common_name
            .is_some_and(|cn| cn.starts_with(super::generation::COMMON_NAME_PREFIX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::intermediate::test_support::{StubUpstream, cfg, eventually, workload};

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

    #[tokio::test]
    async fn a_failed_first_preparation_names_the_backend_error_once() {
        let up = StubUpstream::new();
        up.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = IntermediateSigner::start(
            up,
            &cfg(),
            "cluster.local",
            Duration::from_secs(86400),
            Arc::new(Metrics::new(false)),
        )
        .await
        .err()
        .expect("no intermediate without the backend");
        // As the start error reaches the operator (`{:#}`, one line of sources).
        let msg = crate::backend::remote::error_chain(&e);
        assert_eq!(msg.matches("stub is down").count(), 1, "{msg}");
        assert!(
            msg.contains("could not sign the bridge's intermediate CA"),
            "{msg}"
        );
    }
}
