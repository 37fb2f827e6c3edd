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
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Signer>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

crate::backend::forward_authority!(Instrumented, inner);

#[async_trait]
impl Signer for Instrumented {
    crate::backend::forward_signer_facts!(inner);

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let start = Instant::now();
        let res = self.inner.sign(req).await;
        let result = match &res {
            Ok(_) => "success",
            Err(e) => e.kind(),
        };
        let kind = self.inner.kind();
        self.metrics
            .backend_sign_duration
            .with_label_values(&[kind, result])
            .observe(start.elapsed().as_secs_f64());
        if res.is_ok() {
            let what = match req.subject {
                Subject::Workload(_) => "workload",
                Subject::Server { .. } => "serving",
            };
            self.metrics.issued.with_label_values(&[kind, what]).inc();
        }
        if let Some(t) = self.inner.signing_ca().not_after {
            self.metrics
                .signing_ca_expiry
                .with_label_values(&[kind])
                .set(t as f64);
        }
        res
    }
}
