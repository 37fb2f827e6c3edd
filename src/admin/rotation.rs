//! `/rotation`: the root rotation's status (GET) and the operator's steps (POST
//! `/rotation/start`, `/rotation/advance`, `/rotation/abort`). Steps are accepted from a
//! loopback peer (`kubectl port-forward`, `kubectl exec`) or with the bearer token in
//! `admin.rotationTokenFile`; anyone who reaches the port may read the status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::AdminState;
use crate::backend::{RootRotation, RotationError};
use crate::rotation::Step;

fn json_response(code: StatusCode, body: serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
        .into_response()
}

fn error(code: StatusCode, message: impl std::fmt::Display) -> Response {
    json_response(code, serde_json::json!({ "error": message.to_string() }))
}

/// A refusal: its status and message, turned into a [`Response`] by [`error`].
type Refusal = (StatusCode, String);

fn rotation(s: &AdminState) -> Result<&Arc<dyn RootRotation>, Refusal> {
    s.rotation.as_ref().ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!(
                "backend {} does not rotate its root here: only the local CA with a generated root does (a configured CA or a remote backend's root is rotated where it lives)",
                s.readiness.signer.kind()
            ),
        )
    })
}

fn answer(r: Result<crate::rotation::RotationStatus, RotationError>) -> Response {
    match r {
        Ok(st) => json_response(
            StatusCode::OK,
            serde_json::to_value(st).expect("serializable"),
        ),
        Err(e @ (RotationError::Refused(_) | RotationError::Conflict)) => {
            error(StatusCode::CONFLICT, e)
        }
        Err(e @ RotationError::Unavailable(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

pub(super) async fn status(State(s): State<Arc<AdminState>>) -> Response {
    match rotation(&s) {
        Ok(r) => answer(r.status().await),
        Err((code, m)) => error(code, m),
    }
}

/// Whether a peer may change the rotation: loopback, or the configured bearer token.
fn may_change(
    token_file: Option<&std::path::Path>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    if peer.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    let Some(path) = token_file else {
        return Err((
            StatusCode::FORBIDDEN,
            "rotation steps are accepted only from loopback (kubectl port-forward or exec), or with a bearer token when admin.rotationTokenFile is set".into(),
        ));
    };
    // Read on every call, so the token can be rotated by replacing the file.
    let expected = match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            tracing::error!(path = %path.display(), "admin.rotationTokenFile cannot be read or is empty; refusing rotation steps from non-loopback peers");
            return Err((
                StatusCode::FORBIDDEN,
                "the rotation token file cannot be read".into(),
            ));
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared as digests: equal length, no early exit on the secret's bytes.
    if Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes()) {
        Ok(())
    } else {
        tracing::warn!(peer = %peer, "a rotation step with a missing or wrong bearer token was refused");
        Err((
            StatusCode::FORBIDDEN,
            "missing or wrong bearer token".into(),
        ))
    }
}

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name)
        .is_some_and(|v| v.is_empty() || v == "true" || v == "1")
}

pub(super) async fn change(
    State(s): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::extract::Path(action): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err((code, m)) = may_change(s.rotation_token_file.as_deref(), peer, &headers) {
        return error(code, m);
    }
    let r = match rotation(&s) {
        Ok(r) => r,
        Err((code, m)) => return error(code, m),
    };
    let force = flag(&q, "force");
    let result = match action.as_str() {
        "start" => {
            let reason = q
                .get("reason")
                .map(|r| r.chars().take(200).collect::<String>())
                .unwrap_or_else(|| "operator".into());
            r.start(&reason).await
        }
        "advance" => r.step(Step::Advance { force, auto: false }).await,
        "abort" => r.step(Step::Abort { force }).await,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown rotation step {other:?}: start, advance or abort"),
            );
        }
    };
    if let Err(e) = &result {
        tracing::info!(action = %action, error = %e, "rotation step not taken");
    }
    answer(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn steps_need_loopback_or_the_token() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        let none = HeaderMap::new();
        assert!(may_change(None, at("127.0.0.1:1"), &none).is_ok());
        assert!(may_change(None, at("[::ffff:127.0.0.1]:1"), &none).is_ok());
        let refused = |r: Result<(), Refusal>| r.unwrap_err().0 == StatusCode::FORBIDDEN;
        assert!(refused(may_change(
            None,
            at("10.0.0.1:1"),
            &with_bearer("x")
        )));

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        let p = Some(f.as_path());
        assert!(may_change(p, at("10.0.0.1:1"), &with_bearer("s3cret")).is_ok());
        assert!(refused(may_change(
            p,
            at("10.0.0.1:1"),
            &with_bearer("s3cre")
        )));
        assert!(refused(may_change(p, at("10.0.0.1:1"), &none)));
        // An empty or unreadable token file allows nobody but loopback.
        std::fs::write(&f, "\n").unwrap();
        assert!(refused(may_change(p, at("10.0.0.1:1"), &with_bearer(""))));
        std::fs::remove_file(&f).unwrap();
        assert!(refused(may_change(
            p,
            at("10.0.0.1:1"),
            &with_bearer("s3cret")
        )));
    }
}
