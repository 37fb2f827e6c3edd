//! Slows down connections that keep failing authentication.
//!
//! Every refusal is cheap, but a client that sends nothing but bad credentials (a padded
//! client-certificate chain, junk tokens, no token) on one connection can still ask for
//! thousands of them per second and take CPU from real workloads. Each connection (by peer
//! address) has a budget of authentication failures: [`BURST`], refilled at [`RATE`] per
//! second. Past it, each further failure is answered only after [`DELAY`] (bounded by the
//! request timeout), holding that call's stream, so one connection gets at most
//! `maxConcurrentStreams` refusals per [`DELAY`]. Successful calls are never delayed, and
//! failures that are the bridge's own (UNAVAILABLE) do not count: a healthy istio-agent or
//! ztunnel never fails authentication in a loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Authentication failures a connection may have at once without delay.
pub const BURST: f64 = 32.0;
/// Failures per second refilled into a connection's budget.
pub const RATE: f64 = 8.0;
/// How long a failure past the budget is held before it is answered.
pub const DELAY: Duration = Duration::from_secs(1);
/// Connections remembered; past this, full (idle) budgets are forgotten first.
const MAX_PEERS: usize = 16_384;

struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    fn refilled(&self, now: Instant) -> f64 {
        (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE).min(BURST)
    }
}

#[derive(Default)]
pub struct Tarpit {
    peers: Mutex<HashMap<SocketAddr, Budget>>,
}

impl Tarpit {
    /// Records an authentication failure of the connection from `peer`; returns how long to
    /// hold its answer (None: answer at once).
    pub fn on_failure(&self, peer: SocketAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, b| b.refilled(now) < BURST);
            if peers.len() >= MAX_PEERS {
                peers.clear();
            }
        }
        let b = peers.entry(peer).or_insert(Budget {
            tokens: BURST,
            last: now,
        });
        let tokens = b.refilled(now);
        b.last = now;
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            None
        } else {
            b.tokens = tokens;
            Some(DELAY)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_is_free_then_each_is_delayed_per_connection() {
        let t = Tarpit::default();
        let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:40001".parse().unwrap();
        for _ in 0..BURST as usize {
            assert_eq!(t.on_failure(a), None);
        }
        assert_eq!(t.on_failure(a), Some(DELAY));
        assert_eq!(t.on_failure(a), Some(DELAY));
        assert_eq!(
            t.on_failure(b),
            None,
            "another connection has its own budget"
        );
        std::thread::sleep(Duration::from_millis(300)); // ~2.4 failures refilled
        assert_eq!(t.on_failure(a), None);
        assert_eq!(t.on_failure(a), None);
        assert_eq!(t.on_failure(a), Some(DELAY));
    }
}
