//! The `LanguageModel` API (`kandle.dev/v1alpha1`), the only source of the CRD.
//!
//! A `LanguageModel` names *what* to serve (`spec.model`: a Hugging Face hub repository or files
//! on a PersistentVolumeClaim), *how* the inference server is tuned (`spec.runtime`), *where* it
//! runs (`spec.resources`, `spec.placement`), and how many copies (`spec.replicas`, also reachable
//! through the scale subresource). `status` reports what the operator observed, in the kstatus
//! shape (`observedGeneration` + `conditions`) that `kubectl wait`, Flux and Argo CD read.
//!
//! Every constraint that the API server can check is declared here, on the types, as a CEL rule
//! whose message names the offending field, so that a bad manifest is refused at `kubectl apply`
//! time rather than discovered by the controller. Strings that rules inspect carry a `maxLength`
//! (and lists a `maxItems`) because the API server refuses a CRD whose rules it cannot bound in
//! cost. The rules are evaluated client-side by kube-cel in `tests/invalid_manifests.rs`, on the
//! same cases (`tests/invalid/languagemodels.yaml`) that the control-plane tests send to a real
//! kube-apiserver; rules therefore stick to CEL that both understand (`string(self)` rather than
//! `type(self)` on int-or-string fields).
//!
//! Optional fields are `Option`s skipped when `None`, so that what the operator or a test writes
//! back never pins a value the user did not choose; the few defaults (`revision: main`,
//! `replicas: 1`, `serving.port: 8080`, ...) are in the schema, so the API server fills them in
//! and `kubectl get -o yaml` shows them.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Affinity, EnvVar, Toleration},
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{Condition, Time},
        util::intstr::IntOrString,
    },
};
use kube::CustomResource;
use kube::KubeSchema;
// Used by the expressions inside `#[x_kube(...)]`/`#[kube(validation = ...)]`, which rustc's
// unused-import lint does not see through the derives.
#[allow(unused_imports)]
use kube::core::{ListMerge, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CEL rule accepting a positive Quantity, written either as an integer (`cpu: 2`) or as a
/// Kubernetes quantity string (`memory: 16Gi`). Quantities are int-or-string in the schema;
/// `string(self)` reads both (and, unlike `type(self)`, is also understood by kube-cel, which
/// evaluates the rules in unit tests).
macro_rules! positive_quantity_rule {
    ($field:literal) => {
        Rule::new("isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))")
            .message(concat!($field, " must be a positive quantity such as '2', '500m' or '16Gi'"))
    };
}

/// A CEL rule body accepting a replica count (0 or more) or a percentage from 0% to 100%, for
/// the int-or-string rollout fields. A numeric string (`"2"`) passes too; the builder sends it
/// to the Deployment as the number it spells.
const INT_OR_PERCENT: &str = "string(self).matches('^([0-9]+|(100|[1-9]?[0-9])%)$')";

/// The pattern of a DNS-1123 subdomain: the names of Secrets, PersistentVolumeClaims,
/// StorageClasses and PriorityClasses.
macro_rules! dns_subdomain {
    () => {
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    };
}

/// Specification of a `LanguageModel`: a model served by kandle's inference runtime.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kandle.dev",
    version = "v1alpha1",
    kind = "LanguageModel",
    plural = "languagemodels",
    singular = "languagemodel",
    shortname = "lm",
    category = "kandle",
    namespaced,
    status = "LanguageModelStatus",
    derive = "PartialEq",
    doc = "A language model served on Kubernetes by kandle's inference runtime.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Task",
        type_ = "string",
        description = "What the model does (spec.model.task)",
        json_path = ".spec.model.task"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "The Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "Ready replicas (status.readyReplicas)",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Revision",
        type_ = "string",
        description = "The hub commit the pods are pinned to",
        json_path = ".status.resolvedRevision"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The name becomes a Service name and a label value, both limited to a DNS-1035 label.
    validation = Rule::new(
        "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    )
    .message(
        "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, at most 63 characters): it names the model's Service"
    )
)]
#[x_kube(
    validation = Rule::new("!(has(self.model.pvc) && has(self.cache))").message(
        "spec.cache must not be set with spec.model.pvc: a model on a PersistentVolumeClaim is read in place, not downloaded into a cache"
    ),
    validation = Rule::new(
        "!(has(self.resources.gpu) && has(self.resources.gpu.product) && has(self.placement) && has(self.placement.nodeSelector) && 'nvidia.com/gpu.product' in self.placement.nodeSelector)"
    )
    .message(
        "spec.placement.nodeSelector must not select nvidia.com/gpu.product when spec.resources.gpu.product is set: name the GPU in one place"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LanguageModelSpec {
    /// The model to serve and how to interpret it.
    pub model: ModelSpec,

    /// Tuning of the inference server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeSpec>,

    /// Compute for each replica.
    #[serde(default)]
    pub resources: ResourcesSpec,

    /// Where replicas may be scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,

    /// Number of inference server replicas (also set by `kubectl scale`).
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.replicas must be 0 or more"))]
    pub replicas: i32,

    /// How a change is rolled out to the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,

    /// How the OpenAI-compatible endpoint is exposed.
    #[serde(default)]
    pub serving: ServingSpec,

    /// A PersistentVolumeClaim that keeps downloaded model files across pod restarts
    /// (pods use an emptyDir when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// What kandle does when someone edits an object it owns.
    #[serde(default)]
    pub drift: DriftSpec,

    /// When true kandle stops changing this model's children (no applies, no drift reverts);
    /// status is still reported.
    #[serde(default)]
    pub paused: bool,
}

fn default_replicas() -> i32 {
    1
}

/// The model: exactly one source, plus how to interpret it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.huggingFace) != has(self.pvc)")
        .message("spec.model must set exactly one source: spec.model.huggingFace or spec.model.pvc")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// A repository on the Hugging Face hub (or a hub-compatible endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(concat!(
            "!has(self.tokenSecretRef) || (self.tokenSecretRef.name.matches('",
            dns_subdomain!(),
            "') && self.tokenSecretRef.key.matches('^[-._a-zA-Z0-9]+$'))"
        ))
        .message(
            "spec.model.huggingFace.tokenSecretRef needs the name of a Secret (a DNS subdomain) and a key in it (letters, digits, '-', '_', '.')"
        )
    )]
    pub hugging_face: Option<HuggingFaceSource>,

    /// Model files already on a PersistentVolumeClaim in the model's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,

    /// What the model does; inferred from the model's config when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,

    /// Overrides the architecture read from the model's config (e.g. `llama`, `bert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9][a-z0-9_-]*$')").message(
            "spec.model.architecture must be a lowercase architecture name such as 'llama' or 'bert'"
        )
    )]
    pub architecture: Option<String>,

    /// Numeric type the weights are loaded in.
    #[serde(default)]
    pub dtype: Dtype,
}

/// A Hugging Face hub repository, pinned by the operator to the commit `revision` resolves to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Repository id, `org/name` (or a bare legacy name such as `gpt2`).
    #[schemars(length(max = 200))]
    #[x_kube(
        validation = Rule::new(
            "self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$') && !self.contains('..')"
        )
        .message("spec.model.huggingFace.repo must be a hub repository id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    )]
    pub repo: String,

    /// Branch, tag or full 40-hex commit sha. Abbreviated shas are refused: the hub does not
    /// resolve them, and a hex-looking branch name would be ambiguous.
    #[serde(default = "default_revision")]
    #[schemars(length(max = 255))]
    #[x_kube(
        validation = Rule::new(
            "self.matches('^[0-9a-f]{40}$') || (self.matches('^[A-Za-z0-9][A-Za-z0-9._/-]*$') && !self.contains('..') && !self.contains('//') && !self.endsWith('/') && !self.endsWith('.') && !self.endsWith('.lock') && !self.matches('^[0-9a-f]{7,39}$'))"
        )
        .message(
            "spec.model.huggingFace.revision must be a branch or tag name, or a full 40-character hex commit sha (abbreviated shas are not accepted)"
        )
    )]
    pub revision: String,

    /// One GGUF file in the repository to serve instead of the safetensors weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    #[x_kube(
        validation = Rule::new("self.endsWith('.gguf') && !self.startsWith('/') && !self.contains('..')")
            .message("spec.model.huggingFace.file must be the relative path of one .gguf file in the repository")
    )]
    pub file: Option<String>,

    /// The Secret key holding a hub access token, for gated or private repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

fn default_revision() -> String {
    "main".to_owned()
}

/// A key in a Secret of the model's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(max = 253))]
    pub key: String,
}

/// Model files on a PersistentVolumeClaim, mounted read-only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the claim, in the model's namespace.
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new(concat!("self.matches('", dns_subdomain!(), "')"))
            .message("spec.model.pvc.claimName must be a PersistentVolumeClaim name (a lowercase DNS subdomain)")
    )]
    pub claim_name: String,

    /// Directory (or GGUF file) inside the claim; the claim's root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(
        validation = Rule::new("!self.startsWith('/') && !self.contains('..')")
            .message("spec.model.pvc.path must be a relative path inside the claim, without '..'")
    )]
    pub path: Option<String>,
}

/// What a model does, which selects the OpenAI endpoints the runtime serves.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `/v1/chat/completions` and `/v1/completions`.
    TextGeneration,
    /// `/v1/embeddings`.
    Embedding,
    /// `/v1/classify`.
    Classification,
    /// Encoder-decoder generation through `/v1/completions`.
    Text2Text,
}

impl Task {
    /// The name used on the wire and on the runtime's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::TextGeneration => "TextGeneration",
            Task::Embedding => "Embedding",
            Task::Classification => "Classification",
            Task::Text2Text => "Text2Text",
        }
    }
}

/// Numeric type of the loaded weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// The runtime chooses: the checkpoint's own type on GPU, f32 on CPU.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// The name used on the wire and on the runtime's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// Tuning of the inference server; every limit left out takes the runtime's default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new(
        "!has(self.maxNewTokens) || !has(self.maxSequenceLength) || self.maxNewTokens <= self.maxSequenceLength"
    )
    .message("spec.runtime.maxNewTokens must not exceed spec.runtime.maxSequenceLength"),
    validation = Rule::new(
        "!has(self.maxBatchSize) || !has(self.maxConcurrentRequests) || self.maxBatchSize <= self.maxConcurrentRequests"
    )
    .message("spec.runtime.maxBatchSize must not exceed spec.runtime.maxConcurrentRequests: a batch is cut from admitted requests")
)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// Runtime container image; the operator's default image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(
        validation = Rule::new("self.size() > 0 && !self.contains(' ')")
            .message("spec.runtime.image must be a container image reference without spaces")
    )]
    pub image: Option<String>,

    /// Most sequences decoded together in one forward pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.runtime.maxBatchSize must be at least 1"))]
    pub max_batch_size: Option<i32>,

    /// Longest prompt plus completion, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.runtime.maxSequenceLength must be at least 1"))]
    pub max_sequence_length: Option<i32>,

    /// Requests admitted at once per replica; more are refused with 429 rather than queued
    /// without bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self >= 1").message("spec.runtime.maxConcurrentRequests must be at least 1")
    )]
    pub max_concurrent_requests: Option<i32>,

    /// Upper bound on `max_tokens` a request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.runtime.maxNewTokens must be at least 1"))]
    pub max_new_tokens: Option<i32>,

    /// Extra environment for the runtime container. An entry named like one kandle sets
    /// replaces kandle's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub env: Vec<EnvVar>,

    /// Extra arguments appended to `kandle-runtime serve`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    #[x_kube(
        validation = Rule::new(
            "self.all(a, !(a.startsWith('--model') || a.startsWith('--port') || a.startsWith('--cache-dir')))"
        )
        .message(
            "spec.runtime.args must not set --model, --port or --cache-dir: kandle sets them from spec.model, spec.serving and spec.cache"
        )
    )]
    pub args: Vec<String>,

    /// Secrets' and ConfigMaps' files mounted read-only into the runtime container, for what
    /// the runtime reads from a file: a chat template (`args: [--chat-template, <path>]`), a
    /// trace collector's CA or client certificate (`env` `OTEL_EXPORTER_OTLP_CERTIFICATE`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(f, self.exists_one(g, g.mountPath == f.mountPath))")
            .message("spec.runtime.files must not mount two sources at the same mountPath")
    )]
    pub files: Vec<RuntimeFiles>,
}

/// One Secret's or ConfigMap's keys, each a file of that name under `mountPath`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.secretName) != has(self.configMapName)")
        .message("spec.runtime.files[] must name exactly one of secretName and configMapName")
)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeFiles {
    /// The directory the files appear in: absolute, and outside the directories kandle mounts
    /// (`/tmp`, `/var/cache/kandle`, `/models`).
    #[schemars(length(max = 256))]
    #[x_kube(
        validation = Rule::new(concat!(
            "self.startsWith('/') && self != '/' && !self.contains('..') && !self.contains('//')",
            " && ![", "'/tmp', '/var/cache/kandle', '/models'",
            "].exists(d, self == d || self.startsWith(d + '/'))"
        ))
        .message(
            "spec.runtime.files[].mountPath must be an absolute directory outside /tmp, /var/cache/kandle and /models"
        )
    )]
    pub mount_path: String,

    /// A Secret of the model's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new(concat!("self.matches('", dns_subdomain!(), "')"))
            .message("spec.runtime.files[].secretName must be a Secret name (a lowercase DNS subdomain)")
    )]
    pub secret_name: Option<String>,

    /// A ConfigMap of the model's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new(concat!("self.matches('", dns_subdomain!(), "')"))
            .message("spec.runtime.files[].configMapName must be a ConfigMap name (a lowercase DNS subdomain)")
    )]
    pub config_map_name: Option<String>,
}

/// Compute for each replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// NVIDIA GPUs; none (CPU only) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,

    /// CPU request; estimated when absent (see the builders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = positive_quantity_rule!("spec.resources.cpu"))]
    pub cpu: Option<Quantity>,

    /// Memory request and limit; estimated from the model's size when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = positive_quantity_rule!("spec.resources.memory"))]
    pub memory: Option<Quantity>,
}

/// NVIDIA GPUs per replica, scheduled through the `nvidia.com/gpu` extended resource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.product) || self.count >= 1")
        .message("spec.resources.gpu.product names a GPU model, so spec.resources.gpu.count must be at least 1")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// GPUs per replica; 0 means CPU only.
    #[serde(default)]
    #[x_kube(
        validation = Rule::new("self >= 0").message("spec.resources.gpu.count must be 0 (CPU only) or more")
    )]
    pub count: i32,

    /// Value of the `nvidia.com/gpu.product` node label to schedule on, e.g.
    /// `NVIDIA-A100-SXM4-80GB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(
        validation = Rule::new("self.matches('^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')").message(
            "spec.resources.gpu.product must be a nvidia.com/gpu.product label value such as 'NVIDIA-A100-SXM4-80GB'"
        )
    )]
    pub product: Option<String>,
}

/// Scheduling constraints added to kandle's own (GPU node selector and toleration).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Node labels every replica's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the replicas tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,

    /// Node and pod (anti-)affinity of the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// PriorityClass of the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new(concat!("self.matches('", dns_subdomain!(), "')"))
            .message("spec.placement.priorityClassName must be a PriorityClass name (a lowercase DNS subdomain)")
    )]
    pub priority_class_name: Option<String>,
}

/// How a change reaches the replicas (the Deployment's rolling update).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new(
        "!(has(self.maxSurge) && has(self.maxUnavailable) && string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])"
    )
    .message("spec.rollout.maxSurge and spec.rollout.maxUnavailable must not both be 0: the rollout could never progress")
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Replicas created above `replicas` during a rollout (a number or a percentage);
    /// Kubernetes' 25% when absent. Each surge replica needs its own GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(INT_OR_PERCENT)
            .message("spec.rollout.maxSurge must be a number of replicas (0 or more) or a percentage from 0% to 100%")
    )]
    pub max_surge: Option<IntOrString>,

    /// Replicas that may be unavailable during a rollout (a number or a percentage);
    /// Kubernetes' 25% when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(INT_OR_PERCENT)
            .message("spec.rollout.maxUnavailable must be a number of replicas (0 or more) or a percentage from 0% to 100%")
    )]
    pub max_unavailable: Option<IntOrString>,

    /// Seconds a rollout may make no progress before it is reported failed; 1800 when absent,
    /// longer than Kubernetes' 600 because a replica first downloads and loads the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self >= 60")
            .message("spec.rollout.progressDeadlineSeconds must be at least 60: a replica downloads and loads the model first")
    )]
    pub progress_deadline_seconds: Option<i32>,
}

/// How the OpenAI-compatible endpoint is exposed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Port of the runtime's HTTP server and of the Service.
    #[serde(default = "default_port")]
    #[x_kube(
        validation = Rule::new("self >= 1024 && self <= 65535")
            .message("spec.serving.port must be between 1024 and 65535: the server runs as non-root")
    )]
    pub port: i32,

    /// A Secret key holding the API key clients must send as `Authorization: Bearer <key>`;
    /// no authentication when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(concat!(
            "self.name.matches('", dns_subdomain!(), "') && self.key.matches('^[-._a-zA-Z0-9]+$')"
        ))
        .message(
            "spec.serving.apiKeySecretRef needs the name of a Secret (a DNS subdomain) and a key in it (letters, digits, '-', '_', '.')"
        )
    )]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Type of the Service in front of the replicas.
    #[serde(default)]
    pub service_type: ServiceType,
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self { port: default_port(), api_key_secret_ref: None, service_type: ServiceType::default() }
    }
}

fn default_port() -> i32 {
    8080
}

/// Type of the Service (an `ExternalName` Service cannot front pods, so it is not offered).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    /// The name the Service API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// A PersistentVolumeClaim (`<name>-cache`) for downloaded model files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// StorageClass of the claim; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new(concat!("self.matches('", dns_subdomain!(), "')"))
            .message("spec.cache.storageClassName must be a StorageClass name (a lowercase DNS subdomain)")
    )]
    pub storage_class_name: Option<String>,

    /// Requested size of the claim; it must hold the model's files.
    #[x_kube(validation = positive_quantity_rule!("spec.cache.size"))]
    pub size: Quantity,

    /// Access mode of the claim. `ReadWriteOnce` (the default) lets replicas share the cache
    /// only on one node; replicas spread over nodes need `ReadWriteMany` storage.
    #[serde(default)]
    pub access_mode: CacheAccessMode,
}

/// Access mode of the cache claim.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheAccessMode {
    #[default]
    ReadWriteOnce,
    ReadWriteMany,
}

impl CacheAccessMode {
    /// The name the PersistentVolumeClaim API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheAccessMode::ReadWriteOnce => "ReadWriteOnce",
            CacheAccessMode::ReadWriteMany => "ReadWriteMany",
        }
    }
}

/// What kandle does about edits to the objects it owns.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriftSpec {
    /// `Revert` re-applies kandle's fields; `Report` leaves the edit and sets `Drifted`.
    #[serde(default)]
    pub policy: DriftPolicy,
}

/// The response to config drift.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriftPolicy {
    #[default]
    Revert,
    Report,
}

/// What kandle observed of a `LanguageModel`; written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LanguageModelStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Progressing`, `Degraded`, `ModelResolved` and `Drifted`, in the kstatus shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Pods of the model's Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Pods that are ready (model loaded and warmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Pods running the current pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,

    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// The commit `spec.model.huggingFace.revision` resolved to; the pods are pinned to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_revision: Option<String>,

    /// In-cluster OpenAI base URL, e.g. `http://name.namespace.svc:8080/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// The last drift kandle found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftStatus>,
}

/// Drift found in the objects kandle owns.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriftStatus {
    /// Fields whose live value differed from kandle's, as `Kind/name: path`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config: Vec<String>,

    /// When the drift was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_detected_time: Option<Time>,

    /// What kandle did about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<DriftAction>,
}

/// What kandle did about drift.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriftAction {
    /// kandle's values were re-applied.
    Reverted,
    /// The edit was left in place and reported (`drift.policy: Report`).
    Reported,
}

impl LanguageModel {
    /// GPUs per replica (0 when the model runs on CPU).
    pub fn gpu_count(&self) -> i32 {
        self.spec.resources.gpu.as_ref().map_or(0, |g| g.count.max(0))
    }
}
