//! The backend conformance suite (`istio_ca_bridge::testing::conformance`) run against every
//! backend, each behind its real server or, for DigiCert, its documented in-process fake:
//! the local CA, OpenBao (direct mode), moto's acm-pca behind the fault proxy, the DigiCert
//! fake, cert-manager over the fake Kubernetes API, and intermediate mode over OpenBao. Each gets the same checks: a P-256 and an RSA
//! leaf with the exact profile, answers for another key or identity refused, and, where the
//! backend can be made so, throttling RESOURCE_EXHAUSTED and an outage UNAVAILABLE.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use istio_ca_bridge::backend::{BuildContext, Signer};
use istio_ca_bridge::config::{BackendConfig, BackendMode, IntermediateConfig, LocalConfig};
use istio_ca_bridge::metrics::Metrics;
use istio_ca_bridge::testing::TD;
use istio_ca_bridge::testing::aws::{self, Faults, Moto, Proxy};
use istio_ca_bridge::testing::conformance::{self, BackendUnderTest};
use istio_ca_bridge::testing::fake_digicert::{FakeDigicert, RetryAfter};
use istio_ca_bridge::testing::openbao::{OpenBao, approle};
use serde_json::json;

/// Builds `cfg` the way the bridge does (the suite adds the check itself).
async fn build(cfg: BackendConfig) -> Arc<dyn Signer> {
    istio_ca_bridge::install_crypto_provider();
    cfg.build(&BuildContext {
        trust_domain: TD.into(),
        max_leaf_ttl: Duration::from_secs(86400),
        metrics: Arc::new(Metrics::new(false)),
        rotation: Default::default(),
        ca_store: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{:#}", anyhow::Error::new(e)))
}

struct Local {
    dir: tempfile::TempDir,
}

#[async_trait]
impl BackendUnderTest for Local {
    fn name(&self) -> &'static str {
        "local"
    }
    async fn signer(&self) -> Arc<dyn Signer> {
        build(BackendConfig::Local(LocalConfig {
            state_dir: self.dir.path().join("ca"),
            ..Default::default()
        }))
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ca_conforms() {
    let r = conformance::run(&Local {
        dir: tempfile::tempdir().unwrap(),
    })
    .await;
    assert!(
        !r.checked_outage && !r.checked_throttle,
        "in-process: neither applies"
    );
}

/// OpenBao with PKI and an AppRole; `intermediate` switches the backend to intermediate mode.
struct Bao {
    bao: tokio::sync::Mutex<OpenBao>,
    _secrets: tempfile::TempDir,
    cfg: istio_ca_bridge::config::VaultConfig,
}

impl Bao {
    async fn start(intermediate: bool) -> Bao {
        let mut bao = OpenBao::start().await;
        bao.setup_pki("24h").await;
        if intermediate {
            bao.use_intermediate_policy().await;
        }
        let secrets = tempfile::tempdir().unwrap();
        let (role, secret) = bao.setup_approle(secrets.path(), "1h", "24h").await;
        let mut cfg = bao.backend(approle(role, secret));
        if intermediate {
            cfg.mode = BackendMode::Intermediate;
            cfg.intermediate = IntermediateConfig {
                ttl: Duration::from_secs(6 * 3600),
                ..Default::default()
            };
        }
        Bao {
            bao: tokio::sync::Mutex::new(bao),
            _secrets: secrets,
            cfg,
        }
    }
}

#[async_trait]
impl BackendUnderTest for Bao {
    fn name(&self) -> &'static str {
        match self.cfg.mode {
            BackendMode::Direct => "vault (OpenBao)",
            BackendMode::Intermediate => "intermediate mode over OpenBao",
        }
    }
    async fn signer(&self) -> Arc<dyn Signer> {
        build(BackendConfig::Vault(self.cfg.clone())).await
    }
    async fn throttle(&self) -> bool {
        if self.cfg.mode == BackendMode::Intermediate {
            // Leaves are signed in-process; the upstream is asked only for intermediates.
            return false;
        }
        // A real rate-limit quota on the mount (OpenBao answers 429): one call an hour,
        // used up at once.
        let bao = self.bao.lock().await;
        bao.post(
            "sys/quotas/rate-limit/conformance",
            json!({"path": "pki_int/", "rate": 1, "interval": "1h"}),
        )
        .await;
        let _ = bao
            .raw(reqwest::Method::GET, "pki_int/cert/ca", None, None)
            .await;
        true
    }
    async fn outage(&self) -> bool {
        if self.cfg.mode == BackendMode::Intermediate {
            // Intermediate mode keeps signing through an outage (tests/intermediate.rs).
            return false;
        }
        self.bao.lock().await.kill();
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_conforms() {
    let r = conformance::run(&Bao::start(false).await).await;
    assert!(r.checked_outage && r.checked_throttle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_mode_over_openbao_conforms() {
    conformance::run(&Bao::start(true).await).await;
}

fn aws_test_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in aws::TEST_ENV {
            // SAFETY (test-only): set once, before any AWS client exists, to constants.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

/// moto's acm-pca behind the fault proxy, which can throttle like AWS does.
struct Aws {
    moto: Mutex<Option<Moto>>,
    proxy: Proxy,
    arn: String,
}

#[async_trait]
impl BackendUnderTest for Aws {
    fn name(&self) -> &'static str {
        "AWS Private CA (moto)"
    }
    fn honours_validity(&self) -> bool {
        // moto ignores IssueCertificate's Validity (real AWS Private CA honours it).
        false
    }
    async fn signer(&self) -> Arc<dyn Signer> {
        let mut c = istio_ca_bridge::config::Config::default();
        aws::aws_backend(&mut c, &self.arn, &self.proxy.url, |a| {
            a.issue_timeout = Duration::from_secs(2);
        });
        build(c.backend).await
    }
    async fn throttle(&self) -> bool {
        self.proxy.faults(Faults {
            throttle_issue_always: true,
            ..Default::default()
        });
        true
    }
    async fn outage(&self) -> bool {
        self.proxy.faults(Faults::default());
        drop(self.moto.lock().unwrap().take());
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_private_ca_conforms() {
    aws_test_env();
    let moto = Moto::start().await;
    let (arn, _) = aws::create_root_ca(&moto.url).await;
    let proxy = Proxy::start(&moto.url).await;
    let r = conformance::run(&Aws {
        moto: Mutex::new(Some(moto)),
        proxy,
        arn,
    })
    .await;
    assert!(r.checked_outage && r.checked_throttle);
}

/// The in-process fake of DigiCert's documented REST API (nothing real runs offline).
struct Digicert {
    fake: Mutex<Option<FakeDigicert>>,
    files: tempfile::TempDir,
    base_url: String,
}

#[async_trait]
impl BackendUnderTest for Digicert {
    fn name(&self) -> &'static str {
        "DigiCert (fake)"
    }
    async fn signer(&self) -> Arc<dyn Signer> {
        let p = |n: &str| Some(self.files.path().join(n));
        let mut d = istio_ca_bridge::config::DigicertConfig {
            base_url: self.base_url.clone(),
            ca_file: p("tls-ca.pem"),
            profile_id: istio_ca_bridge::testing::fake_digicert::PROFILE.into(),
            trust_bundle_file: p("roots.pem"),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        d.auth.api_key_file = p("api-key");
        build(BackendConfig::Digicert(d)).await
    }
    async fn throttle(&self) -> bool {
        if let Some(f) = self.fake.lock().unwrap().as_ref() {
            f.throttle_next(1000, Some(RetryAfter::Seconds(0)));
        }
        true
    }
    async fn outage(&self) -> bool {
        drop(self.fake.lock().unwrap().take());
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digicert_conforms() {
    let fake = FakeDigicert::start().await;
    let files = tempfile::tempdir().unwrap();
    let w = |n: &str, s: &str| std::fs::write(files.path().join(n), s).unwrap();
    w("tls-ca.pem", &fake.tls_ca_pem);
    w("roots.pem", &fake.root_pem);
    w("api-key", istio_ca_bridge::testing::fake_digicert::API_KEY);
    let base_url = fake.base_url();
    let r = conformance::run(&Digicert {
        fake: Mutex::new(Some(fake)),
        files,
        base_url,
    })
    .await;
    assert!(r.checked_outage && r.checked_throttle);
}

/// cert-manager over the fake Kubernetes API (nothing real runs offline), a test-side loop
/// playing the issuer; an outage is the API server failing (503), throttling its 429.
struct CertManager {
    fake: Arc<istio_ca_bridge::testing::fake_kube::FakeKube>,
    _issuer: istio_ca_bridge::testing::cm_issuer::CmIssuer,
    files: tempfile::TempDir,
}

#[async_trait]
impl BackendUnderTest for CertManager {
    fn name(&self) -> &'static str {
        "cert-manager (fake API)"
    }
    async fn signer(&self) -> Arc<dyn Signer> {
        let p = |n: &str| Some(self.files.path().join(n));
        build(BackendConfig::CertManager(
            istio_ca_bridge::backend::cert_manager::CertManagerConfig {
                kubeconfig: p("kubeconfig"),
                issuer_ref: istio_ca_bridge::backend::cert_manager::IssuerRefConfig {
                    name: "istio-ca".into(),
                    ..Default::default()
                },
                root_bundle_file: p("roots.pem"),
                request_timeout: Duration::from_secs(2),
                ..Default::default()
            },
        ))
        .await
    }
    async fn throttle(&self) -> bool {
        self.fake.set_certificate_request_failure(Some(429));
        true
    }
    async fn outage(&self) -> bool {
        self.fake.set_certificate_request_failure(Some(503));
        true
    }
    async fn recover(&self) {
        self.fake.set_certificate_request_failure(None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_conforms() {
    let fake = Arc::new(istio_ca_bridge::testing::fake_kube::FakeKube::start_new().await);
    fake.put_namespace("istio-system");
    let issuer = istio_ca_bridge::testing::cm_issuer::CmIssuer::start(fake.clone());
    let files = tempfile::tempdir().unwrap();
    fake.write_kubeconfig(&files.path().join("kubeconfig"), "cm");
    std::fs::write(files.path().join("roots.pem"), &issuer.root_pem).unwrap();
    let r = conformance::run(&CertManager {
        fake,
        _issuer: issuer,
        files,
    })
    .await;
    assert!(r.checked_outage && r.checked_throttle);
}
