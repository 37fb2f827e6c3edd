//! The `server` and `admin` sections: the gRPC listener, its TLS, and the operator's port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, Problems, valid_dns_or_ip};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address. 15012 is where Istio's clients find istiod's CA by default.
    pub listen: SocketAddr,
    pub tls: ServerTlsConfig,
    /// Server-initiated HTTP/2 pings (detect dead peers); client pings are always allowed.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// How long SIGTERM waits for in-flight calls before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once. Istio's clients make
    /// one call at a time; each open stream may buffer up to its flow-control window.
    pub max_concurrent_streams: u32,
    /// Connections served at once; further ones wait in the listen backlog until one
    /// closes (bounds memory under a connection flood).
    pub max_connections: usize,
    /// A TLS handshake slower than this is dropped (slowloris protection).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Upper bound on one CreateCertificate call. istio-agent sends no deadline, so the
    /// server must bound its own work; keep it below the clients' patience.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// CSRs larger than this are refused before parsing (istio CSRs are ~1 KiB). The gRPC
    /// message limit is derived from it, so a larger request is refused from its length
    /// prefix, before it is buffered.
    pub max_csr_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15012".parse().expect("static addr"),
            tls: ServerTlsConfig::default(),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            max_concurrent_streams: 100,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_csr_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ServingCertMode {
    /// The bridge's own backend issues the serving certificate and renews it.
    Issued,
    /// Certificate and key come from PEM files (e.g. a mounted Secret), reloaded on change.
    Files,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    pub mode: ServingCertMode,
    /// Names for the issued serving certificate: DNS names, or IP literals. Must include
    /// the host of the clients' CA_ADDR.
    pub dns_names: Vec<String>,
    /// Lifetime of an issued serving certificate.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Renew an issued serving certificate when less than this is left.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often files are checked for changes (mode files).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        Self {
            mode: ServingCertMode::Issued,
            dns_names: vec![
                "istio-ca-bridge.istio-system.svc".into(),
                "istio-ca-bridge.istio-system.svc.cluster.local".into(),
            ],
            ttl: Duration::from_secs(24 * 3600),
            renew_before: Duration::from_secs(8 * 3600),
            cert_file: None,
            key_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdminConfig {
    /// /metrics, /healthz, /readyz and /config. Plain HTTP: keep it off public networks.
    pub listen: SocketAddr,
    /// Who may read `/config` (it shows topology: backend addresses, cluster ids, issuers):
    /// `loopback` (default: only from inside the pod, e.g. `kubectl port-forward` or `exec`),
    /// `anywhere` (whoever reaches the admin port), or `off`.
    pub config_access: ConfigAccess,
    /// A file holding a bearer token that allows root-rotation steps (`rotate start`,
    /// `advance`, `abort`) from peers other than loopback. Unset: loopback only.
    pub rotation_token_file: Option<std::path::PathBuf>,
}

/// See [`AdminConfig::config_access`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigAccess {
    #[default]
    Loopback,
    Anywhere,
    Off,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15014".parse().expect("static addr"),
            config_access: ConfigAccess::default(),
            rotation_token_file: None,
        }
    }
}

impl ServerConfig {
    /// The largest CreateCertificate message accepted: the CSR plus room for the other
    /// fields (validity, the metadata struct with ImpersonatedIdentity).
    pub fn max_message_bytes(&self) -> usize {
        self.max_csr_bytes + 16 * 1024
    }

    /// Problems, with fields relative to `server`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        p.positive("shutdownGrace", self.shutdown_grace);
        p.positive("requestTimeout", self.request_timeout);
        p.positive("handshakeTimeout", self.handshake_timeout);
        if self.max_concurrent_streams == 0 {
            p.push("maxConcurrentStreams", "must be > 0");
        }
        if self.max_connections == 0 {
            p.push("maxConnections", "must be > 0");
        }
        if self.max_csr_bytes < 512 {
            p.push("maxCsrBytes", "must be at least 512");
        } else if self.max_csr_bytes > 1024 * 1024 {
            p.push("maxCsrBytes", "must be at most 1 MiB");
        }
        p.nest("tls", self.tls.problems());
        p.into_vec()
    }
}

impl ServerTlsConfig {
    /// Problems, with fields relative to `server.tls`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        match self.mode {
            ServingCertMode::Files => {
                if self.cert_file.is_none() {
                    p.push("certFile", "required when mode is files");
                }
                if self.key_file.is_none() {
                    p.push("keyFile", "required when mode is files");
                }
                p.positive("reloadInterval", self.reload_interval);
            }
            ServingCertMode::Issued => {
                if self.dns_names.is_empty() {
                    p.push(
                        "dnsNames",
                        "at least one name is required when mode is issued",
                    );
                }
                for (i, n) in self.dns_names.iter().enumerate() {
                    if !valid_dns_or_ip(n) {
                        p.push(
                            format!("dnsNames[{i}]"),
                            format!("{n:?} is neither a DNS name nor an IP address"),
                        );
                    }
                }
                p.at_least("ttl", self.ttl, Duration::from_secs(2), "2s");
                if self.renew_before.is_zero() || self.renew_before >= self.ttl {
                    p.push("renewBefore", "must be > 0 and less than server.tls.ttl");
                }
                if self.cert_file.is_some() || self.key_file.is_some() {
                    p.push("certFile", "only allowed when mode is files");
                }
            }
        }
        p.into_vec()
    }
}
