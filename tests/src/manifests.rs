//! Kubernetes YAML for what a mini-cluster holds: Pods, Services and EndpointSlices (one per
//! address family), as a manifest-directory source or `kubectl apply` would read them. Every
//! scalar string is double-quoted, so label keys and values need no further care.

use std::fmt::Write;

use crate::{NAMESPACE, NODE_NAME, PodInfo, ServiceState};

/// A YAML double-quoted scalar (JSON string syntax, which YAML accepts).
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn labels_block(out: &mut String, indent: &str, labels: &[(String, String)]) {
    if labels.is_empty() {
        let _ = writeln!(out, "{indent}labels: {{}}");
        return;
    }
    let _ = writeln!(out, "{indent}labels:");
    for (k, v) in labels {
        let _ = writeln!(out, "{indent}  {}: {}", q(k), q(v));
    }
}

pub(crate) fn pod(p: &PodInfo) -> String {
    let mut y = String::new();
    let _ = writeln!(y, "apiVersion: v1\nkind: Pod\nmetadata:");
    let _ = writeln!(y, "  name: {}\n  namespace: {}", q(&p.name), q(NAMESPACE));
    let _ = writeln!(y, "  uid: {}\n  resourceVersion: \"1\"", q(&p.uid));
    labels_block(&mut y, "  ", &p.labels);
    let _ = writeln!(y, "spec:\n  nodeName: {}", q(NODE_NAME));
    let _ = writeln!(
        y,
        "  containers:\n    - name: \"c0\"\n      image: \"redirect-tests/none\""
    );
    let _ = writeln!(
        y,
        "status:\n  phase: \"Running\"\n  qosClass: \"Guaranteed\""
    );
    let _ = writeln!(y, "  hostIP: {}", q(&crate::ROUTER_IP4.to_string()));
    let _ = writeln!(y, "  podIP: {}\n  podIPs:", q(&p.ip4.to_string()));
    let _ = writeln!(
        y,
        "    - ip: {}\n    - ip: {}",
        q(&p.ip4.to_string()),
        q(&p.ip6.to_string())
    );
    let _ = writeln!(
        y,
        "  conditions:\n    - type: \"Ready\"\n      status: \"True\""
    );
    y
}

pub(crate) fn service(s: &ServiceState) -> String {
    let svc = &s.service;
    let mut y = String::new();
    let _ = writeln!(y, "apiVersion: v1\nkind: Service\nmetadata:");
    let _ = writeln!(y, "  name: {}\n  namespace: {}", q(&svc.name), q(NAMESPACE));
    let _ = writeln!(y, "  uid: {}\n  resourceVersion: \"1\"", q(&s.uid));
    let _ = writeln!(y, "spec:\n  type: \"ClusterIP\"");
    let (v4, v6) = (q(&svc.ip4.to_string()), q(&svc.ip6.to_string()));
    let _ = writeln!(
        y,
        "  clusterIP: {v4}\n  clusterIPs:\n    - {v4}\n    - {v6}"
    );
    let _ = writeln!(y, "  ipFamilies:\n    - \"IPv4\"\n    - \"IPv6\"");
    let _ = writeln!(y, "  ipFamilyPolicy: \"RequireDualStack\"\n  ports:");
    for p in &svc.ports {
        let _ = writeln!(y, "    - name: {}\n      protocol: \"TCP\"", q(&p.name));
        if let Some(app) = &p.app_protocol {
            let _ = writeln!(y, "      appProtocol: {}", q(app));
        }
        let _ = writeln!(
            y,
            "      port: {}\n      targetPort: {}",
            p.port, p.target_port
        );
    }
    y
}

/// `ipv6 == false`: the IPv4 slice.
pub(crate) fn endpoint_slice(s: &ServiceState, ipv6: bool) -> String {
    let svc = &s.service;
    let (family, suffix) = if ipv6 {
        ("IPv6", "ipv6")
    } else {
        ("IPv4", "ipv4")
    };
    let mut y = String::new();
    let _ = writeln!(
        y,
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:"
    );
    let name = format!("{}-{suffix}", svc.name);
    let _ = writeln!(y, "  name: {}\n  namespace: {}", q(&name), q(NAMESPACE));
    let _ = writeln!(y, "  resourceVersion: {}", q(&s.version.to_string()));
    let labels = [
        ("kubernetes.io/service-name".to_string(), svc.name.clone()),
        (
            "endpointslice.kubernetes.io/managed-by".to_string(),
            "redirect-tests".to_string(),
        ),
    ];
    labels_block(&mut y, "  ", &labels);
    let _ = writeln!(y, "addressType: {}", q(family));
    if s.backends.is_empty() {
        let _ = writeln!(y, "endpoints: []");
    } else {
        let _ = writeln!(y, "endpoints:");
    }
    for p in &s.backends {
        let addr = if ipv6 {
            p.ip6.to_string()
        } else {
            p.ip4.to_string()
        };
        let _ = writeln!(y, "  - addresses:\n      - {}", q(&addr));
        let _ = writeln!(
            y,
            "    conditions:\n      ready: true\n      serving: true\n      terminating: false"
        );
        let _ = writeln!(y, "    nodeName: {}", q(NODE_NAME));
        let _ = writeln!(
            y,
            "    targetRef:\n      kind: \"Pod\"\n      namespace: {}",
            q(NAMESPACE)
        );
        let _ = writeln!(y, "      name: {}\n      uid: {}", q(&p.name), q(&p.uid));
    }
    let _ = writeln!(y, "ports:");
    for p in &svc.ports {
        let _ = writeln!(y, "  - name: {}\n    protocol: \"TCP\"", q(&p.name));
        let _ = writeln!(y, "    port: {}", p.target_port);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::q;

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(q("redirect.dev/sandbox"), "\"redirect.dev/sandbox\"");
        assert_eq!(q("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(q("\t"), "\"\\u0009\"");
    }
}
