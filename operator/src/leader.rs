//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles at a time.
//!
//! The protocol is client-go's: the Lease names its holder and when it last renewed; a
//! candidate takes the Lease when it is free or its holder has not renewed for
//! `leaseDurationSeconds`. Every write carries the `resourceVersion` it read, so two candidates
//! racing for an expired Lease cannot both win (the loser gets a 409 Conflict). The leader
//! renews every [`RENEW_PERIOD`]; a leader that cannot renew within the lease duration stops
//! (the process exits and its Deployment restarts it as a candidate), because by then another
//! replica may have taken over.
//!
//! [`decide`] is the pure part: given the Lease as read and the clock, what to do.
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::{Error, Result};

/// How long a leader's claim lasts without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews, and how often a candidate retries.
pub const RENEW_PERIOD: Duration = Duration::from_secs(2);

/// What a candidate should do with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it (renew), or it is free or expired (take it).
    Acquire,
    /// Someone else holds a live claim.
    Wait { holder: String },
}

/// Decides from the Lease as read (`None`: none exists) at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else { return Decision::Create };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return Decision::Acquire;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_DURATION.as_secs() as i32));
    let renewed = spec.renew_time.map(|t| t.0).or(spec.acquire_time.map(|t| t.0));
    match renewed {
        Some(t) if now < t.saturating_add(SignedDuration::from_secs(duration)).unwrap_or(t) => Decision::Wait { holder },
        _ => Decision::Acquire,
    }
}

/// A Lease-based elector for one identity.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Elector {
        Elector { api: Api::namespaced(client, namespace), name: name.to_owned(), identity: identity.to_owned() }
    }

    /// One attempt to hold the Lease; `Ok(true)` when we hold it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(current.as_ref(), &self.identity, now);
        let holding = |previous: Option<&LeaseSpec>| {
            let ours = previous.and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str());
            LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                acquire_time: if ours { previous.and_then(|s| s.acquire_time.clone()) } else { Some(MicroTime(now)) },
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(
                    previous.and_then(|s| s.lease_transitions).unwrap_or(0) + if ours { 0 } else { 1 },
                ),
                ..LeaseSpec::default()
            }
        };
        let result = match decision {
            Decision::Wait { .. } => return Ok(false),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(holding(None)),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            Decision::Acquire => {
                // `current` is Some here; replace carries its resourceVersion (optimistic lock).
                let mut lease = current.unwrap_or_default();
                lease.spec = Some(holding(lease.spec.as_ref()));
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(true),
            // Another candidate wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Blocks until this identity holds the Lease.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) if !waiting_logged => {
                    info!(lease = %self.name, identity = %self.identity, "another replica leads; standing by");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(RENEW_PERIOD).await;
        }
    }

    /// Renews until renewal fails for longer than the lease lasts; returns when leadership is
    /// lost (the caller must stop reconciling).
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_PERIOD).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica took the lease");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "renewing the lease failed");
                    if last_ok.elapsed() > LEASE_DURATION {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, now: Timestamp) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn no_lease_means_create_it() {
        assert_eq!(decide(None, "a", Timestamp::now()), Decision::Create);
    }

    #[test]
    fn a_live_claim_of_another_replica_is_respected() {
        let now = Timestamp::now();
        assert_eq!(decide(Some(&lease("b", 5, now)), "a", now), Decision::Wait { holder: "b".into() });
    }

    #[test]
    fn an_expired_claim_is_taken_over_and_our_own_is_renewed() {
        let now = Timestamp::now();
        assert_eq!(decide(Some(&lease("b", 16, now)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&lease("a", 1, now)), "a", now), Decision::Acquire);
    }
}
