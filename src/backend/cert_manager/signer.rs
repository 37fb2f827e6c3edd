//! [`CertManager`]: one CertificateRequest per certificate (or per intermediate), the trust
//! bundle from a file, a ConfigMap or a Secret (re-read), or the first answer's `status.ca`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::client::{Outcome, Requests, request_body};
use super::{CertManagerConfig, KIND, ObjectKeyConfig};
use crate::backend::intermediate::{IntermediateRequest, UpstreamAuthority};
use crate::backend::{Authority, Health, IssuedChain, SignError, SignRequest, Signer, remote};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{SharedBundle, TrustBundle};

/// How often a refused bridge checks whether the API accepts it again.
const DENIED_PROBE_INTERVAL: Duration = Duration::from_secs(2);

pub struct CertManager {
    cfg: CertManagerConfig,
    client: kube::Client,
    requests: Arc<Requests>,
    bundle: watch::Sender<SharedBundle>,
    /// The Kubernetes API's refusal (401/403) of the last call, if it refused.
    denied: Mutex<Option<String>>,
    _stop: DropGuard,
}

/// A unique request name: `istio-ca-bridge-<16 hex>`.
fn request_name() -> String {
    let r: [u8; 8] = rand::random();
    format!(
        "istio-ca-bridge-{}",
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

async fn kube_client(cfg: &CertManagerConfig) -> Result<kube::Client, String> {
    let mut config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::incluster().map_err(|e| e.to_string())?,
    };
    // Each call is bounded by the request's deadline; retries are this backend's business.
    config.connect_timeout = Some(cfg.request_timeout);
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// PEM roots (self-signed certificates only) of `text`, named `what` in errors.
fn roots_of(text: &[u8], what: &str) -> Result<TrustBundle, String> {
    let certs = pki::parse_certs_pem(text).map_err(|e| format!("{what}: {e}"))?;
    let mut roots = Vec::new();
    for c in certs {
        if pki::cert_info(&c)
            .map_err(|e| format!("{what}: {e}"))?
            .self_signed
        {
            roots.push(c);
        }
    }
    TrustBundle::new(roots).map_err(|e| format!("{what}: no self-signed root certificate ({e})"))
}

/// Reads the configured roots (file, ConfigMap or Secret); `None` for trust on first use.
async fn read_roots(
    cfg: &CertManagerConfig,
    client: &kube::Client,
) -> Result<Option<TrustBundle>, String> {
    let key_of = |o: &ObjectKeyConfig| {
        (
            o.namespace.clone().unwrap_or_else(|| cfg.namespace.clone()),
            o.name.clone(),
            o.key.clone(),
        )
    };
    let timeout = cfg.request_timeout;
    if let Some(path) = &cfg.root_bundle_file {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return roots_of(&text, &path.display().to_string()).map(Some);
    }
    if let Some(o) = &cfg.root_bundle_config_map {
        let (ns, name, key) = key_of(o);
        let what = format!("ConfigMap {ns}/{name} key {key}");
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let cm = tokio::time::timeout(timeout, api.get(&name))
            .await
            .map_err(|_| format!("{what}: no answer within {timeout:?}"))?
            .map_err(|e| format!("{what}: {e}"))?;
        let text = cm
            .data
            .and_then(|d| d.get(&key).cloned())
            .ok_or_else(|| format!("{what}: no such key"))?;
        return roots_of(text.as_bytes(), &what).map(Some);
    }
    if let Some(o) = &cfg.root_bundle_secret {
        let (ns, name, key) = key_of(o);
        let what = format!("Secret {ns}/{name} key {key}");
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let s = tokio::time::timeout(timeout, api.get(&name))
            .await
            .map_err(|_| format!("{what}: no answer within {timeout:?}"))?
            .map_err(|e| format!("{what}: {e}"))?;
        let bytes = s
            .data
            .and_then(|d| d.get(&key).cloned())
            .ok_or_else(|| format!("{what}: no such key"))?;
        return roots_of(&bytes.0, &what).map(Some);
    }
    Ok(None)
}

impl CertManager {
    /// Connects, reads the roots (or, with `trustFirstAnswer`, takes them from one
    /// CertificateRequest for a throwaway key) and starts re-reading them.
    pub async fn connect(
        cfg: &CertManagerConfig,
        trust_domain: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let client = kube_client(cfg).await?;
        let requests = Requests::start(client.clone(), cfg, metrics);
        let bundle = match read_roots(cfg, &client).await? {
            Some(b) => b,
            None => first_answer_roots(cfg, &requests, trust_domain).await?,
        };
        tracing::info!(
            backend = KIND,
            namespace = %cfg.namespace,
            issuer = %format!("{}/{} {}", cfg.issuer_ref.group, cfg.issuer_ref.kind, cfg.issuer_ref.name),
            roots = bundle.roots().len(),
            "cert-manager backend ready"
        );
        let stop = CancellationToken::new();
        let me = Arc::new(Self {
            cfg: cfg.clone(),
            client,
            requests,
            bundle: watch::channel(Arc::new(bundle)).0,
            denied: Mutex::new(None),
            _stop: stop.clone().drop_guard(),
        });
        // While the API refuses the bridge (not ready), a probe every few seconds notices
        // fixed RBAC without traffic (a pod that is not ready gets none).
        {
            let weak = Arc::downgrade(&me);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(DENIED_PROBE_INTERVAL) => {}
                    }
                    let Some(me) = weak.upgrade() else { return };
                    let denied = me
                        .denied
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some();
                    if denied && me.requests.probe().await {
                        tracing::info!(
                            backend = KIND,
                            "the Kubernetes API accepts the bridge's calls again"
                        );
                        *me.denied.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                }
            });
        }
        if !cfg.trust_first_answer {
            let weak = Arc::downgrade(&me);
            let every = cfg.root_refresh_interval;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let Some(me) = weak.upgrade() else { return };
                    me.reload_roots().await;
                }
            });
        }
        Ok(me)
    }

    /// Re-reads the configured roots; publishes them if they changed (true).
    async fn reload_roots(&self) -> bool {
        match read_roots(&self.cfg, &self.client).await {
            Ok(Some(b)) if b.roots() != self.bundle.borrow().roots() => {
                tracing::info!(
                    backend = KIND,
                    roots = b.roots().len(),
                    "trust bundle changed"
                );
                self.bundle.send_replace(Arc::new(b));
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(backend = KIND, error = %e, "re-reading the trust bundle failed; keeping the current roots");
                false
            }
        }
    }

    fn note(&self, r: &Result<Outcome, SignError>) {
        let mut d = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Err(SignError::Unavailable(m)) if m.contains("refuses") => *d = Some(m.clone()),
            Ok(_) => *d = None,
            Err(_) => {}
        }
    }

    /// One CertificateRequest for `csr_der`, until `deadline`; deleted afterwards (in the
    /// background) unless `preserveRequests`.
    async fn issue(
        &self,
        csr_der: &[u8],
        ttl: Duration,
        is_ca: bool,
        deadline: Instant,
    ) -> Result<IssuedChain, SignError> {
        let name = request_name();
        let body = request_body(&self.cfg, &name, csr_der, ttl, is_ca);
        let (result, created) = self.requests.run(body, deadline).await;
        self.note(&result);
        if created && !self.cfg.preserve_requests {
            self.requests.delete_later(name.clone());
        }
        match result? {
            Outcome::Issued { certificate, ca } => {
                let chain = [certificate.as_str(), ca.as_deref().unwrap_or("")];
                remote::issued_chain(&certificate, chain).map_err(|e| {
                    SignError::Internal(format!(
                        "CertificateRequest {name}: status.certificate: {e}"
                    ))
                })
            }
            Outcome::Denied(why) => {
                tracing::warn!(backend = KIND, request = %name, reason = %why, "cert-manager denied the CertificateRequest");
                Err(SignError::Rejected(format!(
                    "CertificateRequest {name} denied: {why}"
                )))
            }
            Outcome::Failed { message, invalid } => {
                tracing::warn!(backend = KIND, request = %name, reason = %message, invalid, "the issuer failed the CertificateRequest");
                if invalid {
                    Err(SignError::Rejected(format!(
                        "CertificateRequest {name} is invalid: {message}"
                    )))
                } else {
                    Err(SignError::Unavailable(format!(
                        "CertificateRequest {name} failed: {message}"
                    )))
                }
            }
        }
    }
}

/// Trust on first use: one CertificateRequest for a throwaway key (the bridge's own
/// identity in `namespace`), and the self-signed roots of its `status.ca`.
async fn first_answer_roots(
    cfg: &CertManagerConfig,
    requests: &Requests,
    trust_domain: &str,
) -> Result<TrustBundle, String> {
    let key = pki::generate_key(pki::KeyType::EcdsaP256).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = format!(
        "spiffe://{trust_domain}/ns/{}/sa/istio-ca-bridge",
        cfg.namespace
    );
    params.subject_alt_names = vec![rcgen::SanType::URI(
        uri.as_str()
            .try_into()
            .map_err(|e| format!("{uri}: {e:?}"))?,
    )];
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let name = request_name();
    let body = request_body(cfg, &name, csr.der(), Duration::from_secs(3600), false);
    let deadline = Instant::now() + cfg.request_timeout;
    let (result, created) = requests.run(body, deadline).await;
    if created && !cfg.preserve_requests {
        let _ = requests.delete_now(&name).await;
    }
    let ca = match result.map_err(|e| format!("the first CertificateRequest: {e}"))? {
        Outcome::Issued { ca: Some(ca), .. } => ca,
        Outcome::Issued { ca: None, .. } => {
            return Err("the issuer's answer has no status.ca: configure backend.rootBundleFile, rootBundleConfigMap or rootBundleSecret".into());
        }
        other => return Err(format!("the first CertificateRequest: {other:?}")),
    };
    let bundle = roots_of(ca.as_bytes(), "status.ca of the first answer")?;
    tracing::warn!(
        backend = KIND,
        roots = bundle.roots().len(),
        "TRUST ON FIRST USE: the trust bundle was taken from the issuer's first answer (status.ca), not from configuration. Whoever controls the issuer at this moment controls the mesh's roots. Configure backend.rootBundleFile, rootBundleConfigMap or rootBundleSecret for production"
    );
    Ok(bundle)
}

impl Authority for CertManager {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }
    fn health(&self) -> Health {
        match &*self.denied.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Health::NotReady(why.clone()),
            None => Health::Ready,
        }
    }
}

#[async_trait]
impl Signer for CertManager {
    /// The answer is checked centrally ([`crate::backend::checked`]).
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let deadline = Instant::now() + self.cfg.request_timeout;
        self.issue(&req.csr_der, req.ttl, false, deadline).await
    }

    async fn refresh_trust_bundle(&self) -> bool {
        !self.cfg.trust_first_answer && self.reload_roots().await
    }
}

#[async_trait]
impl UpstreamAuthority for CertManager {
    /// `isCA: true`, with a background task's patience: three request timeouts.
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        let deadline = Instant::now() + self.cfg.request_timeout * 3;
        self.issue(&req.csr_der, req.ttl, true, deadline).await
    }
}
