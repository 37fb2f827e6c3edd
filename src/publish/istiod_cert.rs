//! istiod's serving certificate as the `kubernetes.io/tls` Secret `istiod-tls`
//! (`tls.crt` leaf + intermediates, `tls.key`, `ca.crt` = the trust bundle), which istiod
//! needs when its own CA is off (protocol doc section 9). Issued by the bridge's backend
//! for `istiod.<ns>.svc` (and revision names), like the bridge's own serving certificate.
//!
//! Run only by the cluster's Lease holder. At start the existing Secret is kept if it
//! still verifies against the current trust bundle, names the configured DNS names and is
//! not due for renewal; otherwise (and when `renewBefore` is reached, or the trust bundle
//! changes) a new key and certificate are issued and server-side-applied. The private key
//! never appears in a log.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

use crate::backend::Signer;
use crate::config::IstiodCertConfig;
use crate::pki;
use crate::trust::TrustBundle;
use crate::trust::verify_path;

const FIELD_MANAGER: &str = "istio-ca-bridge";
/// Even when nothing is due, the Secret is re-checked this often.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The Secret's PEM contents.
struct Material {
    cert_chain: String,
    key: String,
    ca: String,
    not_after: i64,
}

fn unix_now() -> i64 {
    pki::unix_secs(SystemTime::now())
}

/// Checks a `tls.crt` against what we would issue; returns its (NotBefore, NotAfter) if it can stay.
fn still_good(
    secret: &Secret,
    names: &[String],
    bundle: &TrustBundle,
    renew_before: Duration,
) -> Result<(i64, i64), String> {
    let data = secret.data.as_ref().ok_or("no data")?;
    let crt = data.get("tls.crt").ok_or("no tls.crt")?;
    if data.get("tls.key").is_none() {
        return Err("no tls.key".into());
    }
    let ca = data.get("ca.crt").ok_or("no ca.crt")?;
    if ca.0 != bundle.pem().as_bytes() {
        return Err("ca.crt is not the current trust bundle".into());
    }
    let certs = pki::parse_certs_pem(&crt.0).map_err(|e| e.to_string())?;
    let info = pki::cert_info(&certs[0]).map_err(|e| e.to_string())?;
    let mut have = info.dns_sans.clone();
    let mut want = names.to_vec();
    have.sort();
    want.sort();
    if have != want {
        return Err(format!("names {have:?} differ from {want:?}"));
    }
    verify_path(
        &certs[0],
        &certs[1..],
        bundle,
        webpki::KeyUsage::server_auth(),
        SystemTime::now(),
    )?;
    if pki::renew_at(info.not_before, info.not_after, renew_before) <= unix_now() {
        return Err("due for renewal".into());
    }
    Ok((info.not_before, info.not_after))
}

async fn issue(signer: &dyn Signer, names: &[String], ttl: Duration) -> Result<Material, String> {
    let c = crate::server::serving::issue_server_cert(signer, names, ttl)
        .await
        .map_err(|e| e.to_string())?;
    let mut cert_chain = pki::cert_pem(&c.leaf);
    for i in &c.intermediates {
        cert_chain.push_str(&pki::cert_pem(i));
    }
    Ok(Material {
        cert_chain,
        key: c.key.serialize_pem(),
        ca: c.bundle.pem().to_string(),
        not_after: c.not_after,
    })
}

async fn apply(api: &Api<Secret>, cfg: &IstiodCertConfig, m: &Material) -> Result<(), String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": cfg.secret_name,
            "namespace": cfg.namespace,
            "labels": {"app.kubernetes.io/managed-by": "istio-ca-bridge"},
        },
        "data": {
            "tls.crt": b64(&m.cert_chain),
            "tls.key": b64(&m.key),
            "ca.crt": b64(&m.ca),
        },
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&secret);
    let call = api.patch(&cfg.secret_name, &params, &patch);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// While leading: keep the Secret valid and current.
pub async fn maintain(
    client: kube::Client,
    cluster: String,
    cfg: IstiodCertConfig,
    signer: Arc<dyn Signer>,
    stop: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &cfg.namespace);
    let names = cfg.effective_dns_names();
    let mut bundle_rx = signer.trust_bundle();
    let secret = format!("{}/{}", cfg.namespace, cfg.secret_name);
    // (issued, NotAfter) of what the Secret holds, if it can stay.
    let mut current: Option<(i64, i64)> = None;
    let mut checked = false;
    let mut failures: u32 = 0;
    loop {
        if !checked {
            let bundle = bundle_rx.borrow_and_update().clone();
            match tokio::time::timeout(Duration::from_secs(10), api.get_opt(&cfg.secret_name)).await
            {
                Ok(Ok(Some(s))) => match still_good(&s, &names, &bundle, cfg.renew_before) {
                    Ok(life) => {
                        tracing::info!(cluster = %cluster, secret = %secret, "existing istiod certificate kept");
                        current = Some(life);
                    }
                    Err(why) => {
                        tracing::info!(cluster = %cluster, secret = %secret, reason = %why, "istiod certificate will be replaced");
                    }
                },
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(cluster = %cluster, secret = %secret, error = %e, "reading the istiod Secret failed; issuing")
                }
                Err(_) => {
                    tracing::warn!(cluster = %cluster, secret = %secret, "reading the istiod Secret timed out; issuing")
                }
            }
            checked = true;
        }
        let due = current.map(|(at, na)| pki::renew_at(at, na, cfg.renew_before));
        if due.is_none_or(|d| d <= unix_now()) {
            let result = match issue(signer.as_ref(), &names, cfg.ttl).await {
                Ok(m) => apply(&api, &cfg, &m)
                    .await
                    .map(|()| (unix_now(), m.not_after)),
                Err(e) => Err(format!("issuing: {e}")),
            };
            match result {
                Ok((at, na)) => {
                    tracing::info!(cluster = %cluster, secret = %secret, not_after = na, dns = ?names, "istiod certificate written");
                    current = Some((at, na));
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(cluster = %cluster, secret = %secret, error = %e, "writing the istiod certificate failed; will retry");
                }
            }
        }
        let wait = if failures > 0 {
            Duration::from_secs(1 << failures.min(5)).min(MAX_SLEEP)
        } else {
            let left = current
                .map(|(at, na)| pki::renew_at(at, na, cfg.renew_before) - unix_now())
                .unwrap_or(0)
                .max(1) as u64;
            Duration::from_secs(left).min(MAX_SLEEP)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = bundle_rx.changed() => {
                if r.is_err() {
                    return;
                }
                tracing::info!(cluster = %cluster, secret = %secret, "trust bundle changed; re-issuing the istiod certificate");
                current = None;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
