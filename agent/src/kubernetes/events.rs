//! Kubernetes Events on pods: an enrollment failure shows in `kubectl describe pod` and
//! `kubectl get events`, where the pod's owner looks, not only in the agent's log.

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::api::{Api, PostParams};
use tracing::{debug, warn};

use crate::{enrollment::Step, workloads::Workload};

/// The Event's `reason` (CamelCase, as Kubernetes reasons are).
pub const ENROLLMENT_FAILED: &str = "MeshEnrollmentFailed";

/// Posts a Warning Event on the pod `w` that its enrollment failed at `step`. Best effort: a
/// refusal by the API server (RBAC, quota) is logged, never retried.
pub async fn enrollment_failed(
    client: kube::Client,
    w: Workload,
    step: Step,
    reason: String,
    node: String,
    fails_closed: bool,
) {
    let now = k8s_openapi::chrono::Utc::now();
    let holds = if fails_closed {
        "the pod fails closed: STRICT ports refuse plaintext, outbound stays captured"
    } else {
        "its network namespace cannot be opened yet"
    };
    let event = Event {
        metadata: ObjectMeta {
            // As the kubelet names them: the object's name and a unique suffix.
            name: Some(format!("{}.{:x}", w.name, now.timestamp_nanos_opt().unwrap_or_default())),
            namespace: Some(w.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            uid: w.uid.clone(),
            ..Default::default()
        },
        reason: Some(ENROLLMENT_FAILED.into()),
        message: Some(format!(
            "mtls-agent on node {node} could not enroll the pod (step {}): {reason}; {holds}; \
             retrying",
            step.as_str()
        )),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("mtls-agent".into()),
            host: Some(node.clone()),
        }),
        reporting_component: Some("mtls-agent".into()),
        reporting_instance: Some(node),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client, &w.namespace);
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => debug!(pod = %w.key(), "Event {ENROLLMENT_FAILED} posted"),
        Err(e) => warn!(pod = %w.key(), "posting Event {ENROLLMENT_FAILED}: {e}"),
    }
}
