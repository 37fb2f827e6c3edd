//! Prometheus metrics.
//!
//! Two families: istiod's `citadel_server_*` series with istiod's exact names and meanings
//! (so the dashboards and alerts Istio users already have keep working; these names
//! predate Prometheus' `_total` convention and promtool's linter flags them, which we
//! accept for compatibility), and our own `istio_ca_bridge_*` series following current
//! conventions. Labels are low-cardinality only: never identities.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    // istiod-compatible series.
    pub csr_count: IntCounter,
    pub authn_failures: IntCounter,
    pub tarpitted: IntCounter,
    pub csr_sign_errors: IntCounterVec,
    pub success_issuance: IntCounter,
    pub citadel_root_expiry: Gauge,
    pub citadel_chain_expiry: Gauge,
    // Our own.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// `requests{result="success",code="OK"}` and `request_duration{result="success"}`,
    /// looked up once: every issued certificate touches them.
    pub requests_ok: IntCounter,
    pub request_duration_ok: Histogram,
    pub in_flight: IntGauge,
    pub authn_failure_reasons: IntCounterVec,
    pub backend_sign_duration: HistogramVec,
    pub issued: IntCounterVec,
    pub backend_ttl_capped: IntCounterVec,
    pub backend_refused_answers: IntCounterVec,
    pub backend_logins: IntCounterVec,
    pub backend_token_renewals: IntCounterVec,
    pub root_expiry: Gauge,
    pub trust_bundle_roots: IntGauge,
    pub signing_ca_expiry: GaugeVec,
    pub serving_cert_expiry: Gauge,
    pub serving_cert_rotations: IntCounter,
    pub serving_cert_errors: IntCounter,
    pub token_reviews: IntCounterVec,
    pub token_review_cache_hits: IntCounterVec,
    pub token_prechecks: IntCounterVec,
    pub kubernetes_leader: IntGaugeVec,
    pub build_info: IntGaugeVec,
    // Remote backends (rate limits, quotas, what came back).
    pub backend_throttles: IntCounterVec,
    pub backend_rate_limit_wait: HistogramVec,
    pub backend_retries: IntCounterVec,
    pub backend_ttl_exceeded: IntCounterVec,
    // Intermediate mode.
    pub intermediate_expiry: GaugeVec,
    pub intermediate_preparations: IntCounterVec,
    pub intermediate_rotations: IntCounterVec,
    pub intermediate_successor_ready: IntGaugeVec,
    // Root rotation.
    pub rotation_phase: IntGauge,
    pub rotation_next_phase: Gauge,
    pub rotation_transitions: IntCounterVec,
    pub rotation_state_errors: IntCounterVec,
    // Audit log.
    pub audit_records: IntCounter,
    pub audit_write_errors: IntCounter,
}

/// Latency buckets from 0.5 ms to 30 s: local signing is sub-millisecond, remote
/// backends take seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new(istio_compat: bool) -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>, register: bool| {
            if register {
                registry.register(c).expect("metric names are unique");
            }
        };
        macro_rules! new {
            ($ty:ty, $opts:expr, $compat:expr) => {{
                let m = <$ty>::with_opts($opts).expect("valid metric");
                reg(Box::new(m.clone()), $compat);
                m
            }};
            ($ty:ty, $opts:expr, $labels:expr, $compat:expr) => {{
                let m = <$ty>::new($opts, $labels).expect("valid metric");
                reg(Box::new(m.clone()), $compat);
                m
            }};
        }
        let c = istio_compat;
        let requests = new!(
            IntCounterVec,
            Opts::new(
                "istio_ca_bridge_requests_total",
                "CreateCertificate calls by result and gRPC code."
            ),
            &["result", "code"],
            true
        );
        let request_duration = new!(
            HistogramVec,
            HistogramOpts::new(
                "istio_ca_bridge_request_duration_seconds",
                "CreateCertificate latency, from request to response."
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["result"],
            true
        );
        let me = Self {
            requests_ok: requests.with_label_values(&["success", "OK"]),
            request_duration_ok: request_duration.with_label_values(&["success"]),
            requests,
            request_duration,
            csr_count: new!(
                IntCounter,
                Opts::new(
                    "citadel_server_csr_count",
                    "The number of CSRs received by the CA server."
                ),
                c
            ),
            authn_failures: new!(
                IntCounter,
                Opts::new(
                    "citadel_server_authentication_failure_count",
                    "The number of authentication failures."
                ),
                c
            ),
            tarpitted: new!(
                IntCounter,
                Opts::new(
                    "istio_ca_bridge_authn_failures_delayed_total",
                    "Authentication failures answered late because their connection had used up its failure budget (a client failing in a loop)."
                ),
                true
            ),
            csr_sign_errors: new!(
                IntCounterVec,
                Opts::new(
                    "citadel_server_csr_sign_err_count",
                    "The number of errors occurred when signing the CSR."
                ),
                &["error"],
                c
            ),
            success_issuance: new!(
                IntCounter,
                Opts::new(
                    "citadel_server_success_cert_issuance_count",
                    "The number of certificates issuances that have succeeded."
                ),
                c
            ),
            citadel_root_expiry: new!(
                Gauge,
                Opts::new(
                    "citadel_server_root_cert_expiry_timestamp",
                    "The unix timestamp, in seconds, when the CA root cert will expire."
                ),
                c
            ),
            citadel_chain_expiry: new!(
                Gauge,
                Opts::new(
                    "citadel_server_cert_chain_expiry_timestamp",
                    "The unix timestamp, in seconds, when the CA cert chain will expire."
                ),
                c
            ),
            in_flight: new!(
                IntGauge,
                Opts::new(
                    "istio_ca_bridge_requests_in_flight",
                    "CreateCertificate calls being handled."
                ),
                true
            ),
            authn_failure_reasons: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_authentication_failures_total",
                    "Rejected callers by reason."
                ),
                &["reason"],
                true
            ),
            backend_sign_duration: new!(
                HistogramVec,
                HistogramOpts::new(
                    "istio_ca_bridge_backend_sign_duration_seconds",
                    "Time the backend took to sign, by backend and result."
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["backend", "result"],
                true
            ),
            issued: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_certificates_issued_total",
                    "Certificates issued, by backend and kind (workload or serving)."
                ),
                &["backend", "kind"],
                true
            ),
            backend_ttl_capped: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_ttl_capped_total",
                    "Certificates the backend issued with a shorter lifetime than requested (e.g. a Vault role's max_ttl)."
                ),
                &["backend"],
                true
            ),
            backend_refused_answers: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_refused_answers_total",
                    "Certificates a backend issued that the bridge refused to hand out (wrong key, names or profile, untrusted chain), by reason."
                ),
                &["backend", "reason"],
                true
            ),
            backend_logins: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_logins_total",
                    "Logins of the bridge to its backend (e.g. Vault auth methods), by result."
                ),
                &["backend", "result"],
                true
            ),
            backend_token_renewals: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_token_renewals_total",
                    "Renewals of the bridge's backend token, by result."
                ),
                &["backend", "result"],
                true
            ),
            root_expiry: new!(
                Gauge,
                Opts::new(
                    "istio_ca_bridge_root_cert_expiry_timestamp_seconds",
                    "NotAfter of the earliest-expiring root in the trust bundle."
                ),
                true
            ),
            trust_bundle_roots: new!(
                IntGauge,
                Opts::new(
                    "istio_ca_bridge_trust_bundle_roots",
                    "Number of roots in the trust bundle."
                ),
                true
            ),
            signing_ca_expiry: new!(
                GaugeVec,
                Opts::new(
                    "istio_ca_bridge_signing_ca_expiry_timestamp_seconds",
                    "NotAfter of the CA certificate that signs workload certificates."
                ),
                &["backend"],
                true
            ),
            serving_cert_expiry: new!(
                Gauge,
                Opts::new(
                    "istio_ca_bridge_serving_cert_expiry_timestamp_seconds",
                    "NotAfter of the gRPC serving certificate."
                ),
                true
            ),
            serving_cert_rotations: new!(
                IntCounter,
                Opts::new(
                    "istio_ca_bridge_serving_cert_rotations_total",
                    "Serving certificates installed (issued or reloaded)."
                ),
                true
            ),
            serving_cert_errors: new!(
                IntCounter,
                Opts::new(
                    "istio_ca_bridge_serving_cert_errors_total",
                    "Failed attempts to issue or reload the serving certificate."
                ),
                true
            ),
            token_reviews: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_token_reviews_total",
                    "Kubernetes TokenReviews sent, by cluster and result (authenticated, refused, error)."
                ),
                &["cluster", "result"],
                true
            ),
            token_review_cache_hits: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_token_review_cache_hits_total",
                    "Bearer tokens answered from the TokenReview cache, by cluster."
                ),
                &["cluster"],
                true
            ),
            token_prechecks: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_token_signature_checks_total",
                    "Service-account tokens checked against the cluster's issuer keys before a TokenReview, by cluster and result (verified, bad_signature, unknown_key: refused without a review; keys_unavailable: reviewed in the reduced lane)."
                ),
                &["cluster", "result"],
                true
            ),
            kubernetes_leader: new!(
                IntGaugeVec,
                Opts::new(
                    "istio_ca_bridge_kubernetes_leader",
                    "1 while this replica holds the cluster's Lease (writes root ConfigMaps and istiod-tls)."
                ),
                &["cluster"],
                true
            ),
            rotation_phase: new!(
                IntGauge,
                Opts::new(
                    "istio_ca_bridge_root_rotation_phase",
                    "Phase of the root rotation as this replica applies it: 0 idle, 1 publishing (old + new root trusted, old signs), 2 signingNew (new signs), 3 retiring (new root alone trusted), 4 done."
                ),
                true
            ),
            rotation_next_phase: new!(
                Gauge,
                Opts::new(
                    "istio_ca_bridge_root_rotation_next_phase_timestamp_seconds",
                    "Earliest time the rotation's next phase is safe (unix seconds); 0 when no rotation is in progress."
                ),
                true
            ),
            rotation_transitions: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_root_rotation_transitions_total",
                    "Rotation phase changes this replica wrote, by target phase and action (start, advance, auto, abort)."
                ),
                &["to", "action"],
                true
            ),
            rotation_state_errors: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_root_rotation_state_errors_total",
                    "Failures reading or writing the shared CA state (operation read or write); the replica keeps its last good state."
                ),
                &["operation"],
                true
            ),
            build_info: new!(
                IntGaugeVec,
                Opts::new("istio_ca_bridge_build_info", "Build information; always 1."),
                &["version"],
                true
            ),
            backend_throttles: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_throttles_total",
                    "Throttled backend calls: source=remote for the backend's own throttling \
                     answers, source=local for calls refused by the client-side rate limit."
                ),
                &["backend", "source"],
                true
            ),
            backend_rate_limit_wait: new!(
                HistogramVec,
                HistogramOpts::new(
                    "istio_ca_bridge_backend_rate_limit_wait_seconds",
                    "Time a backend call waited for the client-side rate limit."
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["backend"],
                true
            ),
            backend_retries: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_retries_total",
                    "Backend calls repeated within one request, by reason \
                     (throttled, transient, in_progress)."
                ),
                &["backend", "reason"],
                true
            ),
            backend_ttl_exceeded: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_backend_ttl_exceeded_total",
                    "Certificates the backend issued with a longer lifetime than requested \
                     (accepted, see the backend docs)."
                ),
                &["backend"],
                true
            ),
            intermediate_expiry: new!(
                GaugeVec,
                Opts::new(
                    "istio_ca_bridge_intermediate_expiry_timestamp_seconds",
                    "Intermediate mode: NotAfter of the bridge's intermediate CA that signs now."
                ),
                &["backend"],
                true
            ),
            intermediate_preparations: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_intermediate_preparations_total",
                    "Intermediate mode: attempts to have the backend sign the next intermediate \
                     CA, by result (success, failure)."
                ),
                &["backend", "result"],
                true
            ),
            intermediate_rotations: new!(
                IntCounterVec,
                Opts::new(
                    "istio_ca_bridge_intermediate_rotations_total",
                    "Intermediate mode: switches of the signing intermediate to its successor."
                ),
                &["backend"],
                true
            ),
            intermediate_successor_ready: new!(
                IntGaugeVec,
                Opts::new(
                    "istio_ca_bridge_intermediate_successor_ready",
                    "Intermediate mode: 1 while the next intermediate is prepared and waits to take over."
                ),
                &["backend"],
                true
            ),
            audit_records: new!(
                IntCounter,
                Opts::new(
                    "istio_ca_bridge_audit_records_total",
                    "Audit records written (one per issued certificate)."
                ),
                true
            ),
            audit_write_errors: new!(
                IntCounter,
                Opts::new(
                    "istio_ca_bridge_audit_write_errors_total",
                    "Failed writes to the audit log (the records of that batch are lost)."
                ),
                true
            ),
            registry,
        };
        me.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        me
    }

    /// Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let enc = prometheus::TextEncoder::new();
        enc.encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding error: {e}\n"))
    }

    /// Updates the trust-bundle gauges.
    /// The rotation gauges for `r`: its phase, and when the next one is safe (0: none).
    pub fn observe_rotation(&self, r: &crate::rotation::RotationState) {
        self.rotation_phase.set(r.phase.number());
        self.rotation_next_phase
            .set(r.next_after.filter(|_| r.in_progress()).unwrap_or(0) as f64);
    }

    /// Counts a transition this replica wrote, and logs it.
    pub fn count_transition(&self, t: &crate::rotation::Transition) {
        self.rotation_transitions
            .with_label_values(&[t.to.as_str(), t.action.as_str()])
            .inc();
        tracing::warn!(from = %t.from, to = %t.to, action = %t.action, forced = t.forced, "root rotation: phase changed");
    }

    pub fn observe_bundle(&self, bundle: &crate::trust::TrustBundle) {
        let t = bundle.earliest_expiry() as f64;
        self.root_expiry.set(t);
        self.citadel_root_expiry.set(t);
        self.trust_bundle_roots.set(bundle.roots().len() as i64);
    }
}
