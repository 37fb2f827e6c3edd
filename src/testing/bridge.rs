//! A real bridge started in-process on 127.0.0.1:0 with the local CA in a temp dir and the
//! test JWT issuer, reached only through its listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::{ISSUER, TD, TestIssuer, connect};
use crate::app::{App, Options};
use crate::audit::AuditLog;
use crate::backend::Signer;
use crate::config::{AuditSink, BackendConfig, Config, JwtIssuerConfig};
use crate::metrics::Metrics;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;

/// A bridge running in-process: what a test starts, calls and inspects.
pub struct Bridge {
    /// Its temp dir: JWKS, local CA state, audit log (removed on drop).
    pub dir: tempfile::TempDir,
    /// The validated config it runs with.
    pub cfg: Config,
    /// The gRPC (CreateCertificate) listener.
    pub grpc: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// The JWT issuer the bridge trusts, to mint tokens for calls.
    pub issuer: Arc<TestIssuer>,
    /// The bridge's metrics registry, for assertions without scraping.
    pub metrics: Arc<Metrics>,
    /// The backend the bridge built, for its kind and trust bundle.
    pub signer: Arc<dyn Signer>,
    /// The audit log, to flush before reading it.
    pub audit: AuditLog,
    stop: Option<oneshot::Sender<()>>,
    /// The `App::run` future; taken by [`Bridge::shutdown`] (or by a test timing a drain).
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests: loopback listeners on port 0, local CA in `dir`, an audit file, and
/// `issuer` as the one JWT issuer (its JWKS written to `dir`).
pub fn test_config(dir: &Path, issuer: &TestIssuer) -> Config {
    let jwks = dir.join("jwks.json");
    issuer.write_jwks(&jwks);
    let mut cfg = Config {
        trust_domain: TD.into(),
        ..Default::default()
    };
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.tls.dns_names = vec!["localhost".into()];
    cfg.server.shutdown_grace = Duration::from_secs(10);
    if let BackendConfig::Local(l) = &mut cfg.backend {
        l.state_dir = dir.join("ca");
    }
    // Every test bridge keeps an audit log (read with `Bridge::audit_records`).
    cfg.audit.sink = AuditSink::File;
    cfg.audit.path = Some(dir.join("audit.jsonl"));
    cfg.authn.jwt = vec![JwtIssuerConfig::with_jwks_file(&issuer.issuer, jwks)];
    cfg
}

impl Bridge {
    /// A bridge with the default test config.
    pub async fn start() -> Bridge {
        Self::start_with(|_| {}).await
    }

    /// A bridge with the test config changed by `edit`.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Bridge {
        Self::start_opts(edit, Options::default()).await
    }

    /// A bridge with the test config changed by `edit` and build `opts` (e.g. a test
    /// signer); returns once its admin port answers.
    pub async fn start_opts(edit: impl FnOnce(&mut Config), opts: Options) -> Bridge {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let issuer = Arc::new(TestIssuer::new(ISSUER));
        let mut cfg = test_config(dir.path(), &issuer);
        edit(&mut cfg);
        cfg.validate().expect("test config valid");
        let app = App::build(cfg.clone(), opts).await.expect("bridge builds");
        let grpc = app.grpc_addr();
        let admin = app.admin_addr();
        let metrics = app.metrics();
        let signer = app.signer();
        let audit = app.audit();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        // `run` starts the admin server and marks the gRPC listener serving in one step, so
        // once /healthz answers, readiness reflects only the backend (no start-up race).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reqwest::get(format!("http://{admin}/healthz"))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "admin port never answered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Bridge {
            dir,
            cfg,
            grpc,
            admin,
            issuer,
            metrics,
            signer,
            audit,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// PEM of the trust bundle (what clients trust for the serving cert too).
    pub fn root_pem(&self) -> String {
        self.signer.trust_bundle().borrow().pem().to_string()
    }

    /// The trust bundle written to a file in the bridge's dir (for openssl and configs).
    pub fn root_file(&self) -> PathBuf {
        let p = self.dir.path().join("root-bundle.pem");
        std::fs::write(&p, self.root_pem()).unwrap();
        p
    }

    /// A gRPC client over TLS that trusts the bridge's bundle, as istio-agent connects.
    pub async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        connect(self.grpc.port(), &self.root_pem())
            .await
            .expect("connect")
    }

    /// The audit log's records so far, parsed (waits until queued records are written).
    pub async fn audit_records(&self) -> Vec<serde_json::Value> {
        self.audit.flush().await;
        audit_records_at(
            self.cfg
                .audit
                .path
                .as_deref()
                .expect("test bridges audit to a file"),
        )
    }

    /// Successful issuances so far (istiod's counter).
    pub fn issued(&self) -> u64 {
        self.metrics.success_issuance.get()
    }

    /// GET on the admin port: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{}", self.admin, path);
        let resp = reqwest::get(&url).await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// POST on the admin port (a rotation step, from loopback): (status, body).
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{}", self.admin, path);
        let resp = reqwest::Client::new().post(&url).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Signals shutdown and waits for `App::run` to return its result.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.task.take().unwrap().await.unwrap()
    }

    /// Signals shutdown without waiting for it; `self.task` is the `App::run` future, which
    /// the caller may take and await to time the drain.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of the sample `name{labels}` (`name` when `labels` is empty) on the bridge's
/// registry (0 when absent).
pub fn metric(b: &Bridge, name: &str, labels: &str) -> f64 {
    let text = b.metrics.render();
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Reads an audit JSON-lines file (also one written by a bridge in a child process).
pub fn audit_records_at(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
        .collect()
}
