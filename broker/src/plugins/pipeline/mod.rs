//! Pipelines: source topics → a plugin → output topics, with a dead-letter topic.
//!
//! Each pipeline runs on a thread of its own (plugin calls are CPU work), with one
//! plugin instance. It reads each source partition from its cursor, calls the plugin
//! on a batch, and commits the outputs, the dead letters and the new cursor in one
//! `Log::write`: after a crash the batch is either wholly there or done again, so
//! the outputs hold each input's result exactly once.
//!
//! A trap, a timeout or running out of memory throws the instance away; a fresh one
//! takes the batch again record by record, so only the record that breaks it goes to
//! the dead-letter topic (with the error in `weir.error`), and the pipeline goes on.
//!
//! Between two batches the runner obeys its control (run, pause, stop) and, when its
//! plugin is a deployed one, swaps in a newly deployed version: the batch before the
//! swap is committed with its cursor, the one after runs on the new version, so no
//! record is lost or done twice across a replacement.
//!
//! `mod.rs` holds the definition (`PipelineConfig`), the status and the cursors;
//! `runner.rs` the thread; `metrics.rs` its counters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::error;

use super::host::Limits;
use super::registry::PluginRegistry;
use crate::storage::{Log, ReadError, StorageError, WriteOp, put_state_op, state_op};
pub use metrics::PipelineMetrics;
pub use runner::RunError;
use runner::Runner;

mod metrics;
mod runner;

const NS_CURSOR: &str = "pipeline.cursor";

/// A pipeline definition that cannot run, and why (for its author).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPipeline(String);

/// A `[[plugins.pipeline]]` of the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    /// A component file (a value ending in `.wasm` or holding a `/`), or the name of a
    /// deployed plugin (`weir plugin deploy NAME FILE.wasm`).
    pub plugin: String,
    /// Source topics.
    pub inputs: Vec<String>,
    /// Output name (as the plugin says it) → topic.
    pub outputs: BTreeMap<String, String>,
    /// Topic for records the plugin fails; default `{name}-dlq`.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Handed to the plugin's `init`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Where a new pipeline starts in each source partition: `earliest`, `latest`,
    /// an offset (`offset:N` or `N`), or the first record at or after a time
    /// (`timestamp:MS`, milliseconds since the Unix epoch).
    #[serde(default = "default_start")]
    pub start: String,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub memory_mb: Option<usize>,
    #[serde(default)]
    pub call_timeout_ms: Option<u64>,
}

fn default_start() -> String {
    "earliest".into()
}

/// Where a new pipeline starts reading (`PipelineConfig::start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    Latest,
    Offset(u64),
    Timestamp(i64),
}

impl std::str::FromStr for StartAt {
    type Err = InvalidPipeline;

    fn from_str(s: &str) -> Result<Self, InvalidPipeline> {
        let parsed = match s {
            "earliest" => Some(Self::Earliest),
            "latest" => Some(Self::Latest),
            s => match s.split_once(':') {
                Some(("offset", n)) => n.parse().ok().map(Self::Offset),
                Some(("timestamp", ms)) => ms.parse().ok().map(Self::Timestamp),
                Some(_) => None,
                None => s.parse().ok().map(Self::Offset),
            },
        };
        parsed.ok_or_else(|| {
            InvalidPipeline(format!(
                "start {s:?} is not earliest, latest, offset:N or timestamp:MS"
            ))
        })
    }
}

/// The component a pipeline runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginRef {
    File(PathBuf),
    Deployed(String),
}

impl PipelineConfig {
    pub fn plugin_ref(&self) -> PluginRef {
        let p = &self.plugin;
        if p.ends_with(".wasm") || p.contains(['/', '\\']) {
            PluginRef::File(PathBuf::from(p))
        } else {
            PluginRef::Deployed(p.clone())
        }
    }

    pub fn start_at(&self) -> Result<StartAt, InvalidPipeline> {
        self.start
            .parse()
            .map_err(|e| self.invalid(format_args!("{e}")))
    }

    fn invalid(&self, reason: std::fmt::Arguments<'_>) -> InvalidPipeline {
        InvalidPipeline(format!("pipeline {}: {reason}", self.name))
    }

    /// The limits of its plugin instances: its own, else the broker's defaults.
    pub fn limits(&self, defaults: &PipelineDefaults) -> Limits {
        Limits {
            memory_bytes: self.memory_mb.unwrap_or(defaults.memory_mb) * 1024 * 1024,
            call_timeout: Duration::from_millis(
                self.call_timeout_ms.unwrap_or(defaults.call_timeout_ms),
            ),
        }
    }

    /// The params as `init` takes them.
    pub fn param_list(&self) -> Vec<(String, String)> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every topic the pipeline reads or writes.
    pub fn topics(&self) -> impl Iterator<Item = String> + '_ {
        self.inputs
            .iter()
            .chain(self.outputs.values())
            .cloned()
            .chain([self.dead_letter_topic()])
    }

    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}-dlq", self.name))
    }

    pub fn validate(&self) -> Result<(), InvalidPipeline> {
        if !crate::names::valid_name(&self.name) {
            return Err(InvalidPipeline(format!(
                "invalid pipeline name {:?}: use 1 to 100 of a-z A-Z 0-9 . _ -",
                self.name
            )));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(self.invalid(format_args!("needs inputs and outputs")));
        }
        self.start_at()?;
        if let PluginRef::Deployed(name) = self.plugin_ref()
            && !crate::names::valid_name(&name)
        {
            return Err(self.invalid(format_args!(
                "plugin {name:?} is neither a .wasm file nor a valid plugin name"
            )));
        }
        if self.batch_size == Some(0)
            || self.memory_mb == Some(0)
            || self.call_timeout_ms == Some(0)
        {
            return Err(self.invalid(format_args!(
                "batch_size, memory_mb and call_timeout_ms must be > 0"
            )));
        }
        for topic in self.topics() {
            crate::storage::TopicName::new(topic).map_err(|e| self.invalid(format_args!("{e}")))?;
        }
        Ok(())
    }
}

/// Defaults of every pipeline (`[plugins]`).
#[derive(Clone, Copy, Debug)]
pub struct PipelineDefaults {
    pub batch_size: usize,
    pub memory_mb: usize,
    pub call_timeout_ms: u64,
}

/// What every pipeline of a broker shares.
#[derive(Clone)]
pub struct PipelineContext {
    pub log: Log,
    pub registry: PluginRegistry,
    pub defaults: PipelineDefaults,
    pub metrics: PipelineMetrics,
    /// The broker's runtime: the pipeline's thread blocks on it for writes and waits.
    pub runtime: Handle,
    pub stop: watch::Receiver<bool>,
}

/// What a pipeline's owner asks of it; obeyed between batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Run,
    Pause,
    Stop,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    #[default]
    Starting,
    Running,
    Paused,
    Failed,
    Stopped,
}

/// Where a pipeline is in one source partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: u32,
    /// The next offset the pipeline reads (its committed cursor).
    pub next_offset: u64,
    pub high_watermark: u64,
}

/// What a running pipeline shows of itself (`weir pipeline describe`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    /// Why it failed, or why a new plugin version was not taken.
    pub error: Option<String>,
    pub plugin_hash: String,
    /// Version of a deployed plugin; none for a component file.
    pub plugin_version: Option<u32>,
    pub positions: Vec<Position>,
}

pub type SharedStatus = Arc<Mutex<Status>>;

/// Runs one pipeline until `stop` or `Control::Stop`; returns when it stopped or
/// failed for good (the reason is then in `status`).
pub fn run(
    config: PipelineConfig,
    context: PipelineContext,
    control: watch::Receiver<Control>,
    status: SharedStatus,
) {
    let name = config.name.clone();
    let result = Runner::new(config, context, control, status.clone()).and_then(|mut r| r.run());
    let mut status = status.lock();
    match result {
        Ok(()) => status.state = RunState::Stopped,
        Err(e) => {
            error!(pipeline = %name, error = %e, "pipeline stopped");
            status.state = RunState::Failed;
            status.error = Some(e.to_string());
        }
    }
}

/// Why a pipeline's cursors could not be placed or forgotten.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error(transparent)]
    Invalid(#[from] InvalidPipeline),
    #[error("input topic {0} does not exist")]
    NoInput(String),
    #[error("pipeline cursors: {0}")]
    Read(#[from] ReadError),
    #[error("pipeline cursors: {0}")]
    Storage(#[from] StorageError),
}

/// The cursor writes for the source partitions of `config` that have none yet,
/// placed where `config.start` says. Committed once, so a restart before the first
/// batch does not move a `latest` start forward.
pub fn initial_cursors(log: &Log, config: &PipelineConfig) -> Result<Vec<WriteOp>, CursorError> {
    let start = config.start_at()?;
    let mut ops = Vec::new();
    for (topic, partition) in source_partitions(log, config)? {
        let key = cursor_key(&config.name, &topic, partition);
        if log.get_state::<u64>(NS_CURSOR, &key)?.is_some() {
            continue;
        }
        let offsets = *log.watch(&topic, partition)?.borrow();
        let next = match start {
            StartAt::Latest => offsets.high_watermark,
            StartAt::Earliest => offsets.log_start,
            StartAt::Offset(n) => n.clamp(offsets.log_start, offsets.high_watermark),
            StartAt::Timestamp(ms) => log
                .offset_for_timestamp(&topic, partition, ms)?
                .map_or(offsets.high_watermark, |(offset, _)| offset),
        };
        ops.push(put_state_op(NS_CURSOR, &key, &next));
    }
    Ok(ops)
}

/// Every partition of the pipeline's source topics.
fn source_partitions(
    log: &Log,
    config: &PipelineConfig,
) -> Result<Vec<(String, u32)>, CursorError> {
    let mut all = Vec::new();
    for topic in &config.inputs {
        let info = log
            .topic(topic)
            .ok_or_else(|| CursorError::NoInput(topic.clone()))?;
        all.extend((0..info.partitions).map(|p| (topic.clone(), p)));
    }
    Ok(all)
}

/// The writes that forget every cursor of pipeline `name`.
pub fn forget_cursors(log: &Log, name: &str) -> Result<Vec<WriteOp>, CursorError> {
    let prefix = format!("{name}/");
    Ok(log
        .list_state::<u64>(NS_CURSOR)?
        .into_iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .map(|(key, _)| state_op(NS_CURSOR, &key, None))
        .collect())
}

fn cursor_key(pipeline: &str, topic: &str, partition: u32) -> String {
    format!("{pipeline}/{topic}/{partition}")
}
