//! Distribution of the trust bundle into Kubernetes: Istio's root ConfigMap in every
//! namespace ([`configmap`]) and istiod's serving certificate Secret ([`istiod_cert`]).
//! Run only by the Lease holder of each cluster. Sits above [`crate::backend`] (istiod's
//! certificate is signed by the configured backend) and uses [`crate::k8s`] as its client.

pub mod configmap;
pub mod istiod_cert;
