//! The pod cache's view of a Pod: only the fields the impersonation check reads.
//!
//! Deserialized straight from the API server's JSON, so everything else in a pod
//! (containers, volumes, env, managedFields, status conditions: kilobytes per pod in a real
//! cluster) is skipped by the parser and never held, not even for the length of a list of
//! every pod of the cluster. `k8s_openapi`'s `Pod` would hold all of it until the list has
//! been applied.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A Pod as the pod cache reads it (`/api/v1/pods`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlimPod {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimSpec>,
    #[serde(default)]
    pub status: Option<SlimStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlimStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

/// The metadata the cache and the watcher use (the watcher resumes from
/// `resourceVersion`); labels, annotations and managedFields are skipped.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Fields {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
    }
    let f = Fields::deserialize(d)?;
    Ok(ObjectMeta {
        name: f.name,
        namespace: f.namespace,
        uid: f.uid,
        resource_version: f.resource_version,
        ..ObjectMeta::default()
    })
}

impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_what_the_check_needs_from_a_full_pod() {
        let full = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app": "web"}, "annotations": {"a": "b"},
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {
                "serviceAccountName": "web", "nodeName": "node-7",
                "containers": [{"name": "app", "image": "x", "env": [{"name": "A", "value": "1"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let p: SlimPod = serde_json::from_value(full).unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(p.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("42"));
        assert!(p.metadata.labels.is_none() && p.metadata.managed_fields.is_none());
        let spec = p.spec.unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.node_name.as_deref(), Some("node-7"));
        assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
        // A bookmark: metadata.resourceVersion only.
        let b: SlimPod = serde_json::from_value(
            serde_json::json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "43"}}),
        )
        .unwrap();
        assert_eq!(b.metadata.resource_version.as_deref(), Some("43"));
        assert!(b.spec.is_none());
        assert_eq!(
            <SlimPod as kube::Resource>::url_path(&(), None),
            "/api/v1/pods"
        );
    }
}
