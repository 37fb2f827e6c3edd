//! The test suite's fake Kubernetes API server (`istio_ca_bridge::testing::fake_kube`) as a
//! process of its own, for benchmarks that run the release bridge against it
//! (`scripts/bench_tokens.py`, `scripts/bench_scale.py`) and for the Helm chart's live run
//! of its Kubernetes installs (`tests/helm/check_chart.py live`). Built only with the
//! `testing` feature.
//!
//! It writes into `--dir`:
//! - `kubeconfig`: for the bridge's `authn.kubernetes.clusters[].kubeconfig`;
//! - `real-tokens`: `--real` service-account tokens of `default/web`, signed by the cluster
//!   key and registered as valid (one per line);
//! - `junk-tokens`: `--junk` JWT-shaped tokens with the cluster key's `kid`, plausible claims
//!   and random signatures, which the fake does not know (one per line);
//! - `ztunnel-token`: with `--nodes`, the token of `istio-system/ztunnel`, bound to its pod
//!   `ztunnel-0` on `node-0` (a node agent that may ask for the identity of pods there);
//! - `ready`, last, once it serves.
//!
//! Control port (`127.0.0.1:<--control-port>`), plain HTTP:
//! - `GET /counts`: the requests seen per endpoint, as JSON (`tokenreviews`, `jwks`,
//!   `configmaps.apply`, `namespaces.list`, ...; see `FakeKube::count`);
//! - `GET /configmaps-holding?name=N&text=T`: how many ConfigMaps named N have a data value
//!   containing T (have the root ConfigMaps converged on a root?).
//!
//! It runs until killed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::Query;
use clap::Parser;
use istio_ca_bridge::testing::fake_kube::{CLUSTER_KID, FakeKube, junk_sa_jwt, pod_json, sa_jwt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    control_port: u16,
    #[arg(long, default_value_t = 1)]
    real: usize,
    #[arg(long, default_value_t = 600)]
    junk: usize,
    /// Each TokenReview is answered after this long (an API server's latency).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    review_latency: Duration,
    /// Namespaces that exist from the start (repeatable); the bridge writes root ConfigMaps
    /// and `istiod-tls` only into existing ones.
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Also the namespaces `ns-0` .. `ns-<N-1>`.
    #[arg(long = "namespaces", default_value_t = 0)]
    namespace_count: usize,
    /// Nodes `node-0` .. `node-<N-1>`, each with a running ztunnel pod
    /// (`istio-system/ztunnel-<n>`, service account `ztunnel`).
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// Running workload pods `pod-<i>` in `ns-<i % 100>`, service account `sa-<i % 1000>`,
    /// on `node-<i % --nodes>` (so `ns-0/sa-0` runs on `node-0`).
    #[arg(long, default_value_t = 0, requires = "nodes")]
    pods: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let fake = std::sync::Arc::new(FakeKube::start_new().await);
    fake.set_review_delay(args.review_latency);
    for ns in &args.namespaces {
        fake.put_namespace(ns);
    }
    for i in 0..args.namespace_count {
        fake.put_namespace(&format!("ns-{i}"));
    }
    for n in 0..args.nodes {
        let (name, uid) = (format!("ztunnel-{n}"), format!("uid-ztunnel-{n}"));
        let node = format!("node-{n}");
        fake.put_pod(pod_json(
            "istio-system",
            &name,
            &uid,
            "ztunnel",
            &node,
            "Running",
        ));
    }
    for i in 0..args.pods {
        fake.put_pod(pod_json(
            &format!("ns-{}", i % 100),
            &format!("pod-{i}"),
            &format!("uid-pod-{i}"),
            &format!("sa-{}", i % 1000),
            &format!("node-{}", i % args.nodes.max(1)),
            "Running",
        ));
    }
    if args.nodes > 0 {
        let t = sa_jwt("istio-system", "ztunnel", "ztunnel-0");
        fake.sa_token(
            &t,
            "istio-system",
            "ztunnel",
            Some(("ztunnel-0", "uid-ztunnel-0")),
        );
        std::fs::write(args.dir.join("ztunnel-token"), t + "\n")?;
    }
    fake.write_kubeconfig(&args.dir.join("kubeconfig"), "Kubernetes");
    let mut real = String::new();
    for i in 0..args.real {
        let t = sa_jwt("default", "web", &format!("real-{i}"));
        fake.sa_token(&t, "default", "web", None);
        real.push_str(&t);
        real.push('\n');
    }
    std::fs::write(args.dir.join("real-tokens"), real)?;
    let junk: Vec<String> = (0..args.junk)
        .map(|n| junk_sa_jwt(CLUSTER_KID, n))
        .collect();
    std::fs::write(args.dir.join("junk-tokens"), junk.join("\n") + "\n")?;

    let control = {
        let (f1, f2) = (fake.clone(), fake.clone());
        axum::Router::new()
            .route(
                "/counts",
                axum::routing::get(move || {
                    let fake = f1.clone();
                    async move {
                        let mut counts = serde_json::json!({"tokenreviews": 0, "jwks": 0});
                        for (k, v) in fake.counts() {
                            counts[k] = v.into();
                        }
                        counts.to_string()
                    }
                }),
            )
            .route(
                "/configmaps-holding",
                axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
                    let fake = f2.clone();
                    async move {
                        let (name, text) = (q.get("name"), q.get("text"));
                        let n = fake.configmaps_holding(
                            name.map_or("istio-ca-root-cert", String::as_str),
                            text.map_or("", String::as_str),
                        );
                        n.to_string()
                    }
                }),
            )
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.control_port)).await?;
    std::fs::write(args.dir.join("ready"), fake.addr.to_string())?;
    axum::serve(listener, control).await?;
    Ok(())
}
