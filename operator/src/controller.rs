//! The reconcile shell: watches `LanguageModel`s and their children and converges the cluster
//! on what the pure builders say, reporting through status, Events and metrics.
//!
//! One reconcile of a model:
//! 1. resolve the hub revision to a commit ([`crate::hub`]), reading the token Secret if named;
//!    a failure keeps the previously pinned commit (pods never follow a moving branch);
//! 2. build the desired children and compare each with the live object over the fields kandle
//!    owns ([`crate::drift::config_drift`]). Each desired child carries the hash of itself in
//!    the `kandle.dev/applied-hash` annotation, which separates the two reasons they can
//!    differ: kandle's desired object changed (the hash differs: apply, a rollout when it is the
//!    Deployment) or someone edited the live one (the hash is equal: config drift, reverted or
//!    reported per `spec.drift.policy`);
//! 3. compute the status ([`crate::status::compute_status`]) and patch it only if it changed.
//!
//! Nothing is written when nothing changed: no apply, no status patch, no Event. Writes are
//! server-side apply under the field manager `kandle-operator`, and counted in
//! `kandle_api_writes_total`.
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::{info, instrument, warn};

use crate::api::{DriftAction, DriftPolicy, DriftStatus};
use crate::builders::{self, BuilderConfig, Resolution};
use crate::consts::{FIELD_MANAGER, FINALIZER, annotation, condition, label, reason};
use crate::drift::config_drift;
use crate::hub::{Hub, ResolveError, is_commit};
use crate::metrics::Metrics;
use crate::status::{Observed, ResolutionOutcome, compute_status};
use crate::{Error, LanguageModel, LanguageModelStatus, Result};

/// Reconciles in flight at once. Unbounded, a restart reconciles every model at the same time
/// and holds all their requests in memory (161 MiB peak at 1000 models); the API server
/// serialises much of that work anyway.
pub const CONCURRENCY: u16 = 16;

/// How often a settled model is looked at again (the hub may move a branch meanwhile).
pub const RESYNC: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub builder: BuilderConfig,
    pub hub: Hub,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per model (`namespace/name`), for growing backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The phase of every model this process reconciled, behind `kandle_models{phase}`.
    phases: Mutex<HashMap<String, &'static str>>,
}

impl Context {
    pub fn new(client: Client, builder: BuilderConfig, metrics: Arc<Metrics>) -> Context {
        let hub = Hub::new(builder.hub_endpoint.as_deref());
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        Context { client, builder, hub, recorder, metrics, failures: Mutex::default(), phases: Mutex::default() }
    }
}

impl Context {
    /// Records the phase of one model (`None`: it is gone) and refreshes `kandle_models`.
    fn set_phase(&self, model: String, phase: Option<&'static str>) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        match phase {
            Some(p) => phases.insert(model, p),
            None => phases.remove(&model),
        };
        for name in PHASES {
            let n = phases.values().filter(|p| **p == name).count() as i64;
            self.metrics.models.get_or_create(&crate::metrics::PhaseLabels { phase: name.to_owned() }).set(n);
        }
    }
}

/// The phases `kandle_models` counts: Degraded wins over Progressing, which wins over Ready.
const PHASES: [&str; 3] = ["Ready", "Progressing", "Degraded"];

/// The phase of a status, for the `kandle_models{phase}` gauge.
pub fn phase(status: &LanguageModelStatus) -> &'static str {
    let is_true = |t: &str| status.conditions.iter().any(|c| c.type_ == t && c.status == "True");
    if is_true(condition::DEGRADED) {
        "Degraded"
    } else if is_true(condition::READY) {
        "Ready"
    } else {
        "Progressing"
    }
}

/// Runs the controller over `lms` until a shutdown signal.
pub async fn run_controller(ctx: Arc<Context>, namespace: Option<String>) {
    let namespace = namespace.as_deref();
    let client = ctx.client.clone();
    let lms: Api<LanguageModel> = scoped(client.clone(), namespace);
    let children = watcher::Config::default().labels(&format!("{}={}", label::NAME, label::NAME_VALUE));
    Controller::new(lms, watcher::Config::default())
        .owns(scoped::<Deployment>(client.clone(), namespace), children.clone())
        .owns(scoped::<Service>(client.clone(), namespace), children.clone())
        .owns(scoped::<PodDisruptionBudget>(client.clone(), namespace), children.clone())
        .owns(scoped::<PersistentVolumeClaim>(client, namespace), children)
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn scoped<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

fn key(lm: &LanguageModel) -> String {
    format!("{}/{}", lm.namespace().unwrap_or_default(), lm.name_any())
}

/// Reconciles one model (see the module docs).
#[instrument(skip_all, fields(model = %key(&lm)))]
pub async fn reconcile(lm: Arc<LanguageModel>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    tracing::debug!(generation = ?lm.metadata.generation, resource_version = ?lm.resource_version(), "reconciling");
    let ns = lm.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<LanguageModel> = Api::namespaced(ctx.client.clone(), &ns);
    let model_key = key(&lm);
    let result = finalizer(&api, FINALIZER, lm, |event| async {
        match event {
            Finalizer::Apply(lm) => apply(&lm, &ctx).await,
            Finalizer::Cleanup(lm) => cleanup(&lm, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&model_key);
    }
    result
}

/// Transient errors back off per object, doubling from 1 s to 5 min; errors the user must fix
/// (an unknown repository, a refused token, a missing Secret) were already reported in status
/// and are retried slowly, doubling from 30 s to 10 min.
pub fn error_policy(lm: Arc<LanguageModel>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.count_error(error.metric_label());
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key(&lm)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures, error.is_permanent());
    warn!(model = %key(&lm), error = %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay before retry number `failures` (1-based).
pub fn backoff(failures: u32, permanent: bool) -> Duration {
    let (base, cap) = if permanent { (30, 600) } else { (1, 300) };
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_secs((base << exp).min(cap))
}

/// What resolution produced: the outcome for status, and the commit to pin the pods to.
async fn resolve(lm: &LanguageModel, ctx: &Context) -> (ResolutionOutcome, Option<String>) {
    let previous = lm.status.as_ref().and_then(|s| s.resolved_revision.clone());
    let Some(hf) = &lm.spec.model.hugging_face else {
        return (ResolutionOutcome::NotRequired, None);
    };
    if is_commit(&hf.revision) {
        return (ResolutionOutcome::NotRequired, Some(hf.revision.clone()));
    }
    let token = match &hf.token_secret_ref {
        None => None,
        Some(r) => match read_token(ctx, lm, &r.name, &r.key).await {
            Ok(t) => Some(t),
            Err(outcome) => return (outcome, previous),
        },
    };
    match ctx.hub.resolve(&hf.repo, &hf.revision, token.as_deref()).await {
        Ok(commit) => (ResolutionOutcome::Resolved { commit: commit.clone() }, Some(commit)),
        Err(ResolveError { reason, message, .. }) => (ResolutionOutcome::Failed { reason, message }, previous),
    }
}

async fn read_token(ctx: &Context, lm: &LanguageModel, name: &str, key: &str) -> Result<String, ResolutionOutcome> {
    let ns = lm.namespace().unwrap_or_default();
    let missing = |what: String| ResolutionOutcome::Failed { reason: reason::TOKEN_SECRET_MISSING, message: what };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get_opt(name).await.map_err(|e| {
        ResolutionOutcome::Failed {
            reason: reason::TOKEN_SECRET_MISSING,
            message: format!("reading Secret {name} failed: {}", crate::error::kube_reason(&e)),
        }
    })?;
    let Some(secret) = secret else {
        return Err(missing(format!(
            "Secret {name} named by spec.model.huggingFace.tokenSecretRef does not exist in namespace {ns}"
        )));
    };
    let value = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| String::from_utf8_lossy(&b.0).trim().to_owned());
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(missing(format!("Secret {name} has no non-empty key {key:?} (spec.model.huggingFace.tokenSecretRef.key)"))),
    }
}

/// Marks `obj` with the hash of its own content, so a later reconcile can tell "kandle's
/// desired object changed" from "someone edited the live one".
fn stamp<K: Resource + Serialize>(obj: &mut K) -> Result<()> {
    obj.annotations_mut().remove(annotation::APPLIED_HASH);
    let json = serde_json::to_vec(&*obj).map_err(|source| Error::Serialize { what: "child", source })?;
    let hash = hex::encode(Sha256::digest(&json))[..16].to_owned();
    obj.annotations_mut().insert(annotation::APPLIED_HASH.to_owned(), hash);
    Ok(())
}

/// What syncing the children found and did, for status and Events.
#[derive(Default)]
struct SyncReport {
    /// `Kind/name: path` of drift left in place (policy Report, or paused).
    reported: Vec<String>,
    /// `Kind/name: path` of drift that was re-applied.
    reverted: Vec<String>,
}

async fn sync_child<K>(ctx: &Context, lm: &LanguageModel, mut desired: K, paused: bool, report: &mut SyncReport) -> Result<Option<K>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    stamp(&mut desired)?;
    let ns = lm.namespace().unwrap_or_default();
    let name = desired.name_any();
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let live = api.get_opt(&name).await?;
    let apply = |action: &'static str, note: String| {
        let api = api.clone();
        let desired = desired.clone();
        let name = name.clone();
        async move {
            ctx.metrics.writes.inc();
            let applied = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await?;
            publish(ctx, lm, EventType::Normal, action, action, note).await;
            Ok::<_, Error>(Some(applied))
        }
    };
    let Some(live) = live else {
        if paused {
            return Ok(None);
        }
        return apply("Created", format!("created {kind} {name}")).await;
    };
    let differences = config_drift(&desired, &live)?;
    if differences.is_empty() {
        return Ok(Some(live));
    }
    let ours_changed = live.annotations().get(annotation::APPLIED_HASH) != desired.annotations().get(annotation::APPLIED_HASH);
    tracing::debug!(%kind, %name, ours_changed, first = %differences[0], "child differs");
    if ours_changed && !paused {
        let (action, note) = if kind == "Deployment" {
            ("RolloutStarted", format!("updating {kind} {name}: the pod template or its settings changed"))
        } else {
            ("Updated", format!("updated {kind} {name}"))
        };
        return apply(action, note).await;
    }
    if ours_changed {
        return Ok(Some(live));
    }
    let paths: Vec<String> = differences.iter().map(|d| format!("{kind}/{name}: {d}")).collect();
    ctx.metrics.count_drift("config");
    if lm.spec.drift.policy == DriftPolicy::Revert && !paused {
        ctx.metrics.drift_corrections.inc();
        report.reverted.extend(paths.iter().cloned());
        let note = format!("reverted edits to {}", paths.join(", "));
        let applied = apply("DriftReverted", note).await?;
        return Ok(applied);
    }
    report.reported.extend(paths);
    Ok(Some(live))
}

async fn delete_if_ours<K>(ctx: &Context, lm: &LanguageModel, name: &str) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &lm.namespace().unwrap_or_default());
    let Some(live) = api.get_opt(name).await? else { return Ok(()) };
    let uid = lm.uid();
    let ours = live.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true));
    if !ours {
        return Ok(());
    }
    ctx.metrics.writes.inc();
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn apply(lm: &LanguageModel, ctx: &Context) -> Result<Action> {
    let name = lm.name_any();
    let (outcome, pin) = resolve(lm, ctx).await;
    let hub_source = lm.spec.model.hugging_face.is_some();
    let paused = lm.spec.paused;
    let mut report = SyncReport::default();
    let mut deployment = None;
    let can_build = !hub_source || pin.is_some();
    if can_build {
        let resolution = Resolution { revision: pin.clone(), model_bytes: None };
        let children = builders::children(lm, &ctx.builder, &resolution)?;
        deployment = sync_child(ctx, lm, children.deployment, paused, &mut report).await?;
        sync_child(ctx, lm, children.service, paused, &mut report).await?;
        match children.pod_disruption_budget {
            Some(pdb) => {
                sync_child(ctx, lm, pdb, paused, &mut report).await?;
            }
            None if !paused => delete_if_ours::<PodDisruptionBudget>(ctx, lm, &name).await?,
            None => {}
        }
        if let Some(pvc) = children.persistent_volume_claim {
            sync_child(ctx, lm, pvc, paused, &mut report).await?;
        }
    }

    let now = Time(Timestamp::now());
    let mut status = compute_status(lm, &Observed { deployment: deployment.as_ref(), resolution: outcome.clone() }, &now);
    apply_drift(&mut status, lm, &report, &now);
    ctx.set_phase(key(lm), Some(phase(&status)));
    let previous = lm.status.clone().unwrap_or_default();
    if status != previous {
        ctx.metrics.writes.inc();
        let api: Api<LanguageModel> = Api::namespaced(ctx.client.clone(), &lm.namespace().unwrap_or_default());
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        announce_transitions(ctx, lm, &previous, &status).await;
        info!(model = %key(lm), "status updated");
    }
    if let ResolutionOutcome::Failed { reason, message } = outcome {
        return Err(Error::Resolve(ResolveError {
            reason,
            message,
            transient: reason == reason::HUB_UNREACHABLE,
        }));
    }
    Ok(Action::requeue(RESYNC))
}

/// Sets the `Drifted` condition and `status.drift` from what this reconcile found.
fn apply_drift(status: &mut LanguageModelStatus, lm: &LanguageModel, report: &SyncReport, now: &Time) {
    let generation = lm.metadata.generation;
    let previous = lm.status.as_ref().and_then(|s| s.drift.clone());
    if !report.reported.is_empty() {
        let same = previous.as_ref().is_some_and(|p| p.config == report.reported && p.action == Some(DriftAction::Reported));
        status.drift = Some(DriftStatus {
            config: report.reported.clone(),
            last_detected_time: if same { previous.and_then(|p| p.last_detected_time) } else { Some(now.clone()) },
            action: Some(DriftAction::Reported),
        });
        let message = format!("children differ from kandle's configuration (drift.policy Report): {}", report.reported.join("; "));
        set_condition(&mut status.conditions, condition::DRIFTED, "True", reason::CONFIG_DRIFT_REPORTED, &message, generation, now);
    } else if !report.reverted.is_empty() {
        status.drift = Some(DriftStatus {
            config: report.reverted.clone(),
            last_detected_time: Some(now.clone()),
            action: Some(DriftAction::Reverted),
        });
        let message = format!("reverted edits to {}", report.reverted.join("; "));
        set_condition(&mut status.conditions, condition::DRIFTED, "False", reason::NO_DRIFT, &message, generation, now);
    } else if status.conditions.iter().any(|c| c.type_ == condition::DRIFTED && c.status == "True") {
        set_condition(&mut status.conditions, condition::DRIFTED, "False", reason::NO_DRIFT, "children match kandle's configuration", generation, now);
    }
}

/// Upserts a condition; `lastTransitionTime` moves only when its status changes.
pub fn set_condition(conditions: &mut Vec<Condition>, type_: &str, status: &str, reason: &str, message: &str, generation: Option<i64>, now: &Time) {
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = now.clone();
        }
        c.status = status.to_owned();
        c.reason = reason.to_owned();
        c.message = message.to_owned();
        c.observed_generation = generation;
        return;
    }
    conditions.push(Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    });
}

fn condition_of<'a>(status: &'a LanguageModelStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Events for condition changes a user would want to see.
async fn announce_transitions(ctx: &Context, lm: &LanguageModel, before: &LanguageModelStatus, after: &LanguageModelStatus) {
    let changed = |t: &str| {
        let a = condition_of(before, t).map(|c| (c.status.as_str(), c.reason.as_str()));
        let b = condition_of(after, t).map(|c| (c.status.as_str(), c.reason.as_str()));
        (a != b).then(|| condition_of(after, t)).flatten()
    };
    if let Some(c) = changed(condition::READY)
        && c.status == "True"
    {
        publish(ctx, lm, EventType::Normal, "RolloutFinished", "Ready", c.message.clone()).await;
    }
    if let Some(c) = changed(condition::DEGRADED)
        && c.status == "True"
    {
        publish(ctx, lm, EventType::Warning, &c.reason, "Degraded", c.message.clone()).await;
    }
    if let Some(c) = changed(condition::MODEL_RESOLVED) {
        let type_ = if c.status == "True" { EventType::Normal } else { EventType::Warning };
        publish(ctx, lm, type_, &c.reason, "ResolveRevision", c.message.clone()).await;
    }
    if let Some(c) = changed(condition::DRIFTED)
        && c.status == "True"
    {
        publish(ctx, lm, EventType::Warning, "DriftDetected", "DetectDrift", c.message.clone()).await;
    }
}

async fn publish(ctx: &Context, lm: &LanguageModel, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event { type_, reason: reason.to_owned(), note: Some(note), action: action.to_owned(), secondary: None };
    // Events are best effort: a failure to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &lm.object_ref(&())).await {
        warn!(error = %e, "could not publish an Event");
    }
}

/// Deletes the model's children (the ones whose controller owner is this model) before the
/// model goes. The cache PVC goes too: it only holds downloaded files, which the hub still has.
async fn cleanup(lm: &LanguageModel, ctx: &Context) -> Result<Action> {
    let name = lm.name_any();
    delete_if_ours::<Deployment>(ctx, lm, &name).await?;
    delete_if_ours::<Service>(ctx, lm, &name).await?;
    delete_if_ours::<PodDisruptionBudget>(ctx, lm, &name).await?;
    delete_if_ours::<PersistentVolumeClaim>(ctx, lm, &builders::cache_claim_name(&name)).await?;
    publish(ctx, lm, EventType::Normal, "Deleted", "Cleanup", format!("removed the children of {name}")).await;
    ctx.set_phase(key(lm), None);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_backoff_doubles_from_one_second_up_to_five_minutes() {
        assert_eq!(backoff(1, false), Duration::from_secs(1));
        assert_eq!(backoff(2, false), Duration::from_secs(2));
        assert_eq!(backoff(5, false), Duration::from_secs(16));
        assert_eq!(backoff(30, false), Duration::from_secs(300));
    }

    #[test]
    fn permanent_errors_retry_slowly() {
        assert_eq!(backoff(1, true), Duration::from_secs(30));
        assert_eq!(backoff(3, true), Duration::from_secs(120));
        assert_eq!(backoff(10, true), Duration::from_secs(600));
    }

    fn time(s: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + s).unwrap())
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let mut conds = Vec::new();
        set_condition(&mut conds, "Drifted", "True", "A", "m1", Some(1), &time(0));
        set_condition(&mut conds, "Drifted", "True", "B", "m2", Some(2), &time(10));
        assert_eq!(conds[0].last_transition_time, time(0));
        assert_eq!(conds[0].message, "m2");
        set_condition(&mut conds, "Drifted", "False", "C", "m3", Some(2), &time(20));
        assert_eq!(conds[0].last_transition_time, time(20));
        assert_eq!(conds.len(), 1);
    }
}
