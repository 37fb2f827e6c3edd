//! The admin port, checked from outside: the real `/metrics` text of a bridge that has
//! served successful and failed requests passes Prometheus' own linter (`promtool check
//! metrics`) except for istiod's historical `citadel_server_*` names, carries every
//! documented series and no identity labels; `/healthz`, `/readyz` and `/config` answer.

use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pki::CsrShape;
use istio_ca_bridge::testing::*;
use tonic::Code;

/// A namespace and service account that must never show up in metrics.
const NS: &str = "metrics-probe-ns";
const SA: &str = "metrics-probe-sa";

/// The only two lint messages istiod's names may draw (counters without `_total`, and
/// `*_count` counters that are not histograms/summaries).
const ACCEPTED_LINTS: [&str; 2] = [
    "counter metrics should have \"_total\" suffix",
    "non-histogram and non-summary metrics should not have \"_count\" suffix",
];

/// Starts a bridge and has it serve one success, one authentication failure and one
/// invalid CSR, so that labelled series (result/code, reason, error) exist.
async fn exercised_bridge(edit: impl FnOnce(&mut istio_ca_bridge::config::Config)) -> Bridge {
    let b = Bridge::start_with(edit).await;
    let mut client = b.client().await;
    let token = b.issuer.token(NS, SA);
    let (_, csr) = csr_for(&spiffe(NS, SA), KeyType::EcdsaP256, CsrShape::IstioAgent);
    call(&mut client, request(csr.clone(), Some(&token), 86400))
        .await
        .expect("a valid request succeeds");
    let e = call(&mut client, request(csr, None, 86400))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = call(
        &mut client,
        request("not a CSR\n".into(), Some(&token), 86400),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(b.issued(), 1);
    b
}

async fn metrics_text(b: &Bridge) -> String {
    let (status, body) = b.admin_get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_flags_only_istiod_compatible_names() {
    let b = exercised_bridge(|_| {}).await;
    let text = metrics_text(&b).await;
    let (code, lines) = promtool(&text).await;
    let report = format!(
        "promtool exit code {code:?}, output:\n{}\n--- /metrics ---\n{text}",
        lines.join("\n")
    );
    assert!(
        matches!(code, Some(0) | Some(3)),
        "promtool failed: {report}"
    );
    for line in &lines {
        let accepted = line.starts_with("citadel_server_")
            && ACCEPTED_LINTS.iter().any(|m| line.ends_with(m))
            && line.split_whitespace().next().is_some_and(|name| {
                // The flagged name is one of istiod's series actually exported.
                text.contains(&format!("# TYPE {name} "))
            });
        assert!(accepted, "unexpected promtool finding {line:?}: {report}");
    }
    // The compatibility names are exported, so the linter does have something to say
    // (exit 3 = lint problems only); everything it says is about them.
    assert_eq!(code, Some(3), "{report}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("citadel_server_success_cert_issuance_count ")),
        "{report}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_is_silent_without_istio_compat_names() {
    let b = exercised_bridge(|cfg| cfg.metrics.istio_compat = false).await;
    let text = metrics_text(&b).await;
    assert!(!text.contains("citadel_server_"), "{text}");
    assert!(text.contains("istio_ca_bridge_requests_total{"), "{text}");
    let (code, lines) = promtool(&text).await;
    assert_eq!(
        (code, lines.as_slice()),
        (Some(0), &[] as &[String]),
        "promtool must accept our own series without findings:\n{}\n--- /metrics ---\n{text}",
        lines.join("\n")
    );
    b.shutdown().await.unwrap();
}

/// Sample lines (`name{labels} value`) of the exposition, without comments.
fn samples(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect()
}

/// The value of the unlabelled sample `name`.
fn value(text: &str, name: &str) -> f64 {
    samples(text)
        .iter()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name}:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_documented_series_and_no_identity_labels() {
    let b = exercised_bridge(|_| {}).await;
    let text = metrics_text(&b).await;
    let expected = [
        // istiod's names, exactly.
        "citadel_server_csr_count ",
        "citadel_server_authentication_failure_count ",
        "citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"} ",
        "citadel_server_success_cert_issuance_count ",
        "citadel_server_root_cert_expiry_timestamp ",
        "citadel_server_cert_chain_expiry_timestamp ",
        // Ours.
        "istio_ca_bridge_requests_total{",
        "istio_ca_bridge_request_duration_seconds_bucket{",
        "istio_ca_bridge_request_duration_seconds_sum{",
        "istio_ca_bridge_request_duration_seconds_count{",
        "istio_ca_bridge_requests_in_flight ",
        "istio_ca_bridge_authentication_failures_total{",
        "istio_ca_bridge_backend_sign_duration_seconds_bucket{backend=\"local\"",
        "istio_ca_bridge_certificates_issued_total{",
        "istio_ca_bridge_root_cert_expiry_timestamp_seconds ",
        "istio_ca_bridge_trust_bundle_roots ",
        "istio_ca_bridge_signing_ca_expiry_timestamp_seconds{",
        "istio_ca_bridge_serving_cert_expiry_timestamp_seconds ",
        "istio_ca_bridge_serving_cert_rotations_total ",
        "istio_ca_bridge_serving_cert_errors_total ",
        "istio_ca_bridge_build_info{",
    ];
    let lines = samples(&text);
    for prefix in expected {
        assert!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "no series starting with {prefix:?}:\n{text}"
        );
    }
    // Counts follow what was served: 3 calls, 1 success, 1 authn failure.
    assert_eq!(value(&text, "citadel_server_csr_count"), 3.0);
    assert_eq!(
        value(&text, "citadel_server_success_cert_issuance_count"),
        1.0
    );
    assert_eq!(
        value(&text, "citadel_server_authentication_failure_count"),
        1.0
    );
    assert_eq!(value(&text, "istio_ca_bridge_requests_in_flight"), 0.0);
    assert_eq!(value(&text, "istio_ca_bridge_trust_bundle_roots"), 1.0);
    // Expiry gauges are real timestamps in the future.
    let now = now() as f64;
    for g in [
        "citadel_server_root_cert_expiry_timestamp",
        "citadel_server_cert_chain_expiry_timestamp",
        "istio_ca_bridge_root_cert_expiry_timestamp_seconds",
        "istio_ca_bridge_serving_cert_expiry_timestamp_seconds",
    ] {
        assert!(value(&text, g) > now, "{g} not in the future:\n{text}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("istio_ca_bridge_requests_total{")
                && l.contains("result=\"success\"")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("istio_ca_bridge_requests_total{")
                && l.contains("result=\"error\"")),
        "{text}"
    );

    // No identity anywhere: not as a label value, not in any other form.
    for l in &lines {
        if let (Some(open), Some(close)) = (l.find('{'), l.rfind('}')) {
            let labels = &l[open + 1..close];
            assert!(!labels.contains("spiffe://"), "identity label: {l}");
        }
    }
    for needle in ["spiffe://", NS, SA, "system:serviceaccount"] {
        assert!(
            !text.contains(needle),
            "/metrics mentions {needle:?}:\n{text}"
        );
    }
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_readiness_and_config_endpoints() {
    let b = Bridge::start().await;
    let (status, body) = b.admin_get("/healthz").await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = b.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "ready");

    let (status, body) = b.admin_get("/config").await;
    assert_eq!(status, 200, "{body}");
    let cfg: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/config is not JSON ({e}): {body}"));
    assert_eq!(cfg["trustDomain"], TD, "{body}");

    let (status, _) = b.admin_get("/no-such-page").await;
    assert_eq!(status, 404);
    b.shutdown().await.unwrap();

    // `admin.configAccess: off` hides it even from loopback (the default, `loopback`, is
    // what served it above; other peers are refused, see the admin module's unit test).
    let b =
        Bridge::start_with(|c| c.admin.config_access = istio_ca_bridge::config::ConfigAccess::Off)
            .await;
    let (status, body) = b.admin_get("/config").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin.configAccess"), "{body}");
    let (status, _) = b.admin_get("/healthz").await;
    assert_eq!(status, 200);
    b.shutdown().await.unwrap();
}
