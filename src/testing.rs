//! Test support for the integration tests in `tests/` (and the crate's own unit tests),
//! compiled once into the library behind the `testing` cargo feature instead of into every
//! test binary. The integration tests get it through the crate's dev-dependency on itself
//! with that feature; a release build never compiles it or its extra dependencies.
//!
//! Black-box by design: the bridge under test is the real one, started in-process on
//! 127.0.0.1:0, and everything goes through its real listeners.
//!
//! - [`bridge`]: a [`Bridge`] running in-process with the local CA in a temp dir.
//! - [`issuer`]: a JWT issuer under test control ([`TestIssuer`]).
//! - [`requests`]: Istio-shaped CSRs and CreateCertificate calls, TLS probes.
//! - [`tools`]: external tools (openssl, promtool, python) and subprocesses under a deadline.
//! - [`log_capture`]: the tracing output of a test binary, captured for assertions.
//! - [`tls_server`]: the one TLS accept loop behind the in-process fakes.
//! - [`fake_digicert`], [`fake_kube`]: fakes of DigiCert's REST API and the Kubernetes API.
//! - [`aws`], [`openbao`]: real upstreams (moto's acm-pca, OpenBao) started per test.
//! - [`conformance`]: the behaviours every backend must show, run against each one.
//! - [`fleet`]: simulated workloads that renew at half-life and shake hands (root rotation).
#![warn(missing_docs)]

pub mod aws;
pub mod bridge;
pub mod cm_issuer;
pub mod conformance;
pub mod fake_digicert;
pub mod fake_kube;
pub mod fleet;
pub mod issuer;
pub mod log_capture;
pub mod openbao;
pub mod requests;
pub mod tls_server;
pub mod tools;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use bridge::{Bridge, audit_records_at, metric, test_config};
pub use fake_kube::SigningKey;
pub use issuer::TestIssuer;
pub use log_capture::logs;
pub use requests::{ask, call, connect, csr_for, leaf_uri, request, serving_serial};
pub use tools::{
    PROMTOOL_HINT, ProcOutput, free_port, openssl, promtool, require_python_modules, require_tool,
    run_with_timeout,
};

/// The trust domain of every test bridge.
pub const TD: &str = "cluster.local";
/// The `iss` of the test JWT issuer every test bridge trusts.
pub const ISSUER: &str = "https://issuer.test";

/// The SPIFFE ID of service account `sa` in namespace `ns` in the test trust domain.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// Seconds since the epoch, for JWT claims.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Polls `f` every 100 ms until it returns true, failing the test after `limit` with
/// `what`: tests wait for background effects (watches, rotations) without fixed sleeps.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
