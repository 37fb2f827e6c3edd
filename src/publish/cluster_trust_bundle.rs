//! The trust bundle as a cluster-scoped `certificates.k8s.io/v1beta1` ClusterTrustBundle
//! (beta in Kubernetes 1.33), which istiod writes as `istio.io:istiod-ca:root-cert` with
//! signer `istio.io/istiod-ca` when `ENABLE_CLUSTER_TRUST_BUNDLE_API` is on, and which pods
//! can mount through a projected volume. Optional (`kubernetes.clusterTrustBundle`).
//!
//! Per cluster, only the Lease holder runs this. It server-side-applies the object when it
//! starts leading, whenever the bundle changes (every root-rotation phase), and again every
//! `kubernetes.rootConfigMap.resyncInterval`; a failed apply is retried every 2 s. Writing a
//! bundle with a signer name needs `attest` on that signer (the chart grants it).

use std::time::Duration;

use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterTrustBundleConfig;
use crate::trust::SharedBundle;

const FIELD_MANAGER: &str = "istio-ca-bridge";
const RETRY: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn apply(
    api: &Api<ClusterTrustBundle>,
    name: &str,
    signer: &str,
    pem: &str,
) -> Result<(), String> {
    let obj = serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1beta1",
        "kind": "ClusterTrustBundle",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "istio-ca-bridge"},
        },
        "spec": {"signerName": signer, "trustBundle": pem},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match tokio::time::timeout(CALL_TIMEOUT, api.patch(name, &params, &Patch::Apply(&obj))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// While leading: keep the ClusterTrustBundle equal to the trust bundle.
pub async fn publish(
    client: kube::Client,
    cluster: String,
    cfg: ClusterTrustBundleConfig,
    resync_interval: Duration,
    mut bundle: watch::Receiver<SharedBundle>,
    stop: CancellationToken,
) {
    let api: Api<ClusterTrustBundle> = Api::all(client);
    let name = cfg.effective_name();
    let mut resync = tokio::time::interval(resync_interval);
    resync.tick().await;
    // The PEM last applied, if the last apply succeeded.
    let mut applied: Option<String> = None;
    loop {
        let pem = bundle.borrow_and_update().pem().to_string();
        if applied.as_deref() != Some(pem.as_str()) {
            match apply(&api, &name, &cfg.signer_name, &pem).await {
                Ok(()) => {
                    tracing::info!(cluster = %cluster, name = %name, "ClusterTrustBundle applied");
                    applied = Some(pem);
                }
                Err(e) => {
                    tracing::warn!(cluster = %cluster, name = %name, error = %e, "applying the ClusterTrustBundle failed; retrying");
                    applied = None;
                }
            }
        }
        let wait_retry = applied.is_none();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = bundle.changed() => if r.is_err() { return },
            _ = resync.tick() => applied = None,
            _ = tokio::time::sleep(RETRY), if wait_retry => {}
        }
    }
}
