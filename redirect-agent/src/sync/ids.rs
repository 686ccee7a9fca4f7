//! Stable numeric ids for service ports and routing keys, as the kernel maps carry them.

use std::collections::HashMap;

use crate::routing::ServiceName;

/// 32-bit FNV-1a.
pub const fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

/// One id space: name → id, FNV-1a of the name, linear probing on collision, never 0.
#[derive(Clone, Debug, Default)]
struct IdSpace {
    by_name: HashMap<String, u32>,
    taken: HashMap<u32, String>,
}

impl IdSpace {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.by_name.get(name) {
            return *id;
        }
        self.id_from(name, fnv1a(name.as_bytes()))
    }

    /// Gives `name` the first free id from `start` on.
    fn id_from(&mut self, name: &str, start: u32) -> u32 {
        let mut id = start;
        while id == 0 || self.taken.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.by_name.insert(name.to_string(), id);
        self.taken.insert(id, name.to_string());
        id
    }
}

/// Gives service ports and routing keys ids that stay the same across syncs: an id, once
/// given, is remembered for the life of the allocator, and (without collisions) is the
/// name's FNV-1a hash, so it is also the same after an agent restart. The two spaces are
/// separate: a service id never needs to differ from a key id.
#[derive(Clone, Debug, Default)]
pub struct IdAllocator {
    services: IdSpace,
    keys: IdSpace,
}

impl IdAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of a service port (hash of `namespace/name:port`).
    pub fn service_id(&mut self, service: &ServiceName) -> u32 {
        self.services.id(&service.to_string())
    }

    /// The id of a routing key.
    pub fn key_id(&mut self, key: &str) -> u32 {
        self.keys.id(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> ServiceName {
        ServiceName {
            namespace: "shop".into(),
            name: name.into(),
            port: "http".into(),
        }
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn an_id_is_the_hash_of_the_name_and_is_remembered() {
        let mut ids = IdAllocator::new();
        let id = ids.service_id(&svc("checkout"));
        assert_eq!(id, fnv1a(b"shop/checkout:http"));
        ids.service_id(&svc("cart"));
        assert_eq!(ids.service_id(&svc("checkout")), id);
    }

    #[test]
    fn colliding_names_get_the_next_free_id() {
        let mut space = IdSpace::default();
        assert_eq!(space.id_from("a", 7), 7);
        assert_eq!(space.id_from("b", 7), 8);
        assert_eq!(space.id_from("c", 7), 9);
        assert_eq!(space.id("b"), 8, "an assignment is remembered");
    }

    #[test]
    fn id_zero_is_never_given() {
        let mut space = IdSpace::default();
        assert_eq!(space.id_from("hash-is-zero", 0), 1);
        assert_eq!(space.id_from("max", u32::MAX), u32::MAX);
        assert_eq!(
            space.id_from("wraps", u32::MAX),
            2,
            "wraps past 0 and the taken 1"
        );
    }
}
