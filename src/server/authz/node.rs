//! The Kubernetes [`NodeAuthorizer`]: may this node agent (ztunnel) have a certificate for
//! `target`? Yes only if the caller's own pod (name and uid from its TokenReview) is in the
//! pod cache of the caller's cluster, runs as the caller's service account and is live,
//! and some live (not Failed, not Succeeded) pod running as the target's service account
//! in the target's namespace is scheduled on the same node (protocol doc section 5).
//!
//! The trusted-account and SPIFFE-ID checks happen before this in
//! [`crate::server::authz::Authorizer`]; everything here is a lookup in the watch-fed
//! cache, never an API call.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{NodeAuthorizer, NodeDenial};
use crate::identity::SpiffeId;
use crate::k8s::Clusters;
use crate::server::authn::Caller;

pub struct KubeNodeAuthorizer {
    clusters: Arc<Clusters>,
    /// How long a check right after start waits for the cluster's first pod list.
    sync_wait: Duration,
    /// A cache whose watch has been failing longer than this no longer authorizes:
    /// pods deleted meanwhile would still look live.
    max_staleness: Duration,
}

impl KubeNodeAuthorizer {
    pub fn new(clusters: Arc<Clusters>, sync_wait: Duration, max_staleness: Duration) -> Self {
        Self {
            clusters,
            sync_wait,
            max_staleness,
        }
    }
}

#[async_trait]
impl NodeAuthorizer for KubeNodeAuthorizer {
    async fn authorize(&self, caller: &Caller, target: &SpiffeId) -> Result<(), NodeDenial> {
        let cluster = self
            .clusters
            .select(caller.cluster.as_deref())
            .ok_or_else(|| format!("caller's cluster {:?} is not configured", caller.cluster))?;
        let pods = cluster
            .pods
            .as_ref()
            .ok_or("no pod cache for the caller's cluster")?;
        let pod_ref = caller
            .pod
            .as_ref()
            .ok_or("the caller's credential names no pod (a pod-bound token reviewed by Kubernetes is required)")?;
        if !pods.wait_synced(self.sync_wait).await {
            return Err(NodeDenial::NotReady(format!(
                "pods of cluster {} are not listed yet (API server unreachable?)",
                cluster.id
            )));
        }
        let stale = pods.stale_for();
        if stale > self.max_staleness {
            return Err(NodeDenial::NotReady(format!(
                "the pod watch of cluster {} has been failing for {}s (over podCacheMaxStaleness); \
                 impersonation resumes once it is fresh again",
                cluster.id,
                stale.as_secs()
            )));
        }
        let pod = pods.get(&pod_ref.uid).ok_or_else(|| -> NodeDenial {
            format!(
                "caller pod {} (uid {}) not found in cluster {}",
                pod_ref.name, pod_ref.uid, cluster.id
            )
            .into()
        })?;
        if pod.name != pod_ref.name {
            return Err(format!(
                "caller pod uid {} belongs to pod {}/{}, not {}",
                pod_ref.uid, pod.namespace, pod.name, pod_ref.name
            )
            .into());
        }
        if pod.namespace != caller.identity.namespace()
            || pod.service_account != caller.identity.service_account()
        {
            return Err(format!(
                "caller pod {}/{} runs as {}/{}, not as the caller's service account",
                pod.namespace, pod.name, pod.namespace, pod.service_account
            )
            .into());
        }
        if !pod.is_live() {
            return Err(format!(
                "caller pod {}/{} is {}",
                pod.namespace,
                pod.name,
                pod.phase.as_deref().unwrap_or("terminated")
            )
            .into());
        }
        let node = pod.node.as_deref().ok_or_else(|| -> NodeDenial {
            format!(
                "caller pod {}/{} is not scheduled on a node",
                pod.namespace, pod.name
            )
            .into()
        })?;
        if !pods.has_live_pod_on_node(target.namespace(), target.service_account(), node) {
            return Err(format!(
                "no live pod with service account {}/{} on node {node}",
                target.namespace(),
                target.service_account()
            )
            .into());
        }
        Ok(())
    }
}
