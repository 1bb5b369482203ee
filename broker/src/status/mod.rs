//! The operator's view: `/v1/status` (the JSON behind the status page and `weir
//! status`), the in-memory history of rates it charts, and the last warnings and errors
//! of the log.
//!
//! Rates are kept in memory only: a sample every [`SAMPLE_INTERVAL`], the last 15
//! minutes of them, so that looking at the gateway never writes to its card.

pub mod sys;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::kafka::KafkaMetrics;
use crate::metrics::StorageMetrics;
use crate::mqtt::MqttMetrics;
use crate::plugins::Pipelines;
use crate::plugins::manager::PipelineView;
use crate::replication::{LinkState, Replication, RuleStatus};
use crate::storage::{Log, now_ms};

/// Time between two samples of the history.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
pub const HISTORY_SAMPLES: usize = 180;
/// Free space under which the disk counts as full (redb needs room for a commit).
const DISK_FULL_BELOW: u64 = 1 << 20;
/// Warnings and errors of the log kept for the page.
const RECENT_EVENTS: usize = 50;

/// A listener as the page shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListenerView {
    pub name: String,
    pub address: String,
    pub tls: bool,
    /// Who may connect: e.g. "anonymous from loopback, users elsewhere".
    pub auth: String,
}

/// Per-second rates over one sample interval, ending at `t_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_ms: i64,
    /// MQTT PUBLISH received plus records produced by Kafka clients.
    pub messages_in: f64,
    /// MQTT PUBLISH sent to subscribers.
    pub messages_out: f64,
    pub bytes_in: f64,
    /// MQTT PUBLISH bytes sent plus record batch bytes fetched by Kafka clients.
    pub bytes_out: f64,
    pub commits: f64,
    /// Bytes the process wrote to the disk (`/proc/self/io`): the flash wear figure.
    pub disk_bytes_written: f64,
}

/// Counter values at one instant; two of them make a [`Sample`].
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    commits: u64,
    disk_bytes_written: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub started_ms: i64,
    pub uptime_s: u64,
    /// "ok", or "degraded" with the reasons in `problems`.
    pub health: String,
    pub problems: Vec<String>,
    pub listeners: Vec<ListenerView>,
    pub sample_interval_s: u64,
    /// Oldest first, at most 15 minutes.
    pub history: Vec<Sample>,
    pub mqtt: MqttStatus,
    pub topics: Vec<TopicStatus>,
    pub groups: Vec<GroupStatus>,
    pub pipelines: Vec<PipelineView>,
    pub replication: Vec<RuleStatus>,
    pub storage: StorageStatus,
    /// Newest last.
    pub recent_log: Vec<LogEvent>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MqttStatus {
    pub connections: i64,
    pub sessions: i64,
    pub subscriptions: i64,
    pub retained: i64,
    pub received: u64,
    pub sent: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    pub dropped: u64,
    pub connects: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopicStatus {
    pub name: String,
    pub partitions: u32,
    /// Records stored (high watermark − log start, over the partitions).
    pub records: u64,
    pub bytes: u64,
    /// `retention.ms`, `None` = forever.
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    /// Records appended per second over the last minute.
    pub records_per_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: String,
    /// Records between the committed offsets and the high watermarks.
    pub lag: u64,
    pub partitions: Vec<GroupPartition>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupPartition {
    pub topic: String,
    pub partition: u32,
    pub committed: u64,
    pub high_watermark: u64,
    pub lag: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StorageStatus {
    pub data_dir: String,
    pub database_bytes: u64,
    pub journal_bytes: u64,
    /// Free space for the data directory's file system (available to this user).
    pub free_bytes: Option<u64>,
    pub commits_per_s: f64,
    pub disk_bytes_written_per_s: f64,
    /// Since the broker started.
    pub disk_bytes_written: u64,
    pub disk_full: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    pub t_ms: i64,
    pub level: String,
    pub target: String,
    pub message: String,
}

/// Everything `/v1/status` reads, shared by the admin API, the sampler and `$SYS`.
pub struct StatusSources {
    pub started: Instant,
    pub started_ms: i64,
    pub data_dir: PathBuf,
    /// Set once every listener is bound.
    pub listeners: std::sync::OnceLock<Vec<ListenerView>>,
    pub log: Log,
    pub storage_metrics: StorageMetrics,
    pub kafka_metrics: KafkaMetrics,
    pub mqtt_metrics: MqttMetrics,
    pub pipelines: Arc<Pipelines>,
    pub replication: Arc<Replication>,
    history: Mutex<History>,
}

#[derive(Default)]
struct History {
    last: Option<(Instant, Totals)>,
    samples: VecDeque<Sample>,
    /// Per sample, the records appended so far per topic (for the topics' rates).
    topic_totals: VecDeque<(Instant, HashMap<String, u64>)>,
}

/// Samples over which a topic's rate is taken: one minute.
const TOPIC_RATE_SAMPLES: usize = 13;

impl StatusSources {
    pub fn new(
        data_dir: PathBuf,
        log: Log,
        storage_metrics: StorageMetrics,
        kafka_metrics: KafkaMetrics,
        mqtt_metrics: MqttMetrics,
        pipelines: Arc<Pipelines>,
        replication: Arc<Replication>,
    ) -> Self {
        Self {
            started: Instant::now(),
            started_ms: now_ms(),
            data_dir,
            listeners: std::sync::OnceLock::new(),
            log,
            storage_metrics,
            kafka_metrics,
            mqtt_metrics,
            pipelines,
            replication,
            history: Mutex::new(History::default()),
        }
    }

    fn totals(&self) -> Totals {
        let m = &self.mqtt_metrics;
        let k = &self.kafka_metrics;
        Totals {
            messages_in: m.received.get() + k.produced_records.get(),
            messages_out: m.sent.get(),
            bytes_in: m.received_bytes.get() + k.produced_bytes.get(),
            bytes_out: m.sent_bytes.get() + k.fetched_bytes.get(),
            commits: self.storage_metrics.commits.get(),
            disk_bytes_written: disk_bytes_written().unwrap_or(0),
        }
    }

    /// Takes one sample of the rates; the sampler calls it every [`SAMPLE_INTERVAL`].
    pub fn sample(&self) {
        let now = Instant::now();
        let totals = self.totals();
        let topics: HashMap<String, u64> = self
            .log
            .topics()
            .into_iter()
            .map(|t| {
                let appended = (0..t.partitions)
                    .filter_map(|p| self.log.offsets(&t.name, p).ok())
                    .map(|o| o.high_watermark)
                    .sum();
                (t.name, appended)
            })
            .collect();
        let mut h = self.history.lock();
        let written_before = h.last.map_or(0, |(_, before)| before.disk_bytes_written);
        self.storage_metrics
            .disk_written_bytes
            .inc_by(totals.disk_bytes_written.saturating_sub(written_before));
        if let Some((then, before)) = h.last {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            let sample = Sample {
                t_ms: now_ms(),
                messages_in: rate(totals.messages_in, before.messages_in),
                messages_out: rate(totals.messages_out, before.messages_out),
                bytes_in: rate(totals.bytes_in, before.bytes_in),
                bytes_out: rate(totals.bytes_out, before.bytes_out),
                commits: rate(totals.commits, before.commits),
                disk_bytes_written: rate(totals.disk_bytes_written, before.disk_bytes_written),
            };
            if h.samples.len() == HISTORY_SAMPLES {
                h.samples.pop_front();
            }
            h.samples.push_back(sample);
        }
        h.last = Some((now, totals));
        if h.topic_totals.len() == TOPIC_RATE_SAMPLES {
            h.topic_totals.pop_front();
        }
        h.topic_totals.push_back((now, topics));
    }

    /// The rates' history, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history.lock().samples.iter().copied().collect()
    }

    fn topic_rates(&self) -> HashMap<String, f64> {
        let h = self.history.lock();
        let (Some((t0, first)), Some((t1, last))) = (h.topic_totals.front(), h.topic_totals.back())
        else {
            return HashMap::new();
        };
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return HashMap::new();
        }
        last.iter()
            .map(|(name, total)| {
                let before = first.get(name).copied().unwrap_or(*total);
                (name.clone(), total.saturating_sub(before) as f64 / secs)
            })
            .collect()
    }

    /// Everything the page shows, read now.
    pub fn status(&self) -> Status {
        let history = self.history();
        let latest = history.last().copied().unwrap_or_default();
        let rates = self.topic_rates();
        let topics = self
            .log
            .topics()
            .into_iter()
            .map(|t| {
                let (records, bytes) = match self.log.describe(&t.name) {
                    Ok((_, parts)) => parts.iter().fold((0, 0), |(r, b), p| {
                        (
                            r + p.high_watermark.saturating_sub(p.log_start),
                            b + p.bytes,
                        )
                    }),
                    Err(_) => (0, 0),
                };
                TopicStatus {
                    records_per_s: rates.get(&t.name).copied().unwrap_or(0.0),
                    name: t.name,
                    partitions: t.partitions,
                    records,
                    bytes,
                    retention_ms: t.config.retention_ms,
                    retention_bytes: t.config.retention_bytes,
                }
            })
            .collect();
        let pipelines = self.pipelines.list();
        let replication = self.replication.status();
        let storage = self.storage(latest);
        let mut problems = Vec::new();
        if !self.log.writer_healthy(Duration::from_secs(30)) {
            problems.push("the storage writer is stalled or failing".to_string());
        }
        if storage.disk_full {
            problems.push("the disk is full: writes are refused".to_string());
        }
        for p in &pipelines {
            if p.status.state == crate::plugins::pipeline::RunState::Failed {
                problems.push(format!("pipeline {} failed", p.name));
            }
        }
        for r in &replication {
            if r.state == LinkState::Disconnected {
                problems.push(format!("replication rule {} is disconnected", r.name));
            }
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: self.started_ms,
            uptime_s: self.started.elapsed().as_secs(),
            health: if problems.is_empty() {
                "ok"
            } else {
                "degraded"
            }
            .to_string(),
            problems,
            listeners: self.listeners.get().cloned().unwrap_or_default(),
            sample_interval_s: SAMPLE_INTERVAL.as_secs(),
            history,
            mqtt: self.mqtt(),
            topics,
            groups: self.groups(),
            pipelines,
            replication,
            storage,
            recent_log: recent_events(),
        }
    }

    pub fn mqtt(&self) -> MqttStatus {
        let m = &self.mqtt_metrics;
        MqttStatus {
            connections: m.connections.get(),
            sessions: m.sessions.get(),
            subscriptions: m.subscriptions.get(),
            retained: m.retained.get(),
            received: m.received.get(),
            sent: m.sent.get(),
            received_bytes: m.received_bytes.get(),
            sent_bytes: m.sent_bytes.get(),
            dropped: m.dropped.get(),
            connects: m.connects.get(),
        }
    }

    fn groups(&self) -> Vec<GroupStatus> {
        let Ok(groups) = self.log.groups_with_offsets() else {
            return Vec::new();
        };
        groups
            .into_iter()
            .filter_map(|group| {
                let committed = self.log.committed_offsets(&group).ok()?;
                let partitions: Vec<GroupPartition> = committed
                    .into_iter()
                    .filter_map(|(topic, partition, c)| {
                        let hw = self.log.offsets(&topic, partition).ok()?.high_watermark;
                        let committed = u64::try_from(c.offset).unwrap_or(0);
                        Some(GroupPartition {
                            lag: hw.saturating_sub(committed),
                            topic,
                            partition,
                            committed,
                            high_watermark: hw,
                        })
                    })
                    .collect();
                Some(GroupStatus {
                    lag: partitions.iter().map(|p| p.lag).sum(),
                    group,
                    partitions,
                })
            })
            .collect()
    }

    fn storage(&self, latest: Sample) -> StorageStatus {
        let size = |name: &str| std::fs::metadata(self.data_dir.join(name)).map_or(0, |m| m.len());
        let free_bytes = rustix::fs::statvfs(&self.data_dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        StorageStatus {
            data_dir: self.data_dir.display().to_string(),
            database_bytes: size(crate::storage::DB_FILE),
            journal_bytes: size(crate::storage::JOURNAL_FILE),
            free_bytes,
            commits_per_s: latest.commits,
            disk_bytes_written_per_s: latest.disk_bytes_written,
            disk_bytes_written: disk_bytes_written().unwrap_or(0),
            disk_full: free_bytes.is_some_and(|f| f < DISK_FULL_BELOW),
        }
    }
}

/// Samples every [`SAMPLE_INTERVAL`] until `stop`.
pub async fn run_sampler(sources: Arc<StatusSources>, stop: watch::Receiver<bool>) {
    every(SAMPLE_INTERVAL, stop, || {
        let sources = sources.clone();
        async move {
            // Reads the database's partitions: off the async workers.
            let _ = tokio::task::spawn_blocking(move || sources.sample()).await;
        }
    })
    .await
}

/// Runs `f` now and every `period` after, until `stop`.
pub async fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = tick.tick() => f().await,
            _ = &mut stopped => return,
        }
    }
}

/// Bytes this process caused to be written to storage (`write_bytes` in `/proc/self/io`).
pub fn disk_bytes_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

static RECENT: Mutex<VecDeque<LogEvent>> = Mutex::new(VecDeque::new());

/// The last warnings and errors, oldest first.
pub fn recent_events() -> Vec<LogEvent> {
    RECENT.lock().iter().cloned().collect()
}

/// A `tracing` layer that keeps the last warnings and errors for the status page.
pub struct RecentEventsLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecentEventsLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        let entry = LogEvent {
            t_ms: now_ms(),
            level: level.to_string(),
            target: event.metadata().target().to_string(),
            message: visitor.0,
        };
        let mut recent = RECENT.lock();
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(entry);
    }
}

/// The event's message, then its fields as `name=value`.
#[derive(Default)]
struct MessageVisitor(String);

impl tracing::field::Visit for MessageVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}{fields}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = format!("{value}{}", self.0);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

/// `weir status`: the page's content as text, `now_ms` being the reader's clock.
pub fn render_text(s: &Status, now_ms: i64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let ago = |ms: i64| human_duration(now_ms.saturating_sub(ms).max(0) as u64 / 1000);
    let latest = s.history.last().copied().unwrap_or_default();
    let _ = writeln!(
        out,
        "weir {} | up {} | health {}",
        s.version,
        human_duration(s.uptime_s),
        s.health
    );
    for p in &s.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
    let _ = writeln!(out, "listeners:");
    for l in &s.listeners {
        let tls = if l.tls { ", TLS" } else { "" };
        let _ = writeln!(out, "  {:<6} {}{tls} ({})", l.name, l.address, l.auth);
    }
    let _ = writeln!(
        out,
        "rates (last {} s): {:.0} msg/s in, {:.0} msg/s out, {} in, {} out",
        s.sample_interval_s,
        latest.messages_in,
        latest.messages_out,
        human_rate(latest.bytes_in),
        human_rate(latest.bytes_out)
    );
    let m = &s.mqtt;
    let _ = writeln!(
        out,
        "mqtt: {} clients connected, {} sessions, {} subscriptions, {} retained, {} received, {} sent, {} dropped",
        m.connections, m.sessions, m.subscriptions, m.retained, m.received, m.sent, m.dropped
    );
    let _ = writeln!(out, "topics:");
    for t in &s.topics {
        let retention = t
            .retention_ms
            .map_or("forever".to_string(), |ms| human_duration(ms / 1000));
        let _ = writeln!(
            out,
            "  {:<24} {:>3} partitions {:>10} records {:>10} {:>8.1} records/s, kept {retention}",
            t.name,
            t.partitions,
            t.records,
            human_bytes(t.bytes),
            t.records_per_s
        );
    }
    if !s.groups.is_empty() {
        let _ = writeln!(out, "consumer groups:");
        for g in &s.groups {
            let _ = writeln!(out, "  {:<24} lag {} records", g.group, g.lag);
        }
    }
    if !s.pipelines.is_empty() {
        let _ = writeln!(out, "pipelines:");
        for p in &s.pipelines {
            let state = serde_json::to_value(p.status.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let version = p
                .status
                .plugin_version
                .map_or(String::new(), |v| format!(" v{v}"));
            let _ = writeln!(
                out,
                "  {:<24} {state}{version} | lag {} | out {} | dead letters {}",
                p.name, p.lag, p.records_out, p.failed
            );
            if let Some(e) = &p.status.error {
                let _ = writeln!(out, "    error: {e}");
            }
        }
    }
    if !s.replication.is_empty() {
        let _ = writeln!(out, "replication:");
        for r in &s.replication {
            let state = serde_json::to_value(r.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let lag: u64 = r.partitions.iter().map(|p| p.lag_records).sum();
            let behind = r
                .partitions
                .iter()
                .filter_map(|p| p.oldest_unsent_ms)
                .min()
                .map_or(String::new(), |ms| format!(", {} behind", ago(ms)));
            let success = r
                .last_success_ms
                .map_or("never".to_string(), |ms| ago(ms) + " ago");
            let _ = writeln!(
                out,
                "  {:<24} {state} to {} | lag {lag} records{behind} | last success {success}",
                r.name, r.upstream
            );
            if let Some(e) = &r.last_error {
                let when = r
                    .last_error_ms
                    .map_or("?".to_string(), |ms| ago(ms) + " ago");
                let over = if r.last_error_over { ", over" } else { "" };
                let _ = writeln!(
                    out,
                    "    {} upstream errors since {} ago; the last {when}{over}: {e}",
                    r.upstream_errors,
                    ago(r.errors_since_ms)
                );
            }
        }
    }
    let st = &s.storage;
    let free = st.free_bytes.map_or("?".to_string(), human_bytes);
    let _ = writeln!(
        out,
        "storage: {} database, {} journal, {free} free | {:.1} commits/s, {} written to disk",
        human_bytes(st.database_bytes),
        human_bytes(st.journal_bytes),
        st.commits_per_s,
        human_rate(st.disk_bytes_written_per_s)
    );
    if !s.recent_log.is_empty() {
        let _ = writeln!(out, "recent warnings and errors:");
        for e in s.recent_log.iter().rev().take(10) {
            let _ = writeln!(out, "  {} ago {} {}", ago(e.t_ms), e.level, e.message);
        }
    }
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_rate(bytes_per_s: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_s.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.5 KB");
        assert_eq!(human_bytes(23_200_000), "23.2 MB");
        assert_eq!(human_duration(59), "59 s");
        assert_eq!(human_duration(600), "10 min");
        assert_eq!(human_duration(7 * 86_400), "7 days");
    }

    #[test]
    fn the_message_comes_before_the_fields() {
        let mut v = MessageVisitor::default();
        use tracing::field::Visit;
        let fields = tracing::field::FieldSet::new(
            &["error", "message"],
            tracing::callsite::Identifier(&CALLSITE),
        );
        let mut it = fields.iter();
        let (error, message) = (it.next().unwrap(), it.next().unwrap());
        v.record_str(&error, "refused");
        v.record_debug(&message, &format_args!("cannot connect"));
        assert_eq!(v.0, "cannot connect error=refused");
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!()
        }
    }
}
