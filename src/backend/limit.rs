//! Pieces shared by the remote backends that pace their own calls (AWS Private CA,
//! DigiCert): a client-side token bucket that queues callers in arrival order, the wait for
//! a slot inside a call's deadline, and jittered exponential backoff.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::SignError;
use crate::metrics::Metrics;

/// Client-side rate limit: a token bucket that hands out reservations, so concurrent
/// callers are served in arrival order at `rate` per second after an initial `burst`.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// (tokens, last refill). Tokens go negative: that is the queue of reservations.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Reserves one call. Returns how long the caller must wait before making it, or, when
    /// that would exceed `max_wait`, the wait it would have needed (nothing is reserved).
    pub fn reserve(&self, max_wait: Duration) -> Result<Duration, Duration> {
        let mut st = self.state.lock().expect("token bucket lock");
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.burst);
        st.1 = now;
        let after = st.0 - 1.0;
        let wait = if after >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-after / self.rate)
        };
        if wait > max_wait {
            return Err(wait);
        }
        st.0 = after;
        Ok(wait)
    }

    /// Waits for a slot, or fails with `Throttled` at once if none comes in time. A slot is
    /// only taken if it leaves `keep` before `deadline` for the call itself: a caller refused
    /// now can retry elsewhere, a caller whose slot comes too late would just time out after
    /// using up quota. Waits are observed in `backend_rate_limit_wait`, refusals counted as
    /// local throttles.
    pub async fn acquire(
        &self,
        deadline: Instant,
        keep: Duration,
        kind: &'static str,
        metrics: &Metrics,
    ) -> Result<(), SignError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.reserve(left.saturating_sub(keep)) {
            Ok(wait) => {
                metrics
                    .backend_rate_limit_wait
                    .with_label_values(&[kind])
                    .observe(wait.as_secs_f64());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(())
            }
            Err(wait) => {
                metrics
                    .backend_throttles
                    .with_label_values(&[kind, "local"])
                    .inc();
                Err(SignError::Throttled {
                    reason: format!(
                        "client-side rate limit of {}/s: next slot in {wait:?}",
                        self.rate
                    ),
                    retry_after: Some(wait),
                })
            }
        }
    }
}

/// Exponential backoff with full jitter: a random delay in [base/2, base] for attempt n.
pub fn backoff(attempt: u32, first: Duration, cap: Duration) -> Duration {
    let base = first
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(cap);
    let jitter: f64 = rand::random::<f64>() * 0.5 + 0.5;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bucket_allows_burst_then_rate() {
        let b = TokenBucket::new(10.0, 5);
        for _ in 0..5 {
            assert_eq!(b.reserve(Duration::ZERO), Ok(Duration::ZERO));
        }
        // The sixth waits 1/rate; the seventh 2/rate (reservations queue up).
        let w6 = b.reserve(Duration::from_secs(1)).unwrap();
        let w7 = b.reserve(Duration::from_secs(1)).unwrap();
        assert!((w6.as_secs_f64() - 0.1).abs() < 0.01, "{w6:?}");
        assert!((w7.as_secs_f64() - 0.2).abs() < 0.01, "{w7:?}");
        // A caller that cannot wait that long reserves nothing.
        assert!(b.reserve(Duration::from_millis(50)).is_err());
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // Refilled, but never above the burst.
        for _ in 0..5 {
            assert_eq!(b.reserve(Duration::ZERO), Ok(Duration::ZERO));
        }
        assert!(b.reserve(Duration::ZERO).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let first = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for attempt in 0..10 {
            let d = backoff(attempt, first, cap);
            let base = (first * 2u32.pow(attempt)).min(cap);
            assert!(d >= base / 2 && d <= base, "{attempt}: {d:?}");
        }
    }
}
