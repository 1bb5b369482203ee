//! Topic names and per-topic configuration, with Kafka's rules and Kafka's key names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Kafka's limit on topic name length.
pub const MAX_TOPIC_NAME_LEN: usize = 249;
/// Upper bound on partitions per topic; a gateway has no use for more.
pub const MAX_PARTITIONS: u32 = 10_000;

/// A topic name that passed Kafka's rules: 1–249 characters of `[a-zA-Z0-9._-]`,
/// not `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicName(String);

impl TopicName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidTopicName> {
        let name = name.into();
        if name.is_empty() {
            return Err(InvalidTopicName::Empty);
        }
        if name == "." || name == ".." {
            return Err(InvalidTopicName::Dots(name));
        }
        if name.len() > MAX_TOPIC_NAME_LEN {
            return Err(InvalidTopicName::TooLong(name.len()));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidTopicName::IllegalChar { name, bad });
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Kafka refuses two topics whose names differ only by `.` versus `_`, because
    /// both map to the same metric name. This is the form they are compared in.
    pub fn collision_form(&self) -> String {
        self.0.replace('.', "_")
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopicName {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name {0:?} is not allowed")]
    Dots(String),
    #[error("topic name is {0} characters long; the limit is {MAX_TOPIC_NAME_LEN}")]
    TooLong(usize),
    #[error(
        "topic name {name:?} contains {bad:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
    )]
    IllegalChar { name: String, bad: char },
}

/// What happens to a topic's old records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CleanupPolicy {
    /// Delete whole batches by age and size (Kafka's `delete`).
    Delete,
    /// Keep the latest record of each key (`compact`, `storage/compaction.rs`).
    Compact,
    /// Both (`compact,delete`).
    CompactDelete,
}

impl CleanupPolicy {
    /// Whether retention deletes old batches.
    pub fn deletes(self) -> bool {
        matches!(self, CleanupPolicy::Delete | CleanupPolicy::CompactDelete)
    }

    /// Whether the compactor keeps only the latest record of each key.
    pub fn compacts(self) -> bool {
        matches!(self, CleanupPolicy::Compact | CleanupPolicy::CompactDelete)
    }
}

/// `compression.type`: the codec of the batches the broker builds itself (MQTT ingest,
/// pipelines, downlinks). A producer's batches are stored as the producer sent them,
/// as Redpanda does: recompressing a client's batch costs CPU a gateway lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Kafka's default, "the producer's codec": the broker, producing, picks zstd.
    Producer,
    Uncompressed,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl CompressionType {
    const NAMES: [(CompressionType, &'static str); 6] = [
        (CompressionType::Producer, "producer"),
        (CompressionType::Uncompressed, "uncompressed"),
        (CompressionType::Gzip, "gzip"),
        (CompressionType::Snappy, "snappy"),
        (CompressionType::Lz4, "lz4"),
        (CompressionType::Zstd, "zstd"),
    ];

    pub fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("producer", |(_, name)| name)
    }

    fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| *c)
    }

    /// The codec of a batch the broker builds.
    pub fn for_broker_batches(self) -> kafka_protocol::records::Compression {
        use kafka_protocol::records::Compression;
        match self {
            CompressionType::Producer | CompressionType::Zstd => Compression::Zstd,
            CompressionType::Uncompressed => Compression::None,
            CompressionType::Gzip => Compression::Gzip,
            CompressionType::Snappy => Compression::Snappy,
            CompressionType::Lz4 => Compression::Lz4,
        }
    }
}

/// Per-topic settings, named and valued as Kafka names them in `describe`.
///
/// Stored as those names and values (`KEYS` order), so that a new key needs no new
/// database format: a row without it gets the default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<(String, String)>", try_from = "Vec<(String, String)>")]
pub struct TopicConfig {
    /// `retention.ms`: batches appended longer ago than this are deleted. `None` = -1 (forever).
    pub retention_ms: Option<u64>,
    /// `retention.bytes`: per partition; the oldest batches go while the partition is larger.
    pub retention_bytes: Option<u64>,
    /// `max.message.bytes`: largest batch accepted, in bytes.
    pub max_message_bytes: u32,
    /// `cleanup.policy`.
    pub cleanup_policy: CleanupPolicy,
    /// `compression.type`.
    pub compression_type: CompressionType,
    /// `delete.retention.ms`: how long a compacted topic keeps a tombstone (a record
    /// with a null value) after the compactor first saw it.
    pub delete_retention_ms: u64,
    /// `min.cleanable.dirty.ratio`, in millionths: the share of a partition's cleanable
    /// bytes not yet compacted that starts a compaction.
    pub min_cleanable_dirty_ratio_ppm: u32,
    /// `min.compaction.lag.ms`: a record stays uncompacted at least this long.
    pub min_compaction_lag_ms: u64,
    /// `segment.bytes`: Weir has no segment files; as Kafka never compacts its active
    /// segment, the compactor leaves a partition's newest batches alone until this many
    /// bytes were appended after them or `segment.ms` passed.
    pub segment_bytes: u64,
    /// `segment.ms`: see `segment_bytes`.
    pub segment_ms: u64,
}

impl From<TopicConfig> for Vec<(String, String)> {
    fn from(config: TopicConfig) -> Self {
        config.entries()
    }
}

impl TryFrom<Vec<(String, String)>> for TopicConfig {
    type Error = InvalidTopicConfig;

    fn try_from(entries: Vec<(String, String)>) -> Result<Self, Self::Error> {
        TopicConfig::default().with_overrides(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

impl Default for TopicConfig {
    /// Kafka's broker defaults: 7 days, unlimited bytes, 1 MiB + 12-byte batches.
    fn default() -> Self {
        Self {
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            max_message_bytes: 1_048_588,
            cleanup_policy: CleanupPolicy::Delete,
            compression_type: CompressionType::Producer,
            delete_retention_ms: 24 * 3600 * 1000,
            min_cleanable_dirty_ratio_ppm: 500_000,
            min_compaction_lag_ms: 0,
            // Kafka's are 1 GiB and 7 days, sized for servers: a gateway's compacted
            // topic (last value per device) would keep every update for a week.
            segment_bytes: 16 << 20,
            segment_ms: 3600 * 1000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopicConfig {
    #[error(
        "unknown topic config {0:?}; known: cleanup.policy, compression.type, delete.retention.ms, max.message.bytes, min.cleanable.dirty.ratio, min.compaction.lag.ms, retention.bytes, retention.ms, segment.bytes, segment.ms"
    )]
    UnknownKey(String),
    #[error("topic config {key}={value:?} is invalid: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: &'static str,
    },
}

impl TopicConfig {
    /// The config keys this broker understands, in `describe` order.
    pub const KEYS: [&'static str; 10] = [
        "cleanup.policy",
        "compression.type",
        "delete.retention.ms",
        "max.message.bytes",
        "min.cleanable.dirty.ratio",
        "min.compaction.lag.ms",
        "retention.bytes",
        "retention.ms",
        "segment.bytes",
        "segment.ms",
    ];

    /// Sets one key from its Kafka string form.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), InvalidTopicConfig> {
        let invalid = |reason| InvalidTopicConfig::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        match key {
            "retention.ms" => {
                self.retention_ms = parse_limit(value)
                    .ok_or_else(|| invalid("expected -1 or a non-negative integer"))?
            }
            "retention.bytes" => {
                self.retention_bytes = parse_limit(value)
                    .ok_or_else(|| invalid("expected -1 or a non-negative integer"))?
            }
            "max.message.bytes" => {
                self.max_message_bytes = value
                    .parse::<u32>()
                    .ok()
                    .filter(|v| *v > 0 && *v <= i32::MAX as u32)
                    .ok_or_else(|| invalid("expected a positive 32-bit integer"))?
            }
            "cleanup.policy" => {
                self.cleanup_policy = match value.replace(' ', "").as_str() {
                    "delete" => CleanupPolicy::Delete,
                    "compact" => CleanupPolicy::Compact,
                    "compact,delete" | "delete,compact" => CleanupPolicy::CompactDelete,
                    _ => return Err(invalid("expected delete, compact or compact,delete")),
                }
            }
            "delete.retention.ms" | "min.compaction.lag.ms" | "segment.ms" => {
                let ms = value
                    .parse::<u64>()
                    .ok()
                    .filter(|v| *v <= i64::MAX as u64)
                    .ok_or_else(|| invalid("expected a non-negative integer"))?;
                match key {
                    "delete.retention.ms" => self.delete_retention_ms = ms,
                    "min.compaction.lag.ms" => self.min_compaction_lag_ms = ms,
                    _ if ms == 0 => return Err(invalid("expected a positive integer")),
                    _ => self.segment_ms = ms,
                }
            }
            "segment.bytes" => {
                // Kafka's lower bound.
                self.segment_bytes = value
                    .parse::<u64>()
                    .ok()
                    .filter(|v| (14..=i32::MAX as u64).contains(v))
                    .ok_or_else(|| invalid("expected an integer from 14 to 2147483647"))?
            }
            "min.cleanable.dirty.ratio" => {
                self.min_cleanable_dirty_ratio_ppm = value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| (0.0..=1.0).contains(v))
                    .map(|v| (v * 1e6).round() as u32)
                    .ok_or_else(|| invalid("expected a number from 0 to 1"))?
            }
            "compression.type" => {
                self.compression_type = CompressionType::parse(value).ok_or_else(|| {
                    invalid("expected producer, uncompressed, gzip, snappy, lz4 or zstd")
                })?
            }
            _ => return Err(InvalidTopicConfig::UnknownKey(key.to_string())),
        }
        Ok(())
    }

    /// The value of one key in Kafka's string form.
    pub fn get(&self, key: &str) -> Option<String> {
        let limit = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        Some(match key {
            "retention.ms" => limit(self.retention_ms),
            "retention.bytes" => limit(self.retention_bytes),
            "max.message.bytes" => self.max_message_bytes.to_string(),
            "cleanup.policy" => match self.cleanup_policy {
                CleanupPolicy::Delete => "delete",
                CleanupPolicy::Compact => "compact",
                CleanupPolicy::CompactDelete => "compact,delete",
            }
            .to_string(),
            "delete.retention.ms" => self.delete_retention_ms.to_string(),
            "min.cleanable.dirty.ratio" => {
                (f64::from(self.min_cleanable_dirty_ratio_ppm) / 1e6).to_string()
            }
            "min.compaction.lag.ms" => self.min_compaction_lag_ms.to_string(),
            "segment.bytes" => self.segment_bytes.to_string(),
            "segment.ms" => self.segment_ms.to_string(),
            "compression.type" => self.compression_type.as_str().to_string(),
            _ => return None,
        })
    }

    /// Every key and its value, in `KEYS` order.
    pub fn entries(&self) -> Vec<(String, String)> {
        Self::KEYS
            .iter()
            .filter_map(|k| Some((k.to_string(), self.get(k)?)))
            .collect()
    }

    /// `self` with `overrides` applied in order; the first bad pair is the error.
    pub fn with_overrides<'a>(
        mut self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, InvalidTopicConfig> {
        for (key, value) in overrides {
            self.set(key, value)?;
        }
        Ok(self)
    }
}

/// `-1` means unlimited, as in Kafka.
fn parse_limit(value: &str) -> Option<Option<u64>> {
    match value.trim() {
        "-1" => Some(None),
        v => v.parse::<u64>().ok().map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_name_rules() {
        assert!(TopicName::new("sensors.temp_1-a").is_ok());
        assert_eq!(TopicName::new(""), Err(InvalidTopicName::Empty));
        assert!(TopicName::new(".").is_err());
        assert!(TopicName::new("..").is_err());
        assert!(TopicName::new("a/b").is_err());
        assert!(TopicName::new("ünïcode").is_err());
        assert!(TopicName::new("x".repeat(249)).is_ok());
        assert!(TopicName::new("x".repeat(250)).is_err());
        assert_eq!(
            TopicName::new("a.b").unwrap().collision_form(),
            TopicName::new("a_b").unwrap().collision_form()
        );
    }

    #[test]
    fn config_round_trips_kafka_strings() {
        let c = TopicConfig::default()
            .with_overrides([("retention.ms", "-1"), ("retention.bytes", "1024")])
            .unwrap();
        assert_eq!(c.get("retention.ms").unwrap(), "-1");
        assert_eq!(c.retention_bytes, Some(1024));
        assert!(matches!(
            TopicConfig::default().set("segment.jitter.ms", "1"),
            Err(InvalidTopicConfig::UnknownKey(_))
        ));
        assert!(TopicConfig::default().set("retention.ms", "soon").is_err());
        assert!(
            TopicConfig::default()
                .set("max.message.bytes", "0")
                .is_err()
        );
        let c = TopicConfig::default()
            .with_overrides([
                ("cleanup.policy", "delete, compact"),
                ("min.cleanable.dirty.ratio", "0.25"),
            ])
            .unwrap();
        assert_eq!(c.cleanup_policy, CleanupPolicy::CompactDelete);
        assert_eq!(c.get("cleanup.policy").unwrap(), "compact,delete");
        assert_eq!(c.get("min.cleanable.dirty.ratio").unwrap(), "0.25");
        assert_eq!(
            TopicConfig::default()
                .get("min.cleanable.dirty.ratio")
                .unwrap(),
            "0.5"
        );
        for (key, bad) in [
            ("cleanup.policy", "shred"),
            ("min.cleanable.dirty.ratio", "1.5"),
            ("segment.bytes", "13"),
            ("segment.ms", "0"),
            ("delete.retention.ms", "-1"),
        ] {
            assert!(TopicConfig::default().set(key, bad).is_err(), "{key}={bad}");
        }
        assert!(
            TopicConfig::default()
                .set("compression.type", "none")
                .is_err()
        );
    }

    #[test]
    fn config_is_stored_as_kafka_strings() {
        let c = TopicConfig::default()
            .with_overrides([("retention.bytes", "1024"), ("compression.type", "lz4")])
            .unwrap();
        let stored = postcard::to_allocvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<TopicConfig>(&stored).unwrap(), c);
        // A row written before a key existed gets the key's default.
        let older: Vec<(String, String)> = vec![("retention.ms".into(), "5".into())];
        let c: TopicConfig = postcard::from_bytes(&postcard::to_allocvec(&older).unwrap()).unwrap();
        assert_eq!(c.retention_ms, Some(5));
        assert_eq!(c.compression_type, CompressionType::Producer);
        let unknown: Vec<(String, String)> = vec![("segment.jitter.ms".into(), "5".into())];
        assert!(
            postcard::from_bytes::<TopicConfig>(&postcard::to_allocvec(&unknown).unwrap()).is_err()
        );
    }
}
