//! Warnings that can repeat thousands of times a second (accept failures under a file
//! descriptor limit, a pod over its connection limit) are logged at most once per interval,
//! with how many were left out since.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub struct LogLimit {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new(every: Duration) -> Self {
        LogLimit {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last one)` when this occurrence may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().ok()?;
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_with_the_count_left_out() {
        let l = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow(), None);
        }
        *l.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(l.allow(), Some(5));
    }
}
