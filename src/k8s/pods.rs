//! A watch-fed cache of one cluster's pods, indexed for the impersonation check: by pod
//! uid (is the caller's pod real, and where does it run?) and by (namespace, service
//! account, node) (does a live pod with the requested identity run on that node?).
//!
//! Fed by `kube::runtime::watcher` (LIST, then WATCH from the list's resourceVersion, with
//! bookmarks, re-listing on expiry and backing off on errors), so an impersonation check
//! is a map lookup and never an API call. Only the few fields the check needs are read
//! ([`SlimPod`]: the rest of each pod is skipped by the parser) and kept.
//! During an outage the last known state is kept and the watch retries, but only for so
//! long: [`PodCache::stale_for`] says how long the watch has been failing, and the
//! impersonation check refuses (UNAVAILABLE) once that exceeds
//! `authn.kubernetes.podCacheMaxStaleness`. While failing, the watch is restarted with a
//! full list every [`RELIST_WHILE_FAILING`], because a resumed watch of a quiet cluster
//! says nothing that would prove the cache fresh again.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod slim;
pub use slim::SlimPod;

/// While the watch fails, it is restarted (LIST + WATCH) this often.
pub const RELIST_WHILE_FAILING: Duration = Duration::from_secs(30);

/// What the impersonation check needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// `spec.nodeName`; `None` until scheduled.
    pub node: Option<String>,
    pub phase: Option<String>,
}

impl PodInfo {
    /// Neither Failed nor Succeeded: a pod that may still be running a workload.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Failed") | Some("Succeeded"))
    }

    fn from_pod(p: &SlimPod) -> Option<(String, PodInfo)> {
        let uid = p.metadata.uid.clone()?;
        let spec = p.spec.as_ref();
        Some((
            uid,
            PodInfo {
                namespace: p.metadata.namespace.clone()?,
                name: p.metadata.name.clone()?,
                // The API server defaults an unset service account to "default".
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
                node: spec
                    .and_then(|s| s.node_name.clone())
                    .filter(|n| !n.is_empty()),
                phase: p.status.as_ref().and_then(|s| s.phase.clone()),
            },
        ))
    }
}

/// (namespace, service account, node).
type NodeKey = (String, String, String);

#[derive(Default)]
struct Index {
    by_uid: HashMap<String, PodInfo>,
    /// Live, scheduled pods only.
    by_node: HashMap<NodeKey, HashSet<String>>,
}

impl Index {
    fn node_key(info: &PodInfo) -> Option<NodeKey> {
        let node = info.node.clone()?;
        info.is_live()
            .then(|| (info.namespace.clone(), info.service_account.clone(), node))
    }

    fn upsert(&mut self, uid: String, info: PodInfo) {
        self.remove(&uid);
        if let Some(k) = Self::node_key(&info) {
            self.by_node.entry(k).or_default().insert(uid.clone());
        }
        self.by_uid.insert(uid, info);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.by_uid.remove(uid)
            && let Some(k) = Self::node_key(&old)
            && let Some(set) = self.by_node.get_mut(&k)
        {
            set.remove(uid);
            if set.is_empty() {
                self.by_node.remove(&k);
            }
        }
    }
}

/// One cluster's pods.
pub struct PodCache {
    index: RwLock<Index>,
    /// True once the first full list has been applied.
    synced: watch::Sender<bool>,
    /// When the watch started failing without a good event since; `None` while healthy.
    failing_since: Mutex<Option<Instant>>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self::new()
    }
}

impl PodCache {
    pub fn new() -> Self {
        Self {
            index: RwLock::new(Index::default()),
            synced: watch::channel(false).0,
            failing_since: Mutex::new(None),
        }
    }

    /// How long the watch has been failing with no good event since (zero while healthy).
    pub fn stale_for(&self) -> Duration {
        self.failing_since
            .lock()
            .expect("pod cache")
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    fn watch_failed(&self) {
        self.failing_since
            .lock()
            .expect("pod cache")
            .get_or_insert_with(Instant::now);
    }

    fn watch_progressed(&self) {
        *self.failing_since.lock().expect("pod cache") = None;
    }

    /// Waits up to `limit` for the first full list; false if it has not arrived.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub fn get(&self, uid: &str) -> Option<PodInfo> {
        self.index
            .read()
            .expect("pod index")
            .by_uid
            .get(uid)
            .cloned()
    }

    /// Does a live pod running as `namespace/service_account` run on `node`?
    pub fn has_live_pod_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        let key = (
            namespace.to_string(),
            service_account.to_string(),
            node.to_string(),
        );
        self.index
            .read()
            .expect("pod index")
            .by_node
            .get(&key)
            .is_some_and(|s| !s.is_empty())
    }

    pub fn len(&self) -> usize {
        self.index.read().expect("pod index").by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one watcher event. `pending` buffers a re-list until it is complete, so a
    /// check never sees a half-listed cluster.
    fn apply(&self, ev: watcher::Event<SlimPod>, pending: &mut Option<Index>) {
        match ev {
            watcher::Event::Init => *pending = Some(Index::default()),
            watcher::Event::InitApply(p) => {
                if let (Some(idx), Some((uid, info))) = (pending.as_mut(), PodInfo::from_pod(&p)) {
                    idx.upsert(uid, info);
                }
            }
            watcher::Event::InitDone => {
                if let Some(idx) = pending.take() {
                    *self.index.write().expect("pod index") = idx;
                }
                self.synced.send_replace(true);
            }
            watcher::Event::Apply(p) => {
                if let Some((uid, info)) = PodInfo::from_pod(&p) {
                    self.index.write().expect("pod index").upsert(uid, info);
                }
            }
            watcher::Event::Delete(p) => {
                if let Some(uid) = &p.metadata.uid {
                    self.index.write().expect("pod index").remove(uid);
                }
            }
        }
    }
}

/// Watches every pod of the cluster into `cache` until `stop`.
pub fn spawn_watch(
    cluster: String,
    client: kube::Client,
    cache: std::sync::Arc<PodCache>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let api: Api<SlimPod> = Api::all(client);
        // List with resourceVersion=0 (served from the API server's watch cache, like
        // client-go informers) rather than a quorum read of every pod in the cluster.
        // (kube only sends resourceVersion=0 for an unpaginated list.)
        let mut config = watcher::Config::default().any_semantic();
        config.page_size = None;
        let mut failing = false;
        'restart: loop {
            let stream = watcher(api.clone(), config.clone()).default_backoff();
            futures::pin_mut!(stream);
            let mut pending = None;
            let mut relist_at = None;
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sleep_until_opt(relist_at) => {
                        tracing::debug!(cluster = %cluster, "pod watch still failing: listing again");
                        continue 'restart;
                    }
                    n = stream.next() => n,
                };
                match next {
                    None => return,
                    Some(Ok(ev)) => {
                        let done = matches!(ev, watcher::Event::InitDone);
                        cache.apply(ev, &mut pending);
                        cache.watch_progressed();
                        relist_at = None;
                        if done {
                            tracing::info!(cluster = %cluster, pods = cache.len(), "pod cache synced");
                        }
                        if failing {
                            failing = false;
                            tracing::info!(cluster = %cluster, "pod watch recovered");
                        }
                    }
                    Some(Err(e)) => {
                        // Logged once per outage; the stream backs off and retries by itself.
                        if !failing {
                            tracing::warn!(cluster = %cluster, error = %e, "pod watch failed; keeping the last known pods for now and retrying");
                        } else {
                            tracing::debug!(cluster = %cluster, error = %e, "pod watch still failing");
                        }
                        failing = true;
                        cache.watch_failed();
                        relist_at.get_or_insert_with(|| {
                            tokio::time::Instant::now() + RELIST_WHILE_FAILING
                        });
                    }
                }
            }
        }
    });
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> SlimPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "namespace": ns, "name": name, "resourceVersion": "1"},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn index_tracks_live_pods_per_node() {
        let c = PodCache::new();
        let mut pending = None;
        c.apply(watcher::Event::Init, &mut pending);
        c.apply(
            watcher::Event::InitApply(pod("u1", "default", "a", "web", "n1", "Running")),
            &mut pending,
        );
        // Nothing visible before the list is complete.
        assert!(c.get("u1").is_none());
        assert!(!c.is_synced());
        c.apply(watcher::Event::InitDone, &mut pending);
        assert!(c.is_synced());
        assert!(c.has_live_pod_on_node("default", "web", "n1"));
        assert!(!c.has_live_pod_on_node("default", "web", "n2"));

        // The pod fails: still known by uid, no longer live on the node.
        c.apply(
            watcher::Event::Apply(pod("u1", "default", "a", "web", "n1", "Failed")),
            &mut pending,
        );
        assert_eq!(c.get("u1").unwrap().phase.as_deref(), Some("Failed"));
        assert!(!c.has_live_pod_on_node("default", "web", "n1"));

        c.apply(
            watcher::Event::Apply(pod("u2", "default", "b", "web", "n1", "Pending")),
            &mut pending,
        );
        assert!(c.has_live_pod_on_node("default", "web", "n1"));
        c.apply(
            watcher::Event::Delete(pod("u2", "default", "b", "web", "n1", "Pending")),
            &mut pending,
        );
        assert!(!c.has_live_pod_on_node("default", "web", "n1"));
        assert!(c.get("u2").is_none());

        // A re-list replaces everything at once.
        c.apply(watcher::Event::Init, &mut pending);
        c.apply(
            watcher::Event::InitApply(pod("u3", "x", "c", "y", "n9", "Running")),
            &mut pending,
        );
        c.apply(watcher::Event::InitDone, &mut pending);
        assert!(c.get("u1").is_none());
        assert!(c.has_live_pod_on_node("x", "y", "n9"));
    }

    #[test]
    fn staleness_counts_from_the_first_failure_until_a_good_event() {
        let c = PodCache::new();
        assert_eq!(c.stale_for(), Duration::ZERO);
        c.watch_failed();
        std::thread::sleep(Duration::from_millis(20));
        c.watch_failed();
        let s = c.stale_for();
        assert!(
            s >= Duration::from_millis(20),
            "{s:?}: counted from the first failure"
        );
        c.watch_progressed();
        assert_eq!(c.stale_for(), Duration::ZERO);
    }
}
