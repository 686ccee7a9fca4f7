//! One timer per connection, moved lazily: setting a later deadline only records it, and the
//! timer, when it fires early, re-arms itself for the recorded one. Per request that costs a
//! clock read instead of a timer registration (which takes the runtime's timer lock).

use std::pin::Pin;

use tokio::time::{Instant, Sleep, sleep_until};

pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// When the timer is armed for (never after `due`, so it never fires late).
    armed: Instant,
    due: Instant,
}

impl Deadline {
    pub fn new(due: Instant) -> Self {
        Deadline {
            sleep: Box::pin(sleep_until(due)),
            armed: due,
            due,
        }
    }

    pub fn set(&mut self, due: Instant) {
        self.due = due;
        if due < self.armed {
            self.sleep.as_mut().reset(due);
            self.armed = due;
        }
    }

    /// Completes when the deadline has passed.
    pub async fn passed(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.due {
                return;
            }
            self.sleep.as_mut().reset(self.due);
            self.armed = self.due;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_last_deadline_set_earlier_or_later() {
        let start = Instant::now();
        let mut d = Deadline::new(start + Duration::from_secs(1));
        d.set(start + Duration::from_secs(5));
        d.passed().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        d.set(Instant::now() + Duration::from_secs(10));
        d.set(Instant::now() + Duration::from_secs(2));
        let t = Instant::now();
        d.passed().await;
        assert_eq!(Instant::now() - t, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_fire_before_its_deadline() {
        let start = Instant::now();
        let mut d = Deadline::new(start + Duration::from_secs(3));
        let early = tokio::time::timeout(Duration::from_secs(2), d.passed()).await;
        assert!(early.is_err());
        d.passed().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }
}
