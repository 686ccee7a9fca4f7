//! The `forks` table kept from one sync to the next: each routing key's entries are made by
//! one owner (a sandbox or a route group), so only the keys whose owner changed are redone.

use std::collections::{BTreeMap, HashMap};

use redirect_common::{ForkEndpoints, ForkKey};

/// `forks_v1` as the owners of the keys made it.
#[derive(Debug, Default)]
pub struct ForkTable {
    pub table: BTreeMap<ForkKey, ForkEndpoints>,
    /// Per key id: the generation of what made its entries.
    made_by: HashMap<u32, u64>,
}

/// What one key's owner makes: its key id, the owner's generation (a number that changes
/// whenever what the owner forks may have changed) and its (service id, endpoints) entries,
/// a later one of a service id replacing an earlier one.
pub struct Made<'a> {
    pub key_id: u32,
    pub generation: u64,
    pub forks: &'a [(u32, ForkEndpoints)],
}

impl ForkTable {
    /// Makes the table that of `made` (every key claimed now); returns the key ids whose
    /// entries may have changed.
    pub fn update(&mut self, made: &[Made<'_>]) -> Vec<u32> {
        let mut touched = Vec::new();
        let mut now = HashMap::with_capacity(made.len());
        for m in made {
            now.insert(m.key_id, m.generation);
            if self.made_by.get(&m.key_id) == Some(&m.generation) {
                continue;
            }
            self.remove(m.key_id);
            for (service_id, eps) in m.forks {
                let key = ForkKey {
                    key_id: m.key_id,
                    service_id: *service_id,
                };
                self.table.insert(key, *eps);
            }
            touched.push(m.key_id);
        }
        let gone: Vec<u32> = self
            .made_by
            .keys()
            .filter(|k| !now.contains_key(k))
            .copied()
            .collect();
        for key_id in gone {
            self.remove(key_id);
            touched.push(key_id);
        }
        self.made_by = now;
        touched.sort_unstable();
        touched
    }

    fn remove(&mut self, key_id: u32) {
        let keys: Vec<ForkKey> = self
            .table
            .range(key_range(key_id))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.table.remove(&k);
        }
    }
}

/// Every `ForkKey` of one key id.
pub fn key_range(key_id: u32) -> std::ops::RangeInclusive<ForkKey> {
    ForkKey {
        key_id,
        service_id: 0,
    }..=ForkKey {
        key_id,
        service_id: u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u32) -> ForkEndpoints {
        ForkEndpoints {
            count: n,
            ..Default::default()
        }
    }

    fn keys(t: &ForkTable) -> Vec<(u32, u32, u32)> {
        t.table
            .iter()
            .map(|(k, v)| (k.key_id, k.service_id, v.count))
            .collect()
    }

    #[test]
    fn only_keys_whose_owner_changed_are_redone_and_a_later_entry_wins() {
        let mut t = ForkTable::default();
        let a = [(1, eps(1)), (2, eps(2)), (1, eps(3))];
        let b = [(7, eps(7))];
        let made = [
            Made {
                key_id: 10,
                generation: 1,
                forks: &a,
            },
            Made {
                key_id: 20,
                generation: 2,
                forks: &b,
            },
        ];
        assert_eq!(t.update(&made), [10, 20]);
        assert_eq!(keys(&t), [(10, 1, 3), (10, 2, 2), (20, 7, 7)]);
        assert_eq!(t.update(&made), Vec::<u32>::new());

        let c = [(8, eps(8))];
        let made = [Made {
            key_id: 20,
            generation: 3,
            forks: &c,
        }];
        assert_eq!(t.update(&made), [10, 20]);
        assert_eq!(keys(&t), [(20, 8, 8)]);
    }
}
