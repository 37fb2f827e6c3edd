//! Shared test support: a real bridge started in-process on 127.0.0.1:0 with the local CA
//! in a temp dir, a test JWT issuer (ES256 and RS256 keys in a JWKS file), Istio-shaped
//! CSRs, and a TLS gRPC client. Black-box: everything goes through the real listener.
#![allow(dead_code)]

pub mod fake_kube;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use istio_ca_bridge::app::{App, Options};
use istio_ca_bridge::backend::Signer;
use istio_ca_bridge::config::{Config, JwtIssuerConfig};
use istio_ca_bridge::metrics::Metrics;
use istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use istio_ca_bridge::pb::{IstioCertificateRequest, IstioCertificateResponse};
use istio_ca_bridge::pki::{self, CsrShape};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const TD: &str = "cluster.local";
pub const ISSUER: &str = "https://issuer.test";

pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// Fails with an install hint if an external tool is missing (tests never skip).
pub fn require_tool(tool: &str, hint: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test but was not found: {hint}"
    );
}

/// A JWT issuer under test control.
pub struct TestIssuer {
    pub issuer: String,
    pub es_key: KeyPair,
    pub rs_key: KeyPair,
    pub jwks: serde_json::Value,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl TestIssuer {
    pub fn new(issuer: &str) -> Self {
        let es_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rs_key =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let raw = rcgen::PublicKeyData::der_bytes(&es_key);
        let spki = rcgen::PublicKeyData::subject_public_key_info(&rs_key);
        let (n, e) = rsa_n_e(&spki);
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "es",
             "x": b64(&raw[1..33]), "y": b64(&raw[33..65])},
            {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "rs", "n": b64(&n), "e": b64(&e)},
        ]});
        Self {
            issuer: issuer.to_string(),
            es_key,
            rs_key,
            jwks,
        }
    }

    pub fn write_jwks(&self, path: &Path) {
        std::fs::write(path, serde_json::to_vec(&self.jwks).unwrap()).unwrap();
    }

    pub fn claims(&self, ns: &str, sa: &str) -> serde_json::Value {
        let now = now();
        serde_json::json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"],
            "iat": now, "nbf": now, "exp": now + 3600,
        })
    }

    /// A valid ES256 service-account token.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.sign_es(&self.claims(ns, sa), Some("es"))
    }

    pub fn sign_es(&self, claims: &serde_json::Value, kid: Option<&str>) -> String {
        let key = EncodingKey::from_ec_pem(self.es_key.serialize_pem().as_bytes()).unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }

    pub fn sign_rs(&self, claims: &serde_json::Value, kid: Option<&str>) -> String {
        let key = EncodingKey::from_rsa_pem(self.rs_key.serialize_pem().as_bytes()).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// (modulus, exponent) of an RSA SubjectPublicKeyInfo, for the JWKS.
fn rsa_n_e(spki: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use x509_parser::prelude::FromDer;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = info.parsed().unwrap() else {
        panic!("not RSA")
    };
    let strip = |b: &[u8]| b.iter().skip_while(|x| **x == 0).copied().collect();
    (strip(rsa.modulus), strip(rsa.exponent))
}

/// A bridge running in-process.
pub struct Bridge {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub issuer: Arc<TestIssuer>,
    pub metrics: Arc<Metrics>,
    pub signer: Arc<dyn Signer>,
    pub audit: istio_ca_bridge::audit::AuditLog,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests: loopback listeners on port 0, local CA in `dir`, the test issuer.
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
    if let istio_ca_bridge::config::BackendConfig::Local(l) = &mut cfg.backend {
        l.state_dir = dir.join("ca");
    }
    // Every test bridge keeps an audit log (read with `Bridge::audit_records`).
    cfg.audit.sink = istio_ca_bridge::config::AuditSink::File;
    cfg.audit.path = Some(dir.join("audit.jsonl"));
    cfg.authn.jwt = vec![JwtIssuerConfig {
        issuer: issuer.issuer.clone(),
        jwks_file: Some(jwks),
        jwks_uri: None,
        jwks_ca_file: None,
        jwks_token_file: None,
        audiences: vec!["istio-ca".into()],
        trust_domain: None,
        cluster_id: None,
        refresh_interval: Duration::from_secs(300),
        insecure_http: false,
    }];
    cfg
}

impl Bridge {
    pub async fn start() -> Bridge {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Bridge {
        Self::start_opts(edit, Options::default()).await
    }

    pub async fn start_opts(edit: impl FnOnce(&mut Config), opts: Options) -> Bridge {
        istio_ca_bridge::install_crypto_provider();
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

    pub fn root_file(&self) -> PathBuf {
        let p = self.dir.path().join("root-bundle.pem");
        std::fs::write(&p, self.root_pem()).unwrap();
        p
    }

    pub async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        let ch = istio_ca_bridge::cli::request::connect(
            &format!("localhost:{}", self.grpc.port()),
            self.root_pem().as_bytes(),
            Some("localhost"),
            None,
        )
        .await
        .expect("connect");
        IstioCertificateServiceClient::new(ch)
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

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{}", self.admin, path);
        let resp = reqwest::get(&url).await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

/// The value of the sample `name{labels}` on the bridge's registry (0 when absent).
pub fn metric(b: &Bridge, name: &str, labels: &str) -> f64 {
    let text = b.metrics.render();
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

pub const PROMTOOL_HINT: &str =
    "apt-get install -y prometheus (Debian/Ubuntu package that ships promtool)";

/// Runs `promtool check metrics` on `text`; returns (exit code, output lines).
pub async fn promtool(text: &str) -> (Option<i32>, Vec<String>) {
    require_tool("promtool", PROMTOOL_HINT);
    let out = run_with_timeout(
        "promtool",
        &["check", "metrics"],
        &[],
        Some(text.as_bytes()),
        Duration::from_secs(60),
    )
    .await;
    let lines = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    (out.code, lines)
}

/// Reads an audit JSON-lines file.
pub fn audit_records_at(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
        .collect()
}

/// A key and an Istio-shaped CSR for `uri`.
pub fn csr_for(
    uri: &str,
    key_type: istio_ca_bridge::config::KeyType,
    shape: CsrShape,
) -> (KeyPair, String) {
    let key = pki::generate_key(key_type).unwrap();
    let csr = pki::workload_csr(&key, uri, shape).unwrap();
    (key, csr)
}

/// Builds a CreateCertificate request with the usual Istio headers.
pub fn request(
    csr: String,
    token: Option<&str>,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut md = prost_types::Struct::default();
    md.fields.insert(
        "CertSigner".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(String::new())),
        },
    );
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: Some(md),
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    req
}

pub async fn call(
    client: &mut IstioCertificateServiceClient<Channel>,
    req: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, tonic::Status> {
    client.create_certificate(req).await.map(|r| r.into_inner())
}

/// Runs openssl with args; returns (success, stdout+stderr).
pub fn openssl(args: &[&str]) -> (bool, String) {
    require_tool("openssl", "apt-get install -y openssl");
    let out = Command::new("openssl").args(args).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Fails with an install hint unless `python3` can import every module in `modules`
/// (comma-separated, as in an `import` statement). Tests never skip.
pub fn require_python_modules(modules: &str, hint: &str) {
    require_tool("python3", "apt-get install -y python3");
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("import {modules}"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 modules {modules} are required by this test but do not import: {hint}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of a subprocess run under a deadline.
pub struct ProcOutput {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ProcOutput {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `program args` with extra `envs` and `stdin` bytes, killing it after `limit`
/// (which fails the test). Never waits longer than `limit`.
pub async fn run_with_timeout(
    program: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> ProcOutput {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    if let Some(data) = stdin {
        // Written concurrently so that a child filling its stdout pipe cannot deadlock us.
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            ProcOutput {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => panic!("{program} {args:?} did not finish within {limit:?} (killed)"),
    }
}

impl Bridge {
    /// Signals shutdown without waiting for it; `self.task` is the `App::run` future, which
    /// the caller may take and await to time the drain.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A loopback port that was free a moment ago, for configs that must name a fixed port
/// (a child process cannot report what port 0 became).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Completes a TLS handshake with `addr` the way a gRPC client does (ALPN h2, verifying
/// `server_name` against `root_pem`) and returns the serial (hex) of the server's leaf.
pub async fn serving_serial(
    addr: SocketAddr,
    root_pem: &str,
    server_name: &str,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::parse_certs_pem(root_pem.as_bytes()).map_err(|e| e.to_string())? {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("server sent no certificate")?;
    Ok(pki::cert_info(leaf).map_err(|e| e.to_string())?.serial_hex)
}
