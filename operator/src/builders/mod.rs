//! Pure builders of the objects kandle owns for one `LanguageModel`.
//!
//! Input: the model as read from the API server, a [`BuilderConfig`] (operator-wide settings)
//! and a [`Resolution`] (what the controller learned about the model: the hub commit to pin and,
//! when known, the size of the weights). Output: [`Children`], the desired state of every child
//! object, holding only the fields kandle owns, so that each can be sent as a server-side apply
//! patch under the `kandle-operator` field manager and compared with the live object for drift.
//! Nothing here talks to the network; the hub revision is an input, never looked up.
//!
//! Children of model `x` in namespace `ns`:
//! - Deployment `x` (see [`deployment`]), always;
//! - Service `x`, always, exposing the runtime's port;
//! - PodDisruptionBudget `x` when `replicas > 1` (one replica cannot be protected without
//!   blocking node drains forever);
//! - PersistentVolumeClaim `x-cache` when `spec.cache` is set.
//!
//! Every child carries the labels of DESIGN.md and a controller owner reference to the model, so
//! that the API server's garbage collector removes it with the model and watches map it back.
mod deployment;
mod hash;
mod others;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{PersistentVolumeClaim, Service},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};

pub use deployment::{
    CACHE_DIR, DEFAULT_CPU_CPU_ONLY, DEFAULT_CPU_WITH_GPU, DEFAULT_MEMORY, MODEL_PVC_DIR, deployment, memory_estimate,
};
pub use hash::pod_template_hash;
pub use others::{cache_claim_name, persistent_volume_claim, pod_disruption_budget, service};

use crate::{
    Error, LanguageModel, Result,
    consts::{FIELD_MANAGER, label},
};

/// The runtime image used when neither the model nor the operator's flags name one.
pub const DEFAULT_RUNTIME_IMAGE: &str = concat!("ghcr.io/kandle-dev/kandle-runtime:", env!("CARGO_PKG_VERSION"));

/// The same for a model with GPUs: the runtime's CUDA build (runtime-image/Dockerfile with
/// `DEVICE=cuda`), since the CPU build refuses `--device cuda`.
pub const DEFAULT_RUNTIME_IMAGE_GPU: &str =
    concat!("ghcr.io/kandle-dev/kandle-runtime:", env!("CARGO_PKG_VERSION"), "-cuda");

/// Operator-wide settings that shape every model's children.
#[derive(Clone, Debug, PartialEq)]
pub struct BuilderConfig {
    /// Runtime image for CPU models whose `spec.runtime.image` is absent.
    pub runtime_image: String,
    /// Runtime image for models with `resources.gpu.count > 0` whose `spec.runtime.image` is
    /// absent: a CUDA build.
    pub runtime_image_gpu: String,
    /// Hub endpoint handed to the download step as `HF_ENDPOINT` (the public hub when `None`).
    pub hub_endpoint: Option<String>,
    /// OTLP/HTTP endpoint every model's server sends its traces to
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`) unless its `spec.runtime.env` names another or sets it
    /// empty; no traces when `None`.
    pub runtime_otlp_endpoint: Option<String>,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        Self {
            runtime_image: DEFAULT_RUNTIME_IMAGE.to_owned(),
            runtime_image_gpu: DEFAULT_RUNTIME_IMAGE_GPU.to_owned(),
            hub_endpoint: None,
            runtime_otlp_endpoint: None,
        }
    }
}

/// What the controller learned about the model before building its children.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// The commit sha the hub resolved `spec.model.huggingFace.revision` to. When `None` the
    /// revision is used as written (right for a sha; for a branch the pods would follow it,
    /// so the controller resolves first).
    pub revision: Option<String>,
    /// Total size of the weights in bytes, when the hub reported it; sizes the memory request.
    pub model_bytes: Option<u64>,
}

/// The desired children of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub deployment: Deployment,
    pub service: Service,
    /// Present when `replicas > 1`.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// Present when `spec.cache` is set.
    pub persistent_volume_claim: Option<PersistentVolumeClaim>,
}

/// Builds every child of `lm`.
pub fn children(lm: &LanguageModel, config: &BuilderConfig, resolution: &Resolution) -> Result<Children> {
    Ok(Children {
        deployment: deployment(lm, config, resolution)?,
        service: service(lm)?,
        pod_disruption_budget: pod_disruption_budget(lm)?,
        persistent_volume_claim: persistent_volume_claim(lm)?,
    })
}

/// Labels on every child and pod of the model named `name`.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (label::NAME.to_owned(), label::NAME_VALUE.to_owned()),
        (label::INSTANCE.to_owned(), name.to_owned()),
        (label::MODEL.to_owned(), name.to_owned()),
        (label::MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned()),
    ])
}

/// The subset of [`labels`] that selects the model's pods. Deployment selectors are immutable,
/// so this set must never grow.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(label::NAME.to_owned(), label::NAME_VALUE.to_owned()), (label::MODEL.to_owned(), name.to_owned())])
}

/// [`selector_labels`] as the string `status.selector` (and so the scale subresource) reports.
pub fn selector_string(name: &str) -> String {
    selector_labels(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The in-cluster OpenAI base URL of the model's Service.
pub fn endpoint(lm: &LanguageModel) -> Option<String> {
    let name = lm.metadata.name.as_deref()?;
    let namespace = lm.metadata.namespace.as_deref()?;
    Some(format!("http://{name}.{namespace}.svc:{}/v1", lm.spec.serving.port))
}

/// Metadata of a child named `name`: namespace, labels and the owner reference.
fn child_meta(lm: &LanguageModel, name: String) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(lm)?.to_owned()),
        labels: Some(labels(model_name(lm)?)),
        owner_references: Some(vec![owner_reference(lm)?]),
        ..ObjectMeta::default()
    })
}

fn model_name(lm: &LanguageModel) -> Result<&str> {
    lm.metadata.name.as_deref().ok_or(Error::MissingObjectKey("metadata.name"))
}

fn namespace(lm: &LanguageModel) -> Result<&str> {
    lm.metadata.namespace.as_deref().ok_or(Error::MissingObjectKey("metadata.namespace"))
}

/// A controller reference: the garbage collector deletes the child with the model, and
/// `blockOwnerDeletion` makes a foreground delete of the model wait for it.
fn owner_reference(lm: &LanguageModel) -> Result<OwnerReference> {
    if lm.uid().is_none() {
        return Err(Error::MissingObjectKey("metadata.uid"));
    }
    let mut owner = lm.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("metadata.name"))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Models used by the builder, status and drift tests.
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use crate::api::*;

    /// A hub model as the API server returns it (name, namespace, uid and defaults set).
    pub fn hub_model() -> LanguageModel {
        let mut lm = LanguageModel::new(
            "smollm",
            LanguageModelSpec {
                model: ModelSpec {
                    hugging_face: Some(HuggingFaceSource {
                        repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                        revision: "main".into(),
                        file: None,
                        token_secret_ref: None,
                    }),
                    task: Some(Task::TextGeneration),
                    ..ModelSpec::default()
                },
                runtime: None,
                resources: ResourcesSpec::default(),
                placement: None,
                replicas: 1,
                rollout: None,
                serving: ServingSpec::default(),
                cache: None,
                drift: DriftSpec::default(),
                paused: false,
            },
        );
        lm.metadata = ObjectMeta {
            name: Some("smollm".into()),
            namespace: Some("models".into()),
            uid: Some("0b3c5e1e-7d1e-4d6c-9d0a-3f1e2a4b5c6d".into()),
            generation: Some(1),
            ..ObjectMeta::default()
        };
        lm
    }

    /// [`hub_model`] on `count` GPUs of `product`.
    pub fn gpu_model(count: i32, product: Option<&str>) -> LanguageModel {
        let mut lm = hub_model();
        lm.spec.resources.gpu = Some(GpuSpec { count, product: product.map(str::to_owned) });
        lm
    }

    /// A model read from a PersistentVolumeClaim.
    pub fn pvc_model() -> LanguageModel {
        let mut lm = hub_model();
        lm.spec.model.hugging_face = None;
        lm.spec.model.pvc = Some(PvcSource { claim_name: "weights".into(), path: Some("minilm".into()) });
        lm.spec.model.task = Some(Task::Embedding);
        lm
    }

    pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn every_child_carries_the_design_labels() {
        let mut lm = hub_model();
        lm.spec.replicas = 2;
        lm.spec.cache = Some(crate::api::CacheSpec {
            storage_class_name: None,
            size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("20Gi".into()),
            access_mode: Default::default(),
        });
        let c = children(&lm, &BuilderConfig::default(), &Resolution::default()).unwrap();
        let metas = [
            &c.deployment.metadata,
            &c.service.metadata,
            &c.pod_disruption_budget.as_ref().unwrap().metadata,
            &c.persistent_volume_claim.as_ref().unwrap().metadata,
        ];
        for meta in metas {
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels["app.kubernetes.io/name"], "kandle");
            assert_eq!(labels["app.kubernetes.io/instance"], "smollm");
            assert_eq!(labels["kandle.dev/model"], "smollm");
            assert_eq!(meta.namespace.as_deref(), Some("models"));
        }
    }

    #[test]
    fn every_child_is_controlled_by_the_model_and_blocks_its_deletion() {
        let mut lm = hub_model();
        lm.spec.replicas = 3;
        let c = children(&lm, &BuilderConfig::default(), &Resolution::default()).unwrap();
        for meta in [&c.deployment.metadata, &c.service.metadata, &c.pod_disruption_budget.unwrap().metadata] {
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            let o = &owners[0];
            assert_eq!((o.api_version.as_str(), o.kind.as_str()), ("kandle.dev/v1alpha1", "LanguageModel"));
            assert_eq!(o.name, "smollm");
            assert_eq!(o.uid, "0b3c5e1e-7d1e-4d6c-9d0a-3f1e2a4b5c6d");
            assert_eq!((o.controller, o.block_owner_deletion), (Some(true), Some(true)));
        }
    }

    #[test]
    fn a_model_not_read_from_the_api_server_is_refused_not_built_with_holes() {
        let mut lm = hub_model();
        lm.metadata.uid = None;
        let err = children(&lm, &BuilderConfig::default(), &Resolution::default()).unwrap_err();
        assert!(matches!(err, Error::MissingObjectKey("metadata.uid")), "{err}");
        let mut lm = hub_model();
        lm.metadata.namespace = None;
        assert!(matches!(service(&lm), Err(Error::MissingObjectKey("metadata.namespace"))));
    }

    #[test]
    fn the_selector_string_matches_the_selector_labels() {
        assert_eq!(selector_string("x"), "app.kubernetes.io/name=kandle,kandle.dev/model=x");
        for (k, v) in selector_labels("x") {
            assert_eq!(labels("x")[&k], v);
        }
    }

    #[test]
    fn the_endpoint_is_the_services_in_cluster_openai_base_url() {
        let mut lm = hub_model();
        lm.spec.serving.port = 9000;
        assert_eq!(endpoint(&lm).as_deref(), Some("http://smollm.models.svc:9000/v1"));
    }
}
