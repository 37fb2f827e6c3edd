//! Distribution of the trust bundle into Kubernetes: Istio's root ConfigMap in every
//! namespace ([`configmap`]), istiod's serving certificate Secret ([`istiod_cert`]) and,
//! optionally, a ClusterTrustBundle ([`cluster_trust_bundle`]).
//! Run only by the Lease holder of each cluster. Sits above [`crate::backend`] (istiod's
//! certificate is signed by the configured backend) and uses [`crate::k8s`] as its client.

pub mod cluster_trust_bundle;
pub mod configmap;
pub mod istiod_cert;
