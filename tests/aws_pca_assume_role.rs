//! `backend.assumeRoleArn`: the AWS Private CA calls are signed with credentials from STS
//! AssumeRole (moto's STS, reached through the SDK's `AWS_ENDPOINT_URL_STS`), not with the
//! default-chain credentials. Its own binary: it sets a process-wide variable.

use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pki::CsrShape;
use istio_ca_bridge::testing::aws::*;
use istio_ca_bridge::testing::*;

/// Puts `testing::aws::TEST_ENV` (dummy credentials for the SDK's default chain) in the
/// environment, once. Here and not in the library: setting the environment is `unsafe`,
/// which the library forbids.
fn aws_test_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in TEST_ENV {
            // SAFETY (test-only): set once, before any AWS client exists, to constants.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_calls_use_the_assumed_role() {
    aws_test_env();
    let moto = Moto::start().await;
    // SAFETY (test-only): the only test of this binary, before any AWS client exists.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL_STS", &moto.url);
    }
    let (arn, _) = create_root_ca(&moto.url).await;
    let proxy = Proxy::start(&moto.url).await;
    let b = Bridge::start_with(|c| {
        aws_backend(c, &arn, &proxy.url, |a| {
            a.assume_role_arn = Some("arn:aws:iam::123456789012:role/istio-ca-bridge".into());
        })
    })
    .await;
    let mut client = b.client().await;
    let id = spiffe("default", "assumed");
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::Ztunnel);
    call(
        &mut client,
        request(csr, Some(&b.issuer.token("default", "assumed")), 3600),
    )
    .await
    .expect("issued with the assumed role");
    let keys = proxy.take_stats().access_keys;
    assert!(!keys.is_empty());
    assert!(
        !keys.contains("testing"),
        "the default-chain credentials signed a Private CA call: {keys:?}"
    );
    assert!(
        keys.iter().all(|k| k.starts_with("ASIA")),
        "STS session credentials expected: {keys:?}"
    );
    b.shutdown().await.unwrap();
}
