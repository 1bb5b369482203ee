//! The one configuration struct: defaults, `weir.toml` (serde + toml), and command-line
//! overrides, in that order. `weir.example.toml` at the repository root documents
//! every key; a test keeps the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::AuthConfig;
pub use crate::mqtt::MqttConfig;
use crate::mqtt::rules::{CompiledIngest, check_bridge, compile_downlink};
use crate::plugins::PipelineConfig;
use crate::replication::ReplicationConfig;
use crate::storage::{InvalidTopicConfig, LogOptions, TopicConfig};
use crate::tls::TlsConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the database file (`weir.redb`).
    pub data_dir: PathBuf,
    pub kafka: KafkaConfig,
    pub mqtt: MqttConfig,
    pub plugins: PluginsConfig,
    pub replication: ReplicationConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub storage: StorageConfig,
    pub topic_defaults: TopicDefaults,
    pub log: LogConfig,
    /// The file this was read from, if any: SIGHUP reads its `[[auth.acl]]` again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    pub listen: SocketAddr,
    /// host:port that clients are told to connect to, when it differs from `listen`.
    pub advertised: Option<String>,
    /// Kafka over TLS (SSL and SASL_SSL clients), with `[tls]`'s certificate; TLS
    /// clients are told the advertised host with this port.
    pub tls_listen: Option<SocketAddr>,
    /// Create a topic, with `[topic_defaults]`, when a client asks for one that is
    /// missing (Kafka's auto.create.topics.enable).
    pub auto_create_topics: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Records per plugin call, at most.
    pub batch_size: usize,
    /// Memory of one plugin instance, MiB.
    pub memory_mb: usize,
    /// Time one plugin call may take before it is stopped, ms.
    pub call_timeout_ms: u64,
    /// Pipelines: source topics → plugin → output topics.
    pub pipeline: Vec<PipelineConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            memory_mb: 16,
            call_timeout_ms: 1000,
            pipeline: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Health, metrics and the topic API. Loopback by default: it can delete topics.
    pub listen: SocketAddr,
    /// HTTPS, with `[tls]`'s certificate.
    pub tls: bool,
    /// Bearer token every request but `/health` must carry; required when `listen` is
    /// not a loopback address. Prefer `token_file`, which keeps it out of this file.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// fsync every group commit before acknowledging. Off trades the last
    /// `flush_interval_ms` of acknowledged writes, on any crash, for speed.
    pub fsync: bool,
    pub flush_interval_ms: u64,
    /// The durability window: a group commit gathers for up to this long after its
    /// first write, so that a light load makes few durable commits (flash wear);
    /// acknowledgements wait for it. 0: commit at once.
    pub commit_interval_ms: u64,
    /// With fsync: small group commits are made durable in the write-ahead journal
    /// and the database's own durable commit (a checkpoint) runs at most this long
    /// after the first of them. 0: no journal, every group commit is durable in redb.
    pub checkpoint_interval_ms: u64,
    /// redb page cache, in MiB.
    pub cache_mb: usize,
    /// Bytes of batches one group commit gathers at most, in KiB.
    pub max_group_kb: usize,
    /// How often retention runs.
    pub retention_check_interval_ms: u64,
    /// How often the compactor looks at compacted topics (Kafka's
    /// `log.cleaner.backoff.ms`).
    pub compaction_check_interval_ms: u64,
}

/// Settings for topics created without explicit ones (Kafka's broker-level defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    pub partitions: u32,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: u32,
    pub cleanup_policy: String,
    pub compression_type: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `weir=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("weir-data"),
            kafka: KafkaConfig::default(),
            mqtt: MqttConfig::default(),
            plugins: PluginsConfig::default(),
            replication: ReplicationConfig::default(),
            admin: AdminConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            storage: StorageConfig::default(),
            topic_defaults: TopicDefaults::default(),
            log: LogConfig::default(),
            source: None,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 9092).into(),
            advertised: None,
            tls_listen: None,
            auto_create_topics: true,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 9644).into(),
            tls: false,
            token: None,
            token_file: None,
        }
    }
}

/// The measured choice (BENCHMARKS.md, "Flash wear"): the longest window that kept
/// PUBACK p50 ≤ 50 ms at 1,000 devices.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 50;
/// Longer windows would hold acknowledgements past what MQTT and Kafka clients
/// tolerate before they resend.
const MAX_COMMIT_INTERVAL_MS: u64 = 1000;
/// The measured choice (BENCHMARKS.md, "Flash wear"): about the kernel's own writeback
/// delay (30 s), past which the database's pages are written anyway.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 30_000;
/// A crash replays at most this long of writes from the journal at start.
const MAX_CHECKPOINT_INTERVAL_MS: u64 = 600_000;
/// The redb cache, MiB: at least one MiB, at most 64 GiB.
const CACHE_MB_RANGE: std::ops::RangeInclusive<usize> = 1..=65_536;

impl Default for StorageConfig {
    fn default() -> Self {
        // The log's own defaults, but for the durability window and the journal: a
        // log opened without a config (tests, tools) commits each write at once.
        let log = LogOptions::new("");
        Self {
            fsync: log.fsync,
            flush_interval_ms: log.flush_interval.as_millis() as u64,
            commit_interval_ms: DEFAULT_COMMIT_INTERVAL_MS,
            checkpoint_interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
            cache_mb: log.cache_bytes >> 20,
            max_group_kb: log.max_group_bytes >> 10,
            retention_check_interval_ms: 30_000,
            compaction_check_interval_ms: 15_000,
        }
    }
}

impl Default for TopicDefaults {
    fn default() -> Self {
        let kafka = TopicConfig::default();
        Self {
            partitions: 1,
            retention_ms: kafka.retention_ms.map_or(-1, |v| v as i64),
            retention_bytes: kafka.retention_bytes.map_or(-1, |v| v as i64),
            max_message_bytes: kafka.max_message_bytes,
            cleanup_policy: "delete".into(),
            compression_type: kafka.compression_type.as_str().into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("[topic_defaults]: {0}")]
    TopicDefaults(#[from] InvalidTopicConfig),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`; keys it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// The `[[auth.acl]]` rules, checked.
    pub fn acl(&self) -> Result<crate::acl::Acl, ConfigError> {
        crate::acl::Acl::new(self.auth.acl.clone()).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and topic defaults.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.topic_config()?;
        self.acl()?;
        self.kafka_advertised()?;
        let d = &self.topic_defaults;
        if d.partitions == 0 || d.partitions > crate::storage::MAX_PARTITIONS {
            return Err(ConfigError::Invalid(format!(
                "[topic_defaults] partitions = {} is out of range",
                d.partitions
            )));
        }
        let m = &self.mqtt;
        if m.receive_maximum == 0 || m.max_inflight == 0 || m.max_packet_size < 64 {
            return Err(ConfigError::Invalid(
                "[mqtt] receive_maximum and max_inflight must be > 0, max_packet_size >= 64".into(),
            ));
        }
        for rule in &m.ingest {
            CompiledIngest::compile(rule).map_err(|e| {
                ConfigError::Invalid(format!("[[mqtt.ingest]] {}: {e}", rule.filter))
            })?;
            crate::storage::TopicName::new(rule.topic.clone())
                .map_err(|e| ConfigError::Invalid(format!("[[mqtt.ingest]] topic: {e}")))?;
        }
        for rule in &m.downlink {
            compile_downlink(rule).map_err(|e| {
                ConfigError::Invalid(format!("[[mqtt.downlink]] {}: {e}", rule.topic))
            })?;
            crate::storage::TopicName::new(rule.topic.clone())
                .map_err(|e| ConfigError::Invalid(format!("[[mqtt.downlink]] topic: {e}")))?;
        }
        for bridge in &m.bridge {
            check_bridge(bridge).map_err(|e| {
                ConfigError::Invalid(format!("[[mqtt.bridge]] {}: {e}", bridge.address))
            })?;
        }
        let mut names = std::collections::HashSet::new();
        for pipeline in &self.plugins.pipeline {
            pipeline
                .validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !names.insert(&pipeline.name) {
                return Err(ConfigError::Invalid(format!(
                    "two pipelines are named {}",
                    pipeline.name
                )));
            }
        }
        self.replication.validate().map_err(ConfigError::Invalid)?;
        if self.plugins.memory_mb == 0
            || self.plugins.call_timeout_ms == 0
            || self.plugins.batch_size == 0
        {
            return Err(ConfigError::Invalid(
                "[plugins] memory_mb, call_timeout_ms and batch_size must be > 0".into(),
            ));
        }
        if self.storage.retention_check_interval_ms == 0
            || self.storage.compaction_check_interval_ms == 0
            || self.storage.flush_interval_ms == 0
        {
            return Err(ConfigError::Invalid(
                "[storage] intervals must be greater than zero".into(),
            ));
        }
        if self.storage.commit_interval_ms > MAX_COMMIT_INTERVAL_MS {
            return Err(ConfigError::Invalid(format!(
                "[storage] commit_interval_ms = {} is out of range: 0 to {MAX_COMMIT_INTERVAL_MS}",
                self.storage.commit_interval_ms
            )));
        }
        if self.storage.checkpoint_interval_ms > MAX_CHECKPOINT_INTERVAL_MS {
            return Err(ConfigError::Invalid(format!(
                "[storage] checkpoint_interval_ms = {} is out of range: 0 to \
                 {MAX_CHECKPOINT_INTERVAL_MS}",
                self.storage.checkpoint_interval_ms
            )));
        }
        let wants_tls = [
            self.mqtt.tls_listen.map(|_| "[mqtt] tls_listen"),
            self.mqtt.wss_listen.map(|_| "[mqtt] wss_listen"),
            self.kafka.tls_listen.map(|_| "[kafka] tls_listen"),
            self.admin.tls.then_some("[admin] tls"),
        ];
        if let Some(Some(key)) = wants_tls.iter().find(|k| k.is_some())
            && (self.tls.cert.is_none() || self.tls.key.is_none())
        {
            return Err(ConfigError::Invalid(format!(
                "{key} needs a certificate: set [tls] cert and key"
            )));
        }
        if self.tls.enabled() && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err(ConfigError::Invalid("[tls] needs both cert and key".into()));
        }
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            return Err(ConfigError::Invalid(
                "[admin] token and token_file: set one".into(),
            ));
        }
        if !CACHE_MB_RANGE.contains(&self.storage.cache_mb) {
            return Err(ConfigError::Invalid(format!(
                "[storage] cache_mb = {} is out of range: {} to {}",
                self.storage.cache_mb,
                CACHE_MB_RANGE.start(),
                CACHE_MB_RANGE.end()
            )));
        }
        Ok(())
    }

    /// The config a topic gets when its creator sets nothing.
    pub fn topic_config(&self) -> Result<TopicConfig, InvalidTopicConfig> {
        let d = &self.topic_defaults;
        TopicConfig::default().with_overrides([
            ("retention.ms", d.retention_ms.to_string().as_str()),
            ("retention.bytes", d.retention_bytes.to_string().as_str()),
            (
                "max.message.bytes",
                d.max_message_bytes.to_string().as_str(),
            ),
            ("cleanup.policy", d.cleanup_policy.as_str()),
            ("compression.type", d.compression_type.as_str()),
        ])
    }

    /// The host and port clients are told to connect to: `kafka.advertised`, else the
    /// listen address, with this machine's host name for an unspecified address.
    pub fn kafka_advertised(&self) -> Result<(String, u16), ConfigError> {
        if let Some(adv) = &self.kafka.advertised {
            let (host, port) = adv
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| {
                    ConfigError::Invalid(format!("[kafka] advertised = {adv:?} is not host:port"))
                })?;
            return Ok((host, port));
        }
        let listen = self.kafka.listen;
        let host = if listen.ip().is_unspecified() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_string())
        } else {
            listen.ip().to_string()
        };
        Ok((host, listen.port()))
    }

    /// The admin API's bearer token (`[admin] token`, else `token_file`). Refuses a
    /// non-loopback admin address without one: it can delete topics and run code.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let token = match (&self.admin.token, &self.admin.token_file) {
            (Some(token), _) => Some(token.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if token.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(ConfigError::Invalid("[admin] token is empty".into()));
        }
        if token.is_none() && !self.admin.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "[admin] listen = {} is reachable from other machines: set [admin] token_file (or token), \
                 or listen on 127.0.0.1",
                self.admin.listen
            )));
        }
        Ok(token)
    }

    pub fn log_options(&self) -> LogOptions {
        let mut options = LogOptions::new(&self.data_dir);
        options.fsync = self.storage.fsync;
        options.flush_interval = Duration::from_millis(self.storage.flush_interval_ms);
        options.commit_interval = Duration::from_millis(self.storage.commit_interval_ms);
        options.checkpoint_interval = Duration::from_millis(self.storage.checkpoint_interval_ms);
        options.cache_bytes = self.storage.cache_mb << 20;
        options.max_group_bytes = self.storage.max_group_kb << 10;
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example file sets every key, to its default value.
    #[test]
    fn example_file_documents_every_default() {
        let text = include_str!("../../weir.example.toml");
        let parsed = Config::parse(text).unwrap();
        assert_eq!(parsed, Config::default());
        let full = toml::to_string(&Config::default()).unwrap();
        let keys = |t: &str| -> Vec<String> {
            let v: toml::Table = toml::from_str(t).unwrap();
            let mut keys = Vec::new();
            for (k, v) in v {
                match v {
                    toml::Value::Table(inner) => {
                        keys.extend(inner.keys().map(|i| format!("{k}.{i}")))
                    }
                    _ => keys.push(k),
                }
            }
            keys.sort();
            keys
        };
        let mut documented = keys(text);
        // `advertised` has no default value and `gateway_id` defaults to the host
        // name, so the example shows them commented out.
        let unset = [
            "kafka.advertised",
            "kafka.tls_listen",
            "mqtt.tls_listen",
            "mqtt.ws_listen",
            "mqtt.wss_listen",
            "admin.token",
            "admin.token_file",
            "tls.cert",
            "tls.key",
            "tls.client_ca",
        ];
        documented.extend(unset.map(String::from));
        documented.push("replication.gateway_id".into());
        documented.sort();
        let mut all = keys(&full);
        all.extend(unset.map(String::from));
        all.sort();
        all.dedup();
        assert_eq!(documented, all);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(matches!(
            Config::parse("datadir = 'x'"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("[topic_defaults]\ncleanup_policy = 'shred'"),
            Err(ConfigError::TopicDefaults(_))
        ));
        assert!(Config::parse("[kafka]\nlisten = 'not an address'").is_err());
        let c = Config::parse("data_dir = '/var/lib/weir'\n[storage]\nfsync = false").unwrap();
        assert!(!c.storage.fsync);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/weir"));
        for (text, key) in [
            ("commit_interval_ms = 1001", "commit_interval_ms"),
            ("checkpoint_interval_ms = 600001", "checkpoint_interval_ms"),
            ("cache_mb = 0", "cache_mb"),
            ("cache_mb = 100000", "cache_mb"),
        ] {
            match Config::parse(&format!("[storage]\n{text}")) {
                Err(ConfigError::Invalid(message)) => assert!(message.contains(key), "{message}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let c = Config::parse("[storage]\ncommit_interval_ms = 0").unwrap();
        assert_eq!(c.log_options().commit_interval, Duration::ZERO);
    }

    #[test]
    fn a_bridge_speaks_mqtt_5_unless_told_3_1_1() {
        let bridge = |version: &str| {
            Config::parse(&format!(
                "[[mqtt.bridge]]\naddress = '127.0.0.1:1884'\nclient_id = 'b'\n\
                 filters = ['a/#']\n{version}"
            ))
        };
        assert_eq!(bridge("").unwrap().mqtt.bridge[0].version, "5");
        assert_eq!(
            bridge("version = '3.1.1'").unwrap().mqtt.bridge[0].version,
            "3.1.1"
        );
        match bridge("version = '4'") {
            Err(ConfigError::Invalid(message)) => {
                assert!(message.contains("bridge version"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
