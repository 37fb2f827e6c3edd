//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go does it, so
//! that of several bridge replicas only one writes cluster objects (root ConfigMaps).
//!
//! Every `retryPeriod` each replica reads the Lease: the holder renews it; the others take
//! it over only once its record (holder, renewTime) has not changed for `leaseDuration`
//! as observed on their OWN clock (no trust in other machines' clocks). Writes carry the
//! read `resourceVersion`, so two replicas racing for an expired Lease cannot both win
//! (the loser gets 409 Conflict). A leader that cannot renew for `leaseDuration` minus one
//! `retryPeriod` stops leading before anyone else can take over; on shutdown it releases
//! the Lease.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

use crate::config::LeaderElectionConfig;

/// Who we are in the Lease: the pod name (HOSTNAME) plus a random suffix, so that a
/// restarted pod is a new candidate.
pub fn identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "istio-ca-bridge".into());
    format!("{host}_{:08x}", rand::random::<u32>())
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
    duration: Duration,
    /// The other holder's record as last seen, and when we first saw it.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

impl Elector {
    /// One round: Ok(true) if we hold the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let secs = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.me.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != self.me {
            let record = (holder.clone(), spec.renew_time.clone());
            let changed = self
                .observed
                .as_ref()
                .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
            if changed {
                self.observed = Some((record.0, record.1, Instant::now()));
                return Ok(false);
            }
            let since = self.observed.as_ref().map(|o| o.2).expect("observed");
            let their = spec
                .lease_duration_seconds
                .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
            if since.elapsed() < their {
                return Ok(false);
            }
            tracing::info!(lease = %self.name, previous = %holder, "lease expired; taking over");
        }
        if holder != self.me {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.me.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (holder cleared) so a successor need not wait for it to expire.
    async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.me.as_str())
        {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await;
        }
    }
}

/// Runs `lead` while this replica holds the Lease (a new run each time leadership is
/// gained; its token is cancelled when it is lost), until `stop`.
pub async fn run<F, Fut>(
    client: kube::Client,
    cfg: &LeaderElectionConfig,
    cluster: &str,
    leader_gauge: prometheus::IntGauge,
    stop: CancellationToken,
    mut lead: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut e = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        name: cfg.lease_name.clone(),
        me: identity(),
        duration: cfg.lease_duration,
        observed: None,
    };
    let mut leading: Option<CancellationToken> = None;
    let mut last_renewed = Instant::now();
    loop {
        let round = tokio::time::timeout(cfg.retry_period, e.try_acquire_or_renew()).await;
        let held = match round {
            Ok(Ok(held)) => Some(held),
            Ok(Err(err)) => {
                tracing::warn!(cluster, lease = %e.name, error = %err, "lease round failed");
                None
            }
            Err(_) => {
                tracing::warn!(cluster, lease = %e.name, "lease round timed out");
                None
            }
        };
        match held {
            Some(true) => {
                last_renewed = Instant::now();
                if leading.is_none() {
                    tracing::info!(cluster, lease = %e.name, identity = %e.me, "became leader");
                    let token = stop.child_token();
                    tokio::spawn(lead(token.clone()));
                    leading = Some(token);
                    leader_gauge.set(1);
                }
            }
            // Lost it, or could not renew for (almost) a whole lease duration: stop
            // writing one retry period before anyone else may take over.
            Some(false) | None
                if leading.is_some()
                    && (held == Some(false)
                        || last_renewed.elapsed() + cfg.retry_period >= e.duration) =>
            {
                tracing::warn!(cluster, lease = %e.name, "lost leadership");
                if let Some(t) = leading.take() {
                    t.cancel();
                }
                leader_gauge.set(0);
            }
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => {
                leader_gauge.set(0);
                if let Some(t) = leading.take() {
                    t.cancel();
                    let _ = tokio::time::timeout(cfg.retry_period, e.release()).await;
                }
                return;
            }
            _ = tokio::time::sleep(cfg.retry_period) => {}
        }
    }
}
