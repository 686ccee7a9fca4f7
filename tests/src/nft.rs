//! kube-proxy style nftables rules for ClusterIPs, in the node netns (modelled on kube-proxy's
//! nftables mode: a `services` dispatch chain, one chain per service port and family that picks
//! an endpoint with `numgen random`, one DNAT chain per endpoint, and a reject for service
//! ports without endpoints).

use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The table's name in the node netns (each cluster has its own node netns).
pub const TABLE: &str = "rdt_kube";

/// One service as the rules see it.
pub struct Rules<'a> {
    pub name: &'a str,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// (port, targetPort)
    pub ports: Vec<(u16, u16)>,
    pub backends4: Vec<Ipv4Addr>,
    pub backends6: Vec<Ipv6Addr>,
}

/// The whole table, replacing any previous version atomically when loaded with `nft -f`.
pub fn render(services: &[Rules<'_>]) -> String {
    let mut dispatch = String::new();
    let mut reject = String::new();
    let mut chains = String::new();
    for (s, svc) in services.iter().enumerate() {
        for (p, &(port, target)) in svc.ports.iter().enumerate() {
            let families: [(&str, String, Vec<String>); 2] = [
                (
                    "ip",
                    svc.ip4.to_string(),
                    svc.backends4
                        .iter()
                        .map(|a| format!("{a}:{target}"))
                        .collect(),
                ),
                (
                    "ip6",
                    svc.ip6.to_string(),
                    svc.backends6
                        .iter()
                        .map(|a| format!("[{a}]:{target}"))
                        .collect(),
                ),
            ];
            for (family, vip, endpoints) in families {
                let chain = format!("svc{s}_port{p}_{family}");
                let comment = format!("{}:{port}", svc.name.replace('"', ""));
                if endpoints.is_empty() {
                    let _ = writeln!(
                        reject,
                        "    {family} daddr {vip} tcp dport {port} reject with tcp reset comment \"{comment}\""
                    );
                    continue;
                }
                let _ = writeln!(
                    dispatch,
                    "    {family} daddr {vip} tcp dport {port} goto {chain} comment \"{comment}\""
                );
                let mut verdicts = Vec::new();
                for (e, endpoint) in endpoints.iter().enumerate() {
                    let ep_chain = format!("{chain}_ep{e}");
                    let _ = writeln!(
                        chains,
                        "  chain {ep_chain} {{\n    meta l4proto tcp dnat {family} to {endpoint}\n  }}"
                    );
                    verdicts.push(format!("{e} : goto {ep_chain}"));
                }
                let _ = writeln!(
                    chains,
                    "  chain {chain} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
                    endpoints.len(),
                    verdicts.join(", ")
                );
            }
        }
    }
    format!(
        "table inet {TABLE} {{}}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20 chain nat_prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n\
         \x20 chain nat_output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n\
         \x20 chain filter_forward {{\n    type filter hook forward priority filter; policy accept;\n    jump no_endpoints\n  }}\n\
         \x20 chain filter_output {{\n    type filter hook output priority filter; policy accept;\n    jump no_endpoints\n  }}\n\
         \x20 chain services {{\n{dispatch}  }}\n\
         \x20 chain no_endpoints {{\n{reject}  }}\n\
         {chains}}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_backends_are_picked_at_random_and_empty_services_reject() {
        let rules = [
            Rules {
                name: "checkout",
                ip4: "10.200.128.10".parse().unwrap(),
                ip6: "fd00:200::128:10".parse().unwrap(),
                ports: vec![(80, 8080)],
                backends4: vec!["10.200.1.2".parse().unwrap(), "10.200.1.3".parse().unwrap()],
                backends6: vec!["fd00:200::1:2".parse().unwrap()],
            },
            Rules {
                name: "empty",
                ip4: "10.200.128.11".parse().unwrap(),
                ip6: "fd00:200::128:11".parse().unwrap(),
                ports: vec![(80, 8080)],
                backends4: vec![],
                backends6: vec![],
            },
        ];
        let text = render(&rules);
        assert!(text.contains("ip daddr 10.200.128.10 tcp dport 80 goto svc0_port0_ip"));
        assert!(text.contains(
            "numgen random mod 2 vmap { 0 : goto svc0_port0_ip_ep0, 1 : goto svc0_port0_ip_ep1 }"
        ));
        assert!(text.contains("dnat ip to 10.200.1.3:8080"));
        assert!(text.contains("dnat ip6 to [fd00:200::1:2]:8080"));
        assert!(text.contains("ip6 daddr fd00:200::128:11 tcp dport 80 reject with tcp reset"));
    }
}
