//! The root ConfigMap (`istio-ca-root-cert`, key `root-cert.pem`, label
//! `istio.io/config: "true"`) in every namespace of every configured cluster: what istiod
//! distributes itself when its CA is on (protocol doc section 9). Proxies trust exactly
//! these roots, so it carries the whole trust bundle (several roots during a rotation).
//!
//! Per cluster, only the Lease holder runs this ([`crate::k8s::leader`]). While leading it
//! watches namespaces and server-side-applies the ConfigMap: into every namespace after
//! the first list, into each new namespace as it appears, everywhere when the trust
//! bundle changes, and everywhere again every `resyncInterval` (repairs edits and
//! deletions). A namespace whose last apply carried the current bundle is skipped, and a
//! failed apply is retried on the next retry tick.
//!
//! Every apply first takes a slot from the cluster's write budget ([`RateLimiter`], the
//! cluster's `qps` and `burst`), so a bundle change in a cluster of thousands of namespaces
//! reaches the API server at a steady rate rather than as one burst.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::RootConfigMapConfig;
use crate::k8s::RateLimiter;
use crate::trust::SharedBundle;

/// Field manager of our server-side applies.
const FIELD_MANAGER: &str = "istio-ca-bridge";
const KEY: &str = "root-cert.pem";
/// Failed applies are retried this often.
const RETRY: Duration = Duration::from_secs(2);

/// While leading: keep the ConfigMap current in every namespace.
pub async fn publish(
    client: kube::Client,
    cluster: String,
    cfg: Arc<RootConfigMapConfig>,
    mut bundle: watch::Receiver<SharedBundle>,
    writes: Arc<RateLimiter>,
    stop: CancellationToken,
) {
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    let stream = watcher(Api::<Namespace>::all(client.clone()), config).default_backoff();
    futures::pin_mut!(stream);
    let excluded: HashSet<&str> = cfg.exclude_namespaces.iter().map(String::as_str).collect();
    let mut namespaces: HashSet<String> = HashSet::new();
    let mut pending: Option<HashSet<String>> = None;
    let mut listed = false;
    // Namespace -> the PEM last applied there.
    let mut applied: HashMap<String, String> = HashMap::new();
    let mut resync = tokio::time::interval(cfg.resync_interval);
    resync.tick().await;
    let mut retry = tokio::time::interval(RETRY);
    let mut pem = bundle.borrow_and_update().pem().to_string();
    loop {
        // What to (re)apply after this event: (namespaces, even if already current).
        let mut todo: Vec<String> = Vec::new();
        let mut force = false;
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = stream.next() => match ev {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(cluster = %cluster, error = %e, "namespace watch failed; retrying");
                }
                Some(Ok(watcher::Event::Init)) => pending = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(ns))) => {
                    if let (Some(p), Some(n)) = (pending.as_mut(), ns.metadata.name) {
                        p.insert(n);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    if let Some(p) = pending.take() {
                        namespaces = p;
                    }
                    applied.retain(|n, _| namespaces.contains(n));
                    listed = true;
                    todo = namespaces.iter().cloned().collect();
                }
                Some(Ok(watcher::Event::Apply(ns))) => {
                    let terminating = ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
                    if let Some(n) = ns.metadata.name {
                        if terminating {
                            namespaces.remove(&n);
                        } else {
                            namespaces.insert(n.clone());
                            todo.push(n);
                        }
                    }
                }
                Some(Ok(watcher::Event::Delete(ns))) => {
                    if let Some(n) = ns.metadata.name {
                        namespaces.remove(&n);
                        applied.remove(&n);
                    }
                }
            },
            r = bundle.changed() => {
                if r.is_err() {
                    return;
                }
                pem = bundle.borrow_and_update().pem().to_string();
                tracing::info!(cluster = %cluster, "trust bundle changed; updating root ConfigMaps");
                todo = namespaces.iter().cloned().collect();
            }
            _ = resync.tick() => {
                todo = namespaces.iter().cloned().collect();
                force = true;
            }
            _ = retry.tick() => {
                todo = namespaces.iter().filter(|n| applied.get(*n) != Some(&pem)).cloned().collect();
            }
        }
        if !listed {
            continue;
        }
        for ns in todo {
            if excluded.contains(ns.as_str()) || (!force && applied.get(&ns) == Some(&pem)) {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = writes.wait_slot() => {}
            }
            match apply(&client, &ns, &cfg.name, &pem).await {
                Ok(()) => {
                    tracing::debug!(cluster = %cluster, namespace = %ns, "root ConfigMap applied");
                    applied.insert(ns, pem.clone());
                }
                Err(e) => {
                    tracing::warn!(cluster = %cluster, namespace = %ns, error = %e, "applying the root ConfigMap failed; will retry");
                    applied.remove(&ns);
                }
            }
        }
    }
}

async fn apply(client: &kube::Client, ns: &str, name: &str, pem: &str) -> Result<(), String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"istio.io/config": "true"},
        },
        "data": {KEY: pem},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&cm);
    let call = api.patch(name, &params, &patch);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}
