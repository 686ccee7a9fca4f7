//! The API writes of the latency phase and how to tell that the agent has applied each.
//!
//! Events come in a cycle of eight, one write each:
//!
//! | kind | write | applied when |
//! |---|---|---|
//! | `sandbox_fork` | merge patch of a sandbox's forks: one more fork (odd cycles: back to its own) | `forks_v1` has (its key, the service) (odd: has not) |
//! | `slice_forked` | a forked service's first EndpointSlice gains an endpoint (odd cycles: loses it) | `services_v1` has the address (odd: has not) |
//! | `sandbox_create` | a new sandbox `ev-N` forking an unforked service | `forks_v1` has (its key, the service) |
//! | `slice_unforked` | an unforked service's slice gains an endpoint | the synced snapshot holds it (no map changes) |
//! | `slice_create` | a new slice of a forked service, one new endpoint | `services_v1` has the address |
//! | `sandbox_delete` | deletes the `ev-N` of this cycle | its key is gone |
//! | `slice_delete` | deletes the slice of this cycle | `services_v1` has not the address |
//! | `slice_unforked` | the endpoint of this cycle's first `slice_unforked` goes again | the synced snapshot lacks it |
//!
//! A [`Check`] looks at the snapshot a sync was given and at the tables it produced: `None`
//! while the snapshot does not hold the write yet, then whether the tables reflect it.

use std::net::{IpAddr, SocketAddr};

use redirect_agent::crd::Sandbox;
use redirect_agent::routing::Tables;
use redirect_agent::slice::Slice;
use redirect_agent::store::{Store, ns_name};
use redirect_common::{ForkKey, SockAddr};
use serde_json::{Value, json};

use super::objects::{
    self, HTTP_PORT, Plan, fork_specs, namespace, sandbox_name, service_name, slice_endpoints,
    slice_name,
};

/// The resources the events write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Sandbox,
    EndpointSlice,
}

/// One API write.
#[derive(Debug)]
pub enum Write {
    /// A merge patch of an existing object.
    Patch {
        resource: Resource,
        namespace: String,
        name: String,
        body: Value,
    },
    Create {
        resource: Resource,
        namespace: String,
        body: Value,
    },
    Delete {
        resource: Resource,
        namespace: String,
        name: String,
    },
}

/// Whether a synced snapshot holds the write (`None`: not yet) and, if so, whether the tables
/// reflect it (`Err` says how they do not). Arguments: the snapshot, the tables with names
/// (`Syncer::last`) and what the maps hold.
pub type Check = Box<dyn Fn(&Store, &Tables, &Tables) -> Option<Result<(), String>> + Send>;

/// One event: what to write and how to see it applied.
pub struct Event {
    pub kind: &'static str,
    pub what: String,
    pub write: Write,
    pub check: Check,
}

pub const KINDS: [&str; 7] = [
    "sandbox_fork",
    "slice_forked",
    "sandbox_create",
    "slice_unforked",
    "slice_create",
    "sandbox_delete",
    "slice_delete",
];

/// The event sequence; it continues across passes, so every toggle is undone in order.
pub struct Events<'p> {
    plan: &'p Plan,
    forked: Vec<u32>,
    unforked: Vec<u32>,
    n: usize,
    next_ip: u32,
    /// The address added by the cycle's first `slice_unforked`, and where.
    unforked_added: Option<(u32, IpAddr)>,
    /// Per toggled target: the address added by the previous (odd) cycle.
    forked_added: Option<(u32, IpAddr)>,
    fork_added: Option<(u32, u32)>,
}

impl<'p> Events<'p> {
    pub fn new(plan: &'p Plan) -> Events<'p> {
        let forked = plan.forked_services();
        let unforked = (0..plan.services.len() as u32)
            .filter(|i| forked.binary_search(i).is_err())
            .collect();
        Events {
            plan,
            forked,
            unforked,
            n: 0,
            next_ip: 0,
            unforked_added: None,
            forked_added: None,
            fork_added: None,
        }
    }

    fn new_ip(&mut self) -> IpAddr {
        self.next_ip += 1;
        IpAddr::V4(objects::ip([10, 192, 0, 0], self.next_ip))
    }

    /// Cycle `c`'s pick among `n` (spread so that consecutive cycles touch other objects).
    fn pick(c: usize, n: usize, salt: usize) -> usize {
        (c * 7919 + salt * 104_729) % n.max(1)
    }

    pub fn next_event(&mut self) -> Event {
        let (c, step) = (self.n / 8, self.n % 8);
        self.n += 1;
        match step {
            0 => self.sandbox_fork(c),
            1 => self.slice_forked(c),
            2 => self.sandbox_create(c),
            3 | 7 => self.slice_unforked(c),
            4 => self.slice_create(c),
            5 => self.sandbox_delete(c),
            _ => self.slice_delete(c),
        }
    }

    fn sandbox_fork(&mut self, c: usize) -> Event {
        let (b, service, add) = match self.fork_added.take() {
            Some((b, service)) => (b, service, false),
            None => {
                let b = Self::pick(c, self.plan.sandboxes.len(), 1) as u32;
                let sb = &self.plan.sandboxes[b as usize];
                // A service of its namespace that it does not fork yet.
                let mut service = None;
                for k in 0..self.plan.services.len() {
                    let i = Self::pick(c + k, self.plan.services.len(), 2) as u32;
                    if self.plan.services[i as usize].namespace == sb.namespace
                        && sb.forks.iter().all(|f| f.service != i)
                    {
                        service = Some(i);
                        break;
                    }
                }
                let service = service.expect("a namespace with an unforked service");
                self.fork_added = Some((b, service));
                (b, service, true)
            }
        };
        let mut forks = fork_specs(self.plan, b);
        if add {
            forks.push(json!({"service": service_name(service), "selector": objects::fork_selector(b, service)}));
        }
        let ns = namespace(self.plan.sandboxes[b as usize].namespace);
        let name = sandbox_name(b);
        let svc = service_name(service);
        let what = format!(
            "Sandbox {ns}/{name} {} a fork of {svc}",
            if add { "gains" } else { "loses" }
        );
        let check = {
            let (ns, name, key) = (ns.clone(), name.clone(), name.clone());
            Box::new(move |store: &Store, last: &Tables, maps: &Tables| {
                let sb = find_sandbox(store, &ns, &name)?;
                let has = sb.spec.forks.iter().any(|f| f.service == svc);
                if has != add {
                    return None;
                }
                Some(expect_fork(last, maps, &key, &ns, &svc, add))
            }) as Check
        };
        Event {
            kind: "sandbox_fork",
            what,
            write: Write::Patch {
                resource: Resource::Sandbox,
                namespace: ns,
                name,
                body: json!({"spec": {"forks": forks}}),
            },
            check,
        }
    }

    fn slice_forked(&mut self, c: usize) -> Event {
        let (i, ip, add) = match self.forked_added.take() {
            Some((i, ip)) => (i, ip, false),
            None => {
                let i = self.forked[Self::pick(c, self.forked.len(), 3)];
                let ip = self.new_ip();
                self.forked_added = Some((i, ip));
                (i, ip, true)
            }
        };
        self.slice_toggle("slice_forked", i, ip, add, true)
    }

    fn slice_unforked(&mut self, c: usize) -> Event {
        let (i, ip, add) = match self.unforked_added.take() {
            Some((i, ip)) => (i, ip, false),
            None => {
                let i = self.unforked[Self::pick(c, self.unforked.len(), 4)];
                let ip = self.new_ip();
                self.unforked_added = Some((i, ip));
                (i, ip, true)
            }
        };
        self.slice_toggle("slice_unforked", i, ip, add, false)
    }

    /// Adds `ip` to (or removes it from) service `i`'s first slice.
    fn slice_toggle(
        &mut self,
        kind: &'static str,
        i: u32,
        ip: IpAddr,
        add: bool,
        forked: bool,
    ) -> Event {
        let ns = namespace(self.plan.services[i as usize].namespace);
        let name = slice_name(i, 0);
        let mut endpoints = slice_endpoints(self.plan, i, 0);
        if add {
            endpoints.push(objects::endpoint_at(
                &ip.to_string(),
                &format!("{}-ev-{}", service_name(i), self.next_ip),
                &ns,
                "node-0001",
                self.next_ip,
            ));
        }
        let what = format!(
            "EndpointSlice {ns}/{name} {} {ip}",
            if add { "gains" } else { "loses" }
        );
        let check = {
            let (ns, name) = (ns.clone(), name.clone());
            let ip_text = ip.to_string();
            Box::new(move |store: &Store, _: &Tables, maps: &Tables| {
                let slice = find_slice(store, &ns, &name)?;
                if slice_has(slice, &ip_text) != add {
                    return None;
                }
                if !forked {
                    return Some(Ok(()));
                }
                Some(expect_backend(maps, ip, add))
            }) as Check
        };
        Event {
            kind,
            what,
            write: Write::Patch {
                resource: Resource::EndpointSlice,
                namespace: ns,
                name,
                body: json!({"endpoints": endpoints}),
            },
            check,
        }
    }

    fn ev_sandbox(c: usize) -> String {
        format!("ev-{c:05}")
    }

    /// The unforked service cycle `c`'s new sandbox forks.
    fn ev_service(&self, c: usize) -> u32 {
        self.unforked[Self::pick(c, self.unforked.len(), 5)]
    }

    fn sandbox_create(&mut self, c: usize) -> Event {
        let service = self.ev_service(c);
        let ns = namespace(self.plan.services[service as usize].namespace);
        let name = Self::ev_sandbox(c);
        let svc = service_name(service);
        let body = json!({
            "apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"routingKey": name, "forks": [
                {"service": svc, "selector": {"app": svc, "sandbox": name}}]},
        });
        let what = format!("Sandbox {ns}/{name} (forks {svc}) is created");
        let check = {
            let (ns, name) = (ns.clone(), name.clone());
            Box::new(move |store: &Store, last: &Tables, maps: &Tables| {
                find_sandbox(store, &ns, &name)?;
                Some(expect_fork(last, maps, &name, &ns, &svc, true))
            }) as Check
        };
        Event {
            kind: "sandbox_create",
            what,
            write: Write::Create {
                resource: Resource::Sandbox,
                namespace: ns,
                body,
            },
            check,
        }
    }

    fn sandbox_delete(&mut self, c: usize) -> Event {
        let service = self.ev_service(c);
        let ns = namespace(self.plan.services[service as usize].namespace);
        let name = Self::ev_sandbox(c);
        let what = format!("Sandbox {ns}/{name} is deleted");
        let check = {
            let (ns, name) = (ns.clone(), name.clone());
            Box::new(move |store: &Store, last: &Tables, _: &Tables| {
                if find_sandbox(store, &ns, &name).is_some() {
                    return None;
                }
                Some(if last.keys.values().any(|k| k.key == name) {
                    Err(format!("key {name} is still in the tables"))
                } else {
                    Ok(())
                })
            }) as Check
        };
        Event {
            kind: "sandbox_delete",
            what,
            write: Write::Delete {
                resource: Resource::Sandbox,
                namespace: ns,
                name,
            },
            check,
        }
    }

    /// The forked service of cycle `c`'s new slice, and the slice's name and address.
    fn ev_slice(&self, c: usize) -> (u32, String) {
        let i = self.forked[Self::pick(c, self.forked.len(), 6)];
        (i, format!("{}-ev{c:05}", service_name(i)))
    }

    fn ev_slice_ip(c: usize) -> IpAddr {
        IpAddr::V4(objects::ip([10, 224, 0, 0], c as u32 + 1))
    }

    fn slice_create(&mut self, c: usize) -> Event {
        let (i, name) = self.ev_slice(c);
        let ns = namespace(self.plan.services[i as usize].namespace);
        let ip = Self::ev_slice_ip(c);
        let endpoint = objects::endpoint_at(
            &ip.to_string(),
            &format!("{name}-pod"),
            &ns,
            "node-0002",
            c as u32,
        );
        let body = objects::slice_with(self.plan, i, &name, vec![endpoint]);
        let what = format!("EndpointSlice {ns}/{name} ({ip}) is created");
        let check = {
            let (ns, name) = (ns.clone(), name.clone());
            Box::new(move |store: &Store, _: &Tables, maps: &Tables| {
                find_slice(store, &ns, &name)?;
                Some(expect_backend(maps, ip, true))
            }) as Check
        };
        Event {
            kind: "slice_create",
            what,
            write: Write::Create {
                resource: Resource::EndpointSlice,
                namespace: ns,
                body,
            },
            check,
        }
    }

    fn slice_delete(&mut self, c: usize) -> Event {
        let (i, name) = self.ev_slice(c);
        let ns = namespace(self.plan.services[i as usize].namespace);
        let ip = Self::ev_slice_ip(c);
        let what = format!("EndpointSlice {ns}/{name} is deleted");
        let check = {
            let (ns, name) = (ns.clone(), name.clone());
            Box::new(move |store: &Store, _: &Tables, maps: &Tables| {
                if find_slice(store, &ns, &name).is_some() {
                    return None;
                }
                Some(expect_backend(maps, ip, false))
            }) as Check
        };
        Event {
            kind: "slice_delete",
            what,
            write: Write::Delete {
                resource: Resource::EndpointSlice,
                namespace: ns,
                name,
            },
            check,
        }
    }
}

fn find_sandbox<'s>(store: &'s Store, ns: &str, name: &str) -> Option<&'s Sandbox> {
    store
        .sandboxes
        .iter()
        .find(|s| ns_name(&s.metadata) == (ns, name))
        .map(|s| &**s)
}

fn find_slice<'s>(store: &'s Store, ns: &str, name: &str) -> Option<&'s Slice> {
    store
        .endpoint_slices
        .iter()
        .find(|s| (s.namespace.as_str(), s.name.as_str()) == (ns, name))
        .map(|s| &**s)
}

fn slice_has(slice: &Slice, ip: &str) -> bool {
    slice.endpoints.iter().any(|e| e.ip.to_string() == ip)
}

/// `services_v1` has (or has not) `ip:8080`.
fn expect_backend(maps: &Tables, ip: IpAddr, present: bool) -> Result<(), String> {
    let has = maps
        .services
        .contains_key(&SockAddr::from(SocketAddr::new(ip, HTTP_PORT)));
    if has == present {
        Ok(())
    } else {
        Err(format!(
            "services_v1 {} {ip}:{HTTP_PORT}",
            if present { "lacks" } else { "still has" }
        ))
    }
}

/// `forks_v1` has (or has not) an entry for routing key `key` and `ns/service:http`.
fn expect_fork(
    last: &Tables,
    maps: &Tables,
    key: &str,
    ns: &str,
    service: &str,
    present: bool,
) -> Result<(), String> {
    let key_id = last
        .keys
        .iter()
        .find(|(_, k)| k.key == key)
        .map(|(id, _)| *id);
    let service_id = last
        .service_names
        .iter()
        .find(|(_, n)| n.namespace == ns && n.name == service && n.port == "http")
        .map(|(id, _)| *id);
    let has = match (key_id, service_id) {
        (Some(key_id), Some(service_id)) => {
            maps.forks.contains_key(&ForkKey { key_id, service_id })
        }
        _ => false,
    };
    if has == present {
        Ok(())
    } else {
        Err(format!(
            "forks_v1 {} ({key}, {ns}/{service}:http)",
            if present { "lacks" } else { "still has" }
        ))
    }
}
