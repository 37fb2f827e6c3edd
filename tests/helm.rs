//! The Helm chart (charts/istio-ca-bridge) checked with the real Helm v4 engine and the real
//! binary. The logic lives in tests/helm/check_chart.py (Helm's Go SDK through
//! helm-python-sdk); each test here runs one of its checks against this build's
//! `istio-ca-bridge`, so the chart and the binary cannot drift apart:
//!
//! - `lint`: `helm lint --strict` passes for the defaults and every file in the chart's `ci/`.
//! - `render`: every `ci/` file renders to YAML that parses, with the expected objects, and the
//!   rendered ConfigMap's config passes `istio-ca-bridge check-config`.
//! - `structure`: Service, container and probe ports equal the rendered config's listen ports;
//!   probe paths; terminationGracePeriodSeconds above shutdownGrace; hardened securityContext;
//!   selectors; every file the config reads comes from a read-only mount and every directory it
//!   writes (local state, intermediate state, audit log) from a writable one of its own, with no
//!   other writable volume; RBAC equals the API calls the binary's effective config makes (none
//!   without `kubernetes.enabled`), never a wildcard.
//! - `rbac`: per feature combination (TokenReview, impersonation, root ConfigMaps, istiod-tls,
//!   leader election, the Secret a generated local root is shared through, the
//!   ClusterTrustBundle and its signer, renamed objects) the exact grants, written out literally.
//! - `image`: the Deployment runs the Dockerfile's ENTRYPOINT as its USER with its EXPOSEd ports
//!   (the image itself is not built: no container runtime on the test machines).
//! - `failures`: unsafe values (several replicas each generating its own root, ...) fail
//!   rendering with a message naming the fix.
//! - `schema`: values.schema.json rejects wrong types naming the field, and knows exactly the
//!   config keys the binary knows, per backend type (`BACKEND_CONFIGS` in check_chart.py).
//! - `backends`: values.schema.json is the chart's one list of backend types (the enum of
//!   `config.backend.type`, one if/then branch and one `backends.<type>` block each): an unknown
//!   type is refused by the schema naming the field and the allowed types (and by the templates,
//!   from the `backends.<type>` keys, when the schema is skipped); intermediate mode is wired for
//!   exactly the branches that allow `mode`; no template names two types in one action.
//! - `alerts`: the PrometheusRule passes `promtool check rules` and `promtool test rules`.
//! - `live`: each `ci/` install that can run on this machine, and the chart's defaults, is run
//!   for real (its args, env and mounted files; the local backend: the others need the
//!   install's Vault, AWS account or DigiCert tenant): probes answer, a Kubernetes-shaped token
//!   gets a certificate over TLS to the Service's name, SIGTERM exits within the grace period,
//!   nothing is written outside the writable mounts (read-only root filesystem), the audit file
//!   has the workload's record, and every metric the alerts and dashboard use is exported (the
//!   intermediate-mode ones, which appear only with a Vault or AWS backend, are checked to be
//!   named in the binary instead). Kubernetes installs run every replica against the
//!   `fake-apiserver` binary standing in for the cluster (in-cluster credentials become its
//!   kubeconfig): for the defaults, both replicas sign with the one generated root in the shared
//!   Secret, report it in `rotate status`, and the Lease holder publishes it. The installs not
//!   run are named in the output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HELM_HINT: &str = "pip install helm-python-sdk==0.2.2";
/// Each check takes a few seconds; this only stops a hung run.
const LIMIT: Duration = Duration::from_secs(120);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn require_python_modules(modules: &str, hint: &str) {
    let out = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is required by this test ({e}): apt-get install -y python3")
        });
    assert!(
        out.status.success(),
        "python3 modules {modules} are required by this test but do not import: {hint}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs one check of tests/helm/check_chart.py; panics with its output unless it passes.
fn chart_check(check: &str) {
    require_python_modules("helm_python", HELM_HINT);
    let script: PathBuf = root().join("tests/helm/check_chart.py");
    let chart = root().join("charts/istio-ca-bridge");
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(check)
        .arg("--chart")
        .arg(&chart)
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_istio-ca-bridge"))
        // The test suite's fake Kubernetes API server (built with the `testing` feature, which
        // the dev-dependency on this crate enables), for `live`.
        .arg("--fake-apiserver")
        .arg(env!("CARGO_BIN_EXE_fake-apiserver"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn python3");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    // Helm logs each `fail` it evaluates at INFO; the failure tests evaluate them on purpose.
    let stderr: String = stderr
        .lines()
        .filter(|l| !l.contains("INFO funcMap fail"))
        .collect::<Vec<_>>()
        .join("\n");
    print!("{stdout}");
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("chart check `{check}` failed ({s}):\n{stdout}\n{stderr}"),
        None => {
            panic!("chart check `{check}` did not finish within {LIMIT:?}:\n{stdout}\n{stderr}")
        }
    }
}

#[test]
fn chart_lints_strictly_with_defaults_and_every_ci_values_file() {
    chart_check("lint");
}

#[test]
fn every_ci_values_file_renders_parseable_manifests_whose_config_the_binary_accepts() {
    chart_check("render");
}

#[test]
fn rendered_objects_agree_with_the_rendered_config_and_are_hardened() {
    chart_check("structure");
}

#[test]
fn rbac_grants_exactly_the_api_calls_of_each_feature_combination() {
    chart_check("rbac");
}

#[test]
fn chart_runs_the_dockerfiles_entrypoint_as_its_user() {
    chart_check("image");
}

#[test]
fn unsafe_values_fail_rendering_with_a_message_naming_the_fix() {
    chart_check("failures");
}

#[test]
fn values_schema_rejects_wrong_types_and_knows_exactly_the_binarys_config_keys() {
    chart_check("schema");
}

#[test]
fn backend_types_are_listed_only_in_the_values_schema() {
    chart_check("backends");
}

#[test]
fn prometheus_rules_pass_promtool_and_fire_on_synthetic_series() {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is required by this test: apt-get install -y prometheus"
    );
    chart_check("alerts");
}

#[test]
fn each_ci_install_runs_for_real_probes_issue_metrics_and_sigterm() {
    require_python_modules(
        "cryptography, grpc",
        "pip install -r tests/python/requirements.txt",
    );
    chart_check("live");
}
