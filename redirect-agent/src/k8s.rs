//! Facts read off Kubernetes objects the same way everywhere (node agent and controller): pod
//! readiness and addresses, Service ports and target ports, well-known labels.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Label of an EndpointSlice naming its Service (kube-proxy balances over such slices).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the controller of an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Ready (condition `Ready=True`) and not terminating.
pub fn pod_ready(pod: &Pod) -> bool {
    !pod_terminating(pod) && pod_running(pod) && pod_ready_condition(pod)
}

pub fn pod_ready_condition(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn pod_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Not finished (phase neither `Succeeded` nor `Failed`).
pub fn pod_running(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod's IPs (both families), from `status.podIPs`, else `status.podIP`; normalised.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips.dedup();
    ips
}

/// The Service's TCP ports (protocol unset means TCP).
pub fn tcp_ports(svc: &Service) -> Vec<&ServicePort> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .collect()
}

/// The port the pod serves a service port on: `targetPort` as a number, or the pod's TCP
/// container port of that name; the service port itself when `targetPort` is unset.
pub fn target_port(pod: &Pod, port: &ServicePort) -> Option<u16> {
    let number = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().is_none_or(|p| p == "TCP")
                })?
                .container_port
        }
    };
    u16::try_from(number).ok().filter(|p| *p != 0)
}
