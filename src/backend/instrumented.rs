//! `Instrumented<S>`: metrics for any [`Signer`], as a decorator so that no backend has to
//! remember to record them.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{IssuedChain, SignError, SignRequest, Signer, Subject};
use crate::metrics::Metrics;

pub struct Instrumented {
    inner: Arc<dyn Signer>,
    metrics: Arc<Metrics>,
    /// The series every successful call touches, looked up once (a signer's kind never
    /// changes) instead of by label values on every certificate.
    hot: Hot,
}

struct Hot {
    success_duration: prometheus::Histogram,
    issued_workload: prometheus::IntCounter,
    issued_serving: prometheus::IntCounter,
    /// Made on first use: a backend that never tells its CA's expiry has no series.
    ca_expiry: std::sync::OnceLock<prometheus::Gauge>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Signer>, metrics: Arc<Metrics>) -> Self {
        let kind = inner.kind();
        let hot = Hot {
            success_duration: metrics
                .backend_sign_duration
                .with_label_values(&[kind, "success"]),
            issued_workload: metrics.issued.with_label_values(&[kind, "workload"]),
            issued_serving: metrics.issued.with_label_values(&[kind, "serving"]),
            ca_expiry: std::sync::OnceLock::new(),
        };
        Self {
            inner,
            metrics,
            hot,
        }
    }
}

crate::backend::forward_authority!(Instrumented, inner);

#[async_trait]
impl Signer for Instrumented {
    crate::backend::forward_signer_facts!(inner);

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let start = Instant::now();
        let res = self.inner.sign(req).await;
        let elapsed = start.elapsed().as_secs_f64();
        match &res {
            Ok(_) => {
                self.hot.success_duration.observe(elapsed);
                match req.subject {
                    Subject::Workload(_) => self.hot.issued_workload.inc(),
                    Subject::Server { .. } => self.hot.issued_serving.inc(),
                }
            }
            Err(e) => self
                .metrics
                .backend_sign_duration
                .with_label_values(&[self.inner.kind(), e.kind()])
                .observe(elapsed),
        }
        if let Some(t) = self.inner.signing_ca().not_after {
            self.hot
                .ca_expiry
                .get_or_init(|| {
                    self.metrics
                        .signing_ca_expiry
                        .with_label_values(&[self.inner.kind()])
                })
                .set(t as f64);
        }
        res
    }
}
