//! What the agent keeps of each watched Service and Pod: only the fields `desired()` (and
//! `redirectctl`) read, so that a cluster's worth of them fits in a node agent's memory
//! (EndpointSlices, the most numerous, become the compact [`crate::slice::Slice`]). Everything
//! else (managed fields, annotations, container specs, statuses) is dropped as the object
//! arrives, and every list kept is shrunk to its length: deserialised lists grow by doubling
//! from 4.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// `v` without spare capacity.
fn shrunk<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

/// Identity fields only (plus labels when `keep_labels` says which to keep).
fn meta(m: ObjectMeta, keep_label: impl Fn(&str) -> bool) -> ObjectMeta {
    let labels = m.labels.map(|l| {
        l.into_iter()
            .filter(|(k, _)| keep_label(k))
            .collect::<std::collections::BTreeMap<_, _>>()
    });
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        labels: labels.filter(|l| !l.is_empty()),
        deletion_timestamp: m.deletion_timestamp,
        creation_timestamp: m.creation_timestamp,
        ..ObjectMeta::default()
    }
}

/// ClusterIPs and TCP-relevant port fields.
pub fn service(s: Service) -> Service {
    Service {
        metadata: meta(s.metadata, |_| false),
        spec: s.spec.map(|spec| ServiceSpec {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips.map(shrunk),
            type_: spec.type_,
            ports: spec.ports.map(|ports| {
                shrunk(
                    ports
                        .into_iter()
                        .map(|p| ServicePort {
                            name: p.name,
                            port: p.port,
                            target_port: p.target_port,
                            protocol: p.protocol,
                            app_protocol: p.app_protocol,
                            ..ServicePort::default()
                        })
                        .collect(),
                )
            }),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Labels (fork selectors match them), node, container ports (named target ports), phase,
/// IPs and the Ready condition.
pub fn pod(p: Pod) -> Pod {
    Pod {
        metadata: meta(p.metadata, |_| true),
        spec: p.spec.map(|spec| PodSpec {
            node_name: spec.node_name,
            containers: shrunk(
                spec.containers
                    .into_iter()
                    .filter(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
                    .map(|c| Container {
                        name: c.name,
                        ports: c.ports.map(|ports| {
                            shrunk(
                                ports
                                    .into_iter()
                                    .map(|p| ContainerPort {
                                        name: p.name,
                                        container_port: p.container_port,
                                        protocol: p.protocol,
                                        ..ContainerPort::default()
                                    })
                                    .collect(),
                            )
                        }),
                        ..Container::default()
                    })
                    .collect(),
            ),
            ..PodSpec::default()
        }),
        status: p.status.map(|st| PodStatus {
            phase: st.phase,
            pod_ip: st.pod_ip,
            pod_ips: st.pod_ips.map(shrunk),
            conditions: st.conditions.map(|cs| {
                shrunk(
                    cs.into_iter()
                        .filter(|c| c.type_ == "Ready")
                        .map(|c| PodCondition {
                            type_: c.type_,
                            status: c.status,
                            ..PodCondition::default()
                        })
                        .collect(),
                )
            }),
            ..PodStatus::default()
        }),
    }
}

/// The metadata of a custom resource, without what the agent never reads.
pub fn custom_meta(m: ObjectMeta) -> ObjectMeta {
    meta(m, |_| true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn managed_fields() -> serde_json::Value {
        json!([{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:ports": {}}}}])
    }

    #[test]
    fn a_service_keeps_its_addresses_and_ports_and_nothing_else() {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "checkout", "namespace": "shop", "uid": "u1",
                         "resourceVersion": "7", "labels": {"app": "checkout"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4000)},
                         "managedFields": managed_fields()},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "selector": {"app": "checkout"}, "sessionAffinity": "None",
                     "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP",
                                "appProtocol": "http", "nodePort": 30080}]},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        let kept = service(s);
        assert_eq!(
            serde_json::to_value(&kept).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "checkout", "namespace": "shop", "uid": "u1", "resourceVersion": "7"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                         "ports": [{"name": "http", "port": 80, "targetPort": "web",
                                    "protocol": "TCP", "appProtocol": "http"}]}
            })
        );
    }

    #[test]
    fn a_pod_keeps_labels_node_ports_ips_and_readiness() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "checkout-fx", "namespace": "shop", "uid": "p1",
                         "labels": {"app": "checkout-fx"}, "managedFields": managed_fields(),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "rs", "uid": "r1"}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "default",
                     "volumes": [{"name": "v", "emptyDir": {}}],
                     "containers": [
                        {"name": "app", "image": "shop/checkout:fx", "env": [{"name": "A", "value": "b"}],
                         "ports": [{"name": "web", "containerPort": 8080, "protocol": "TCP"}]},
                        {"name": "sidecar", "image": "log:1"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5",
                       "podIPs": [{"ip": "10.244.1.5"}], "hostIP": "172.18.0.2",
                       "conditions": [{"type": "Ready", "status": "True"},
                                      {"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "app", "image": "i", "imageID": "x",
                                              "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(pod(p)).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "checkout-fx", "namespace": "shop", "uid": "p1",
                             "labels": {"app": "checkout-fx"}},
                "spec": {"nodeName": "n1", "containers": [
                    {"name": "app", "ports": [{"name": "web", "containerPort": 8080, "protocol": "TCP"}]}]},
                "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}],
                           "conditions": [{"type": "Ready", "status": "True"}]}
            })
        );
    }
}
