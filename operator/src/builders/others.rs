//! The model's Service, PodDisruptionBudget and cache PersistentVolumeClaim.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            PersistentVolumeClaim, PersistentVolumeClaimSpec, Service, ServicePort, ServiceSpec,
            VolumeResourceRequirements,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{child_meta, model_name, selector_labels};
use crate::{LanguageModel, Result};

/// Name of the model's cache claim.
pub fn cache_claim_name(model: &str) -> String {
    format!("{model}-cache")
}

/// The Service in front of the model's pods, on `serving.port`.
pub fn service(lm: &LanguageModel) -> Result<Service> {
    let name = model_name(lm)?;
    Ok(Service {
        metadata: child_meta(lm, name.to_owned())?,
        spec: Some(ServiceSpec {
            type_: Some(lm.spec.serving.service_type.as_str().into()),
            selector: Some(selector_labels(name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: lm.spec.serving.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// A budget of one voluntary disruption at a time, when there is more than one replica (with a
/// single replica any budget either blocks node drains forever or protects nothing).
pub fn pod_disruption_budget(lm: &LanguageModel) -> Result<Option<PodDisruptionBudget>> {
    if lm.spec.replicas <= 1 {
        return Ok(None);
    }
    let name = model_name(lm)?;
    Ok(Some(PodDisruptionBudget {
        metadata: child_meta(lm, name.to_owned())?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(name)), match_expressions: None }),
            // A replica still loading (not ready) may be evicted: it serves nothing yet, and
            // protecting it could stall a node drain for the whole load time.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            min_available: None,
        }),
        status: None,
    }))
}

/// The cache claim, when `spec.cache` is set.
pub fn persistent_volume_claim(lm: &LanguageModel) -> Result<Option<PersistentVolumeClaim>> {
    let Some(cache) = &lm.spec.cache else { return Ok(None) };
    let name = model_name(lm)?;
    Ok(Some(PersistentVolumeClaim {
        metadata: child_meta(lm, cache_claim_name(name))?,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![cache.access_mode.as_str().into()]),
            storage_class_name: cache.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), cache.size.clone())])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;
    use crate::{
        api::{CacheAccessMode, CacheSpec, SecretKeyRef, ServiceType},
        builders::fixtures::*,
    };

    #[test]
    fn the_service_exposes_the_serving_port_to_the_model_pods() {
        let mut lm = hub_model();
        lm.spec.serving.port = 9000;
        lm.spec.serving.service_type = ServiceType::LoadBalancer;
        lm.spec.serving.api_key_secret_ref = Some(SecretKeyRef { name: "k".into(), key: "k".into() });
        let s = service(&lm).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("smollm"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.selector.unwrap(), selector_labels("smollm"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.port, 9000);
        assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
    }

    #[test]
    fn a_single_replica_gets_no_disruption_budget() {
        assert_eq!(pod_disruption_budget(&hub_model()).unwrap(), None);
        let mut lm = hub_model();
        lm.spec.replicas = 0;
        assert_eq!(pod_disruption_budget(&lm).unwrap(), None);
    }

    #[test]
    fn several_replicas_get_a_budget_of_one_disruption_at_a_time() {
        let mut lm = hub_model();
        lm.spec.replicas = 2;
        let pdb = pod_disruption_budget(&lm).unwrap().unwrap();
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.selector.unwrap().match_labels.unwrap(), selector_labels("smollm"));
        assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
    }

    #[test]
    fn a_cache_spec_becomes_a_claim_of_that_size_and_class() {
        assert_eq!(persistent_volume_claim(&hub_model()).unwrap(), None);
        let mut lm = hub_model();
        lm.spec.cache = Some(CacheSpec {
            storage_class_name: Some("fast-ssd".into()),
            size: Quantity("50Gi".into()),
            access_mode: CacheAccessMode::ReadWriteMany,
        });
        let pvc = persistent_volume_claim(&lm).unwrap().unwrap();
        assert_eq!(pvc.metadata.name.as_deref(), Some("smollm-cache"));
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteMany"]);
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast-ssd"));
        assert_eq!(spec.resources.unwrap().requests.unwrap()["storage"], Quantity("50Gi".into()));
    }
}
