//! Root rotation: the phases that take the mesh from root A to root B without a failed
//! handshake, when each next phase is safe, and what start, advance and abort may do.
//!
//! A workload learns roots only when it renews, which it does within its certificate's
//! lifetime, at most `policy.maxTtl`. So:
//! 1. **publishing**: B is generated and the bundle becomes A+B; A still signs. Safe to go on
//!    once every workload has renewed (and every ConfigMap reader re-read): `maxTtl + skew`.
//! 2. **signingNew**: B signs; A+B stay trusted. Safe to go on once every A-signed
//!    certificate has expired: `maxTtl + skew` again.
//! 3. **retiring**: the bundle is B alone; A's key is kept so the step can be undone. Safe to
//!    finish once every workload holds the B-only bundle: `maxTtl + skew`.
//! 4. **done**: A is deleted; B is the root. A new rotation may start.
//!
//! Every wait is also at least the latest expiry of the certificates this replica has seen
//! issued that the wait is about (see [`Timing::seen_until`]). Abort steps back one phase,
//! never into a state where a live certificate would stop chaining.
//!
//! This module is pure (no I/O, no clock: callers pass `now`); where the state is kept and
//! how replicas agree on it is the local CA's store (`backend::local::store`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, Problems};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    #[default]
    Idle,
    Publishing,
    SigningNew,
    Retiring,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Publishing => "publishing",
            Phase::SigningNew => "signingNew",
            Phase::Retiring => "retiring",
            Phase::Done => "done",
        }
    }

    /// The value of the phase gauge (0 idle .. 4 done).
    pub fn number(self) -> i64 {
        self as i64
    }

    pub const ALL: [Phase; 5] = [
        Phase::Idle,
        Phase::Publishing,
        Phase::SigningNew,
        Phase::Retiring,
        Phase::Done,
    ];

    /// Whether the new root (B) signs in this phase.
    pub fn signs_with_next(self) -> bool {
        matches!(self, Phase::SigningNew | Phase::Retiring)
    }

    /// Whether the current root (A) is in the bundle.
    pub fn trusts_current(self) -> bool {
        !matches!(self, Phase::Retiring)
    }

    /// Whether a next root exists in this phase.
    pub fn has_next(self) -> bool {
        matches!(
            self,
            Phase::Publishing | Phase::SigningNew | Phase::Retiring
        )
    }

    /// What the wait before leaving this phase is for (status, refusals).
    fn wait_reason(self) -> &'static str {
        match self {
            Phase::Publishing => "every workload renews, and so learns the new root, within it",
            Phase::SigningNew => "every certificate signed by the old root expires within it",
            Phase::Retiring => {
                "every workload renews, and so drops the old root from its bundle, within it"
            }
            Phase::Idle | Phase::Done => "",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of phase, as the state keeps it and the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    /// Unix seconds.
    pub at: i64,
    /// `start`, `advance`, `abort` or `auto` (the wait was over).
    pub action: String,
    /// The replica that wrote it.
    pub by: String,
    /// A wait was skipped on the operator's word.
    pub forced: bool,
}

/// Transitions kept in the state (older ones are in the audit log).
const HISTORY: usize = 32;

/// The rotation's state, shared by every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationState {
    pub phase: Phase,
    /// When the phase began (unix seconds; 0 for a CA that never rotated).
    pub since: i64,
    /// The earliest time the next phase is safe (unix seconds); none in idle and done.
    pub next_after: Option<i64>,
    /// Certificates signed by the next root may be alive until then (an abort from
    /// signingNew); going back to idle, which forgets that root, waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_signed_until: Option<i64>,
    /// Set by abort: the rotation waits for the operator instead of advancing by itself.
    #[serde(default)]
    pub paused: bool,
    /// Why this rotation began (operator, upstream root change).
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub history: Vec<Transition>,
}

impl Default for RotationState {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            since: 0,
            next_after: None,
            next_signed_until: None,
            paused: false,
            reason: String::new(),
            history: Vec::new(),
        }
    }
}

/// What the waits are computed from.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// `policy.maxTtl`: no workload certificate lives longer.
    pub max_ttl: Duration,
    /// `rotation.skew`: added to every wait (clock skew, ConfigMap propagation, a replica
    /// that reads the state late).
    pub skew: Duration,
    /// The latest NotAfter of the certificates this replica issued that the current wait is
    /// about (in signingNew: those signed by the old root), if any.
    pub seen_until: Option<i64>,
}

impl Timing {
    fn wait(&self) -> i64 {
        secs(self.max_ttl) + secs(self.skew)
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

/// Why a step was refused; the text says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// How a step was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The operator (`rotate advance`), or `auto` when the wait is over.
    Advance {
        force: bool,
        auto: bool,
    },
    Abort {
        force: bool,
    },
}

impl RotationState {
    /// Whether a rotation is under way.
    pub fn in_progress(&self) -> bool {
        self.phase.has_next()
    }

    /// Whether the phase's wait is over and it may advance by itself.
    pub fn due(&self, now: i64, timing: &Timing) -> bool {
        self.in_progress() && !self.paused && self.safe_after(timing).is_some_and(|t| now >= t)
    }

    /// The earliest time the next phase is safe, with what this replica has seen issued.
    pub fn safe_after(&self, timing: &Timing) -> Option<i64> {
        let seen = timing.seen_until.map(|t| t + secs(timing.skew));
        match (self.next_after, seen) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, _) => a,
        }
    }

    /// Begins a rotation: to publishing.
    pub fn start(
        &self,
        now: i64,
        timing: &Timing,
        reason: &str,
        by: &str,
    ) -> Result<Self, Refusal> {
        if self.in_progress() {
            return Err(Refusal(format!(
                "a rotation is already in progress (phase {}, since {}); follow it with `rotate status`",
                self.phase,
                crate::pki::rfc3339(self.since)
            )));
        }
        let mut next = self.clone();
        next.reason = reason.to_string();
        next.paused = false;
        next.next_signed_until = None;
        next.enter(
            Phase::Publishing,
            now,
            Some(now + timing.wait()),
            "start",
            by,
            false,
        );
        Ok(next)
    }

    /// One step forwards or back.
    pub fn step(&self, step: Step, now: i64, timing: &Timing, by: &str) -> Result<Self, Refusal> {
        if !self.in_progress() {
            return Err(Refusal(format!(
                "no rotation is in progress (phase {}); start one with `rotate start`",
                self.phase
            )));
        }
        let mut next = self.clone();
        match step {
            Step::Advance { force, auto } => {
                let safe = self.safe_after(timing).unwrap_or(now);
                let early = now < safe;
                if early && !force {
                    return Err(Refusal(format!(
                        "phase {} began at {} and waits maxTtl + skew ({}s): {}. The next phase is safe from {} (in {}s); pass --force to skip the wait, at the risk of workloads that do not trust the root they meet",
                        self.phase,
                        crate::pki::rfc3339(self.since),
                        timing.wait(),
                        self.phase.wait_reason(),
                        crate::pki::rfc3339(safe),
                        safe - now,
                    )));
                }
                let (to, next_after) = match self.phase {
                    Phase::Publishing => (Phase::SigningNew, Some(now + timing.wait())),
                    Phase::SigningNew => (Phase::Retiring, Some(now + timing.wait())),
                    Phase::Retiring => (Phase::Done, None),
                    _ => unreachable!("in progress"),
                };
                next.paused = false;
                if to == Phase::Done {
                    next.next_signed_until = None;
                }
                let action = if auto { "auto" } else { "advance" };
                next.enter(to, now, next_after, action, by, early);
            }
            Step::Abort { force } => match self.phase {
                Phase::Publishing => {
                    if let Some(until) = self.next_signed_until
                        && now < until + secs(timing.skew)
                        && !force
                    {
                        let safe = until + secs(timing.skew);
                        return Err(Refusal(format!(
                            "certificates signed by the new root may be alive until {}: forgetting it now would break them. Abort is safe from {} (in {}s); pass --force to skip the wait",
                            crate::pki::rfc3339(until),
                            crate::pki::rfc3339(safe),
                            safe - now
                        )));
                    }
                    next.next_signed_until = None;
                    next.paused = false;
                    next.enter(Phase::Idle, now, None, "abort", by, force);
                }
                Phase::SigningNew => {
                    // Back to the old root signing; the new one stays trusted for as long as
                    // the certificates it signed live.
                    next.next_signed_until = Some(now + secs(timing.max_ttl));
                    next.paused = true;
                    next.enter(Phase::Publishing, now, Some(now), "abort", by, false);
                }
                Phase::Retiring => {
                    next.paused = true;
                    next.enter(Phase::SigningNew, now, Some(now), "abort", by, false);
                }
                _ => unreachable!("in progress"),
            },
        }
        Ok(next)
    }

    fn enter(
        &mut self,
        to: Phase,
        now: i64,
        next_after: Option<i64>,
        action: &str,
        by: &str,
        forced: bool,
    ) {
        self.history.push(Transition {
            from: self.phase,
            to,
            at: now,
            action: action.to_string(),
            by: by.to_string(),
            forced,
        });
        if self.history.len() > HISTORY {
            let extra = self.history.len() - HISTORY;
            self.history.drain(..extra);
        }
        self.phase = to;
        self.since = now;
        self.next_after = next_after;
    }

    /// The last transition, if any.
    pub fn last(&self) -> Option<&Transition> {
        self.history.last()
    }
}

/// A root as `/rotation` shows it (no key material).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RootSummary {
    /// `current` (A during a rotation), `next` (B), or `other` (a further root an upstream
    /// CA offers, published throughout).
    pub role: &'static str,
    pub common_name: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    /// In the trust bundle in this phase.
    pub trusted: bool,
    /// Signs leaves in this phase.
    pub signing: bool,
}

impl RootSummary {
    /// The summary of the root certificate `der`.
    pub fn of(der: &[u8], role: &'static str, trusted: bool, signing: bool) -> Self {
        let info = crate::pki::cert_info(der).ok();
        let common_name = crate::pki::common_name(der);
        Self {
            role,
            common_name,
            serial: info.as_ref().map(|i| i.serial_hex.clone()),
            not_after: info.map(|i| crate::pki::rfc3339(i.not_after)),
            trusted,
            signing,
        }
    }
}

/// What `/rotation` and `rotate status` show.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    pub phase: Phase,
    pub since: Option<String>,
    /// When the next phase is safe, with what this replica has seen issued.
    pub next_phase_after: Option<String>,
    pub next_phase_in_seconds: Option<i64>,
    /// What the current wait is for.
    pub waiting_for: Option<&'static str>,
    pub auto_advance: bool,
    pub paused: bool,
    pub reason: String,
    pub roots: Vec<RootSummary>,
    /// Where the state is kept.
    pub store: String,
    /// The replica that answered.
    pub replica: String,
    pub history: Vec<Transition>,
}

impl RotationStatus {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        r: &RotationState,
        timing: &Timing,
        now: i64,
        auto_advance: bool,
        roots: Vec<RootSummary>,
        store: String,
        replica: &str,
    ) -> Self {
        let safe = r.safe_after(timing).filter(|_| r.in_progress());
        Self {
            phase: r.phase,
            since: (r.since > 0).then(|| crate::pki::rfc3339(r.since)),
            next_phase_after: safe.map(crate::pki::rfc3339),
            next_phase_in_seconds: safe.map(|t| (t - now).max(0)),
            waiting_for: Some(r.phase.wait_reason()).filter(|w| !w.is_empty()),
            auto_advance,
            paused: r.paused,
            reason: r.reason.clone(),
            roots,
            store,
            replica: replica.to_string(),
            history: r.history.clone(),
        }
    }
}

/// This replica's name in transitions: the pod name (HOSTNAME) and a random suffix, so that
/// a restarted pod, or a second bridge in one test process, is told apart.
pub fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "istio-ca-bridge".into());
    format!("{host}_{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// The `rotation` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Added to every wait: clock skew between replicas and workloads, ConfigMap
    /// propagation, a replica that reads the shared state late.
    #[serde(with = "humantime_serde")]
    pub skew: Duration,
    /// Advance by itself when a phase's wait is over. Off: every step is `rotate advance`.
    pub auto_advance: bool,
    /// How often each replica re-reads the shared state (and advances a due phase).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A remote backend (Vault, AWS Private CA, DigiCert, intermediate mode): follow a new
    /// root the CA offers through the phases (`backend::follow`). Off: the CA's roots are
    /// published as they are read, as before rotation existed.
    pub follow_upstream: bool,
    /// Where a remote backend's rotation state is kept without Kubernetes (the file
    /// `upstream-roots.json`); unset: memory only, and a restart forgets the phase.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            skew: Duration::from_secs(300),
            auto_advance: true,
            poll_interval: Duration::from_secs(10),
            follow_upstream: true,
            state_dir: None,
        }
    }
}

impl RotationConfig {
    /// Problems, with fields relative to `rotation`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        p.at_least(
            "pollInterval",
            self.poll_interval,
            Duration::from_millis(100),
            "100ms",
        );
        if self.skew < self.poll_interval {
            p.push(
                "skew",
                "must be at least rotation.pollInterval: a replica may read a new phase that late",
            );
        }
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        max_ttl: Duration::from_secs(60),
        skew: Duration::from_secs(5),
        seen_until: None,
    };

    fn advance(s: &RotationState, now: i64, force: bool) -> Result<RotationState, Refusal> {
        s.step(Step::Advance { force, auto: false }, now, &T, "r1")
    }

    #[test]
    fn a_full_rotation_waits_max_ttl_plus_skew_in_each_phase() {
        let s = RotationState::default()
            .start(1000, &T, "operator", "r1")
            .unwrap();
        assert_eq!(s.phase, Phase::Publishing);
        assert_eq!(s.next_after, Some(1065));
        let e = advance(&s, 1064, false).unwrap_err();
        assert!(e.0.contains("--force") && e.0.contains("in 1s"), "{e}");
        assert!(!s.due(1064, &T) && s.due(1065, &T));
        let s = advance(&s, 1065, false).unwrap();
        assert_eq!((s.phase, s.next_after), (Phase::SigningNew, Some(1130)));
        let s = advance(&s, 1130, false).unwrap();
        assert_eq!((s.phase, s.next_after), (Phase::Retiring, Some(1195)));
        let s = advance(&s, 1195, false).unwrap();
        assert_eq!((s.phase, s.next_after), (Phase::Done, None));
        assert_eq!(s.history.len(), 4);
        assert!(s.history.iter().all(|t| !t.forced));
        // A new rotation may follow; one in progress may not be started twice.
        let s = s.start(2000, &T, "again", "r2").unwrap();
        assert!(
            s.start(2001, &T, "x", "r2")
                .unwrap_err()
                .0
                .contains("already")
        );
    }

    #[test]
    fn forcing_skips_a_wait_and_says_so() {
        let s = RotationState::default().start(0, &T, "", "r1").unwrap();
        let s = advance(&s, 1, true).unwrap();
        assert_eq!(s.phase, Phase::SigningNew);
        assert!(s.last().unwrap().forced);
    }

    #[test]
    fn issuance_seen_lengthens_the_wait() {
        let s = RotationState::default().start(0, &T, "", "r1").unwrap();
        let t = Timing {
            seen_until: Some(100),
            ..T
        };
        assert_eq!(s.safe_after(&t), Some(105));
        assert!(!s.due(104, &t));
        assert!(
            s.step(
                Step::Advance {
                    force: false,
                    auto: true
                },
                104,
                &t,
                "r"
            )
            .is_err()
        );
        let s = s
            .step(
                Step::Advance {
                    force: false,
                    auto: true,
                },
                105,
                &t,
                "r",
            )
            .unwrap();
        assert_eq!(s.last().unwrap().action, "auto");
    }

    #[test]
    fn abort_steps_back_without_breaking_live_certificates() {
        let s = RotationState::default().start(0, &T, "", "r1").unwrap();
        // From publishing, nothing was signed by the new root: back to idle at once.
        let idle = s.step(Step::Abort { force: false }, 1, &T, "r1").unwrap();
        assert_eq!(idle.phase, Phase::Idle);

        let s = advance(&s, 65, false).unwrap();
        let back = s.step(Step::Abort { force: false }, 70, &T, "r1").unwrap();
        assert_eq!(back.phase, Phase::Publishing);
        assert!(
            back.paused,
            "an aborted rotation does not advance by itself"
        );
        assert!(!back.due(10_000, &T));
        // The new root's certificates live until 130: forgetting it waits for them.
        let e = back
            .step(Step::Abort { force: false }, 100, &T, "r1")
            .unwrap_err();
        assert!(e.0.contains("alive until"), "{e}");
        assert_eq!(
            back.step(Step::Abort { force: false }, 135, &T, "r1")
                .unwrap()
                .phase,
            Phase::Idle
        );
        // Re-advancing after an abort is allowed at once (everyone trusts both roots).
        assert_eq!(advance(&back, 71, false).unwrap().phase, Phase::SigningNew);

        let r = advance(&advance(&s, 130, false).unwrap(), 131, true).unwrap();
        assert_eq!(r.phase, Phase::Done);
        let retiring = advance(&s, 130, false).unwrap();
        assert_eq!(
            retiring
                .step(Step::Abort { force: false }, 131, &T, "r1")
                .unwrap()
                .phase,
            Phase::SigningNew
        );
        assert!(r.step(Step::Abort { force: false }, 200, &T, "r1").is_err());
    }

    #[test]
    fn history_is_bounded() {
        let mut s = RotationState::default();
        for i in 0..40 {
            s = s.start(i * 10, &T, "", "r").unwrap();
            s = s
                .step(Step::Abort { force: false }, i * 10 + 1, &T, "r")
                .unwrap();
        }
        assert_eq!(s.history.len(), HISTORY);
    }
}
