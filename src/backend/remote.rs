//! The kit every remote backend calls its CA with (Vault, AWS Private CA, DigiCert, and
//! the upstream calls of intermediate mode), so each backend only says how to make one
//! call and how to read its failures:
//! - [`Failure`]: what one failed call means for the caller: throttled (with the CA's
//!   retry-after), transient (retry), not ready yet (poll again) or final;
//! - [`Retry::run`]: retries until the deadline, each attempt behind the client-side
//!   [`TokenBucket`] and after a jittered [`backoff`], counting retries and throttles;
//!   [`Retry::run_polling`] the same, with the CA's own pace ([`Polling`]) for answers that
//!   are not ready yet;
//! - [`error_chain`]: an error and its sources on one line, for logs and messages;
//! - [`issued_chain`]: a leaf and the PEM chain texts the CA answered, as an
//!   [`IssuedChain`] (roots and repeats dropped);
//! - [`retry_after`]: an HTTP answer's `Retry-After`;
//! - [`build_in_mode`]: a backend's `Plugin::build` for `direct` and `intermediate` mode.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::time::Instant;

use super::intermediate::{BackendMode, IntermediateConfig, UpstreamAuthority, UpstreamConnect};
use super::{BuildContext, BuildError, IssuedChain, SignError, Signer};
use crate::metrics::Metrics;
use crate::pki;

/// How one failed remote call should be handled.
#[derive(Debug)]
pub enum Failure {
    /// The CA throttled the call: wait (its retry-after, else backoff) and retry while the
    /// deadline allows; at the deadline the caller is told to back off.
    Throttled {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Nothing happened at the CA (or the call is idempotent): retry while the deadline
    /// allows; at the deadline the CA counts as unavailable.
    Transient(String),
    /// Accepted but not finished (AWS RequestInProgress, a DigiCert PENDING enrollment):
    /// poll again while the deadline allows.
    Pending(String),
    /// Do not retry: this is the answer.
    Final(SignError),
}

impl fmt::Display for Failure {
    /// What went wrong, for a caller that does not retry (start-up, background refresh).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Throttled { message, .. } => write!(f, "throttled: {message}"),
            Failure::Transient(m) => f.write_str(m),
            Failure::Pending(m) => write!(f, "{m} (not ready)"),
            Failure::Final(e) => write!(f, "{e}"),
        }
    }
}

/// Backoff bounds: the first delay and the cap.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// Between retries of a call that failed transiently: a CA's hiccups pass in well
    /// under a second, and several tries must fit in a few seconds' budget.
    pub const TRANSIENT: Backoff = Backoff {
        first: Duration::from_millis(100),
        cap: Duration::from_secs(1),
    };
    /// After a throttled call without a retry-after: longer, so a throttled CA is not
    /// asked again at once.
    pub const THROTTLED: Backoff = Backoff {
        first: Duration::from_millis(200),
        cap: Duration::from_secs(2),
    };
}

/// How to retry calls to one CA until a deadline.
pub struct Retry<'a> {
    /// Backend name for metric labels and logs.
    pub kind: &'static str,
    pub metrics: &'a Metrics,
    /// The client-side rate limit each attempt waits for, if the backend has one.
    pub bucket: Option<&'a TokenBucket>,
    /// A slot is only taken if it leaves this much before the deadline for the call.
    pub keep: Duration,
    pub throttled: Backoff,
    pub transient: Backoff,
}

/// How [`Retry::run_polling`] waits after a [`Failure::Pending`]: the CA sets the pace of
/// an answer that is not ready, not the backoff of a failure.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    /// The `backend_retries` reason of each poll (`pending`; AWS documents `in_progress`).
    pub reason: &'static str,
    /// Poll n (from 0) waits `first`·2ⁿ, at most `cap`.
    pub every: Backoff,
    /// Jittered like [`backoff`] (many callers polling one CA), or exactly that schedule
    /// (a pace the operator configured).
    pub jitter: bool,
}

impl Retry<'_> {
    /// Runs `call(attempt)` until it succeeds, fails finally, or the deadline leaves no
    /// room for another attempt. `op` names the call in messages ("IssueCertificate").
    /// A [`Failure::Pending`] waits like a transient failure and counts as `pending`.
    pub async fn run<T, F, Fut>(&self, op: &str, deadline: Instant, call: F) -> Result<T, SignError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let polling = Polling {
            reason: "pending",
            every: self.transient,
            jitter: true,
        };
        self.run_polling(op, deadline, polling, call).await
    }

    /// [`Self::run`], with a [`Failure::Pending`] polled again as `polling` says. `attempt`
    /// counts every call so far; the polling schedule only the polls.
    pub async fn run_polling<T, F, Fut>(
        &self,
        op: &str,
        deadline: Instant,
        polling: Polling,
        mut call: F,
    ) -> Result<T, SignError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 0u32;
        let mut polls = 0u32;
        loop {
            if let Some(b) = self.bucket {
                b.acquire(deadline, self.keep, self.kind, self.metrics)
                    .await?;
            }
            let failure = match tokio::time::timeout_at(deadline, call(attempt)).await {
                Err(_) => {
                    return Err(SignError::Unavailable(format!(
                        "{op}: no answer before the deadline"
                    )));
                }
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(f)) => f,
            };
            let (delay, reason, on_deadline) = match failure {
                Failure::Final(e) => return Err(e),
                Failure::Throttled {
                    message,
                    retry_after,
                } => {
                    self.metrics
                        .backend_throttles
                        .with_label_values(&[self.kind, "remote"])
                        .inc();
                    let d = retry_after.unwrap_or_else(|| {
                        backoff(attempt, self.throttled.first, self.throttled.cap)
                    });
                    (
                        d,
                        "throttled",
                        SignError::Throttled {
                            reason: message,
                            retry_after: Some(d),
                        },
                    )
                }
                Failure::Transient(m) => (
                    backoff(attempt, self.transient.first, self.transient.cap),
                    "transient",
                    SignError::Unavailable(m),
                ),
                Failure::Pending(m) => {
                    let Backoff { first, cap } = polling.every;
                    let d = if polling.jitter {
                        backoff(polls, first, cap)
                    } else {
                        first
                            .saturating_mul(2u32.saturating_pow(polls.min(16)))
                            .min(cap)
                    };
                    polls += 1;
                    (
                        d,
                        polling.reason,
                        SignError::Unavailable(format!("{m} (still pending at the deadline)")),
                    )
                }
            };
            if Instant::now() + delay >= deadline {
                return Err(on_deadline);
            }
            tracing::debug!(backend = self.kind, op, reason, attempt, delay = ?delay, "retrying");
            self.metrics
                .backend_retries
                .with_label_values(&[self.kind, reason])
                .inc();
            attempt += 1;
            tokio::time::sleep(delay).await;
        }
    }
}

/// An error and its sources on one line (`a: b: c`), for logs and messages.
pub fn error_chain(e: &(dyn std::error::Error + '_)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why an answer's certificates could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChainTextError {
    #[error("certificate: {0}")]
    Leaf(pki::PkiError),
    #[error("chain: {0}")]
    Chain(pki::PkiError),
}

/// The leaf (first certificate of `leaf_pem`) and the certificates of `chain_pems` that
/// link it to a root: in order, without roots, the leaf itself or repeats. The result is
/// checked by [`super::checked`] like every answer.
pub fn issued_chain<'a>(
    leaf_pem: &str,
    chain_pems: impl IntoIterator<Item = &'a str>,
) -> Result<IssuedChain, ChainTextError> {
    let leaf: CertificateDer<'static> = pki::parse_certs_pem(leaf_pem.as_bytes())
        .map_err(ChainTextError::Leaf)?
        .into_iter()
        .next()
        .ok_or(ChainTextError::Leaf(pki::PkiError::NoCertificate))?;
    let links = pki::chain_links(chain_pems, &leaf).map_err(ChainTextError::Chain)?;
    Ok(IssuedChain::new(leaf, links))
}

/// An HTTP answer's `Retry-After`: delay-seconds or an HTTP date (a date in the past is
/// no delay).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `Plugin::build` of a backend that can run in either mode: in `direct` mode `connect`
/// is called once and its signer signs every certificate; in `intermediate` mode it is the
/// upstream that signs the bridge's intermediates (called again whenever intermediate mode
/// needs to connect).
pub async fn build_in_mode<B, F, Fut>(
    kind: &'static str,
    mode: BackendMode,
    intermediate: &IntermediateConfig,
    ctx: &BuildContext,
    connect: F,
) -> Result<Arc<dyn Signer>, BuildError>
where
    B: Signer + UpstreamAuthority,
    F: Fn(Arc<Metrics>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<B>, BuildError>> + Send + 'static,
{
    if mode == BackendMode::Direct {
        return Ok(connect(ctx.metrics.clone()).await?);
    }
    let metrics = ctx.metrics.clone();
    let upstream: UpstreamConnect = Arc::new(move || {
        let connecting = connect(metrics.clone());
        Box::pin(async move { Ok(connecting.await? as Arc<dyn UpstreamAuthority>) })
    });
    super::intermediate::build(kind, upstream, intermediate, ctx).await
}

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
        self.reserve_n(1, max_wait)
    }

    /// Reserves `n` calls at once (one operation that makes several), all or nothing: the
    /// wait is until the last of them may be made.
    pub fn reserve_n(&self, n: u32, max_wait: Duration) -> Result<Duration, Duration> {
        let mut st = self.state.lock().expect("token bucket lock");
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.burst);
        st.1 = now;
        let after = st.0 - f64::from(n.max(1));
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
        self.acquire_n(1, deadline, keep, kind, metrics).await
    }

    /// [`Self::acquire`] for `n` calls at once ([`Self::reserve_n`]).
    pub async fn acquire_n(
        &self,
        n: u32,
        deadline: Instant,
        keep: Duration,
        kind: &'static str,
        metrics: &Metrics,
    ) -> Result<(), SignError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.reserve_n(n, left.saturating_sub(keep)) {
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
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(30);
        h.insert(
            reqwest::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(27) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

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

    fn retry(metrics: &Metrics) -> Retry<'_> {
        let ms = Duration::from_millis;
        Retry {
            kind: "test",
            metrics,
            bucket: None,
            keep: Duration::ZERO,
            throttled: Backoff {
                first: ms(1),
                cap: ms(2),
            },
            transient: Backoff {
                first: ms(1),
                cap: ms(2),
            },
        }
    }

    #[tokio::test]
    async fn polling_keeps_its_own_exact_schedule_and_reason() {
        let m = Metrics::new(false);
        let polling = Polling {
            reason: "in_progress",
            every: Backoff {
                first: Duration::from_millis(20),
                cap: Duration::from_millis(40),
            },
            jitter: false,
        };
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        // A transient failure first, then three polls: 20, 40 (the cap), 40 ms.
        let got = retry(&m)
            .run_polling("op", deadline, polling, |attempt| async move {
                match attempt {
                    0 => Err(Failure::Transient("reset".into())),
                    1..=3 => Err(Failure::Pending("not yet".into())),
                    _ => Ok(attempt),
                }
            })
            .await
            .unwrap();
        assert_eq!(got, 4);
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        let retries = |r| m.backend_retries.with_label_values(&["test", r]).get();
        assert_eq!((retries("in_progress"), retries("transient")), (3, 1));
        assert_eq!(retries("pending"), 0);
    }

    #[tokio::test]
    async fn pending_beyond_the_deadline_is_unavailable_and_final_is_final() {
        let m = Metrics::new(false);
        let deadline = Instant::now() + Duration::from_millis(50);
        let e = retry(&m)
            .run("op", deadline, |_| async {
                Err::<(), _>(Failure::Pending("request 7".into()))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SignError::Unavailable(m) if m.contains("request 7") && m.contains("pending")),
            "{e:?}"
        );
        let e = retry(&m)
            .run("op", Instant::now() + Duration::from_secs(5), |_| async {
                Err::<(), _>(Failure::Final(SignError::Rejected("no".into())))
            })
            .await
            .unwrap_err();
        assert!(matches!(e, SignError::Rejected(_)), "{e:?}");
        assert_eq!(
            m.backend_retries
                .with_label_values(&["test", "transient"])
                .get(),
            0
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h)
        };
        assert_eq!(with("3"), Some(Duration::from_secs(3)));
        assert_eq!(with(" 0 "), Some(Duration::ZERO));
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(60);
        let d = with(&httpdate::fmt_http_date(in_a_minute)).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        assert_eq!(with("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
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
