//! Replication with a central Kafka-compatible cluster (issue #6).
//!
//! Up: chosen local topics flow to the centre (`uplink/`): the local log is the
//! buffer, the cursor is committed only after the centre acknowledged, records carry
//! their provenance. Down: upstream topics flow into local topics (`downlink.rs`),
//! for commands that the MQTT downlink then delivers to devices. The Kafka client is
//! behind two traits in `client.rs` (librdkafka).

pub mod client;
pub mod downlink;
pub mod error;
pub mod readback;
pub mod uplink;

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

use crate::storage::{Log, TopicConfig, TopicName};
use client::LinkErrors;

/// `[replication]` of the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This gateway's name: in upstream topic names (`{gateway}`) and in every
    /// replicated record's `weir.gateway` header. Default: the host name.
    pub gateway_id: String,
    pub upstream: Vec<UpstreamConfig>,
    pub rule: Vec<RuleConfig>,
    /// Test only (`weir serve --unsafe-hold-replication-cursors`): never write the
    /// up rules' cursors.
    #[serde(skip)]
    pub unsafe_hold_cursors: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            gateway_id: default_gateway_id(),
            upstream: Vec::new(),
            rule: Vec::new(),
            unsafe_hold_cursors: false,
        }
    }
}

fn default_gateway_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && TopicName::new(h.clone()).is_ok())
        .unwrap_or_else(|| "weir".to_string())
}

/// `[[replication.upstream]]`: a central cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// host:port[,host:port…]
    pub bootstrap_servers: String,
    /// Default: `weir-{gateway_id}`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// plaintext (default), ssl, sasl_plaintext or sasl_ssl.
    #[serde(default)]
    pub security_protocol: Option<String>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// PEM files for TLS: the CA to trust, and a client certificate and key.
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
    #[serde(default)]
    pub ssl_certificate_location: Option<String>,
    #[serde(default)]
    pub ssl_key_location: Option<String>,
    /// Any other librdkafka property.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local topics to the centre.
    #[default]
    Up,
    /// Centre topics to local topics.
    Down,
}

/// `[[replication.rule]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Names the rule's cursors: keep it stable.
    pub name: String,
    /// An `[[replication.upstream]]` name.
    pub upstream: String,
    #[serde(default)]
    pub direction: Direction,
    /// Source topics: local ones going up, upstream ones coming down.
    pub topics: Vec<String>,
    /// Destination topic name, with `{topic}` (the source topic) and `{gateway}`.
    #[serde(default = "default_target")]
    pub target: String,
    /// Up only: none, gzip, snappy, lz4 (default) or zstd.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Up only: bytes per upstream batch (librdkafka batch.size).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// Up only: how long a batch may wait to fill, ms.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Up only: bytes per second this rule may send; 0 is no cap.
    #[serde(default)]
    pub max_bytes_per_sec: u64,
    /// Up only: with a large backlog (over `priority_backlog` records), rules of a
    /// higher priority on the same upstream go first; the others wait.
    #[serde(default)]
    pub priority: i32,
    /// Where a new rule starts: earliest (default) or latest.
    #[serde(default = "default_start")]
    pub start: String,
}

fn default_target() -> String {
    "{topic}".into()
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_batch_bytes() -> usize {
    1024 * 1024
}
fn default_linger_ms() -> u64 {
    5
}
fn default_start() -> String {
    "earliest".into()
}

/// Records of backlog above which a rule makes lower-priority rules wait.
pub const PRIORITY_BACKLOG: u64 = 1000;

impl RuleConfig {
    /// The destination topic of source `topic`.
    pub fn target_topic(&self, gateway: &str, topic: &str) -> String {
        self.target
            .replace("{gateway}", gateway)
            .replace("{topic}", topic)
    }
}

impl ReplicationConfig {
    pub fn validate(&self) -> Result<(), String> {
        TopicName::new(self.gateway_id.clone())
            .map_err(|e| format!("[replication] gateway_id: {e}"))?;
        let reserved = client::reserved_properties();
        let mut names = std::collections::HashSet::new();
        for u in &self.upstream {
            if !names.insert(&u.name) {
                return Err(format!("two upstreams are named {}", u.name));
            }
            if u.bootstrap_servers.trim().is_empty() {
                return Err(format!("upstream {}: bootstrap_servers is empty", u.name));
            }
            if let Some(p) = &u.security_protocol
                && !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&p.as_str())
            {
                return Err(format!(
                    "upstream {}: security_protocol {p:?} is not plaintext, ssl, sasl_plaintext or sasl_ssl",
                    u.name
                ));
            }
            for key in u.properties.keys() {
                if let Some(named) = reserved.get(key.as_str()) {
                    return Err(format!(
                        "upstream {}: set {key} with {named}, not in properties",
                        u.name
                    ));
                }
            }
        }
        let mut rules = std::collections::HashSet::new();
        for r in &self.rule {
            if !crate::names::valid_name(&r.name) {
                return Err(format!(
                    "replication rule name {:?}: use a-z A-Z 0-9 . _ -",
                    r.name
                ));
            }
            if !rules.insert(&r.name) {
                return Err(format!("two replication rules are named {}", r.name));
            }
            if !self.upstream.iter().any(|u| u.name == r.upstream) {
                return Err(format!("rule {}: no upstream named {}", r.name, r.upstream));
            }
            if r.topics.is_empty() {
                return Err(format!("rule {}: no topics", r.name));
            }
            if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&r.compression.as_str()) {
                return Err(format!(
                    "rule {}: compression {:?} is not none, gzip, snappy, lz4 or zstd",
                    r.name, r.compression
                ));
            }
            if !["earliest", "latest"].contains(&r.start.as_str()) {
                return Err(format!("rule {}: start is earliest or latest", r.name));
            }
            for topic in &r.topics {
                TopicName::new(topic.clone()).map_err(|e| format!("rule {}: {e}", r.name))?;
                TopicName::new(r.target_topic(&self.gateway_id, topic))
                    .map_err(|e| format!("rule {}: target: {e}", r.name))?;
            }
        }
        Ok(())
    }
}

type Labels = Vec<(String, String)>;
crate::metrics::group! {
    /// `weir_replication_*` metrics.
    #[derive(Clone, Debug, Default)]
    pub struct ReplicationMetrics in "replication" {
        // {rule, topic, partition}
        /// Records not yet acknowledged by the other side.
        lag_records: Family<Labels, Gauge>,
        /// Bytes not yet acknowledged by the other side (estimated from stored sizes).
        lag_bytes: Family<Labels, Gauge>,
        // {rule}
        /// Records replicated.
        records: Family<Labels, Counter>,
        /// Bytes of keys and values replicated.
        bytes: Family<Labels, Counter>,
        /// Unix time of the last acknowledged record.
        last_success_seconds: Family<Labels, Gauge>,
        /// Errors the upstream client reported (connections, requests).
        upstream_errors: Family<Labels, Counter>,
        /// Records deleted by local retention before they were replicated.
        lost_records: Family<Labels, Counter>,
        /// Records the upstream refused for good (e.g. too large); skipped.
        failed_records: Family<Labels, Counter>,
        /// Records found at the centre when reading it back (sent before a restart), not sent
        /// again.
        already_upstream: Family<Labels, Counter>,
        /// 1 while the upstream is reachable.
        connected: Family<Labels, Gauge>,
    }
}

/// What a rule's runner is doing (logged at each change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    #[default]
    Connecting,
    Connected,
    Disconnected,
    BackingOff,
    CaughtUp,
}

/// One partition of a rule, for `weir replication status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: u32,
    /// Next source offset not yet acknowledged (committed cursor or ahead of it).
    pub cursor: u64,
    pub high_watermark: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Timestamp (Unix ms) of the batch holding the oldest record not yet acknowledged,
    /// when there is one: how far behind the rule is in time.
    pub oldest_unsent_ms: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub name: String,
    pub upstream: String,
    pub direction: Direction,
    pub state: LinkState,
    /// Unix ms of the last acknowledged record.
    pub last_success_ms: Option<i64>,
    /// Upstream errors since `errors_since_ms` (the broker's start: the count is not
    /// kept across restarts).
    pub upstream_errors: u64,
    pub errors_since_ms: i64,
    pub last_error: Option<String>,
    /// Unix ms of `last_error`.
    pub last_error_ms: Option<i64>,
    /// The last error is over: a record was acknowledged after it, or the rule is
    /// caught up. Set when the status is read.
    pub last_error_over: bool,
    pub lost_records: u64,
    pub partitions: Vec<PartitionStatus>,
}

pub type SharedStatus = Arc<Mutex<RuleStatus>>;

/// Sets the state, with a log line when it changes.
pub fn set_state(status: &SharedStatus, metrics: &ReplicationMetrics, state: LinkState) {
    let mut s = status.lock();
    if s.state != state {
        info!(rule = %s.name, upstream = %s.upstream, from = ?s.state, to = ?state, "replication state");
        s.state = state;
        let connected = matches!(state, LinkState::Connected | LinkState::CaughtUp);
        metrics
            .connected
            .get_or_create(&rule_labels(&s.name))
            .set(i64::from(connected));
    }
}

/// Counts upstream errors a rule has not seen yet (`now` against `seen`) in its
/// status and metrics, and marks it disconnected when no broker of the centre is
/// reachable. Both directions call it on every change of their client's link.
pub fn note_link_errors(
    status: &SharedStatus,
    metrics: &ReplicationMetrics,
    seen: &mut LinkErrors,
    now: LinkErrors,
) {
    if now.count <= seen.count {
        return;
    }
    add_upstream_errors(status, metrics, now.count - seen.count, now.last.clone());
    if now.all_down {
        set_state(status, metrics, LinkState::Disconnected);
    }
    *seen = now;
}

/// Adds `count` upstream errors, the last saying `last`.
pub fn add_upstream_errors(
    status: &SharedStatus,
    metrics: &ReplicationMetrics,
    count: u64,
    last: impl std::fmt::Display,
) {
    let mut s = status.lock();
    metrics
        .upstream_errors
        .get_or_create(&rule_labels(&s.name))
        .inc_by(count);
    s.upstream_errors += count;
    s.error(last);
}

/// The rule's last acknowledged record (Unix ms), to tell whether a session moved any.
pub fn last_success(status: &SharedStatus) -> Option<i64> {
    status.lock().last_success_ms
}

impl RuleStatus {
    /// Records `error` as the rule's last error, now.
    pub fn error(&mut self, error: impl std::fmt::Display) {
        self.last_error = Some(error.to_string());
        self.last_error_ms = Some(crate::storage::now_ms());
    }

    /// Whether the last error is over (see `last_error_over`).
    fn error_over(&self) -> bool {
        match self.last_error_ms {
            None => false,
            Some(at) => {
                self.state == LinkState::CaughtUp || self.last_success_ms.is_some_and(|ok| ok > at)
            }
        }
    }
}

/// The replication of a broker: one task per rule.
pub struct Replication {
    statuses: Vec<SharedStatus>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Replication {
    /// The tasks, to wait for them at shutdown.
    pub fn take_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock())
    }

    pub fn status(&self) -> Vec<RuleStatus> {
        self.statuses
            .iter()
            .map(|s| {
                let mut s = s.lock().clone();
                s.last_error_over = s.error_over();
                s
            })
            .collect()
    }
}

/// Starts every rule's task.
pub async fn start(
    config: &ReplicationConfig,
    log: &Log,
    topic_defaults: &TopicConfig,
    partitions: u32,
    metrics: &ReplicationMetrics,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Replication> {
    if config.unsafe_hold_cursors {
        tracing::warn!("test only: replication cursors are never written");
    }
    let gate = uplink::PriorityGate::default();
    // Every up rule reports its backlog to the gate before any sends, so a low
    // priority rule cannot start first on a backlog a higher one has.
    let ups = config
        .rule
        .iter()
        .filter(|r| r.direction == Direction::Up)
        .count();
    let registered = Arc::new(tokio::sync::Barrier::new(ups.max(1)));
    let mut statuses = Vec::new();
    let mut tasks = Vec::new();
    for rule in &config.rule {
        metrics.declare_rule(&rule.name);
        let upstream = config
            .upstream
            .iter()
            .find(|u| u.name == rule.upstream)
            .ok_or_else(|| anyhow::anyhow!("rule {}: no upstream {}", rule.name, rule.upstream))?
            .clone();
        let status = SharedStatus::new(Mutex::new(RuleStatus {
            name: rule.name.clone(),
            upstream: rule.upstream.clone(),
            direction: rule.direction,
            errors_since_ms: crate::storage::now_ms(),
            ..Default::default()
        }));
        let client_id = upstream
            .client_id
            .clone()
            .unwrap_or_else(|| format!("weir-{}", config.gateway_id));
        let task = match rule.direction {
            Direction::Up => {
                for topic in &rule.topics {
                    log.ensure_topic(topic, partitions, topic_defaults).await?;
                }
                let runner = uplink::Uplink {
                    rule: rule.clone(),
                    connector: Arc::new(client::Librdkafka {
                        upstream,
                        client_id,
                    }),
                    gateway: config.gateway_id.clone(),
                    log: log.clone(),
                    metrics: metrics.clone(),
                    status: status.clone(),
                    gate: gate.clone(),
                    registered: registered.clone(),
                    stop: stop.clone(),
                    hold_cursors: config.unsafe_hold_cursors,
                };
                supervise(runner.run(), &rule.name, &status)
            }
            Direction::Down => {
                let runner = downlink::Downlink {
                    rule: rule.clone(),
                    upstream,
                    client_id,
                    gateway: config.gateway_id.clone(),
                    log: log.clone(),
                    topic_defaults: topic_defaults.clone(),
                    metrics: metrics.clone(),
                    status: status.clone(),
                    stop: stop.clone(),
                };
                supervise(runner.run(), &rule.name, &status)
            }
        };
        info!(rule = %rule.name, upstream = %rule.upstream, direction = ?rule.direction,
            topics = ?rule.topics, target = %rule.target, "replication rule started");
        statuses.push(status);
        tasks.push(task);
    }
    Ok(Replication {
        statuses,
        tasks: Mutex::new(tasks),
    })
}

/// Runs a rule's task; a bug that panics in it stops that rule only, and says so in
/// the log and the rule's status instead of leaving it looking alive.
fn supervise(
    task: impl std::future::Future<Output = ()> + Send + 'static,
    rule: &str,
    status: &SharedStatus,
) -> tokio::task::JoinHandle<()> {
    use futures::FutureExt;
    let (rule, status) = (rule.to_string(), status.clone());
    tokio::spawn(async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%rule, panic = %what, "replication rule stopped by a bug; restart the broker");
            let mut s = status.lock();
            s.state = LinkState::Disconnected;
            s.error(format!("stopped by a bug: {what}"));
        }
    })
}

/// Counts `records` (`bytes` of keys and values) the other side took, now.
fn record_success(
    metrics: &ReplicationMetrics,
    status: &SharedStatus,
    rule: &str,
    records: u64,
    bytes: u64,
) {
    let labels = rule_labels(rule);
    metrics.records.get_or_create(&labels).inc_by(records);
    metrics.bytes.get_or_create(&labels).inc_by(bytes);
    let now = crate::storage::now_ms();
    metrics
        .last_success_seconds
        .get_or_create(&labels)
        .set(now / 1000);
    status.lock().last_success_ms = Some(now);
}

/// Cursor key of `rule` in `topic`/`partition`.
fn cursor_key(rule: &str, topic: &str, partition: u32) -> String {
    format!("{rule}/{topic}/{partition}")
}

impl ReplicationMetrics {
    /// Creates a rule's counters at 0, so that they are exported before their first
    /// event (a dashboard's `rate()` then sees the first error too).
    fn declare_rule(&self, rule: &str) {
        let labels = rule_labels(rule);
        for counter in [
            &self.records,
            &self.bytes,
            &self.upstream_errors,
            &self.lost_records,
            &self.failed_records,
            &self.already_upstream,
        ] {
            let _ = counter.get_or_create(&labels);
        }
        let _ = self.connected.get_or_create(&labels);
    }
}

fn rule_labels(rule: &str) -> Labels {
    vec![("rule".to_string(), rule.to_string())]
}

fn partition_labels(rule: &str, topic: &str, partition: u32) -> Labels {
    vec![
        ("rule".to_string(), rule.to_string()),
        ("topic".to_string(), topic.to_string()),
        ("partition".to_string(), partition.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_over_once_a_record_is_acknowledged_after_it() {
        let mut s = RuleStatus::default();
        assert!(!s.error_over());
        s.error("Connection refused");
        let at = s.last_error_ms.unwrap();
        assert!(!s.error_over());
        s.last_success_ms = Some(at - 1);
        assert!(
            !s.error_over(),
            "a success before the error does not end it"
        );
        s.last_success_ms = Some(at + 1);
        assert!(s.error_over());
        s.last_success_ms = None;
        s.state = LinkState::CaughtUp;
        assert!(s.error_over());
    }
}
