//! The composition root: builds every component from the config, binds the listeners and
//! runs until shutdown, then drains within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Readiness};
use crate::backend::{Signer, checked::Checked, instrumented::Instrumented};
use crate::config::{self, Config, DEV_ISSUER, JwtIssuerConfig};
use crate::k8s;
use crate::metrics::Metrics;
use crate::server::authn::{self, Authenticator};
use crate::server::serving;
use crate::server::{self, CaService, authz};

/// Hooks for tests and embedders.
#[derive(Default)]
pub struct Options {
    /// Use this signer instead of building the configured backend.
    pub signer: Option<Arc<dyn Signer>>,
}

pub struct App {
    cfg: Config,
    metrics: Arc<Metrics>,
    signer: Arc<dyn Signer>,
    service: CaService,
    readiness: Arc<Readiness>,
    resolver: Arc<server::tls::CertResolver>,
    serving_not_after: i64,
    jwt: Option<Arc<authn::jwt::JwtAuthenticator>>,
    /// Kubernetes clusters (TokenReview and pod caches), when configured.
    clusters: Option<Arc<k8s::Clusters>>,
    hard_stop: CancellationToken,
    audit: crate::audit::AuditLog,
    grpc: TcpListener,
    admin: TcpListener,
}

impl App {
    /// Builds everything and binds both listeners; nothing is served until [`App::run`].
    pub async fn build(mut cfg: Config, opts: Options) -> anyhow::Result<App> {
        crate::install_crypto_provider();
        let metrics = Arc::new(Metrics::new(cfg.metrics.istio_compat));

        let trusted_node_accounts = config::parse_accounts(&cfg.authn.trusted_node_accounts)
            .map_err(|e| anyhow::anyhow!("authn.trustedNodeAccounts: {e}"))?;
        let clusters = match &cfg.authn.kubernetes {
            Some(k) => Some(Arc::new(
                k8s::Clusters::build(k, &cfg.trust_domain, !trusted_node_accounts.is_empty())
                    .await
                    .context("building the Kubernetes clients")?,
            )),
            None => None,
        };
        let inner = match opts.signer {
            Some(s) => s,
            None => {
                let mut ctx = cfg.build_context(metrics.clone());
                if let (Some((ns, name)), Some(c)) = (cfg.shared_local_ca(), &clusters) {
                    let cluster = &c.all()[0];
                    tracing::info!(cluster = %cluster.id, secret = %format!("{ns}/{name}"), "the local CA is shared through a Secret");
                    ctx.ca_store = Some(Arc::new(k8s::ca_secret::SecretStore::new(
                        cluster.client(),
                        ns,
                        name,
                    )));
                }
                let built = cfg
                    .backend
                    .build(&ctx)
                    .await
                    .context("building the backend")?;
                if cfg.follows_upstream() {
                    follow_upstream(&cfg, built, clusters.as_deref(), metrics.clone()).await?
                } else {
                    built
                }
            }
        };
        // Every signer, built or handed in, is checked the same way: what it issues is
        // verified once (Checked), then counted (Instrumented) and recorded (Audited).
        let inner: Arc<dyn Signer> = Arc::new(Checked::new(
            inner,
            metrics.clone(),
            cfg.policy.accept_longer_lifetimes,
        ));
        let audit = crate::audit::AuditLog::start(&cfg.audit, metrics.clone())
            .context("opening the audit log")?;
        let signer: Arc<dyn Signer> = Arc::new(crate::audit::Audited::new(
            Arc::new(Instrumented::new(inner, metrics.clone())),
            audit.clone(),
        ));
        metrics.observe_bundle(&signer.trust_bundle().borrow());
        if let Some(t) = signer.signing_ca().not_after {
            let v = t as f64;
            metrics
                .signing_ca_expiry
                .with_label_values(&[signer.kind()])
                .set(v);
            metrics.citadel_chain_expiry.set(v);
        }

        let resolver = Arc::new(server::tls::CertResolver::default());
        let serving_not_after =
            serving::initial(&cfg.server.tls, signer.as_ref(), &resolver, &metrics)
                .await
                .context("obtaining the serving certificate")?;

        if let Some(dev) = &cfg.authn.dev_issuer {
            crate::dev::ensure(&dev.dir).context("creating the development token issuer")?;
            tracing::warn!(
                "authn.devIssuer is enabled: anyone with access to its key directory can obtain any identity"
            );
            cfg.authn.jwt.push(JwtIssuerConfig {
                refresh_interval: std::time::Duration::from_secs(60),
                ..JwtIssuerConfig::with_jwks_file(DEV_ISSUER, crate::dev::jwks_path(&dev.dir))
            });
        }

        let mut chain: Vec<Arc<dyn Authenticator>> = Vec::new();
        if cfg.authn.client_cert {
            let extra = match &cfg.authn.client_cert_issuers_file {
                Some(p) => {
                    let text = std::fs::read(p).with_context(|| {
                        format!("reading authn.clientCertIssuersFile {}", p.display())
                    })?;
                    crate::pki::parse_certs_pem(&text)
                        .with_context(|| format!("authn.clientCertIssuersFile {}", p.display()))?
                }
                None => Vec::new(),
            };
            let a = authn::client_cert::ClientCertAuthenticator::new(
                signer.clone(),
                &extra,
                cfg.trust_domains(),
            )
            .map_err(|e| anyhow::anyhow!("authn.clientCertIssuersFile: {e}"))?;
            chain.push(Arc::new(a));
        }
        let mut jwt = None;
        if !cfg.authn.jwt.is_empty() {
            let j = Arc::new(
                authn::jwt::JwtAuthenticator::new(&cfg.authn.jwt, &cfg.trust_domain)
                    .await
                    .context("loading JWT issuers")?
                    .defer_unknown_issuers(clusters.is_some()),
            );
            chain.push(j.clone());
            jwt = Some(j);
        }
        let mut node_authorizer: Option<Arc<dyn authz::NodeAuthorizer>> = None;
        if let (Some(k), Some(clusters)) = (&cfg.authn.kubernetes, &clusters) {
            // After the JWT issuers: a token they know never costs a TokenReview.
            chain.push(Arc::new(
                authn::token_review::TokenReviewAuthenticator::new(
                    clusters.clone(),
                    authn::token_review::Settings {
                        audiences: k.audiences.clone(),
                        cache_size: k.cache_size,
                        cache_max_ttl: k.cache_max_ttl,
                        jwt_issuers: cfg.authn.jwt.iter().map(|j| j.issuer.clone()).collect(),
                        metrics: metrics.clone(),
                    },
                ),
            ));
            if !trusted_node_accounts.is_empty() {
                node_authorizer = Some(Arc::new(authz::node::KubeNodeAuthorizer::new(
                    clusters.clone(),
                    k.pod_sync_wait,
                    k.pod_cache_max_staleness,
                )));
            }
            tracing::info!(clusters = ?clusters.ids(), impersonation = node_authorizer.is_some(), "Kubernetes TokenReview enabled");
        }
        let authn = authn::Chain::new(chain);
        tracing::info!(authenticators = ?authn.names(), "authentication chain");
        let authz = authz::Authorizer::new(trusted_node_accounts, node_authorizer);

        let hard_stop = CancellationToken::new();
        let service = CaService::new(
            authn,
            authz,
            signer.clone(),
            server::Settings {
                policy: cfg.policy.clone(),
                max_csr_bytes: cfg.server.max_csr_bytes,
                request_timeout: cfg.server.request_timeout,
            },
            metrics.clone(),
            hard_stop.clone(),
        );
        let grpc = TcpListener::bind(cfg.server.listen)
            .await
            .with_context(|| format!("binding server.listen {}", cfg.server.listen))?;
        let admin = TcpListener::bind(cfg.admin.listen)
            .await
            .with_context(|| format!("binding admin.listen {}", cfg.admin.listen))?;
        let readiness = Arc::new(Readiness {
            grpc_serving: false.into(),
            draining: false.into(),
            signer: signer.clone(),
            resolver: resolver.clone(),
        });
        Ok(App {
            cfg,
            metrics,
            signer,
            service,
            readiness,
            resolver,
            serving_not_after,
            jwt,
            clusters,
            hard_stop,
            audit,
            grpc,
            admin,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    pub fn signer(&self) -> Arc<dyn Signer> {
        self.signer.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The audit log (tests flush it before reading the file).
    pub fn audit(&self) -> crate::audit::AuditLog {
        self.audit.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish
    /// and returns; after `server.shutdownGrace` it returns anyway.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let grace = self.cfg.server.shutdown_grace;
        let config_json = serde_json::to_string_pretty(&self.cfg.redacted_json())?;
        tracing::info!(config = %serde_json::to_string(&self.cfg.redacted_json())?, "effective config");

        if let Some(j) = &self.jwt {
            j.spawn_refresh(stop.clone());
        }
        if let Some(c) = &self.clusters {
            c.spawn_watchers(stop.clone());
            if self.cfg.kubernetes.writes() {
                spawn_cluster_writers(
                    c,
                    &self.cfg.kubernetes,
                    self.signer.clone(),
                    &self.metrics,
                    stop.clone(),
                );
            }
        }
        serving::spawn_maintainer(
            self.cfg.server.tls.clone(),
            self.signer.clone(),
            self.resolver.clone(),
            self.metrics.clone(),
            self.serving_not_after,
            stop.clone(),
        );
        spawn_bundle_watch(self.signer.clone(), self.metrics.clone(), stop.clone());
        if let Some(r) = self.signer.root_rotation() {
            spawn_rotation_audit(r.as_ref(), self.audit.clone(), stop.clone());
        }

        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn_on_own_thread(
            self.admin,
            Arc::new(AdminState {
                metrics: self.metrics.clone(),
                readiness: self.readiness.clone(),
                config_json,
                config_access: self.cfg.admin.config_access,
                rotation: self.signer.root_rotation(),
                rotation_token_file: self.cfg.admin.rotation_token_file.clone(),
            }),
            admin_stop.clone(),
        )?;

        let tls = server::tls::server_config(self.resolver.clone());
        let grpc_addr = self.grpc.local_addr()?;
        let server_opts = self.cfg.server.clone();
        let grpc_stop = stop.clone();
        let mut grpc_task = tokio::spawn(async move {
            server::tls::serve(self.grpc, tls, self.service, &server_opts, grpc_stop).await
        });
        self.readiness.grpc_serving.store(true, Ordering::Relaxed);
        tracing::info!(grpc = %grpc_addr, admin = %self.cfg.admin.listen, backend = self.signer.kind(), "istio-ca-bridge ready");

        tokio::select! {
            _ = shutdown => {}
            r = &mut grpc_task => {
                admin_stop.cancel();
                stop.cancel();
                return match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("gRPC server stopped unexpectedly")),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("gRPC server failed")),
                    Err(e) => Err(anyhow::anyhow!("gRPC server task panicked: {e}")),
                };
            }
        }
        tracing::info!(grace = ?grace, "shutting down: no new connections, draining in-flight calls");
        self.readiness.draining.store(true, Ordering::Relaxed);
        stop.cancel();
        let drained = tokio::time::timeout(grace, &mut grpc_task).await;
        admin_stop.cancel();
        let _ = admin_task.await;
        // Every certificate handed out is in the audit log before the process ends.
        let audit = self.audit.clone();
        let flush = async move {
            if tokio::time::timeout(std::time::Duration::from_secs(5), audit.flush())
                .await
                .is_err()
            {
                tracing::error!("the audit log did not flush within 5s at shutdown");
            }
        };
        match drained {
            Ok(Ok(Ok(()))) => {
                flush.await;
                tracing::info!("drained; bye");
                Ok(())
            }
            Ok(Ok(Err(e))) => {
                Err(anyhow::Error::new(e).context("gRPC server failed while draining"))
            }
            Ok(Err(e)) => Err(anyhow::anyhow!("gRPC server task panicked: {e}")),
            Err(_) => {
                // Answer what is still running with UNAVAILABLE (clients retry elsewhere)
                // and drop its work, then give the connections a moment to flush that.
                self.hard_stop.cancel();
                grpc_task.abort();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                flush.await;
                tracing::warn!(grace = ?grace, "shutdown grace period over; remaining calls answered UNAVAILABLE");
                Ok(())
            }
        }
    }
}

/// Per cluster: while this replica holds the Lease, the root ConfigMaps, the istiod
/// Secret and the ClusterTrustBundle (whichever are enabled) are kept current.
fn spawn_cluster_writers(
    clusters: &k8s::Clusters,
    cfg: &config::KubernetesConfig,
    signer: Arc<dyn Signer>,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    for cluster in clusters.all() {
        let client = cluster.client();
        let writes = cluster.writes();
        let leader_gauge = metrics
            .kubernetes_leader
            .with_label_values(&[cluster.id.as_str()]);
        let id = cluster.id.clone();
        let cfg = Arc::new(cfg.clone());
        let signer = signer.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let le = cfg.leader_election.clone();
            let lead_id = id.clone();
            k8s::leader::run(
                client.clone(),
                &le,
                &lead_id,
                leader_gauge,
                stop,
                move |token| {
                    let (client, id, cfg, signer, writes) = (
                        client.clone(),
                        id.clone(),
                        cfg.clone(),
                        signer.clone(),
                        writes.clone(),
                    );
                    async move {
                        let roots = async {
                            if cfg.root_config_map.enabled {
                                crate::publish::configmap::publish(
                                    client.clone(),
                                    id.clone(),
                                    Arc::new(cfg.root_config_map.clone()),
                                    signer.trust_bundle(),
                                    writes,
                                    token.clone(),
                                )
                                .await;
                            }
                        };
                        let istiod = async {
                            if cfg.istiod_cert.enabled {
                                crate::publish::istiod_cert::maintain(
                                    client.clone(),
                                    id.clone(),
                                    cfg.istiod_cert.clone(),
                                    signer.clone(),
                                    token.clone(),
                                )
                                .await;
                            }
                        };
                        let ctb = async {
                            if cfg.cluster_trust_bundle.enabled {
                                crate::publish::cluster_trust_bundle::publish(
                                    client.clone(),
                                    id.clone(),
                                    cfg.cluster_trust_bundle.clone(),
                                    cfg.root_config_map.resync_interval,
                                    signer.trust_bundle(),
                                    token.clone(),
                                )
                                .await;
                            }
                        };
                        tokio::join!(roots, istiod, ctb);
                    }
                },
            )
            .await;
        });
    }
}

/// Keeps the trust-bundle gauges current when the bundle changes.
fn spawn_bundle_watch(signer: Arc<dyn Signer>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut rx = signer.trust_bundle();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let b = rx.borrow_and_update().clone();
            metrics.observe_bundle(&b);
            tracing::info!(roots = b.roots().len(), "trust bundle changed");
        }
    });
}

/// Wraps a remote backend in the follower of its roots (`backend::follow`), with the state
/// in the CA Secret (Kubernetes), `rotation.stateDir`, or memory.
async fn follow_upstream(
    cfg: &Config,
    built: Arc<dyn Signer>,
    clusters: Option<&k8s::Clusters>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<dyn Signer>> {
    use crate::backend::follow::{FileRootsStore, Follower, MemoryRootsStore, RootsStore};
    let store: Arc<dyn RootsStore> = match (cfg.upstream_rotation_secret(), clusters) {
        (Some((ns, name)), Some(c)) => Arc::new(k8s::ca_secret::UpstreamRootsSecret::new(
            c.all()[0].client(),
            ns,
            name,
        )),
        _ => match &cfg.rotation.state_dir {
            Some(dir) => Arc::new(FileRootsStore::new(dir)),
            None => {
                tracing::warn!(
                    "rotation.stateDir is not set and there is no Kubernetes API: a rotation of the backend's root is kept in memory only, and a restart forgets its phase"
                );
                Arc::new(MemoryRootsStore::default())
            }
        },
    };
    let f = Follower::open(
        built,
        store,
        cfg.rotation.clone(),
        cfg.policy.max_ttl,
        metrics,
    )
    .await
    .map_err(|e| anyhow::anyhow!("root rotation state: {e}"))?;
    Ok(f)
}

/// Writes an audit record for every rotation transition this replica makes.
fn spawn_rotation_audit(
    rotation: &dyn crate::backend::RootRotation,
    audit: crate::audit::AuditLog,
    stop: CancellationToken,
) {
    let mut rx = rotation.transitions();
    tokio::spawn(async move {
        loop {
            let t = tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => match r {
                    Ok(t) => t,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::error!(missed = n, "audit: rotation transitions were missed");
                        continue;
                    }
                    Err(_) => return,
                },
            };
            audit.rotation(&t).await;
        }
    });
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
