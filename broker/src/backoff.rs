//! The wait before trying again after a failure, one rule for every retry loop (upstream
//! sessions, the MQTT bridge, a pipeline's or the downlink's write): doubling from 0.5 s
//! to 30 s, and from 0.5 s again once an attempt made progress. A fixed short wait
//! hammers a Kafka cluster or a full disk for as long as it lasts; a fixed long one
//! leaves a link down long after it came back.

use std::time::Duration;

#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(500);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait after a failed attempt, which made progress before it failed or not.
    pub fn after(&mut self, progressed: bool) -> Duration {
        if progressed {
            self.reset();
        }
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    /// An attempt succeeded: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap_and_starts_again_after_progress() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..8).map(|_| b.after(false).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(b.after(true), Duration::from_millis(500));
        assert_eq!(b.after(false), Duration::from_millis(1000));
        b.reset();
        assert_eq!(b.after(false), Duration::from_millis(500));
    }
}
