//! The bounds on what an uplink sends: rules of a higher priority on the same upstream
//! go first while their backlog is large, and a rule's bandwidth cap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::super::{PRIORITY_BACKLOG, RuleConfig};

/// A rule as the gate sees it: upstream, priority, backlog in records.
type Standing = (String, i32, u64);

/// Lets rules of a higher priority go first while they have a large backlog.
#[derive(Clone, Default)]
pub struct PriorityGate(Arc<Mutex<HashMap<String, Standing>>>);

impl PriorityGate {
    pub(super) fn report(&self, rule: &RuleConfig, lag: u64) {
        self.0.lock().insert(
            rule.name.clone(),
            (rule.upstream.clone(), rule.priority, lag),
        );
    }

    /// False while a rule of a higher priority on the same upstream has a backlog.
    pub(super) fn open(&self, rule: &RuleConfig) -> bool {
        !self.0.lock().values().any(|(upstream, priority, lag)| {
            *upstream == rule.upstream && *priority > rule.priority && *lag > PRIORITY_BACKLOG
        })
    }
}

/// Bytes per second, with a one-second burst; unlimited at 0.
pub(super) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u64) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Takes `bytes` if the bucket holds them (or a second's worth, for a larger record).
    pub(super) fn take(&mut self, bytes: usize) -> bool {
        self.take_at(bytes, Instant::now())
    }

    fn take_at(&mut self, bytes: usize, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        // A record larger than a second's worth still goes, once the bucket is full.
        if self.tokens >= (bytes as f64).min(self.rate) {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rule(name: &str, upstream: &str, priority: i32) -> RuleConfig {
        let mut rule: RuleConfig = toml::from_str(&format!(
            "name = \"{name}\"\nupstream = \"{upstream}\"\ntopics = [\"t\"]"
        ))
        .expect("a rule");
        rule.priority = priority;
        rule
    }

    #[test]
    fn a_higher_priority_backlog_closes_the_gate_on_its_upstream_only() {
        let gate = PriorityGate::default();
        let (high, low, elsewhere) = (rule("high", "c", 5), rule("low", "c", 0), rule("e", "d", 0));
        gate.report(&high, PRIORITY_BACKLOG + 1);
        assert!(!gate.open(&low), "a lower priority waits");
        assert!(gate.open(&high), "the rule itself goes on");
        assert!(gate.open(&elsewhere), "another upstream is not held");
        gate.report(&high, PRIORITY_BACKLOG);
        assert!(
            gate.open(&low),
            "a backlog at the threshold no longer holds others"
        );
    }

    #[test]
    fn the_bucket_refills_at_its_rate_with_a_one_second_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000);
        bucket.last = start;
        assert!(bucket.take_at(600, start));
        assert!(!bucket.take_at(600, start), "400 left");
        assert!(
            bucket.take_at(600, start + Duration::from_millis(200)),
            "600 after 0.2 s"
        );
        // Idle for long: never more than a second's worth.
        let later = start + Duration::from_secs(60);
        assert!(bucket.take_at(1000, later));
        assert!(!bucket.take_at(1, later));
    }

    #[test]
    fn a_record_larger_than_a_second_goes_once_the_bucket_is_full_and_zero_is_unlimited() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100);
        bucket.last = start;
        assert!(
            bucket.take_at(5000, start),
            "full bucket: a large record goes"
        );
        assert!(
            !bucket.take_at(1, start + Duration::from_millis(500)),
            "in debt"
        );
        let mut unlimited = TokenBucket::new(0);
        assert!(unlimited.take_at(usize::MAX, start));
    }
}
