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

/// What the retention task may do with a topic's old batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CleanupPolicy {
    /// Delete whole batches by age and size (Kafka's `delete`).
    Delete,
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopicConfig {
    #[error(
        "unknown topic config {0:?}; known: retention.ms, retention.bytes, max.message.bytes, cleanup.policy, compression.type"
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
    pub const KEYS: [&'static str; 5] = [
        "cleanup.policy",
        "compression.type",
        "max.message.bytes",
        "retention.bytes",
        "retention.ms",
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
                self.cleanup_policy = match value {
                    "delete" => CleanupPolicy::Delete,
                    "compact" | "compact,delete" | "delete,compact" => {
                        return Err(invalid(
                            "log compaction is not implemented yet; use \"delete\"",
                        ));
                    }
                    _ => return Err(invalid("expected \"delete\"")),
                }
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
                CleanupPolicy::Delete => "delete".to_string(),
            },
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
            TopicConfig::default().set("segment.ms", "1"),
            Err(InvalidTopicConfig::UnknownKey(_))
        ));
        assert!(TopicConfig::default().set("retention.ms", "soon").is_err());
        assert!(
            TopicConfig::default()
                .set("max.message.bytes", "0")
                .is_err()
        );
        assert!(
            TopicConfig::default()
                .set("cleanup.policy", "compact")
                .is_err()
        );
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
        let unknown: Vec<(String, String)> = vec![("segment.ms".into(), "5".into())];
        assert!(
            postcard::from_bytes::<TopicConfig>(&postcard::to_allocvec(&unknown).unwrap()).is_err()
        );
    }
}
