//! Status computation: from what the controller observed (the live Deployment and the outcome of
//! resolving the hub revision) to the `LanguageModel`'s status, as a pure function.
//!
//! Conditions, in the kstatus shape (`type`, `status`, `reason`, `message`,
//! `lastTransitionTime`, `observedGeneration`):
//! - `Ready`: every desired replica runs the current pod template and is ready (or the model is
//!   scaled to zero);
//! - `Progressing`: the Deployment is still converging (True), or has converged or given up
//!   (False, with the reason);
//! - `Degraded`: something blocks the desired state: a rollout past its progress deadline, or a
//!   revision that cannot be resolved;
//! - `ModelResolved`: the hub revision resolved to a commit, or needs no resolution.
//!
//! `lastTransitionTime` only moves when a condition's `status` changes, so that an unchanged
//! world computes an identical status and the controller writes nothing. Conditions of other
//! types (e.g. `Drifted`, set by drift handling) are carried over untouched.
use k8s_openapi::{
    api::apps::v1::Deployment,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{
    LanguageModel, LanguageModelStatus,
    builders::{endpoint, selector_string},
    consts::{condition, reason},
};

/// The outcome of resolving `spec.model.huggingFace.revision`.
#[derive(Clone, Debug, PartialEq)]
pub enum ResolutionOutcome {
    /// A PVC source, or a revision that already is a commit sha.
    NotRequired,
    /// The hub answered with this commit.
    Resolved { commit: String },
    /// Not attempted yet.
    Pending,
    /// The hub refused or could not be asked; `reason` is one of [`crate::consts::reason`]
    /// (`RepositoryNotFound`, `HubUnauthorized`, ...) and `message` never holds the token.
    Failed { reason: &'static str, message: String },
}

/// What the controller saw in the cluster for one model.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The live Deployment, `None` when it does not exist (yet).
    pub deployment: Option<&'a Deployment>,
    /// How the hub revision resolved.
    pub resolution: ResolutionOutcome,
}

/// A condition as computed, before `lastTransitionTime` is settled against the previous status.
struct Verdict {
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

/// Computes the status of `lm` from what was observed; `now` stamps conditions whose status
/// changed.
pub fn compute_status(lm: &LanguageModel, observed: &Observed<'_>, now: &Time) -> LanguageModelStatus {
    let previous = lm.status.clone().unwrap_or_default();
    let generation = lm.metadata.generation;
    let name = lm.metadata.name.as_deref().unwrap_or_default();
    let desired = lm.spec.replicas.max(0);

    let dep_status = observed.deployment.and_then(|d| d.status.clone()).unwrap_or_default();
    let replicas = dep_status.replicas.unwrap_or(0);
    let ready = dep_status.ready_replicas.unwrap_or(0);
    let updated = dep_status.updated_replicas.unwrap_or(0);

    let resolved_revision = match &observed.resolution {
        ResolutionOutcome::Resolved { commit } => Some(commit.clone()),
        ResolutionOutcome::NotRequired => lm.spec.model.hugging_face.as_ref().map(|h| h.revision.clone()),
        // The pods stay pinned to the last commit that resolved.
        ResolutionOutcome::Pending | ResolutionOutcome::Failed { .. } => previous.resolved_revision.clone(),
    };

    let verdicts = verdicts(lm, observed, DeploymentCounts { desired, replicas, ready, updated });
    let mut conditions: Vec<Condition> =
        verdicts.into_iter().map(|v| settle(&previous.conditions, v, generation, now)).collect();
    // Conditions this function does not own (e.g. Drifted) are kept as they were.
    conditions.extend(previous.conditions.iter().filter(|c| !OWNED.contains(&c.type_.as_str())).cloned());

    LanguageModelStatus {
        observed_generation: generation,
        conditions,
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(updated),
        selector: Some(selector_string(name)),
        resolved_revision,
        endpoint: endpoint(lm),
        drift: previous.drift,
    }
}

/// Condition types [`compute_status`] owns, in the order it writes them.
const OWNED: [&str; 4] = [condition::READY, condition::PROGRESSING, condition::DEGRADED, condition::MODEL_RESOLVED];

#[derive(Clone, Copy)]
struct DeploymentCounts {
    desired: i32,
    replicas: i32,
    ready: i32,
    updated: i32,
}

fn verdicts(lm: &LanguageModel, observed: &Observed<'_>, n: DeploymentCounts) -> [Verdict; 4] {
    let resolution = resolution_verdict(&observed.resolution);
    let resolution_failure = match &observed.resolution {
        ResolutionOutcome::Failed { reason, message } => Some((*reason, message.clone())),
        _ => None,
    };

    let Some(deployment) = observed.deployment else {
        let (progressing, degraded) = match &resolution_failure {
            Some((r, m)) => (
                verdict(condition::PROGRESSING, "False", r, format!("cannot create the Deployment: {m}")),
                verdict(condition::DEGRADED, "True", r, m.clone()),
            ),
            None => (
                verdict(condition::PROGRESSING, "True", reason::DEPLOYMENT_PENDING, "creating the Deployment".into()),
                verdict(condition::DEGRADED, "False", reason::AS_EXPECTED, "nothing is failing".into()),
            ),
        };
        let ready =
            verdict(condition::READY, "False", reason::DEPLOYMENT_PENDING, "the Deployment does not exist yet".into());
        return [ready, progressing, degraded, resolution];
    };

    let dep_generation = deployment.metadata.generation.unwrap_or(0);
    let dep_status = deployment.status.clone().unwrap_or_default();
    let seen_by_controller = dep_status.observed_generation.unwrap_or(0) >= dep_generation;
    let deadline_exceeded = dep_status.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing" && c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    // Converged: the Deployment controller saw the latest template, and exactly the desired
    // number of pods run it, all ready (no old pods left over).
    let settled = seen_by_controller && n.updated == n.desired && n.replicas == n.desired && n.ready >= n.desired;

    let ready = if settled && n.desired == 0 {
        verdict(condition::READY, "True", reason::SCALED_TO_ZERO, "replicas is 0".into())
    } else if settled {
        verdict(condition::READY, "True", reason::AVAILABLE, format!("{} of {} replicas ready", n.ready, n.desired))
    } else {
        verdict(
            condition::READY,
            "False",
            reason::REPLICAS_NOT_READY,
            format!("{} of {} replicas ready, {} updated", n.ready, n.desired, n.updated),
        )
    };

    let progressing = if deadline_exceeded {
        verdict(
            condition::PROGRESSING,
            "False",
            reason::PROGRESS_DEADLINE_EXCEEDED,
            "the rollout made no progress within spec.rollout.progressDeadlineSeconds".into(),
        )
    } else if settled {
        verdict(condition::PROGRESSING, "False", reason::ROLLOUT_COMPLETE, "the rollout is complete".into())
    } else if lm.spec.paused {
        verdict(condition::PROGRESSING, "False", reason::PAUSED, "spec.paused is set: kandle changes nothing".into())
    } else {
        verdict(
            condition::PROGRESSING,
            "True",
            reason::ROLLOUT_IN_PROGRESS,
            format!("{} of {} replicas updated, {} ready", n.updated, n.desired, n.ready),
        )
    };

    let degraded = if deadline_exceeded {
        verdict(
            condition::DEGRADED,
            "True",
            reason::PROGRESS_DEADLINE_EXCEEDED,
            "the rollout is stuck: check the pods' events (image, GPUs, model download)".into(),
        )
    } else if let Some((r, m)) = resolution_failure {
        verdict(condition::DEGRADED, "True", r, m)
    } else {
        verdict(condition::DEGRADED, "False", reason::AS_EXPECTED, "nothing is failing".into())
    };

    [ready, progressing, degraded, resolution]
}

fn resolution_verdict(outcome: &ResolutionOutcome) -> Verdict {
    match outcome {
        ResolutionOutcome::NotRequired => {
            verdict(condition::MODEL_RESOLVED, "True", reason::NOT_REQUIRED, "the source needs no resolution".into())
        }
        ResolutionOutcome::Resolved { commit } => {
            verdict(condition::MODEL_RESOLVED, "True", reason::RESOLVED, format!("pinned to commit {commit}"))
        }
        ResolutionOutcome::Pending => verdict(
            condition::MODEL_RESOLVED,
            "Unknown",
            reason::RESOLUTION_PENDING,
            "the revision has not been resolved yet".into(),
        ),
        ResolutionOutcome::Failed { reason, message } => {
            verdict(condition::MODEL_RESOLVED, "False", reason, message.clone())
        }
    }
}

fn verdict(type_: &'static str, status: &'static str, reason: &'static str, message: String) -> Verdict {
    Verdict { type_, status, reason, message }
}

/// Turns a verdict into a condition, keeping the previous `lastTransitionTime` unless the
/// status changed.
fn settle(previous: &[Condition], v: Verdict, generation: Option<i64>, now: &Time) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == v.type_ && c.status == v.status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: v.type_.into(),
        status: v.status.into(),
        reason: v.reason.into(),
        message: v.message,
        last_transition_time,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::apps::v1::{DeploymentCondition, DeploymentStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
        jiff::Timestamp,
    };

    use super::*;
    use crate::builders::fixtures::*;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + secs).unwrap())
    }

    fn dep(generation: i64, observed: i64, replicas: i32, updated: i32, ready: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { generation: Some(generation), ..ObjectMeta::default() },
            spec: None,
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(replicas),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn cond<'a>(s: &'a LanguageModelStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_}"))
    }

    fn resolved() -> ResolutionOutcome {
        ResolutionOutcome::Resolved { commit: SHA.into() }
    }

    #[test]
    fn a_converged_deployment_makes_the_model_ready_and_not_progressing() {
        let lm = hub_model();
        let d = dep(2, 2, 1, 1, 1);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        assert_eq!((cond(&s, "Ready").status.as_str(), cond(&s, "Ready").reason.as_str()), ("True", "Available"));
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Progressing").reason, "RolloutComplete");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "ModelResolved").reason, "Resolved");
        assert_eq!(s.resolved_revision.as_deref(), Some(SHA));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!((s.replicas, s.ready_replicas, s.updated_replicas), (Some(1), Some(1), Some(1)));
        assert_eq!(s.selector.as_deref(), Some("app.kubernetes.io/name=kandle,kandle.dev/model=smollm"));
        assert_eq!(s.endpoint.as_deref(), Some("http://smollm.models.svc:8080/v1"));
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(1)));
    }

    #[test]
    fn a_deployment_the_controller_has_not_seen_yet_is_still_progressing() {
        let lm = hub_model();
        let d = dep(3, 2, 1, 1, 1);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Progressing").status, "True");
    }

    #[test]
    fn old_pods_left_during_a_rollout_keep_it_progressing() {
        let mut lm = hub_model();
        lm.spec.replicas = 2;
        let d = dep(1, 1, 3, 2, 2);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Progressing").reason, "RolloutInProgress");
    }

    #[test]
    fn loading_replicas_are_not_ready() {
        let lm = hub_model();
        let d = dep(1, 1, 1, 1, 0);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        assert_eq!(cond(&s, "Ready").reason, "ReplicasNotReady");
        assert_eq!(cond(&s, "Ready").message, "0 of 1 replicas ready, 1 updated");
        assert_eq!(cond(&s, "Degraded").status, "False");
    }

    #[test]
    fn a_model_scaled_to_zero_is_ready() {
        let mut lm = hub_model();
        lm.spec.replicas = 0;
        let d = dep(1, 1, 0, 0, 0);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        assert_eq!((cond(&s, "Ready").status.as_str(), cond(&s, "Ready").reason.as_str()), ("True", "ScaledToZero"));
    }

    #[test]
    fn a_missing_deployment_is_pending_not_degraded() {
        let s = compute_status(
            &hub_model(),
            &Observed { deployment: None, resolution: ResolutionOutcome::Pending },
            &at(0),
        );
        assert_eq!(cond(&s, "Ready").reason, "DeploymentPending");
        assert_eq!(cond(&s, "Progressing").status, "True");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "ModelResolved").status, "Unknown");
    }

    #[test]
    fn a_rollout_past_its_deadline_is_degraded_and_no_longer_progressing() {
        let lm = hub_model();
        let mut d = dep(2, 2, 2, 1, 1);
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            ..DeploymentCondition::default()
        }]);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        assert_eq!(cond(&s, "Progressing").reason, "ProgressDeadlineExceeded");
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(
            (cond(&s, "Degraded").status.as_str(), cond(&s, "Degraded").reason.as_str()),
            ("True", "ProgressDeadlineExceeded")
        );
    }

    #[test]
    fn a_failed_resolution_degrades_the_model_with_its_reason_and_keeps_the_last_commit() {
        let mut lm = hub_model();
        lm.status = Some(LanguageModelStatus { resolved_revision: Some(SHA.into()), ..LanguageModelStatus::default() });
        let failed =
            ResolutionOutcome::Failed { reason: reason::HUB_UNAUTHORIZED, message: "the hub refused the token".into() };
        let d = dep(1, 1, 1, 1, 1);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: failed.clone() }, &at(0));
        assert_eq!(
            (cond(&s, "ModelResolved").status.as_str(), cond(&s, "ModelResolved").reason.as_str()),
            ("False", "HubUnauthorized")
        );
        assert_eq!(
            (cond(&s, "Degraded").status.as_str(), cond(&s, "Degraded").reason.as_str()),
            ("True", "HubUnauthorized")
        );
        assert_eq!(s.resolved_revision.as_deref(), Some(SHA));
        assert_eq!(cond(&s, "Ready").status, "True", "the pinned pods still serve");

        let s = compute_status(&hub_model(), &Observed { deployment: None, resolution: failed }, &at(0));
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Degraded").reason, "HubUnauthorized");
    }

    #[test]
    fn a_pvc_model_needs_no_resolution_and_reports_no_revision() {
        let d = dep(1, 1, 1, 1, 1);
        let s = compute_status(
            &pvc_model(),
            &Observed { deployment: Some(&d), resolution: ResolutionOutcome::NotRequired },
            &at(0),
        );
        assert_eq!(cond(&s, "ModelResolved").reason, "ResolutionNotRequired");
        assert_eq!(s.resolved_revision, None);
    }

    #[test]
    fn an_unchanged_world_computes_an_identical_status() {
        let mut lm = hub_model();
        let d = dep(1, 1, 1, 1, 1);
        let observed = Observed { deployment: Some(&d), resolution: resolved() };
        let first = compute_status(&lm, &observed, &at(0));
        lm.status = Some(first.clone());
        let second = compute_status(&lm, &observed, &at(600));
        assert_eq!(first, second, "so a no-op reconcile writes nothing");
    }

    #[test]
    fn last_transition_time_moves_only_when_a_condition_changes_status() {
        let mut lm = hub_model();
        let loading = dep(1, 1, 1, 1, 0);
        let s0 = compute_status(&lm, &Observed { deployment: Some(&loading), resolution: resolved() }, &at(0));
        lm.status = Some(s0);
        let ready = dep(1, 1, 1, 1, 1);
        let s1 = compute_status(&lm, &Observed { deployment: Some(&ready), resolution: resolved() }, &at(100));
        assert_eq!(cond(&s1, "Ready").last_transition_time, at(100), "False -> True");
        assert_eq!(cond(&s1, "Degraded").last_transition_time, at(0), "stayed False");
        assert_eq!(cond(&s1, "ModelResolved").last_transition_time, at(0), "stayed True");
    }

    #[test]
    fn conditions_owned_by_others_are_carried_over() {
        let mut lm = hub_model();
        let drifted = Condition {
            type_: "Drifted".into(),
            status: "True".into(),
            reason: "ConfigDriftReported".into(),
            message: "Deployment/smollm: spec.replicas".into(),
            last_transition_time: at(5),
            observed_generation: Some(1),
        };
        lm.status = Some(LanguageModelStatus { conditions: vec![drifted.clone()], ..LanguageModelStatus::default() });
        let d = dep(1, 1, 1, 1, 1);
        let s = compute_status(&lm, &Observed { deployment: Some(&d), resolution: resolved() }, &at(0));
        let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Progressing", "Degraded", "ModelResolved", "Drifted"]);
        assert_eq!(cond(&s, "Drifted"), &drifted);
    }
}
