//! A FAKE Kubernetes API server, in-process on 127.0.0.1:0 over TLS (a test CA).
//!
//! It exists because no kube-apiserver can run offline on this machine. It follows the
//! documented API for exactly the endpoints the bridge uses, with the real JSON shapes,
//! status codes and query parameters, and is driven through the SAME kube-rs client code
//! as production (the bridge reads a kubeconfig file pointing at it):
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` -> 201 with the TokenReview echoed
//!   and a `status` the test decided per token. A registered service-account token behaves
//!   like the real authenticator: authenticated only if its audiences intersect
//!   `spec.audiences`, and then `status.audiences` is that intersection. Unknown tokens
//!   are unauthenticated. Requests without the kubeconfig's bearer token get 401.
//! - `GET /openid/v1/jwks`: the service-account issuer's public keys (a JWK Set), by
//!   default [`SigningKey::cluster`], the key [`sa_jwt`] signs with; tests can publish other
//!   keys or make it fail.
//! - `GET /api/v1/pods` (list): a `PodList` with `metadata.resourceVersion`. With
//!   `resourceVersion=0` (what the bridge sends, like client-go informers) it answers from
//!   the "watch cache": everything, `limit` ignored; otherwise `limit` pages with
//!   `continue` tokens.
//! - `GET /api/v1/pods?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`:
//!   a chunked stream of newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK",
//!   "object":{...}}` events: first every change after N, then live changes; the stream
//!   ends after `timeoutSeconds`. A resourceVersion older than the retained history gets
//!   the real `410 Gone` ERROR event.
//! - `GET /api/v1/namespaces/{ns}/pods/{name}`: served and COUNTED, so tests can prove
//!   the bridge never fetches single pods.
//! - `GET /api/v1/namespaces` list and watch, exactly like pods (one resourceVersion counter
//!   for everything, like etcd's revision).
//! - `PATCH /api/v1/namespaces/{ns}/configmaps/{name}` as server-side apply
//!   (`application/apply-patch+yaml`, `fieldManager` required): create or update, 404 if the
//!   namespace does not exist.
//! - Secrets: GET, and server-side apply like ConfigMaps.
//! - `coordination.k8s.io/v1` Leases: GET, POST (409 AlreadyExists), PUT with optimistic
//!   concurrency (409 Conflict unless `metadata.resourceVersion` is the current one).
//! - `cert-manager.io/v1` CertificateRequests: create, get, delete, list, watch (with a
//!   `metadata.name` field selector) and the status subresource (`cert_requests.rs`).
//!
//! Every request is counted per endpoint. `stop()` drops the listener and every open
//! connection (watches included), like an API server going away; `start()` serves again
//! on the same port with the same state.
//!
//! Layout: `store.rs` (objects, history, the resourceVersion counter), `handlers.rs` (the
//! routes, the fake's own client authentication, TokenReviews, lists and watches),
//! `objects.rs` (ConfigMaps, Secrets and Leases: what the bridge writes), `client.rs` (a
//! test bridge's config pointing at the fake); the TLS server is
//! [`super::tls_server::TlsServer`].
mod cert_requests;
mod client;
mod handlers;
mod objects;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub use client::{CLUSTER_KID, K8S_ISSUER, SigningKey, cluster, junk_sa_jwt, kube_config, sa_jwt};
use store::{Change, Store};

use super::tls_server::{TestServerCert, TlsServer};

/// The bearer token the bridge's kubeconfig presents to the fake.
pub const CLIENT_TOKEN: &str = "bridge-sa-token-for-the-fake-apiserver";

/// What the fake answers for one token.
#[derive(Clone, Debug)]
pub enum Review {
    /// A service-account token bound to `pod` (name, uid), valid for `audiences`.
    ServiceAccount {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
        /// The pod (name, uid) the token is bound to, if any.
        pod: Option<(String, String)>,
        /// The token's audiences.
        audiences: Vec<String>,
    },
    /// This exact `status` object, whatever was asked.
    Raw(Value),
}

/// The fake's state, shared with the request handlers.
struct Inner {
    reviews: Mutex<HashMap<String, Review>>,
    review_delay: Mutex<Duration>,
    /// When set, TokenReviews get this HTTP status (e.g. 403: the bridge lacks RBAC).
    review_failure: Mutex<Option<u16>>,
    /// The JWKs served at `/openid/v1/jwks`.
    jwks: Mutex<Vec<Value>>,
    /// When set, `/openid/v1/jwks` gets this HTTP status.
    jwks_failure: Mutex<Option<u16>>,
    /// When set, pod lists and watches get this HTTP status (the pod cache cannot sync).
    pods_failure: Mutex<Option<u16>>,
    store: Mutex<Store>,
    /// Every change, for the open watches.
    events: broadcast::Sender<Change>,
    counts: Mutex<HashMap<&'static str, u64>>,
    /// Query strings of list and watch requests, in order.
    pod_queries: Mutex<Vec<String>>,
    /// `spec.audiences` of each review received.
    review_audiences: Mutex<Vec<Vec<String>>>,
    /// When set, every CertificateRequest call gets this HTTP status.
    cr_failure: Mutex<Option<u16>>,
    /// When each CertificateRequest call came, and which.
    cr_calls: Mutex<Vec<(std::time::Instant, &'static str)>>,
}

/// A running (or stopped) fake Kubernetes API server.
pub struct FakeKube {
    /// Where it listens; kept across `stop()` and `start()`.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    tls: Arc<rustls::ServerConfig>,
    /// PEM of the CA of its serving certificate (in the kubeconfig).
    pub ca_pem: String,
    /// The server while it runs; dropping it cuts every connection.
    running: Option<TlsServer>,
}

/// A pod object as the API server returns it.
pub fn pod_json(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": uid,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": name},
        },
        "spec": {
            "serviceAccountName": sa,
            "nodeName": node,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": {"phase": phase, "podIP": "10.0.0.1"},
    })
}

impl FakeKube {
    /// A fake with an empty store, serving on a fresh loopback port.
    pub async fn start_new() -> FakeKube {
        crate::install_crypto_provider();
        let cert = TestServerCert::new("fake-kube-ca");
        let mut fake = FakeKube {
            addr: "127.0.0.1:0".parse().unwrap(),
            inner: Arc::new(Inner {
                reviews: Mutex::new(HashMap::new()),
                review_delay: Mutex::new(Duration::ZERO),
                review_failure: Mutex::new(None),
                pods_failure: Mutex::new(None),
                jwks: Mutex::new(vec![SigningKey::cluster().jwk()]),
                jwks_failure: Mutex::new(None),
                store: Mutex::new(Store::new(1000)),
                events: broadcast::channel(16384).0,
                counts: Mutex::new(HashMap::new()),
                pod_queries: Mutex::new(Vec::new()),
                review_audiences: Mutex::new(Vec::new()),
                cr_failure: Mutex::new(None),
                cr_calls: Mutex::new(Vec::new()),
            }),
            tls: cert.server_config(None),
            ca_pem: cert.ca_pem,
            running: None,
        };
        fake.serve().await.unwrap();
        fake
    }

    /// Serves on `self.addr` (port 0 the first time), with the current state.
    async fn serve(&mut self) -> std::io::Result<()> {
        let app = handlers::router(self.inner.clone());
        let server = TlsServer::bind(self.addr, self.tls.clone(), move |_| app.clone()).await?;
        self.addr = server.addr();
        self.running = Some(server);
        Ok(())
    }

    /// The API server goes away: no listener, every connection (and watch) cut.
    pub async fn stop(&mut self) {
        if let Some(server) = self.running.take() {
            server.stop().await;
        }
    }

    /// Serves again on the same address, with the same state.
    pub async fn start(&mut self) {
        assert!(self.running.is_none(), "already running");
        let mut last = None;
        for _ in 0..50 {
            match self.serve().await {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot re-bind {}: {last:?}", self.addr);
    }

    /// Writes a kubeconfig for this fake (TLS with its CA, bearer-token user).
    pub fn write_kubeconfig(&self, path: &Path, context: &str) {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {context}\nclusters:\n- name: {context}\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: bridge\nusers:\n- name: bridge\n  user:\n    token: {CLIENT_TOKEN}\n",
            port = self.addr.port()
        );
        std::fs::write(path, text).unwrap();
    }

    /// What the fake answers for `token` from now on.
    pub fn set_review(&self, token: &str, r: Review) {
        self.inner
            .reviews
            .lock()
            .unwrap()
            .insert(token.to_string(), r);
    }

    /// Registers a service-account token valid for `istio-ca`.
    pub fn sa_token(&self, token: &str, ns: &str, sa: &str, pod: Option<(&str, &str)>) {
        self.set_review(
            token,
            Review::ServiceAccount {
                namespace: ns.into(),
                name: sa.into(),
                pod: pod.map(|(n, u)| (n.to_string(), u.to_string())),
                audiences: vec!["istio-ca".into()],
            },
        );
    }

    /// Makes TokenReviews fail with `code` (403 Forbidden, 429, 500...), or work again.
    pub fn set_review_failure(&self, code: Option<u16>) {
        *self.inner.review_failure.lock().unwrap() = code;
    }

    /// Makes pod lists and watches fail with `code` (e.g. 403: no RBAC for pods), or work.
    pub fn set_pods_failure(&self, code: Option<u16>) {
        *self.inner.pods_failure.lock().unwrap() = code;
    }

    /// `/openid/v1/jwks` lists exactly these keys from now on (a key rotation).
    pub fn publish_keys(&self, keys: &[&SigningKey]) {
        *self.inner.jwks.lock().unwrap() = keys.iter().map(|k| k.jwk()).collect();
    }

    /// Makes `/openid/v1/jwks` fail with `code` (403: the RBAC for it is missing), or work.
    pub fn set_jwks_failure(&self, code: Option<u16>) {
        *self.inner.jwks_failure.lock().unwrap() = code;
    }

    /// TokenReviews are answered after `d` (a slow or hanging API server).
    pub fn set_review_delay(&self, d: Duration) {
        *self.inner.review_delay.lock().unwrap() = d;
    }

    /// Requests seen for an endpoint: `tokenreviews`, `jwks`, `pods.list`, `pods.watch`,
    /// `pods.get`, `namespaces.list`, `namespaces.watch`, `configmaps.apply`, `secrets.get`,
    /// `secrets.apply`, `leases.get`,
    /// `leases.create`, `leases.replace`, `unauthorized`, `other`.
    pub fn count(&self, endpoint: &str) -> u64 {
        self.inner
            .counts
            .lock()
            .unwrap()
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Every endpoint's request count so far (the names of [`Self::count`]).
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.inner
            .counts
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// How many ConfigMaps named `name` (in any namespace) have a data value containing
    /// `text` (e.g. a root's PEM: have the root ConfigMaps converged?).
    pub fn configmaps_holding(&self, name: &str, text: &str) -> usize {
        let mut store = self.inner.store.lock().unwrap();
        store
            .coll("configmaps")
            .current
            .iter()
            .filter(|((_, n), cm)| {
                n == name
                    && cm["data"].as_object().is_some_and(|d| {
                        d.values()
                            .any(|v| v.as_str().is_some_and(|v| v.contains(text)))
                    })
            })
            .count()
    }

    /// Query strings of the pod lists and watches so far, in order (what the bridge's
    /// reflector asked for).
    pub fn pod_queries(&self) -> Vec<String> {
        self.inner.pod_queries.lock().unwrap().clone()
    }

    /// `spec.audiences` of each TokenReview received, in order.
    pub fn review_audiences(&self) -> Vec<Vec<String>> {
        self.inner.review_audiences.lock().unwrap().clone()
    }

    fn put(&self, kind: &'static str, obj: Value) {
        let (rv, ev, obj) = self.inner.store.lock().unwrap().put(kind, obj);
        let _ = self.inner.events.send((kind, rv, ev, obj));
    }

    /// Creates or replaces a pod (ADDED or MODIFIED event).
    pub fn put_pod(&self, pod: Value) {
        self.put("pods", pod);
    }

    /// Deletes a pod (DELETED event).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let d = self.inner.store.lock().unwrap().delete("pods", ns, name);
        if let Some((rv, obj)) = d {
            let _ = self.inner.events.send(("pods", rv, "DELETED", obj));
        }
    }

    /// Creates a namespace (phase Active).
    pub fn put_namespace(&self, name: &str) {
        self.put(
            "namespaces",
            json!({"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        );
    }

    /// The stored ConfigMap, as the bridge left it.
    pub fn configmap(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().get("configmaps", ns, name)
    }

    /// Someone deletes a ConfigMap.
    pub fn delete_configmap(&self, ns: &str, name: &str) {
        let d = self
            .inner
            .store
            .lock()
            .unwrap()
            .delete("configmaps", ns, name);
        if let Some((rv, obj)) = d {
            let _ = self.inner.events.send(("configmaps", rv, "DELETED", obj));
        }
    }

    /// The stored Secret, as the bridge left it.
    pub fn secret(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().get("secrets", ns, name)
    }

    /// Deletes a Secret (as `kubectl delete secret` would).
    pub fn delete_secret(&self, ns: &str, name: &str) {
        self.inner.store.lock().unwrap().delete("secrets", ns, name);
    }

    /// The stored ClusterTrustBundle `name` (cluster-scoped).
    pub fn cluster_trust_bundle(&self, name: &str) -> Option<Value> {
        self.inner
            .store
            .lock()
            .unwrap()
            .get("clustertrustbundles", "", name)
    }

    /// The stored Lease (who holds leadership).
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().get("leases", ns, name)
    }

    /// Creates or replaces a ConfigMap with `data` (what another controller, trust-manager
    /// say, wrote).
    pub fn put_configmap(&self, ns: &str, name: &str, data: Value) {
        self.put(
            "configmaps",
            json!({"metadata": {"namespace": ns, "name": name}, "data": data}),
        );
    }

    /// Creates or replaces a Secret with `data` (values base64-encoded here).
    pub fn put_secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect();
        self.put(
            "secrets",
            json!({"metadata": {"namespace": ns, "name": name}, "type": "Opaque", "data": data}),
        );
    }

    /// Every stored CertificateRequest.
    pub fn certificate_requests(&self) -> Vec<Value> {
        let mut store = self.inner.store.lock().unwrap();
        store
            .coll(cert_requests::COLL)
            .current
            .values()
            .cloned()
            .collect()
    }

    /// Writes the status of a CertificateRequest, as an issuer does (MODIFIED event);
    /// false if it does not exist (any more).
    pub fn set_certificate_request_status(&self, ns: &str, name: &str, status: Value) -> bool {
        cert_requests::put_status(&self.inner, ns, name, status).is_some()
    }

    /// Makes every CertificateRequest call fail with this HTTP status (429: with
    /// `Retry-After: 1`), or serves them again.
    pub fn set_certificate_request_failure(&self, code: Option<u16>) {
        *self.inner.cr_failure.lock().unwrap() = code;
    }

    /// When each CertificateRequest call arrived, and which (`certificaterequests.create`,
    /// `.get`, `.list`, `.watch`, `.delete`).
    pub fn certificate_request_calls(&self) -> Vec<(std::time::Instant, &'static str)> {
        self.inner.cr_calls.lock().unwrap().clone()
    }

    /// Sends a BOOKMARK (current resourceVersion) to every open watch.
    pub fn bookmark(&self) {
        let rv = self.inner.store.lock().unwrap().rv;
        for kind in ["pods", "namespaces"] {
            let obj = json!({"metadata": {"resourceVersion": rv.to_string()}});
            let _ = self.inner.events.send((kind, rv, "BOOKMARK", obj));
        }
    }
}
