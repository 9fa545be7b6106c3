//! The pod-template hash: a short digest of everything that makes the Deployment roll out.
use k8s_openapi::api::core::v1::PodTemplateSpec;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Hex digest (16 characters, 64 bits) of the template's JSON. k8s-openapi serializes struct
/// fields in a fixed order and maps as sorted `BTreeMap`s, so equal templates hash equally.
pub fn pod_template_hash(template: &PodTemplateSpec) -> Result<String> {
    let json = serde_json::to_vec(template).map_err(|source| Error::Serialize { what: "pod template", source })?;
    let digest = Sha256::digest(&json);
    Ok(hex::encode(&digest[..8]))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    #[test]
    fn equal_templates_hash_equally_and_different_ones_differently() {
        let a = PodTemplateSpec { metadata: Some(ObjectMeta::default()), spec: Some(PodSpec::default()) };
        let mut b = a.clone();
        assert_eq!(pod_template_hash(&a).unwrap(), pod_template_hash(&b).unwrap());
        b.spec.as_mut().unwrap().priority_class_name = Some("high".into());
        assert_ne!(pod_template_hash(&a).unwrap(), pod_template_hash(&b).unwrap());
        assert_eq!(pod_template_hash(&a).unwrap().len(), 16);
    }
}
