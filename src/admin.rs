//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process is alive),
//! `/readyz` (the gRPC listener is up, a serving certificate is installed and the backend
//! can sign), `/config` (the effective config, secrets redacted; by default only to loopback
//! peers, `admin.configAccess`) and `/roots` (the current
//! trust bundle as PEM: public, and what `istio-ca-root-cert` must hold) and `/rotation` (the
//! root rotation, [`rotation`]).

mod rotation;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::{Health, Signer};
use crate::config::ConfigAccess;
use crate::metrics::Metrics;
use crate::server::tls::CertResolver;

/// Everything readiness depends on.
pub struct Readiness {
    pub grpc_serving: AtomicBool,
    pub draining: AtomicBool,
    pub signer: Arc<dyn Signer>,
    pub resolver: Arc<CertResolver>,
}

impl Readiness {
    pub fn check(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        if !self.grpc_serving.load(Ordering::Relaxed) {
            return Err("gRPC listener not serving".into());
        }
        if self.resolver.current().is_none() {
            return Err("no serving certificate".into());
        }
        match self.signer.health() {
            Health::Ready => Ok(()),
            Health::NotReady(why) => Err(format!("backend {}: {why}", self.signer.kind())),
        }
    }
}

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub config_json: String,
    pub config_access: ConfigAccess,
    /// The root rotation, when the backend runs one.
    pub rotation: Option<Arc<dyn crate::backend::RootRotation>>,
    /// `admin.rotationTokenFile`.
    pub rotation_token_file: Option<std::path::PathBuf>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/config", get(config))
        .route("/roots", get(roots))
        .route("/rotation", get(rotation::status))
        .route("/rotation/{action}", axum::routing::post(rotation::change))
        .with_state(state)
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    match s.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn roots(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let bundle = s.readiness.signer.trust_bundle().borrow().clone();
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        bundle.pem().to_string(),
    )
}

async fn config(
    State(s): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !config_allowed(s.config_access, peer) {
        return (
            StatusCode::FORBIDDEN,
            "/config is served only as admin.configAccess allows (default: loopback only)\n",
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.config_json.clone(),
    )
        .into_response()
}

/// Whether a peer may read `/config` (an IPv4-mapped IPv6 loopback counts as loopback).
fn config_allowed(access: ConfigAccess, peer: SocketAddr) -> bool {
    match access {
        ConfigAccess::Anywhere => true,
        ConfigAccess::Loopback => peer.ip().to_canonical().is_loopback(),
        ConfigAccess::Off => false,
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}

/// Runs [`serve`] on a thread of its own with a single-threaded runtime, so that probes and
/// scrapes are answered within an OS time slice even while every worker of the main runtime
/// is busy signing (a saturated bridge must not fail its liveness probe and be restarted,
/// which would make the overload worse). Resolves when the server has stopped.
pub fn spawn_on_own_thread(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.into_std()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    std::thread::Builder::new()
        .name("admin-http".into())
        .spawn(move || {
            let _log = tracing::dispatcher::set_default(&dispatch);
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin server: cannot build its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, state, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "admin server: cannot use its listener"),
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_for_loopback_peers_by_default() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        let d = ConfigAccess::default();
        assert!(config_allowed(d, at("127.0.0.1:5000")));
        assert!(config_allowed(d, at("[::1]:5000")));
        assert!(config_allowed(d, at("[::ffff:127.0.0.1]:5000")));
        assert!(!config_allowed(d, at("10.1.2.3:5000")));
        assert!(!config_allowed(d, at("[fd00::1]:5000")));
        assert!(config_allowed(ConfigAccess::Anywhere, at("10.1.2.3:5000")));
        assert!(!config_allowed(ConfigAccess::Off, at("127.0.0.1:5000")));
    }
}
