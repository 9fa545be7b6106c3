//! Names shared by the operator, its children and its users: condition types and reasons, label
//! and annotation keys, the finalizer and the field manager. Kept in one place because each is a
//! contract (kstatus readers, label selectors, `kubectl wait`, managed-fields ownership) that a
//! typo would silently break.

/// The server-side apply field manager of every write kandle makes.
pub const FIELD_MANAGER: &str = "kandle-operator";

/// Finalizer that lets kandle clean up a model's children before it disappears.
pub const FINALIZER: &str = "kandle.dev/cleanup";

/// Condition types on `LanguageModel.status.conditions`.
pub mod condition {
    /// Serving: every desired replica is ready on the current pod template.
    pub const READY: &str = "Ready";
    /// A rollout or scale change is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something the user must act on (or wait out) keeps the model from its desired state.
    pub const DEGRADED: &str = "Degraded";
    /// The hub revision resolved to a commit (or the source needs no resolution).
    pub const MODEL_RESOLVED: &str = "ModelResolved";
    /// A child object differs from what kandle applied.
    pub const DRIFTED: &str = "Drifted";
}

/// Condition reasons (CamelCase, stable: users and alerts match on them).
pub mod reason {
    /// Ready: all replicas ready and updated.
    pub const AVAILABLE: &str = "Available";
    /// Ready=False / Progressing: pods exist but are still downloading or loading the model.
    pub const REPLICAS_NOT_READY: &str = "ReplicasNotReady";
    /// Progressing: the Deployment is replacing pods with the new template.
    pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
    /// Progressing=False: nothing is changing.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// Progressing=False, Degraded: the Deployment passed its progress deadline.
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// Ready=False: the Deployment does not exist yet (or not observed yet).
    pub const DEPLOYMENT_PENDING: &str = "DeploymentPending";
    /// Ready: replicas is 0, so there is nothing to wait for.
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// Degraded=False.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Progressing=False: `spec.paused` is set.
    pub const PAUSED: &str = "Paused";
    /// ModelResolved: the revision resolved to a commit.
    pub const RESOLVED: &str = "Resolved";
    /// ModelResolved: the source is a PersistentVolumeClaim or already a commit sha.
    pub const NOT_REQUIRED: &str = "ResolutionNotRequired";
    /// ModelResolved=False: the hub does not know the repository or revision.
    pub const REPOSITORY_NOT_FOUND: &str = "RepositoryNotFound";
    /// ModelResolved=False: the hub refused the token (or needs one).
    pub const HUB_UNAUTHORIZED: &str = "HubUnauthorized";
    /// ModelResolved=False: the hub could not be reached.
    pub const HUB_UNREACHABLE: &str = "HubUnreachable";
    /// ModelResolved=False: the token Secret or its key does not exist.
    pub const TOKEN_SECRET_MISSING: &str = "TokenSecretMissing";
    /// ModelResolved=Unknown: resolution has not happened yet.
    pub const RESOLUTION_PENDING: &str = "ResolutionPending";
    /// Drifted: a child differs and `drift.policy` is `Report`.
    pub const CONFIG_DRIFT_REPORTED: &str = "ConfigDriftReported";
    /// Drifted=False: a drifted child was re-applied (or no drift was found).
    pub const NO_DRIFT: &str = "NoDrift";
}

/// Label keys on every child object and pod.
pub mod label {
    /// Always `kandle` (DESIGN.md).
    pub const NAME: &str = "app.kubernetes.io/name";
    /// The `LanguageModel`'s name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// Always [`super::FIELD_MANAGER`]: who manages the object.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The `LanguageModel`'s name (kandle's own key, used in selectors).
    pub const MODEL: &str = "kandle.dev/model";
    /// Value of [`NAME`].
    pub const NAME_VALUE: &str = "kandle";
}

/// Annotation keys kandle writes.
pub mod annotation {
    /// Hash of the pod template, i.e. of exactly what makes the Deployment roll out.
    pub const POD_TEMPLATE_HASH: &str = "kandle.dev/pod-template-hash";
    /// Hash of the object kandle applied, set on every child: equal on the live object means
    /// any difference is someone else's edit (drift); different means kandle's desired object
    /// changed (an update or rollout).
    pub const APPLIED_HASH: &str = "kandle.dev/applied-hash";
    /// The hub commit the pods were built for.
    pub const RESOLVED_REVISION: &str = "kandle.dev/resolved-revision";
}

/// Node labels, taints and extended resources of the NVIDIA device plugin and GPU feature
/// discovery.
pub mod gpu {
    /// Extended resource the device plugin advertises.
    pub const RESOURCE: &str = "nvidia.com/gpu";
    /// Node label with the GPU model (GPU feature discovery).
    pub const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
    /// Taint key GPU node pools commonly carry so that only GPU workloads land there.
    pub const TAINT_KEY: &str = "nvidia.com/gpu";
}
