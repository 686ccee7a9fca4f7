//! The `services` table kept up to date claim by claim instead of built anew on every sync.
//!
//! Every forked service port claims its ClusterIPs (first pass) and its baseline backend
//! addresses (second pass); an address belongs to the first claim in (pass, service name,
//! position) order, so a backend address never shadows a VIP and a conflict is settled the
//! same way whatever changed before. At 10,000s of addresses, redoing only the addresses of the
//! ports that changed is what keeps a watch event cheap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use redirect_common::{ServiceValue, SockAddr};

use crate::routing::{PortProtocol, ServiceName};

/// A forked service port as the `services` table sees it.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: Arc<ServiceName>,
    pub protocol: PortProtocol,
    /// Its ClusterIPs on the port.
    pub vips: Arc<[SockAddr]>,
    /// Its baseline backend addresses.
    pub backends: Arc<[SockAddr]>,
}

impl Port {
    fn same(&self, other: &Port) -> bool {
        let same_list = |a: &Arc<[SockAddr]>, b: &Arc<[SockAddr]>| Arc::ptr_eq(a, b) || a == b;
        (Arc::ptr_eq(&self.name, &other.name) || self.name == other.name)
            && self.protocol == other.protocol
            && same_list(&self.vips, &other.vips)
            && same_list(&self.backends, &other.backends)
    }

    /// Its claims: (pass, position, address).
    fn claims(&self) -> impl Iterator<Item = (u8, u32, SockAddr)> + '_ {
        let vips = self.vips.iter().enumerate().map(|(i, a)| (0, i as u32, *a));
        let backends = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, a)| (1, i as u32, *a));
        vips.chain(backends)
    }
}

/// One port's claim on an address; claims order as the passes do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    pass: u8,
    name: Arc<ServiceName>,
    position: u32,
    service_id: u32,
}

/// The `services`, `service_names` and `service_protocols` tables, and the claims behind them.
#[derive(Debug, Default)]
pub struct ServiceClaims {
    ports: HashMap<u32, Port>,
    /// The ids in `ports` per Service namespace and name.
    by_service: HashMap<String, HashMap<String, Vec<u32>>>,
    /// Per claimed address: its claims, first (the owner) first.
    claims: HashMap<SockAddr, Vec<Claim>>,
    /// Addresses claimed by more than one service port.
    conflicted: BTreeSet<SockAddr>,
    pub services: BTreeMap<SockAddr, ServiceValue>,
    pub names: BTreeMap<u32, Arc<ServiceName>>,
    pub protocols: BTreeMap<u32, PortProtocol>,
}

impl ServiceClaims {
    /// The port `service_id` claims now, if any.
    pub fn port(&self, service_id: u32) -> Option<&Port> {
        self.ports.get(&service_id)
    }

    /// Every port that claims addresses now.
    pub fn ports(&self) -> impl Iterator<Item = (u32, &Port)> {
        self.ports.iter().map(|(id, p)| (*id, p))
    }

    /// The ids of the ports of Service `namespace/name` that claim addresses now.
    pub fn ports_of(&self, namespace: &str, name: &str) -> impl Iterator<Item = u32> + '_ {
        let ids = self.by_service.get(namespace).and_then(|n| n.get(name));
        ids.into_iter().flatten().copied()
    }

    /// Applies `changes` (a port's claims now, or `None`: it claims nothing any more), redoing
    /// only the addresses of ports that changed. Returns those addresses (sorted), or `None`
    /// when so many changed that the table was built anew.
    pub fn update(&mut self, changes: Vec<(u32, Option<Port>)>) -> Option<Vec<SockAddr>> {
        let added: usize = changes
            .iter()
            .filter_map(|(_, p)| p.as_ref())
            .map(|p| p.vips.len() + p.backends.len())
            .sum();
        // Room for all at once: growing by doubling would move the table's entries again
        // and again on a first call.
        self.claims.reserve(added);
        self.ports.reserve(changes.len());
        let mut touched: Vec<SockAddr> = Vec::with_capacity(added);
        for (id, port) in changes {
            match (self.ports.get(&id), &port) {
                (Some(old), Some(new)) if old.same(new) => continue,
                (None, None) => continue,
                _ => {}
            }
            if let Some(old) = self.ports.remove(&id) {
                for (_, _, addr) in old.claims() {
                    if let Some(claims) = self.claims.get_mut(&addr) {
                        claims.retain(|c| c.service_id != id);
                    }
                    touched.push(addr);
                }
                self.names.remove(&id);
                self.protocols.remove(&id);
                if let Some(names) = self.by_service.get_mut(&old.name.namespace)
                    && let Some(ids) = names.get_mut(&old.name.name)
                {
                    ids.retain(|i| *i != id);
                    if ids.is_empty() {
                        names.remove(&old.name.name);
                    }
                }
            }
            if let Some(port) = port {
                for (pass, position, addr) in port.claims() {
                    self.claims.entry(addr).or_default().push(Claim {
                        pass,
                        name: port.name.clone(),
                        position,
                        service_id: id,
                    });
                    touched.push(addr);
                }
                self.names.insert(id, port.name.clone());
                self.protocols.insert(id, port.protocol);
                self.by_service
                    .entry(port.name.namespace.clone())
                    .or_default()
                    .entry(port.name.name.clone())
                    .or_default()
                    .push(id);
                self.ports.insert(id, port);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        if touched.len() > self.services.len() {
            // Most of the table (the first call): one sorted bulk build instead.
            let mut entries = Vec::with_capacity(self.claims.len());
            self.claims.retain(|_, c| !c.is_empty());
            for (addr, claims) in &mut self.claims {
                claims.sort_unstable();
                entries.push((*addr, owner(claims)));
            }
            entries.sort_unstable_by_key(|(addr, _)| *addr);
            self.conflicted = entries
                .iter()
                .filter(|(addr, _)| conflicted(&self.claims[addr]))
                .map(|(addr, _)| *addr)
                .collect();
            self.services = entries.into_iter().collect();
            return None;
        }
        for addr in &touched {
            self.settle(*addr);
        }
        Some(touched)
    }

    /// Sets the owner of `addr` from its claims.
    fn settle(&mut self, addr: SockAddr) {
        let Some(claims) = self.claims.get_mut(&addr) else {
            self.services.remove(&addr);
            self.conflicted.remove(&addr);
            return;
        };
        claims.sort_unstable();
        if claims.is_empty() {
            self.claims.remove(&addr);
            self.services.remove(&addr);
            self.conflicted.remove(&addr);
            return;
        }
        if conflicted(claims) {
            self.conflicted.insert(addr);
        } else {
            self.conflicted.remove(&addr);
        }
        self.services.insert(addr, owner(claims));
    }

    /// A warning per claim that lost its address to another service port, in claim order.
    pub fn conflicts(&self) -> Vec<String> {
        let mut lost: Vec<(&Claim, SockAddr, &Claim)> = Vec::new();
        for addr in &self.conflicted {
            let claims = &self.claims[addr];
            let first = &claims[0];
            lost.extend(
                claims[1..]
                    .iter()
                    .filter(|c| c.service_id != first.service_id)
                    .map(|c| (c, *addr, first)),
            );
        }
        lost.sort_by(|a, b| a.0.cmp(b.0));
        lost.into_iter()
            .map(|(c, addr, first)| {
                format!(
                    "{} is an address of both {} and {}; connections to it count as {}",
                    SocketAddr::from(addr),
                    first.name,
                    c.name,
                    first.name
                )
            })
            .collect()
    }
}

/// The map value for the owner of an address: its first claim.
fn owner(claims: &[Claim]) -> ServiceValue {
    ServiceValue {
        service_id: claims[0].service_id,
        flags: 0,
    }
}

/// Whether another service port than the owner claims the address too.
fn conflicted(claims: &[Claim]) -> bool {
    claims.iter().any(|c| c.service_id != claims[0].service_id)
}
