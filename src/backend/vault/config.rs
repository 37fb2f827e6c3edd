//! Vault's (and OpenBao's) configuration (`backend.type: vault`). No secret is stored
//! here: credentials are read from files or environment variables named by the config.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::intermediate::{BackendMode, IntermediateConfig};
use crate::validate::{FieldError, Problems, Shared};

/// The Vault (or OpenBao) PKI backend. No secret is stored here: credentials are read
/// from files or environment variables named by the config, so `/config` shows nothing
/// worth stealing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultConfig {
    /// Base URL of the Vault API, e.g. `https://vault.vault.svc:8200` (no `/v1`).
    pub address: String,
    #[serde(default)]
    pub tls: VaultTlsConfig,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Path of the PKI secrets engine.
    #[serde(default = "default_vault_mount")]
    pub mount: String,
    /// PKI role that signs workload certificates (`<mount>/sign/<role>`).
    pub role: String,
    /// PKI role for the bridge's own serving certificate (DNS names). Default: `role`,
    /// which then must also allow those names.
    #[serde(default)]
    pub server_role: Option<String>,
    /// Sign with this issuer (`<mount>/issuer/<ref>/sign/<role>`) instead of the role's or
    /// the mount's default issuer; the trust bundle is then read from this issuer too.
    #[serde(default)]
    pub issuer_ref: Option<String>,
    /// Bound on each HTTP call to Vault (connect + response). Keep it below
    /// `server.requestTimeout` so a hung Vault turns into UNAVAILABLE, not a timeout.
    #[serde(default = "default_vault_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    pub auth: VaultAuthConfig,
    /// Take the trust bundle's roots from the mount's CA chain (the self-signed
    /// certificates in it). Turn off when the mount's chain does not include its root.
    #[serde(default = "default_true")]
    pub roots_from_mount: bool,
    /// Additional (or, with `rootsFromMount: false`, the only) trusted roots, PEM.
    /// Re-read at every refresh, so a root rotation can be staged here.
    #[serde(default)]
    pub root_bundle_file: Option<PathBuf>,
    /// How often the roots are re-read (changes are published to every reader).
    #[serde(default = "default_root_refresh", with = "humantime_serde")]
    pub root_refresh_interval: Duration,
    /// `direct`: every workload certificate is one `sign/<role>` call. `intermediate`: the
    /// mount signs an intermediate CA for this replica (`root/sign-intermediate`, or
    /// `issuer/<issuerRef>/sign-intermediate`), which signs workloads locally.
    #[serde(default)]
    pub mode: BackendMode,
    #[serde(default)]
    pub intermediate: IntermediateConfig,
}

fn default_vault_mount() -> String {
    "pki".into()
}
fn default_vault_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_root_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_true() -> bool {
    true
}

/// TLS towards Vault.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VaultTlsConfig {
    /// CA bundle (PEM) that signed Vault's serving certificate. Default: public web roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for Vault listeners that require mTLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// How the bridge obtains its Vault token. Every credential is read from a file (re-read
/// at each login, so rotated files are picked up) or from an environment variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "camelCase", deny_unknown_fields)]
pub enum VaultAuthConfig {
    /// A token given to the bridge; renewed while renewable, re-read from its source when
    /// it can no longer be renewed or Vault refuses it.
    Token(VaultTokenAuth),
    /// Kubernetes auth method: the pod's service-account token.
    Kubernetes(VaultKubernetesAuth),
    /// AppRole auth method.
    #[serde(rename = "approle")]
    AppRole(VaultAppRoleAuth),
    /// JWT auth method with a token from a file.
    Jwt(VaultJwtAuth),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultTokenAuth {
    /// File holding the token (exactly one of `tokenFile`, `tokenEnv`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Name of the environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultKubernetesAuth {
    /// Vault role of the Kubernetes auth method.
    pub role: String,
    /// Service-account token (a projected token with Vault's audience is best).
    #[serde(default = "default_sa_token_file")]
    pub token_file: PathBuf,
    #[serde(default = "default_kubernetes_mount")]
    pub mount: String,
}

fn default_sa_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}
fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultAppRoleAuth {
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultJwtAuth {
    /// Vault role of the JWT auth method (default: the method's default role).
    #[serde(default)]
    pub role: Option<String>,
    pub token_file: PathBuf,
    #[serde(default = "default_jwt_mount")]
    pub mount: String,
}

fn default_jwt_mount() -> String {
    "jwt".into()
}

impl VaultConfig {
    /// Problems, with fields relative to `backend`.
    pub fn problems(&self, _shared: &Shared) -> Vec<FieldError> {
        let mut p = Problems::new();
        match reqwest::Url::parse(&self.address) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.path() != "/" && !u.path().is_empty() {
                    p.push(
                        "address",
                        "give the server's base URL only, without a path such as /v1",
                    );
                }
                if u.scheme() == "http"
                    && (self.tls.ca_file.is_some() || self.tls.client_cert_file.is_some())
                {
                    p.push("tls", "TLS settings require an https address");
                }
            }
            _ => p.push(
                "address",
                format!("{:?} is not an http(s) URL", self.address),
            ),
        }
        for (field, value) in [("mount", Some(&self.mount)), ("role", Some(&self.role))]
            .into_iter()
            .chain([
                ("serverRole", self.server_role.as_ref()),
                ("issuerRef", self.issuer_ref.as_ref()),
                ("namespace", self.namespace.as_ref()),
            ])
        {
            if let Some(v) = value
                && let Err(e) = check_vault_path(v)
            {
                p.push(field, e);
            }
        }
        p.positive("requestTimeout", self.request_timeout);
        if self.tls.client_cert_file.is_some() != self.tls.client_key_file.is_some() {
            p.push(
                "tls.clientKeyFile",
                "clientCertFile and clientKeyFile must be set together",
            );
        }
        if !self.roots_from_mount && self.root_bundle_file.is_none() {
            p.push(
                "rootBundleFile",
                "required when rootsFromMount is false (there would be no trusted root)",
            );
        }
        p.at_least(
            "rootRefreshInterval",
            self.root_refresh_interval,
            Duration::from_secs(1),
            "1s",
        );
        match &self.auth {
            VaultAuthConfig::Token(t) => {
                if t.token_file.is_some() == t.token_env.is_some() {
                    p.push(
                        "auth.tokenFile",
                        "exactly one of tokenFile or tokenEnv must be set",
                    );
                }
                if let Some(e) = &t.token_env {
                    p.env_name("auth.tokenEnv", e);
                }
            }
            VaultAuthConfig::Kubernetes(k) => {
                if k.role.is_empty() {
                    p.push("auth.role", "must not be empty");
                }
                if let Err(e) = check_vault_path(&k.mount) {
                    p.push("auth.mount", e);
                }
            }
            VaultAuthConfig::AppRole(a) => {
                if let Err(e) = check_vault_path(&a.mount) {
                    p.push("auth.mount", e);
                }
            }
            VaultAuthConfig::Jwt(j) => {
                if j.role.as_deref() == Some("") {
                    p.push("auth.role", "must not be empty when set");
                }
                if let Err(e) = check_vault_path(&j.mount) {
                    p.push("auth.mount", e);
                }
            }
        }
        if self.mode == BackendMode::Intermediate {
            p.nest("intermediate", self.intermediate.problems());
        }
        p.into_vec()
    }
}

/// A Vault path segment list such as `pki_int` or `team/pki`: no empty segments, no
/// leading or trailing slash, nothing that would change the URL's meaning.
fn check_vault_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty".into());
    }
    let ok = p.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} must be path segments of letters, digits, '-', '_' or '.' separated by single '/'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{backend_problems, backend_section};

    fn parse(yaml: &str) -> Result<VaultConfig, (String, String)> {
        backend_section(yaml)
    }

    fn validate(cfg: &VaultConfig) -> Result<(), Vec<FieldError>> {
        backend_problems(cfg.problems(&Shared::default()))
    }

    const VAULT: &str =
        "backend:\n  type: vault\n  address: https://vault:8200\n  mount: pki_int\n  role: r\n";

    #[test]
    fn vault_backend_parses_every_auth_method() {
        for auth in [
            "method: token\n    tokenFile: /t",
            "method: token\n    tokenEnv: VAULT_TOKEN",
            "method: kubernetes\n    role: bridge",
            "method: approle\n    roleIdFile: /r\n    secretIdFile: /s",
            "method: jwt\n    tokenFile: /j\n    role: bridge",
        ] {
            let cfg = parse(&format!("{VAULT}  auth:\n    {auth}\n"))
                .unwrap_or_else(|e| panic!("{auth}: {e:?}"));
            validate(&cfg).unwrap_or_else(|e| panic!("{auth}: {e:?}"));
            let v = &cfg;
            assert_eq!(v.request_timeout, Duration::from_secs(5));
            assert!(v.roots_from_mount);
        }
        let cfg = parse(&format!(
            "{VAULT}  auth:\n    method: kubernetes\n    role: b\n"
        ))
        .unwrap();
        let v = &cfg;
        let VaultAuthConfig::Kubernetes(k) = &v.auth else {
            panic!()
        };
        assert_eq!(k.mount, "kubernetes");
        assert_eq!(
            k.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
    }

    #[test]
    fn vault_unknown_fields_and_bad_values_are_named() {
        let (field, msg) = parse(&format!(
            "{VAULT}  auth:\n    method: approle\n    roleIdFile: /r\n    secretId: oops\n"
        ))
        .unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("secretId"), "{msg}");
        let (_, msg) = parse(&format!("{VAULT}  auth:\n    method: ldap\n")).unwrap_err();
        assert!(msg.contains("ldap"), "{msg}");

        let cfg = parse(
            "backend:\n  type: vault\n  address: vault:8200/v1\n  mount: /pki/\n  role: ''\n  \
             requestTimeout: 0s\n  rootsFromMount: false\n  tls:\n    clientCertFile: /c\n  \
             auth:\n    method: token\n",
        )
        .unwrap();
        let fields: Vec<String> = validate(&cfg)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        for f in [
            "backend.address",
            "backend.mount",
            "backend.role",
            "backend.requestTimeout",
            "backend.rootBundleFile",
            "backend.tls.clientKeyFile",
            "backend.auth.tokenFile",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        let cfg = parse(&format!(
            "{VAULT}  auth:\n    method: token\n    tokenFile: /t\n    tokenEnv: X\n"
        ))
        .unwrap();
        assert_eq!(
            validate(&cfg).unwrap_err()[0].field,
            "backend.auth.tokenFile"
        );
        let cfg = parse(
            "backend:\n  type: vault\n  address: https://vault:8200/v1\n  role: r\n  auth:\n    method: token\n    tokenEnv: T\n",
        )
        .unwrap();
        assert_eq!(validate(&cfg).unwrap_err()[0].field, "backend.address");
    }

    #[test]
    fn vault_config_holds_no_secret_values() {
        let cfg = parse(&format!(
            "{VAULT}  auth:\n    method: approle\n    roleIdFile: /r\n    secretIdFile: /s\n"
        ))
        .unwrap();
        let json = serde_json::to_value(&cfg).unwrap().to_string();
        assert!(json.contains("\"secretIdFile\":\"/s\""), "{json}");
    }
}
