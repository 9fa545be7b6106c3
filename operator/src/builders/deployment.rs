//! The model's Deployment: pods that download the model and serve it.
//!
//! Pod layout, and the command-line contract with `kandle-runtime`:
//! - hub source: an init container runs
//!   `kandle-runtime download --model hf://<repo>@<sha> --cache-dir /var/cache/kandle [--file F]`
//!   with `HF_ENDPOINT` (when configured) and `HF_TOKEN` (from `tokenSecretRef`), writing into
//!   the `model-cache` volume (the cache PVC, or an emptyDir);
//! - PVC source: no download; the claim is mounted read-only at `/models` and `--model` is
//!   `/models/<path>`;
//! - the main container runs `kandle-runtime serve --model <same> --cache-dir ... --port P
//!   --served-model-name <name> --device cuda|cpu --dtype D [--file F] [--task T]
//!   [--architecture A] [--max-batch-size N] [--max-sequence-length N]
//!   [--max-concurrent-requests N] [--max-new-tokens N] <spec.runtime.args...>` with
//!   `HF_HUB_OFFLINE=1` (everything it needs was downloaded), `KANDLE_API_KEY` from
//!   `serving.apiKeySecretRef`, the operator's `OTEL_EXPORTER_OTLP_ENDPOINT` when it has one,
//!   and, when the server traces, its pod's resource attributes (`with_trace_resource`);
//!   `spec.runtime.files[i]`'s Secret or ConfigMap is mounted read-only at its `mountPath`
//!   (volume `files-<i>`). The
//!   cache is mounted read-only there: the weights never change after the download, and a
//!   compromised server cannot poison a cache that other replicas share.
//!
//! The pod template carries `kandle.dev/pod-template-hash`, a hash of the template itself: the
//! template is exactly what makes a Deployment roll out, so the hash changes if and only if a
//! rollout is due (replicas, rollout strategy, Service type, drift policy and `paused` are outside
//! it and never restart pods).
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
            ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Toleration,
            Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::{
    BuilderConfig, Resolution, cache_claim_name, child_meta, labels, model_name, namespace, pod_template_hash,
    selector_labels,
};
use crate::{
    LanguageModel, Result,
    api::{HuggingFaceSource, RuntimeFiles, SecretKeyRef},
    consts::{annotation, gpu},
};

/// Where the model cache volume is mounted (the runtime's `--cache-dir`).
pub const CACHE_DIR: &str = "/var/cache/kandle";
/// Where a PVC model source is mounted.
pub const MODEL_PVC_DIR: &str = "/models";
/// CPU request of a GPU replica when `resources.cpu` is absent: the GPU does the work, one
/// core feeds it (tokenisation, HTTP, scheduling).
pub const DEFAULT_CPU_WITH_GPU: &str = "1";
/// CPU request of a CPU-only replica when `resources.cpu` is absent.
pub const DEFAULT_CPU_CPU_ONLY: &str = "2";
/// Memory request (and limit) when `resources.memory` is absent and the model's size unknown.
pub const DEFAULT_MEMORY: &str = "4Gi";
/// Seconds a rollout may stall before the Deployment reports it failed, when
/// `rollout.progressDeadlineSeconds` is absent (see [`crate::api::RolloutSpec`]).
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 1800;

/// UID and GID the runtime runs as: any non-zero id works with `runAsNonRoot`; 65532 is the
/// conventional "nonroot" of distroless images.
const RUNTIME_UID: i64 = 65532;
const CACHE_VOLUME: &str = "model-cache";
const MODEL_VOLUME: &str = "model";
const TMP_VOLUME: &str = "tmp";
/// `spec.runtime.files[i]`'s volume is `files-<i>`.
const FILES_VOLUME: &str = "files";
const HTTP_PORT_NAME: &str = "http";
const MAIN_CONTAINER: &str = "runtime";
const DOWNLOAD_CONTAINER: &str = "download";

/// The memory a replica is given when `resources.memory` is absent but the size of the weights
/// is known: the weights pass through host memory while loading (and stay there on CPU), plus a
/// quarter for activations, KV cache and tokenizer, plus 1 GiB for the process. Rounded up to
/// MiB so that the API server stores it exactly as written (no drift from canonicalisation).
pub fn memory_estimate(model_bytes: u64) -> Quantity {
    const MIB: u64 = 1024 * 1024;
    let bytes = model_bytes.saturating_add(model_bytes / 4).saturating_add(1024 * MIB);
    Quantity(format!("{}Mi", bytes.div_ceil(MIB)))
}

/// Builds the Deployment of `lm`.
pub fn deployment(lm: &LanguageModel, config: &BuilderConfig, resolution: &Resolution) -> Result<Deployment> {
    let name = model_name(lm)?.to_owned();
    let mut template = pod_template(lm, config, resolution)?;
    let hash = pod_template_hash(&template)?;
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotation::POD_TEMPLATE_HASH.to_owned(), hash.clone());

    let mut metadata = child_meta(lm, name.clone())?;
    let mut annotations = BTreeMap::from([(annotation::POD_TEMPLATE_HASH.to_owned(), hash)]);
    if let Some(rev) = pinned_revision(lm, resolution) {
        annotations.insert(annotation::RESOLVED_REVISION.to_owned(), rev);
    }
    metadata.annotations = Some(annotations);

    let rollout = lm.spec.rollout.clone().unwrap_or_default();
    let strategy = DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        // Only what the user chose is set; the rest keeps Kubernetes' 25% defaults.
        rolling_update: (rollout.max_surge.is_some() || rollout.max_unavailable.is_some()).then(|| {
            RollingUpdateDeployment {
                max_surge: rollout.max_surge.as_ref().map(int_or_percent),
                max_unavailable: rollout.max_unavailable.as_ref().map(int_or_percent),
            }
        }),
    };

    Ok(Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(lm.spec.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(&name)), match_expressions: None },
            template,
            strategy: Some(strategy),
            progress_deadline_seconds: Some(
                rollout.progress_deadline_seconds.unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS),
            ),
            // Old ReplicaSets of a model only cost etcd space; three allow a manual rollback.
            revision_history_limit: Some(3),
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// A rollout bound as the Deployment accepts it: the CRD lets `"2"` through (CEL cannot tell a
/// numeric string from a number portably), the Deployment API wants a number or a percentage.
fn int_or_percent(v: &IntOrString) -> IntOrString {
    match v {
        IntOrString::String(s) => s.parse::<i32>().map_or_else(|_| v.clone(), IntOrString::Int),
        IntOrString::Int(_) => v.clone(),
    }
}

/// The commit the pods run, for a hub source.
fn pinned_revision(lm: &LanguageModel, resolution: &Resolution) -> Option<String> {
    let hub = lm.spec.model.hugging_face.as_ref()?;
    Some(resolution.revision.clone().unwrap_or_else(|| hub.revision.clone()))
}

/// The `--model` argument (and its GGUF `--file`) shared by download and serve.
fn model_args(lm: &LanguageModel, resolution: &Resolution) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(hub) = &lm.spec.model.hugging_face {
        let rev = pinned_revision(lm, resolution).unwrap_or_else(|| hub.revision.clone());
        args.extend(["--model".to_owned(), format!("hf://{}@{rev}", hub.repo)]);
        if let Some(file) = &hub.file {
            args.extend(["--file".to_owned(), file.clone()]);
        }
    } else if let Some(pvc) = &lm.spec.model.pvc {
        let path = match pvc.path.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => format!("{MODEL_PVC_DIR}/{p}"),
            _ => MODEL_PVC_DIR.to_owned(),
        };
        args.extend(["--model".to_owned(), path]);
    }
    args.extend(["--cache-dir".to_owned(), CACHE_DIR.to_owned()]);
    args
}

fn pod_template(lm: &LanguageModel, config: &BuilderConfig, resolution: &Resolution) -> Result<PodTemplateSpec> {
    let name = model_name(lm)?;
    let spec = &lm.spec;
    let gpus = lm.gpu_count();
    // A GPU model needs the runtime's CUDA build: the CPU build refuses `--device cuda`.
    let default_image = if gpus > 0 { &config.runtime_image_gpu } else { &config.runtime_image };
    let image = spec.runtime.as_ref().and_then(|r| r.image.clone()).unwrap_or_else(|| default_image.clone());

    let mut volumes = vec![empty_dir(TMP_VOLUME)];
    let mut init_containers = Vec::new();
    let mut serve_mounts = vec![mount(TMP_VOLUME, "/tmp", false)];
    let mut serve_env = Vec::new();

    match (&spec.model.hugging_face, &spec.model.pvc) {
        (Some(hub), _) => {
            volumes.push(match &spec.cache {
                Some(_) => Volume {
                    name: CACHE_VOLUME.into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: cache_claim_name(name),
                        read_only: None,
                    }),
                    ..Volume::default()
                },
                None => empty_dir(CACHE_VOLUME),
            });
            serve_mounts.push(mount(CACHE_VOLUME, CACHE_DIR, true));
            serve_env.push(env("HF_HUB_OFFLINE", "1"));
            init_containers.push(download_container(lm, hub, config, resolution, &image));
        }
        (None, Some(pvc)) => {
            volumes.push(Volume {
                name: MODEL_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc.claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            });
            // The runtime still gets a writable cache dir for anything it derives at load time.
            volumes.push(empty_dir(CACHE_VOLUME));
            serve_mounts.push(mount(MODEL_VOLUME, MODEL_PVC_DIR, true));
            serve_mounts.push(mount(CACHE_VOLUME, CACHE_DIR, false));
        }
        // Refused by the CRD's CEL rule; built as a pod that fails visibly rather than panicking.
        (None, None) => {}
    }

    for (i, files) in spec.runtime.iter().flat_map(|r| &r.files).enumerate() {
        let volume = format!("{FILES_VOLUME}-{i}");
        volumes.push(files_volume(&volume, files));
        serve_mounts.push(mount(&volume, &files.mount_path, true));
    }
    if let Some(key_ref) = &spec.serving.api_key_secret_ref {
        serve_env.push(secret_env("KANDLE_API_KEY", key_ref));
    }
    if let Some(endpoint) = &config.runtime_otlp_endpoint {
        serve_env.push(env(OTLP_ENDPOINT, endpoint));
    }
    let serve_env = merge_env(serve_env, spec.runtime.as_ref().map(|r| r.env.as_slice()).unwrap_or_default());
    let serve_env = with_trace_resource(serve_env, namespace(lm)?, name);

    let serve = Container {
        name: MAIN_CONTAINER.into(),
        image: Some(image),
        command: Some(vec!["kandle-runtime".into()]),
        args: Some(serve_args(lm, resolution)),
        env: (!serve_env.is_empty()).then_some(serve_env),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.into()),
            container_port: spec.serving.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(serve_resources(lm, resolution)),
        startup_probe: Some(probe(
            "/health",
            // Up to 30 minutes for the process to answer /health at all (a runtime that loads
            // before binding its port); liveness only starts after this succeeds.
            ProbeTiming { period: 10, timeout: 5, failures: 180 },
        )),
        readiness_probe: Some(probe("/ready", ProbeTiming { period: 5, timeout: 3, failures: 3 })),
        // /health answers while the model loads, so a slow load never trips liveness; a minute
        // of silence means the process is wedged.
        liveness_probe: Some(probe("/health", ProbeTiming { period: 10, timeout: 5, failures: 6 })),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(serve_mounts),
        ..Container::default()
    };

    let mut node_selector = spec.placement.as_ref().map(|p| p.node_selector.clone()).unwrap_or_default();
    let mut tolerations = spec.placement.as_ref().map(|p| p.tolerations.clone()).unwrap_or_default();
    if gpus > 0 {
        if let Some(product) = spec.resources.gpu.as_ref().and_then(|g| g.product.clone()) {
            node_selector.insert(gpu::PRODUCT_LABEL.into(), product);
        }
        if !tolerations.iter().any(|t| t.key.as_deref() == Some(gpu::TAINT_KEY)) {
            tolerations.push(Toleration {
                key: Some(gpu::TAINT_KEY.into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            });
        }
    }

    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels(name)), ..ObjectMeta::default() }),
        spec: Some(PodSpec {
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            containers: vec![serve],
            volumes: Some(volumes),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            affinity: spec.placement.as_ref().and_then(|p| p.affinity.clone()),
            priority_class_name: spec.placement.as_ref().and_then(|p| p.priority_class_name.clone()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUNTIME_UID),
                run_as_group: Some(RUNTIME_UID),
                // The cache volume must be writable by the runtime user; OnRootMismatch skips
                // re-chowning gigabytes of weights on every start.
                fs_group: Some(RUNTIME_UID),
                fs_group_change_policy: Some("OnRootMismatch".into()),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..PodSecurityContext::default()
            }),
            // The runtime never talks to the Kubernetes API.
            automount_service_account_token: Some(false),
            // Service env vars are noise to the runtime and grow with the namespace.
            enable_service_links: Some(false),
            // In-flight generations get time to finish after SIGTERM (graceful drain).
            termination_grace_period_seconds: Some(60),
            ..PodSpec::default()
        }),
    })
}

fn download_container(
    lm: &LanguageModel,
    hub: &HuggingFaceSource,
    config: &BuilderConfig,
    resolution: &Resolution,
    image: &str,
) -> Container {
    let mut env_vars = Vec::new();
    if let Some(endpoint) = &config.hub_endpoint {
        env_vars.push(env("HF_ENDPOINT", endpoint));
    }
    if let Some(token) = &hub.token_secret_ref {
        // Only the download step sees the token; the server runs offline.
        env_vars.push(secret_env("HF_TOKEN", token));
    }
    let mut args = vec!["download".to_owned()];
    args.extend(model_args(lm, resolution));
    Container {
        name: DOWNLOAD_CONTAINER.into(),
        image: Some(image.to_owned()),
        command: Some(vec!["kandle-runtime".into()]),
        args: Some(args),
        env: (!env_vars.is_empty()).then_some(env_vars),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("250m".into())),
                ("memory".into(), Quantity("256Mi".into())),
            ])),
            // Downloads stream to disk; a limit keeps a misbehaving download from starving the node.
            limits: Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![mount(TMP_VOLUME, "/tmp", false), mount(CACHE_VOLUME, CACHE_DIR, false)]),
        ..Container::default()
    }
}

fn serve_args(lm: &LanguageModel, resolution: &Resolution) -> Vec<String> {
    let spec = &lm.spec;
    let mut args = vec!["serve".to_owned()];
    args.extend(model_args(lm, resolution));
    args.extend(["--port".into(), spec.serving.port.to_string()]);
    args.extend(["--served-model-name".into(), lm.metadata.name.clone().unwrap_or_default()]);
    args.extend(["--device".into(), if lm.gpu_count() > 0 { "cuda" } else { "cpu" }.into()]);
    args.extend(["--dtype".into(), spec.model.dtype.as_str().into()]);
    if let Some(task) = spec.model.task {
        args.extend(["--task".into(), task.as_str().into()]);
    }
    if let Some(arch) = &spec.model.architecture {
        args.extend(["--architecture".into(), arch.clone()]);
    }
    if let Some(rt) = &spec.runtime {
        let limits = [
            ("--max-batch-size", rt.max_batch_size),
            ("--max-sequence-length", rt.max_sequence_length),
            ("--max-concurrent-requests", rt.max_concurrent_requests),
            ("--max-new-tokens", rt.max_new_tokens),
        ];
        for (flag, value) in limits {
            if let Some(v) = value {
                args.extend([flag.to_owned(), v.to_string()]);
            }
        }
        args.extend(rt.args.iter().cloned());
    }
    args
}

/// Requests (and the memory limit) of the serving container; see the `DEFAULT_*` constants and
/// [`memory_estimate`] for what an absent field becomes.
fn serve_resources(lm: &LanguageModel, resolution: &Resolution) -> ResourceRequirements {
    let gpus = lm.gpu_count();
    let res = &lm.spec.resources;
    let cpu = res
        .cpu
        .clone()
        .unwrap_or_else(|| Quantity(if gpus > 0 { DEFAULT_CPU_WITH_GPU } else { DEFAULT_CPU_CPU_ONLY }.into()));
    let memory = res
        .memory
        .clone()
        .or_else(|| resolution.model_bytes.map(memory_estimate))
        .unwrap_or_else(|| Quantity(DEFAULT_MEMORY.into()));
    // Memory limit = request: a server that outgrows its estimate is OOM-killed and restarted
    // visibly instead of squeezing its neighbours. No CPU limit: throttling only adds latency.
    let mut limits = BTreeMap::from([("memory".to_owned(), memory.clone())]);
    if gpus > 0 {
        // Extended resources are requested through limits (requests default to them).
        limits.insert(gpu::RESOURCE.into(), Quantity(gpus.to_string()));
    }
    ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".to_owned(), cpu), ("memory".to_owned(), memory)])),
        limits: Some(limits),
        ..ResourceRequirements::default()
    }
}

/// kandle's env first, then the user's: a user entry with a name kandle also sets replaces
/// kandle's in place. Names stay unique, which server-side apply requires (env is a map keyed
/// by name).
fn merge_env(ours: Vec<EnvVar>, users: &[EnvVar]) -> Vec<EnvVar> {
    let mut merged = ours;
    for user in users {
        match merged.iter_mut().find(|e| e.name == user.name) {
            Some(existing) => *existing = user.clone(),
            None => merged.push(user.clone()),
        }
    }
    merged
}

/// The runtime's exporter sends traces when either of these is set and not empty
/// (`kandle-telemetry`).
const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
/// The pod's own name, uid and node, from the downward API, for `OTEL_RESOURCE_ATTRIBUTES`.
const POD_FIELDS: [(&str, &str); 3] =
    [("KANDLE_POD_NAME", "metadata.name"), ("KANDLE_POD_UID", "metadata.uid"), ("KANDLE_NODE_NAME", "spec.nodeName")];

/// When the server exports traces (an endpoint set, by the operator's default or the user's
/// env), its spans say where they come from, in OpenTelemetry's Kubernetes resource
/// attributes, as the OpenTelemetry Operator's injection writes them: `k8s.namespace.name`,
/// `k8s.deployment.name`, `k8s.pod.name`, `k8s.pod.uid`, `k8s.node.name`, `k8s.container.name`.
/// The pod's own fields come from the downward API and reach the value by the kubelet's
/// `$(VAR)` expansion, so they are declared before it. A user's literal
/// `OTEL_RESOURCE_ATTRIBUTES` follows kandle's in the same value, and a key given twice takes
/// the user's (the SDK keeps the last); one from a `valueFrom` is left as the user's alone.
/// Without an endpoint nothing is added: a model that does not trace keeps its pods as they were.
fn with_trace_resource(mut vars: Vec<EnvVar>, namespace: &str, name: &str) -> Vec<EnvVar> {
    let exports = vars.iter().any(|e| {
        (e.name == OTLP_ENDPOINT || e.name == OTLP_TRACES_ENDPOINT)
            && (e.value_from.is_some() || e.value.as_deref().is_some_and(|v| !v.trim().is_empty()))
    });
    if !exports {
        return vars;
    }
    let users = match vars.iter().position(|e| e.name == RESOURCE_ATTRIBUTES) {
        Some(i) if vars[i].value_from.is_some() => return vars,
        Some(i) => vars.remove(i).value.filter(|v| !v.trim().is_empty()),
        None => None,
    };
    for (var, field) in POD_FIELDS {
        if !vars.iter().any(|e| e.name == var) {
            vars.push(field_env(var, field));
        }
    }
    let mut attributes = format!(
        "k8s.namespace.name={namespace},k8s.deployment.name={name},k8s.pod.name=$(KANDLE_POD_NAME),\
         k8s.pod.uid=$(KANDLE_POD_UID),k8s.node.name=$(KANDLE_NODE_NAME),k8s.container.name={MAIN_CONTAINER}"
    );
    if let Some(users) = users {
        attributes.push(',');
        attributes.push_str(&users);
    }
    vars.push(env(RESOURCE_ATTRIBUTES, &attributes));
    vars
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..SecurityContext::default()
    }
}

struct ProbeTiming {
    period: i32,
    timeout: i32,
    failures: i32,
}

fn probe(path: &str, t: ProbeTiming) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(t.period),
        timeout_seconds: Some(t.timeout),
        failure_threshold: Some(t.failures),
        success_threshold: Some(1),
        ..Probe::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field_path.into(), api_version: None }),
            ..EnvVarSource::default()
        }),
    }
}

fn secret_env(name: &str, key_ref: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: key_ref.name.clone(),
                key: key_ref.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() }
}

/// A volume of the Secret or ConfigMap that `spec.runtime.files[]` names (the CRD's rule
/// makes it exactly one).
fn files_volume(name: &str, files: &RuntimeFiles) -> Volume {
    Volume {
        name: name.into(),
        secret: files
            .secret_name
            .as_ref()
            .map(|s| SecretVolumeSource { secret_name: Some(s.clone()), ..SecretVolumeSource::default() }),
        config_map: files
            .config_map_name
            .as_ref()
            .map(|c| ConfigMapVolumeSource { name: c.clone(), ..ConfigMapVolumeSource::default() }),
        ..Volume::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{CacheSpec, PlacementSpec, RolloutSpec, RuntimeFiles, RuntimeSpec},
        builders::fixtures::*,
    };

    fn build(lm: &LanguageModel) -> Deployment {
        deployment(lm, &BuilderConfig::default(), &Resolution { revision: Some(SHA.into()), model_bytes: None })
            .unwrap()
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn serve(d: &Deployment) -> &Container {
        &pod(d).containers[0]
    }

    fn args(c: &Container) -> Vec<&str> {
        c.args.as_ref().unwrap().iter().map(String::as_str).collect()
    }

    fn template_hash(d: &Deployment) -> String {
        d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
            [annotation::POD_TEMPLATE_HASH]
            .clone()
    }

    #[test]
    fn a_hub_model_downloads_the_resolved_commit_before_serving_it() {
        let d = build(&hub_model());
        let init = &pod(&d).init_containers.as_ref().unwrap()[0];
        assert_eq!(init.command.as_ref().unwrap(), &["kandle-runtime"]);
        assert_eq!(
            args(init),
            [
                "download",
                "--model",
                &format!("hf://HuggingFaceTB/SmolLM2-135M-Instruct@{SHA}"),
                "--cache-dir",
                CACHE_DIR
            ]
        );
        let a = args(serve(&d));
        assert_eq!(
            a[..5],
            ["serve", "--model", &format!("hf://HuggingFaceTB/SmolLM2-135M-Instruct@{SHA}"), "--cache-dir", CACHE_DIR]
        );
        let annotations = d.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[annotation::RESOLVED_REVISION], SHA);
    }

    #[test]
    fn an_unresolved_revision_is_used_as_written() {
        let lm = hub_model();
        let d = deployment(&lm, &BuilderConfig::default(), &Resolution::default()).unwrap();
        assert!(args(serve(&d)).contains(&"hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"));
    }

    #[test]
    fn the_download_mounts_the_cache_writable_and_the_server_mounts_it_read_only() {
        let d = build(&hub_model());
        let init = &pod(&d).init_containers.as_ref().unwrap()[0];
        let cache =
            |c: &Container| c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == CACHE_VOLUME).cloned().unwrap();
        assert_eq!(cache(init).mount_path, CACHE_DIR);
        assert_eq!(cache(init).read_only, None);
        assert_eq!(cache(serve(&d)).read_only, Some(true));
        let vol = pod(&d).volumes.as_ref().unwrap().iter().find(|v| v.name == CACHE_VOLUME).unwrap();
        assert!(vol.empty_dir.is_some(), "no cache PVC: an emptyDir");
    }

    #[test]
    fn a_cache_spec_puts_the_cache_on_the_models_claim() {
        let mut lm = hub_model();
        lm.spec.cache = Some(CacheSpec {
            storage_class_name: None,
            size: Quantity("10Gi".into()),
            access_mode: Default::default(),
        });
        let d = build(&lm);
        let vol = pod(&d).volumes.as_ref().unwrap().iter().find(|v| v.name == CACHE_VOLUME).unwrap();
        assert_eq!(vol.persistent_volume_claim.as_ref().unwrap().claim_name, "smollm-cache");
    }

    #[test]
    fn a_gguf_file_is_passed_to_download_and_serve() {
        let mut lm = hub_model();
        lm.spec.model.hugging_face.as_mut().unwrap().file = Some("model-q4_1.gguf".into());
        let d = build(&lm);
        for c in [&pod(&d).init_containers.as_ref().unwrap()[0], serve(&d)] {
            let a = args(c);
            let i = a.iter().position(|x| *x == "--file").expect("--file");
            assert_eq!(a[i + 1], "model-q4_1.gguf");
        }
    }

    #[test]
    fn the_hub_token_reaches_only_the_download_step_from_its_secret() {
        let mut lm = hub_model();
        lm.spec.model.hugging_face.as_mut().unwrap().token_secret_ref =
            Some(SecretKeyRef { name: "hf".into(), key: "token".into() });
        let config = BuilderConfig { hub_endpoint: Some("http://hub.local:8080".into()), ..BuilderConfig::default() };
        let d = deployment(&lm, &config, &Resolution::default()).unwrap();
        let init_env = pod(&d).init_containers.as_ref().unwrap()[0].env.clone().unwrap();
        let token = init_env.iter().find(|e| e.name == "HF_TOKEN").unwrap();
        assert_eq!(token.value, None, "never inline");
        let sel = token.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("hf", "token"));
        assert!(
            init_env.iter().any(|e| e.name == "HF_ENDPOINT" && e.value.as_deref() == Some("http://hub.local:8080"))
        );
        let serve_env = serve(&d).env.clone().unwrap_or_default();
        assert!(!serve_env.iter().any(|e| e.name == "HF_TOKEN"));
        assert!(serve_env.iter().any(|e| e.name == "HF_HUB_OFFLINE" && e.value.as_deref() == Some("1")));
    }

    #[test]
    fn a_pvc_model_is_mounted_read_only_and_not_downloaded() {
        let d = build(&pvc_model());
        assert!(pod(&d).init_containers.is_none());
        let a = args(serve(&d));
        assert_eq!(a[..3], ["serve", "--model", "/models/minilm"]);
        let vol = pod(&d).volumes.as_ref().unwrap().iter().find(|v| v.name == MODEL_VOLUME).unwrap();
        let claim = vol.persistent_volume_claim.as_ref().unwrap();
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("weights", Some(true)));
        assert!(!d.metadata.annotations.as_ref().unwrap().contains_key(annotation::RESOLVED_REVISION));
    }

    #[test]
    fn runtime_limits_and_extra_args_become_serve_flags_in_order() {
        let mut lm = hub_model();
        lm.spec.runtime = Some(RuntimeSpec {
            max_batch_size: Some(8),
            max_sequence_length: Some(4096),
            max_concurrent_requests: Some(64),
            max_new_tokens: Some(512),
            args: vec!["--log-format=json".into()],
            ..RuntimeSpec::default()
        });
        lm.spec.model.architecture = Some("llama".into());
        let a = args(serve(&build(&lm))).join(" ");
        assert!(
            a.ends_with(
                "--port 8080 --served-model-name smollm --device cpu --dtype auto --task TextGeneration \
                 --architecture llama --max-batch-size 8 --max-sequence-length 4096 \
                 --max-concurrent-requests 64 --max-new-tokens 512 --log-format=json"
            ),
            "{a}"
        );
    }

    #[test]
    fn runtime_files_are_mounted_read_only_into_the_runtime_alone() {
        let mut lm = hub_model();
        let before = build(&lm);
        lm.spec.runtime = Some(RuntimeSpec {
            files: vec![
                RuntimeFiles {
                    mount_path: "/etc/kandle/template".into(),
                    config_map_name: Some("chat-template".into()),
                    ..RuntimeFiles::default()
                },
                RuntimeFiles {
                    mount_path: "/etc/otel".into(),
                    secret_name: Some("collector-ca".into()),
                    ..RuntimeFiles::default()
                },
            ],
            ..RuntimeSpec::default()
        });
        let d = build(&lm);
        let volumes = pod(&d).volumes.as_ref().unwrap();
        let v0 = volumes.iter().find(|v| v.name == "files-0").unwrap();
        assert_eq!(v0.config_map.as_ref().unwrap().name, "chat-template");
        assert!(v0.secret.is_none());
        let v1 = volumes.iter().find(|v| v.name == "files-1").unwrap();
        assert_eq!(v1.secret.as_ref().unwrap().secret_name.as_deref(), Some("collector-ca"));
        assert!(v1.config_map.is_none());
        let mounts = serve(&d).volume_mounts.as_ref().unwrap();
        for (volume, path) in [("files-0", "/etc/kandle/template"), ("files-1", "/etc/otel")] {
            let m = mounts.iter().find(|m| m.name == volume).unwrap();
            assert_eq!((m.mount_path.as_str(), m.read_only), (path, Some(true)));
        }
        // The download needs none of them.
        let init = &pod(&d).init_containers.as_ref().unwrap()[0];
        assert!(init.volume_mounts.as_ref().unwrap().iter().all(|m| !m.name.starts_with("files-")));
        // A new file source is a new pod template: the pods roll.
        assert_ne!(template_hash(&before), template_hash(&d));
    }

    #[test]
    fn the_runtime_image_comes_from_the_spec_else_from_the_operator_config() {
        let config = BuilderConfig {
            runtime_image: "registry.local/kandle-runtime:dev".into(),
            runtime_image_gpu: "registry.local/kandle-runtime:dev-cuda".into(),
            ..BuilderConfig::default()
        };
        let d = deployment(&hub_model(), &config, &Resolution::default()).unwrap();
        assert_eq!(serve(&d).image.as_deref(), Some("registry.local/kandle-runtime:dev"));
        assert_eq!(
            pod(&d).init_containers.as_ref().unwrap()[0].image.as_deref(),
            Some("registry.local/kandle-runtime:dev")
        );
        let mut lm = hub_model();
        lm.spec.runtime = Some(RuntimeSpec { image: Some("mine:1".into()), ..RuntimeSpec::default() });
        assert_eq!(serve(&deployment(&lm, &config, &Resolution::default()).unwrap()).image.as_deref(), Some("mine:1"));
        // A model with GPUs gets the CUDA build, unless it names its own image.
        let gpu = deployment(&gpu_model(1, None), &config, &Resolution::default()).unwrap();
        assert_eq!(serve(&gpu).image.as_deref(), Some("registry.local/kandle-runtime:dev-cuda"));
        let mut lm = gpu_model(1, None);
        lm.spec.runtime = Some(RuntimeSpec { image: Some("mine:1".into()), ..RuntimeSpec::default() });
        assert_eq!(serve(&deployment(&lm, &config, &Resolution::default()).unwrap()).image.as_deref(), Some("mine:1"));
        assert!(BuilderConfig::default().runtime_image_gpu.ends_with("-cuda"));
    }

    #[test]
    fn gpus_become_limits_a_product_node_selector_and_a_toleration() {
        let d = build(&gpu_model(2, Some("NVIDIA-A100-SXM4-80GB")));
        let limits = serve(&d).resources.as_ref().unwrap().limits.clone().unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("2".into()));
        assert_eq!(pod(&d).node_selector.as_ref().unwrap()["nvidia.com/gpu.product"], "NVIDIA-A100-SXM4-80GB");
        let tol = &pod(&d).tolerations.as_ref().unwrap()[0];
        assert_eq!(tol.key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(tol.operator.as_deref(), Some("Exists"));
        assert_eq!(tol.effect.as_deref(), Some("NoSchedule"));
        assert!(args(serve(&d)).windows(2).any(|w| w == ["--device", "cuda"]));
    }

    #[test]
    fn a_gpu_model_without_a_product_gets_no_node_selector() {
        let d = build(&gpu_model(1, None));
        assert!(pod(&d).node_selector.is_none());
        assert!(pod(&d).tolerations.is_some());
    }

    #[test]
    fn a_cpu_model_asks_for_no_gpu_and_tolerates_no_gpu_taint() {
        let d = build(&gpu_model(0, None));
        let limits = serve(&d).resources.as_ref().unwrap().limits.clone().unwrap();
        assert!(!limits.contains_key("nvidia.com/gpu"));
        assert!(pod(&d).tolerations.is_none());
        assert!(args(serve(&d)).windows(2).any(|w| w == ["--device", "cpu"]));
    }

    #[test]
    fn placement_is_merged_with_kandles_gpu_scheduling() {
        let mut lm = gpu_model(1, Some("NVIDIA-L4"));
        lm.spec.placement = Some(PlacementSpec {
            node_selector: BTreeMap::from([("pool".into(), "inference".into())]),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            }],
            affinity: None,
            priority_class_name: Some("high".into()),
        });
        let d = build(&lm);
        let sel = pod(&d).node_selector.clone().unwrap();
        assert_eq!((sel["pool"].as_str(), sel["nvidia.com/gpu.product"].as_str()), ("inference", "NVIDIA-L4"));
        let keys: Vec<_> = pod(&d).tolerations.as_ref().unwrap().iter().map(|t| t.key.clone().unwrap()).collect();
        assert_eq!(keys, ["dedicated", "nvidia.com/gpu"]);
        assert_eq!(pod(&d).priority_class_name.as_deref(), Some("high"));
    }

    #[test]
    fn requests_come_from_the_spec_when_given() {
        let mut lm = gpu_model(1, None);
        lm.spec.resources.cpu = Some(Quantity("4".into()));
        lm.spec.resources.memory = Some(Quantity("24Gi".into()));
        let r = serve(&build(&lm)).resources.clone().unwrap();
        let req = r.requests.unwrap();
        assert_eq!((req["cpu"].0.as_str(), req["memory"].0.as_str()), ("4", "24Gi"));
        assert_eq!(r.limits.unwrap()["memory"].0, "24Gi");
    }

    #[test]
    fn absent_requests_are_estimated_from_the_model_size_when_known() {
        let lm = hub_model();
        let two_gib = 2 * 1024 * 1024 * 1024;
        let d = deployment(&lm, &BuilderConfig::default(), &Resolution { revision: None, model_bytes: Some(two_gib) })
            .unwrap();
        let req = serve(&d).resources.clone().unwrap().requests.unwrap();
        // 2 GiB of weights + 25% + 1 GiB = 3.5 GiB.
        assert_eq!(req["memory"].0, "3584Mi");
        assert_eq!(req["cpu"].0, DEFAULT_CPU_CPU_ONLY);
        let unknown = build(&lm);
        assert_eq!(serve(&unknown).resources.clone().unwrap().requests.unwrap()["memory"].0, DEFAULT_MEMORY);
        assert_eq!(
            build(&gpu_model(1, None)).spec.unwrap().template.spec.unwrap().containers[0]
                .resources
                .clone()
                .unwrap()
                .requests
                .unwrap()["cpu"]
                .0,
            DEFAULT_CPU_WITH_GPU
        );
    }

    #[test]
    fn the_memory_estimate_rounds_up_to_whole_mebibytes() {
        assert_eq!(memory_estimate(0).0, "1024Mi");
        assert_eq!(memory_estimate(1).0, "1025Mi");
    }

    #[test]
    fn probes_give_a_loading_model_time_and_check_ready_and_health() {
        let d = build(&hub_model());
        let c = serve(&d);
        let path = |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert_eq!(path(&c.readiness_probe), "/ready");
        assert_eq!(path(&c.liveness_probe), "/health");
        assert_eq!(path(&c.startup_probe), "/health");
        let startup = c.startup_probe.as_ref().unwrap();
        let window = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
        assert!(window >= 30 * 60, "a model gets at least 30 minutes to start, got {window}s");
        let liveness = c.liveness_probe.as_ref().unwrap();
        assert!(liveness.period_seconds.unwrap() * liveness.failure_threshold.unwrap() >= 60);
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
    }

    #[test]
    fn pods_meet_the_restricted_pod_security_standard() {
        let d = build(&hub_model());
        let p = pod(&d);
        let psc = p.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let containers = p.init_containers.iter().flatten().chain(p.containers.iter());
        let mut n = 0;
        for c in containers {
            n += 1;
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]), "{}", c.name);
            assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
            assert!(c.volume_mounts.as_ref().unwrap().iter().any(|m| m.mount_path == "/tmp"), "writable /tmp");
        }
        assert_eq!(n, 2);
        assert_eq!(p.automount_service_account_token, Some(false));
    }

    #[test]
    fn the_selector_is_stable_and_matches_the_pod_labels() {
        let d = build(&hub_model());
        let spec = d.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        for (k, v) in selector {
            assert_eq!(&pod_labels[k], v);
        }
        assert_eq!(selector.len(), 2);
    }

    #[test]
    fn the_rollout_maps_onto_the_deployment_strategy() {
        let mut lm = hub_model();
        lm.spec.rollout = Some(RolloutSpec {
            max_surge: Some(IntOrString::Int(0)),
            max_unavailable: Some(IntOrString::String("50%".into())),
            progress_deadline_seconds: Some(3600),
        });
        let spec = build(&lm).spec.unwrap();
        let s = spec.strategy.unwrap();
        assert_eq!(s.type_.as_deref(), Some("RollingUpdate"));
        let ru = s.rolling_update.unwrap();
        assert_eq!(ru.max_surge, Some(IntOrString::Int(0)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::String("50%".into())));
        assert_eq!(spec.progress_deadline_seconds, Some(3600));
        lm.spec.rollout.as_mut().unwrap().max_surge = Some(IntOrString::String("2".into()));
        let numeric = build(&lm).spec.unwrap().strategy.unwrap().rolling_update.unwrap();
        assert_eq!(numeric.max_surge, Some(IntOrString::Int(2)), "a numeric string is sent as a number");
        let default = build(&hub_model()).spec.unwrap();
        assert_eq!(default.progress_deadline_seconds, Some(DEFAULT_PROGRESS_DEADLINE_SECONDS));
        assert!(default.strategy.unwrap().rolling_update.is_none(), "Kubernetes' defaults stay");
    }

    #[test]
    fn replicas_come_from_the_spec() {
        let mut lm = hub_model();
        lm.spec.replicas = 0;
        assert_eq!(build(&lm).spec.unwrap().replicas, Some(0));
    }

    #[test]
    fn the_template_hash_changes_with_what_restarts_pods_and_only_with_that() {
        let base = template_hash(&build(&hub_model()));
        assert_eq!(base, template_hash(&build(&hub_model())), "deterministic");
        assert_eq!(d_hash_annotation(&build(&hub_model())), base, "also on the Deployment");

        let mut no_restart = hub_model();
        no_restart.spec.replicas = 5;
        no_restart.spec.paused = true;
        no_restart.spec.rollout = Some(RolloutSpec { progress_deadline_seconds: Some(900), ..RolloutSpec::default() });
        no_restart.spec.serving.service_type = crate::api::ServiceType::LoadBalancer;
        no_restart.spec.drift.policy = crate::api::DriftPolicy::Report;
        assert_eq!(template_hash(&build(&no_restart)), base);

        let restarts: [fn(&mut LanguageModel); 5] = [
            |lm| lm.spec.runtime = Some(RuntimeSpec { max_batch_size: Some(4), ..RuntimeSpec::default() }),
            |lm| lm.spec.resources.memory = Some(Quantity("8Gi".into())),
            |lm| lm.spec.serving.port = 9090,
            |lm| lm.spec.model.dtype = crate::api::Dtype::Bf16,
            |lm| lm.spec.resources.gpu = Some(crate::api::GpuSpec { count: 1, product: None }),
        ];
        for (i, change) in restarts.iter().enumerate() {
            let mut lm = hub_model();
            change(&mut lm);
            assert_ne!(template_hash(&build(&lm)), base, "change #{i} must roll out");
        }
        let other_commit = deployment(
            &hub_model(),
            &BuilderConfig::default(),
            &Resolution { revision: Some("f".repeat(40)), model_bytes: None },
        )
        .unwrap();
        assert_ne!(template_hash(&other_commit), base, "a new commit rolls out");
    }

    fn d_hash_annotation(d: &Deployment) -> String {
        d.metadata.annotations.as_ref().unwrap()[annotation::POD_TEMPLATE_HASH].clone()
    }

    #[test]
    fn user_env_is_appended_and_replaces_kandles_entry_of_the_same_name() {
        let mut lm = hub_model();
        lm.spec.runtime = Some(RuntimeSpec {
            env: vec![env("RUST_LOG", "debug"), env("HF_HUB_OFFLINE", "0")],
            ..RuntimeSpec::default()
        });
        let e = serve(&build(&lm)).env.clone().unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["HF_HUB_OFFLINE", "RUST_LOG"]);
        assert_eq!(e[0].value.as_deref(), Some("0"));
    }

    fn traced(lm: &LanguageModel, default_endpoint: Option<&str>) -> Vec<EnvVar> {
        let config = BuilderConfig { runtime_otlp_endpoint: default_endpoint.map(Into::into), ..BuilderConfig::default() };
        let d = deployment(lm, &config, &Resolution { revision: Some(SHA.into()), model_bytes: None }).unwrap();
        serve(&d).env.clone().unwrap_or_default()
    }

    fn value<'a>(vars: &'a [EnvVar], name: &str) -> Option<&'a str> {
        vars.iter().find(|e| e.name == name).and_then(|e| e.value.as_deref())
    }

    const KANDLES_ATTRIBUTES: &str = "k8s.namespace.name=models,k8s.deployment.name=smollm,k8s.pod.name=$(KANDLE_POD_NAME),\
        k8s.pod.uid=$(KANDLE_POD_UID),k8s.node.name=$(KANDLE_NODE_NAME),k8s.container.name=runtime";

    #[test]
    fn the_operators_trace_endpoint_reaches_the_server_with_the_pods_kubernetes_attributes() {
        let e = traced(&hub_model(), Some("http://otel-collector.observability:4318"));
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "HF_HUB_OFFLINE",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "KANDLE_POD_NAME",
                "KANDLE_POD_UID",
                "KANDLE_NODE_NAME",
                "OTEL_RESOURCE_ATTRIBUTES"
            ],
            "the downward-API variables come before the value that expands them"
        );
        assert_eq!(value(&e, "OTEL_EXPORTER_OTLP_ENDPOINT"), Some("http://otel-collector.observability:4318"));
        assert_eq!(value(&e, "OTEL_RESOURCE_ATTRIBUTES"), Some(KANDLES_ATTRIBUTES));
        let field = |name: &str| {
            let from = e.iter().find(|e| e.name == name).unwrap().value_from.as_ref().unwrap();
            from.field_ref.as_ref().unwrap().field_path.clone()
        };
        assert_eq!(field("KANDLE_POD_NAME"), "metadata.name");
        assert_eq!(field("KANDLE_POD_UID"), "metadata.uid");
        assert_eq!(field("KANDLE_NODE_NAME"), "spec.nodeName");
    }

    #[test]
    fn a_model_that_does_not_trace_gets_no_trace_variables() {
        let mut lm = hub_model();
        assert_eq!(traced(&lm, None).iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["HF_HUB_OFFLINE"]);
        // A user's empty endpoint turns the operator's default off, and adds nothing.
        lm.spec.runtime = Some(RuntimeSpec { env: vec![env("OTEL_EXPORTER_OTLP_ENDPOINT", "")], ..RuntimeSpec::default() });
        let e = traced(&lm, Some("http://otel-collector.observability:4318"));
        assert_eq!(e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["HF_HUB_OFFLINE", "OTEL_EXPORTER_OTLP_ENDPOINT"]);
        assert_eq!(value(&e, "OTEL_EXPORTER_OTLP_ENDPOINT"), Some(""));
    }

    #[test]
    fn a_users_endpoint_and_attributes_are_kept_beside_kandles() {
        let mut lm = hub_model();
        lm.spec.runtime = Some(RuntimeSpec {
            env: vec![
                env("OTEL_RESOURCE_ATTRIBUTES", "team=search,k8s.container.name=serve"),
                env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4318/v1/traces"),
            ],
            ..RuntimeSpec::default()
        });
        let e = traced(&lm, None);
        assert_eq!(value(&e, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), Some("http://tempo:4318/v1/traces"));
        assert_eq!(e.last().unwrap().name, "OTEL_RESOURCE_ATTRIBUTES", "after the variables it expands");
        assert_eq!(
            value(&e, "OTEL_RESOURCE_ATTRIBUTES").unwrap(),
            format!("{KANDLES_ATTRIBUTES},team=search,k8s.container.name=serve"),
            "the user's come last, so a key given twice is theirs"
        );
        assert_eq!(e.iter().filter(|e| e.name == "OTEL_RESOURCE_ATTRIBUTES").count(), 1);

        // Attributes from a ConfigMap cannot be joined to kandle's: they are the user's alone.
        let from_map = EnvVar {
            name: "OTEL_RESOURCE_ATTRIBUTES".into(),
            value: None,
            value_from: Some(EnvVarSource::default()),
        };
        lm.spec.runtime.as_mut().unwrap().env[0] = from_map.clone();
        let e = traced(&lm, None);
        assert_eq!(e.iter().find(|e| e.name == "OTEL_RESOURCE_ATTRIBUTES"), Some(&from_map));
        assert!(!e.iter().any(|e| e.name.starts_with("KANDLE_POD")));
    }

    #[test]
    fn an_api_key_secret_is_handed_to_the_server_by_reference() {
        let mut lm = hub_model();
        lm.spec.serving.api_key_secret_ref = Some(SecretKeyRef { name: "keys".into(), key: "api".into() });
        let e = serve(&build(&lm)).env.clone().unwrap();
        let key = e.iter().find(|e| e.name == "KANDLE_API_KEY").unwrap();
        assert_eq!(key.value, None);
        assert_eq!(key.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "keys");
    }
}
