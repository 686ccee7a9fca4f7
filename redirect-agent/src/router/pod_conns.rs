//! Connections per client pod: no pod may hold more than its share of the router. A pod is
//! known by its address, which reaches the router untranslated.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

pub struct PodConns {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its pod until dropped.
pub struct PodConn {
    pods: Arc<PodConns>,
    ip: IpAddr,
}

impl PodConns {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PodConns {
            max,
            counts: Mutex::default(),
        })
    }

    /// Counts a connection from `ip`, or `None` when the pod already holds its maximum.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PodConn> {
        let mut counts = self.counts.lock().ok()?;
        let n = counts.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PodConn {
            pods: self.clone(),
            ip,
        })
    }

    /// Connections `ip` holds now.
    #[cfg(test)]
    pub fn held(&self, ip: IpAddr) -> usize {
        self.counts
            .lock()
            .map(|c| c.get(&ip).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for PodConn {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.pods.counts.lock()
            && let Some(n) = counts.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_gets_at_most_its_share_and_gets_it_back_on_close() {
        let pods = PodConns::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = pods.take(a).unwrap();
        let _second = pods.take(a).unwrap();
        assert!(pods.take(a).is_none());
        assert!(pods.take(b).is_some(), "another pod is not affected");
        drop(first);
        assert_eq!(pods.held(a), 1);
        assert!(pods.take(a).is_some());
    }
}
