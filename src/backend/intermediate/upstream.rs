//! The seam between intermediate mode and a backend: what the bridge asks for
//! ([`IntermediateRequest`]), who can answer ([`UpstreamAuthority`]: Vault/OpenBao, AWS
//! Private CA), how to reach one ([`UpstreamConnect`]), and [`LazyUpstream`], the stand-in
//! while a replica that started from its stored intermediate is not connected yet.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backend::{Authority, BuildError, Health, IssuedChain, SignError, remote};
use crate::trust::{SharedBundle, TrustBundle};

/// What the bridge asks its backend to sign: a CA certificate for `public_key_der`.
#[derive(Debug, Clone)]
pub struct IntermediateRequest {
    /// A CSR for the key, with the subject below (some APIs take only CSRs).
    pub csr_der: Vec<u8>,
    pub public_key_der: Vec<u8>,
    pub common_name: String,
    pub ttl: Duration,
    /// Ask for pathLenConstraint 0.
    pub path_len_zero: bool,
    /// Have it signed under this root, if the upstream can choose ([`UpstreamAuthority::can_choose_root`]).
    pub under_root: Option<rustls_pki_types::CertificateDer<'static>>,
}

/// A backend that can sign the bridge's intermediate CA.
#[async_trait]
pub trait UpstreamAuthority: Authority {
    /// Signs a CA certificate for `req`. `leaf` of the answer is the intermediate;
    /// `intermediates` link it to a root of the trust bundle (roots excluded).
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError>;

    /// Whether [`IntermediateRequest::under_root`] is honoured (Vault without `issuerRef`).
    fn can_choose_root(&self) -> bool {
        false
    }
}

/// An upstream that is not connected yet: a replica restarted during a backend outage
/// starts with its stored intermediate and this, which keeps trying to connect (with
/// backoff) and answers UNAVAILABLE to preparations until it has. The trust bundle is the
/// stored one until the backend's own takes over.
pub struct LazyUpstream {
    kind: &'static str,
    inner: std::sync::OnceLock<Arc<dyn UpstreamAuthority>>,
    bundle: watch::Sender<SharedBundle>,
    last_error: Mutex<String>,
    _stop: DropGuard,
}

impl LazyUpstream {
    pub fn start(
        kind: &'static str,
        stored: TrustBundle,
        first_error: String,
        connect: UpstreamConnect,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(Arc::new(stored));
        let stop = CancellationToken::new();
        let me = Arc::new(Self {
            kind,
            inner: std::sync::OnceLock::new(),
            bundle: tx,
            last_error: Mutex::new(first_error),
            _stop: stop.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                let delay =
                    remote::backoff(attempt, Duration::from_secs(1), Duration::from_secs(60));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                attempt += 1;
                match connect().await.map_err(|e| remote::error_chain(&e)) {
                    Ok(up) => {
                        let Some(me) = weak.upgrade() else { return };
                        tracing::info!(
                            backend = kind,
                            attempts = attempt,
                            "connected to the backend"
                        );
                        let mut rx = up.trust_bundle();
                        let _ = me.inner.set(up);
                        drop(me);
                        // From now on the backend's bundle is the bundle.
                        loop {
                            let current = rx.borrow_and_update().clone();
                            match weak.upgrade() {
                                Some(me) => {
                                    me.bundle.send_replace(current);
                                }
                                None => return,
                            }
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                r = rx.changed() => if r.is_err() { return },
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(backend = kind, error = %e, attempts = attempt, "backend still unreachable; signing with the stored intermediate CA");
                        match weak.upgrade() {
                            Some(me) => {
                                *me.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e
                            }
                            None => return,
                        }
                    }
                }
            }
        });
        me
    }
}

impl Authority for LazyUpstream {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.bundle.subscribe()
    }
    fn signing_roots(&self) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
        self.inner.get().and_then(|up| up.signing_roots())
    }
    fn health(&self) -> Health {
        match self.inner.get() {
            Some(up) => up.health(),
            None => Health::NotReady("not connected to the backend yet".into()),
        }
    }
}

#[async_trait]
impl UpstreamAuthority for LazyUpstream {
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        match self.inner.get() {
            Some(up) => up.sign_intermediate(req).await,
            None => Err(SignError::Unavailable(format!(
                "not connected to the backend yet: {}",
                self.last_error.lock().unwrap_or_else(|p| p.into_inner())
            ))),
        }
    }

    fn can_choose_root(&self) -> bool {
        self.inner.get().is_some_and(|up| up.can_choose_root())
    }
}

/// Connects to the upstream of intermediate mode (again, if the first try fails).
pub type UpstreamConnect = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<Arc<dyn UpstreamAuthority>, BuildError>>
        + Send
        + Sync,
>;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::backend::intermediate::test_support::{StubUpstream, eventually, new_root};
    use crate::pki::{self, KeyType};

    fn request() -> IntermediateRequest {
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        IntermediateRequest {
            csr_der: Vec::new(),
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            common_name: "istio-ca-bridge test".into(),
            ttl: Duration::from_secs(3600),
            path_len_zero: true,
            under_root: None,
        }
    }

    #[tokio::test]
    async fn a_lazy_upstream_is_unavailable_until_connected_then_is_the_backend() {
        let (_, stored) = new_root("stored root");
        let backend = StubUpstream::new();
        let attempts = Arc::new(AtomicU32::new(0));
        let connect: UpstreamConnect = {
            let (backend, attempts) = (backend.clone(), attempts.clone());
            Arc::new(move || {
                let backend = backend.clone();
                let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    if n < 2 {
                        Err(BuildError::new("stub", "still down"))
                    } else {
                        Ok(backend as Arc<dyn UpstreamAuthority>)
                    }
                })
            })
        };
        let lazy = LazyUpstream::start("stub", stored.clone(), "down at start".into(), connect);
        // Before connecting: the stored bundle, not ready, and preparations are told why.
        assert_eq!(lazy.trust_bundle().borrow().roots(), stored.roots());
        assert!(matches!(lazy.health(), Health::NotReady(_)));
        let e = lazy.sign_intermediate(&request()).await.unwrap_err();
        assert!(
            matches!(&e, SignError::Unavailable(m) if m.contains("down at start")),
            "{e}"
        );
        eventually("the failed retry is the reason now", || {
            lazy.last_error.lock().unwrap().contains("stub: still down")
        })
        .await;
        // Connected: the backend's health, bundle (and its later changes) and signatures.
        eventually("connected", || lazy.health() == Health::Ready).await;
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            2,
            "no retries once connected"
        );
        eventually("the backend's bundle", || {
            lazy.trust_bundle().borrow().roots() == backend.trust_bundle().borrow().roots()
        })
        .await;
        let rotated = backend.rotate_root();
        eventually("the backend's new bundle", || {
            lazy.trust_bundle().borrow().roots() == rotated.roots()
        })
        .await;
        lazy.sign_intermediate(&request())
            .await
            .expect("signed by the backend");
    }
}
