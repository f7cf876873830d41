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

/// Normal: a pod of this node that opted in is enrolled.
pub const MESH_ENROLLED: &str = "MeshEnrolled";
/// Warning: a pod of this node opted in, yet is not enrolled (a sidecar, a protected namespace).
pub const MESH_SKIPPED: &str = "MeshSkipped";
/// Normal: an enrolled pod left the mesh (its label or its namespace's changed).
pub const MESH_RELEASED: &str = "MeshReleased";

/// The pod an Event is about.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
}

impl From<&Workload> for PodRef {
    fn from(w: &Workload) -> Self {
        PodRef {
            name: w.name.to_string(),
            namespace: w.namespace.to_string(),
            uid: w.uid.as_ref().map(|u| u.to_string()),
        }
    }
}

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
    let holds = if fails_closed {
        "the pod fails closed: STRICT ports refuse plaintext, outbound stays captured"
    } else {
        "its network namespace cannot be opened yet"
    };
    let message = format!(
        "mtls-agent on node {node} could not enroll the pod (step {}): {reason}; {holds}; \
         retrying",
        step.as_str()
    );
    post(client, PodRef::from(&w), "Warning", ENROLLMENT_FAILED, message, node).await;
}

/// Posts an Event of `type_` (`Normal`, `Warning`) with `reason` on `pod`. Best effort: a
/// refusal by the API server (RBAC, quota) is logged, never retried.
pub async fn post(
    client: kube::Client,
    pod: PodRef,
    type_: &str,
    reason: &str,
    message: String,
    node: String,
) -> bool {
    let key = format!("{}.{}", pod.name, pod.namespace);
    let involved = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.name.clone()),
        namespace: Some(pod.namespace.clone()),
        uid: pod.uid.clone(),
        ..Default::default()
    };
    create(client, &pod.namespace, involved, &key, type_, reason, message, node).await
}

/// The namespace Events about cluster-scoped objects (a Node) are posted in, as the kubelet
/// does.
pub const NODE_EVENTS_NAMESPACE: &str = "default";

/// Posts an Event on the Node `node`, where `kubectl describe node` shows it. Its uid is the
/// node's name, as the kubelet's Events on its Node carry (kubectl looks them up by it). Best
/// effort, as [`post`].
pub async fn post_on_node(
    client: kube::Client,
    type_: &str,
    reason: &str,
    message: String,
    node: String,
) -> bool {
    let involved = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.clone()),
        uid: Some(node.clone()),
        ..Default::default()
    };
    let key = format!("node {node}");
    create(client, NODE_EVENTS_NAMESPACE, involved, &key, type_, reason, message, node).await
}

#[allow(clippy::too_many_arguments)]
async fn create(
    client: kube::Client,
    namespace: &str,
    involved: ObjectReference,
    key: &str,
    type_: &str,
    reason: &str,
    message: String,
    node: String,
) -> bool {
    let now = k8s_openapi::chrono::Utc::now();
    let object = involved.name.clone().unwrap_or_default();
    let event = Event {
        metadata: ObjectMeta {
            // As the kubelet names them: the object's name and a unique suffix.
            name: Some(format!("{object}.{:x}", now.timestamp_nanos_opt().unwrap_or_default())),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        involved_object: involved,
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(type_.into()),
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
    let api: Api<Event> = Api::namespaced(client, namespace);
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => {
            debug!(object = %key, "Event {reason} posted");
            true
        }
        Err(e) => {
            warn!(object = %key, "posting Event {reason}: {e}");
            false
        }
    }
}
