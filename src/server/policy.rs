//! TTL policy: what lifetime a workload certificate gets.
//!
//! `validity_duration <= 0` means "server default" (Istio's contract). Above the maximum
//! the request is clamped (default, like istio-csr) or refused (like istiod). The backend
//! further clamps to its issuer's NotAfter.

use std::time::Duration;

use crate::config::{OverMax, PolicyConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("requested validity {requested_secs}s exceeds the maximum of {max_secs}s")]
pub struct TtlError {
    pub requested_secs: i64,
    pub max_secs: u64,
}

/// The lifetime to issue for, and whether the request was clamped.
pub fn ttl(requested_secs: i64, policy: &PolicyConfig) -> Result<(Duration, bool), TtlError> {
    if requested_secs <= 0 {
        return Ok((policy.default_ttl, false));
    }
    let requested = Duration::from_secs(requested_secs as u64);
    if requested <= policy.max_ttl {
        return Ok((requested, false));
    }
    match policy.over_max {
        OverMax::Clamp => Ok((policy.max_ttl, true)),
        OverMax::Reject => Err(TtlError {
            requested_secs,
            max_secs: policy.max_ttl.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_clamps_and_rejects() {
        let mut p = PolicyConfig::default();
        let day = Duration::from_secs(86400);
        assert_eq!(ttl(0, &p).unwrap(), (day, false));
        assert_eq!(ttl(-5, &p).unwrap(), (day, false));
        assert_eq!(ttl(i64::MIN, &p).unwrap(), (day, false));
        assert_eq!(ttl(3600, &p).unwrap(), (Duration::from_secs(3600), false));
        assert_eq!(ttl(i64::MAX, &p).unwrap(), (day, true));
        p.over_max = OverMax::Reject;
        assert!(ttl(86401, &p).is_err());
        assert!(ttl(i64::MAX, &p).is_err());
    }
}
