//! The fake's request handlers: the common gate (counting, slowness, 429 bursts,
//! authentication, forced 401/403), the CHECK of every request's shape against DigiCert's
//! documented API (headers `x-api-key`, `content-type` and `accept` JSON; `profile.id`,
//! `seat.seat_id`, a PEM CSR whose signature verifies and whose URI SAN matches the JSON,
//! `validity`, `delivery_format: x509`, `include_ca_chain: true`,
//! `attributes.extensions.san.uris == [spiffe id]`, no other top-level field), and the
//! signing of the leaf.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;
use x509_parser::prelude::*;

use super::{Inner, Mode, PROFILE, Pending, RetryAfter};

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"errors": [{"code": code, "message": message}]}),
    )
}

/// The common gate of every API call: counting, slowness, 429 bursts, authentication,
/// forced 401/403. `Some(response)` ends the call.
async fn gate(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    inner.stats.lock().unwrap().arrivals.push(Instant::now());
    let delay = *inner.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    {
        let mut t = inner.throttle.lock().unwrap();
        if t.0 > 0 {
            t.0 -= 1;
            inner.stats.lock().unwrap().throttled += 1;
            let mut resp = error(
                StatusCode::TOO_MANY_REQUESTS,
                "request_limit_exceeded",
                "Rate limit exceeded",
            );
            match t.1 {
                Some(RetryAfter::Seconds(s)) => {
                    resp.headers_mut()
                        .insert("retry-after", s.to_string().parse().unwrap());
                }
                Some(RetryAfter::Date(d)) => {
                    let at = httpdate::fmt_http_date(SystemTime::now() + d);
                    resp.headers_mut()
                        .insert("retry-after", at.parse().unwrap());
                }
                None => {}
            }
            return Some(resp);
        }
    }
    let want = inner.api_key.lock().unwrap().clone();
    let got = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if want.is_none() && got.is_some() {
        // mTLS: the client certificate is the credential; a key would be a leak.
        inner
            .stats
            .lock()
            .unwrap()
            .drifts
            .push("x-api-key sent on the mTLS host".into());
    }
    if let Some(w) = want
        && got != Some(w.as_str())
    {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Invalid API key",
        ));
    }
    match *inner.mode.lock().unwrap() {
        Mode::Unauthorized => {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Invalid API key",
            ));
        }
        Mode::Forbidden => {
            return Some(error(
                StatusCode::FORBIDDEN,
                "access_denied",
                "User does not have permission to use this profile",
            ));
        }
        _ => {}
    }
    None
}

fn drift(inner: &Inner, what: String) -> Response {
    inner.stats.lock().unwrap().drifts.push(what.clone());
    error(StatusCode::BAD_REQUEST, "invalid_input_field", &what)
}

fn check_json_headers(headers: &HeaderMap) -> Result<(), String> {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !h("content-type").starts_with("application/json") {
        return Err(format!("content-type {:?}", h("content-type")));
    }
    if h("accept") != "application/json" {
        return Err(format!("accept {:?}", h("accept")));
    }
    Ok(())
}

/// Checks an enrollment body; returns the CSR's SubjectPublicKeyInfo.
fn check_enrollment(body: &serde_json::Value) -> Result<Vec<u8>, String> {
    let obj = body.as_object().ok_or("body is not an object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    let want = [
        "attributes",
        "csr",
        "delivery_format",
        "include_ca_chain",
        "profile",
        "seat",
        "validity",
    ];
    if keys != want {
        return Err(format!("top-level fields {keys:?}, expected {want:?}"));
    }
    if body["profile"] != serde_json::json!({"id": PROFILE}) {
        return Err(format!("profile {}", body["profile"]));
    }
    match body["seat"]["seat_id"].as_str() {
        Some(s) if !s.is_empty() && body["seat"].as_object().unwrap().len() == 1 => {}
        _ => return Err(format!("seat {}", body["seat"])),
    }
    if body["delivery_format"] != "x509" {
        return Err(format!("delivery_format {}", body["delivery_format"]));
    }
    if body["include_ca_chain"] != true {
        return Err(format!("include_ca_chain {}", body["include_ca_chain"]));
    }
    let v = &body["validity"];
    let unit_ok = matches!(v["unit"].as_str(), Some("hours" | "days"));
    if !unit_ok || v["duration"].as_u64().unwrap_or(0) < 1 || v.as_object().unwrap().len() != 2 {
        return Err(format!("validity {v}"));
    }
    let csr_pem = body["csr"].as_str().ok_or("csr is not a string")?;
    let p = ::pem::parse(csr_pem).map_err(|e| format!("csr is not PEM: {e}"))?;
    if p.tag() != "CERTIFICATE REQUEST" {
        return Err(format!("csr PEM tag {}", p.tag()));
    }
    let (_, csr) = X509CertificationRequest::from_der(p.contents())
        .map_err(|e| format!("csr does not parse: {e}"))?;
    csr.verify_signature()
        .map_err(|e| format!("csr signature: {e}"))?;
    let mut csr_uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    csr_uris.push(u.to_string());
                }
            }
        }
    }
    let san = &body["attributes"]["extensions"]["san"];
    if body["attributes"].as_object().map(|o| o.len()) != Some(1)
        || body["attributes"]["extensions"]
            .as_object()
            .map(|o| o.len())
            != Some(1)
    {
        return Err(format!("attributes {}", body["attributes"]));
    }
    match (san.get("uris"), san.get("dns_names")) {
        (Some(uris), None) => {
            let uris: Vec<String> =
                serde_json::from_value(uris.clone()).map_err(|e| format!("san.uris: {e}"))?;
            if uris.len() != 1 || !uris[0].starts_with("spiffe://") {
                return Err(format!("san.uris {uris:?}: expected one SPIFFE ID"));
            }
            if csr_uris != uris {
                return Err(format!("san.uris {uris:?} but the CSR says {csr_uris:?}"));
            }
            if san.as_object().unwrap().len() != 1 {
                return Err(format!("san {san}"));
            }
        }
        (None, Some(dns)) => {
            let dns: Vec<String> =
                serde_json::from_value(dns.clone()).map_err(|e| format!("san.dns_names: {e}"))?;
            if dns.is_empty() {
                return Err("san.dns_names empty".into());
            }
        }
        _ => return Err(format!("san {san}: expected uris or dns_names")),
    }
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// Signs a leaf for `spki` with the SAN and validity of the enrollment body; returns the
/// `certificate` field (leaf, then intermediate and root when the chain is included).
fn sign(inner: &Inner, body: &serde_json::Value, spki: &[u8]) -> (String, String) {
    let san = &body["attributes"]["extensions"]["san"];
    let mut names = Vec::new();
    for u in san["uris"].as_array().into_iter().flatten() {
        names.push(rcgen::SanType::URI(u.as_str().unwrap().try_into().unwrap()));
    }
    for d in san["dns_names"].as_array().into_iter().flatten() {
        names.push(rcgen::SanType::DnsName(
            d.as_str().unwrap().try_into().unwrap(),
        ));
    }
    for ip in san["ip_addresses"].as_array().into_iter().flatten() {
        names.push(rcgen::SanType::IpAddress(
            ip.as_str().unwrap().parse().unwrap(),
        ));
    }
    let unit = match body["validity"]["unit"].as_str() {
        Some("days") => 86400,
        _ => 3600,
    };
    let secs = body["validity"]["duration"].as_u64().unwrap() * unit;
    let mut p = rcgen::CertificateParams::default();
    // A SPIFFE profile: no subject attributes, the identity is the (critical) SAN. rcgen's
    // default subject (a CN) would be refused by the bridge's check of every leaf.
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = names;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::minutes(1);
    p.not_after = now + ::time::Duration::seconds(secs as i64);
    let serial: [u8; 16] = rand::random();
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let key = rcgen::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let leaf = p.signed_by(&key, &inner.ca.inter_issuer).unwrap();
    let mut pem = leaf.pem();
    if *inner.chain_in_answer.lock().unwrap() {
        pem.push_str(&inner.ca.inter.pem());
        pem.push_str(&inner.ca.root.pem());
    }
    inner.stats.lock().unwrap().issued += 1;
    let serial_hex: String = serial.iter().map(|b| format!("{b:02X}")).collect();
    (serial_hex, pem)
}

fn issued_response(status: StatusCode, serial: String, pem: String) -> Response {
    json(
        status,
        serde_json::json!({"serial_number": serial, "delivery_format": "x509", "certificate": pem}),
    )
}

pub(super) async fn enroll(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.stats.lock().unwrap().enrollments += 1;
    if let Some(r) = gate(&inner, &headers).await {
        return r;
    }
    if let Err(e) = check_json_headers(&headers) {
        return drift(&inner, format!("enroll: {e}"));
    }
    let body: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return drift(&inner, format!("enroll: body is not JSON: {e}")),
    };
    let spki = match check_enrollment(&body) {
        Ok(s) => s,
        Err(e) => return drift(&inner, format!("enroll: {e}")),
    };
    {
        let mut st = inner.stats.lock().unwrap();
        st.seats
            .push(body["seat"]["seat_id"].as_str().unwrap().to_string());
        st.validities.push((
            body["validity"]["unit"].as_str().unwrap().to_string(),
            body["validity"]["duration"].as_u64().unwrap(),
        ));
    }
    let mode = inner.mode.lock().unwrap().clone();
    match mode {
        Mode::BadRequest => error(
            StatusCode::BAD_REQUEST,
            "invalid_csr",
            "The CSR key size is not allowed by this profile",
        ),
        Mode::Pending { polls } => {
            let id = {
                let mut n = inner.next_id.lock().unwrap();
                *n += 1;
                format!("req-{n}")
            };
            inner.pending.lock().unwrap().insert(
                id.clone(),
                Pending {
                    polls_left: polls,
                    body,
                    spki,
                },
            );
            json(
                StatusCode::CREATED,
                serde_json::json!({"status": "PENDING", "request_id": id}),
            )
        }
        _ => {
            let (serial, pem) = sign(&inner, &body, &spki);
            issued_response(StatusCode::CREATED, serial, pem)
        }
    }
}

pub(super) async fn pickup(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.stats.lock().unwrap().pickups += 1;
    if let Some(r) = gate(&inner, &headers).await {
        return r;
    }
    if let Err(e) = check_json_headers(&headers) {
        return drift(&inner, format!("pickup: {e}"));
    }
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if body != serde_json::json!({"profile": {"id": PROFILE}}) {
        return drift(&inner, format!("pickup: body {body}"));
    }
    let ready = {
        let mut pending = inner.pending.lock().unwrap();
        let Some(p) = pending.get_mut(&id) else {
            drop(pending);
            return drift(&inner, format!("pickup: unknown request_id {id}"));
        };
        p.polls_left = p.polls_left.saturating_sub(1);
        if p.polls_left == 0 {
            pending.remove(&id)
        } else {
            None
        }
    };
    match ready {
        Some(p) => {
            let (serial, pem) = sign(&inner, &p.body, &p.spki);
            issued_response(StatusCode::OK, serial, pem)
        }
        None => json(
            StatusCode::OK,
            serde_json::json!({"status": "PENDING", "request_id": id}),
        ),
    }
}

pub(super) async fn hello(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.stats.lock().unwrap().hellos += 1;
    if let Some(r) = gate(&inner, &headers).await {
        return r;
    }
    (
        StatusCode::OK,
        "Hello from DigiCert ONE - Trust Lifecycle Manager REST API!",
    )
        .into_response()
}

pub(super) async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route {uri}"),
    )
}
