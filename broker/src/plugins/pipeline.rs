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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::records::RecordBatchDecoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::host::{Header, InputRecord, Instance, Limits, Module, PluginError, PluginHost, Source};
use super::registry::PluginRegistry;
use crate::storage::{Log, ReadError, StorageError, WriteOp, now_ms, put_state_op, state_op};
use weir_wire::partition::partition_for_key;
use weir_wire::record_batch::build::NewRecord;

const NS_CURSOR: &str = "pipeline.cursor";
/// Bytes of output one call may return per input byte, beyond a floor: more is
/// treated as a runaway plugin.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

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
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
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
        parsed
            .ok_or_else(|| format!("start {s:?} is not earliest, latest, offset:N or timestamp:MS"))
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

    pub fn start_at(&self) -> Result<StartAt, String> {
        self.start
            .parse()
            .map_err(|e| format!("pipeline {}: {e}", self.name))
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

    pub fn validate(&self) -> Result<(), String> {
        if !crate::names::valid_name(&self.name) {
            return Err(format!(
                "invalid pipeline name {:?}: use 1 to 100 of a-z A-Z 0-9 . _ -",
                self.name
            ));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(format!("pipeline {}: needs inputs and outputs", self.name));
        }
        self.start_at()?;
        if let PluginRef::Deployed(name) = self.plugin_ref()
            && !crate::names::valid_name(&name)
        {
            return Err(format!(
                "pipeline {}: plugin {name:?} is neither a .wasm file nor a valid plugin name",
                self.name
            ));
        }
        if self.batch_size == Some(0)
            || self.memory_mb == Some(0)
            || self.call_timeout_ms == Some(0)
        {
            return Err(format!(
                "pipeline {}: batch_size, memory_mb and call_timeout_ms must be > 0",
                self.name
            ));
        }
        for topic in self.topics() {
            crate::storage::TopicName::new(topic)
                .map_err(|e| format!("pipeline {}: {e}", self.name))?;
        }
        Ok(())
    }
}

/// A metric's labels: `pipeline="…"`.
type Labels = Vec<(String, String)>;

/// An output on its way to a topic: (input index, topic, key, value, headers).
type Emitted = (
    usize,
    String,
    Option<Bytes>,
    Option<Bytes>,
    Vec<(String, Bytes)>,
);

/// Per-pipeline metrics (`weir_pipeline_*{pipeline="…"}`).
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    pub records_in: Family<Labels, Counter>,
    pub records_out: Family<Labels, Counter>,
    pub dropped: Family<Labels, Counter>,
    pub failed: Family<Labels, Counter>,
    pub traps: Family<Labels, Counter>,
    pub lag: Family<Labels, Gauge>,
    pub call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineMetrics {
    pub fn new() -> Self {
        Self {
            records_in: Family::default(),
            records_out: Family::default(),
            dropped: Family::default(),
            failed: Family::default(),
            traps: Family::default(),
            lag: Family::default(),
            call_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
            }),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("pipeline");
        r.register(
            "records_in",
            "Records given to the plugin",
            self.records_in.clone(),
        );
        r.register(
            "records_out",
            "Records the plugin emitted, appended to outputs",
            self.records_out.clone(),
        );
        r.register(
            "dropped",
            "Records the plugin filtered out",
            self.dropped.clone(),
        );
        r.register(
            "failed",
            "Records sent to the dead-letter topic",
            self.failed.clone(),
        );
        r.register(
            "traps",
            "Instances thrown away after a trap, timeout or memory limit",
            self.traps.clone(),
        );
        r.register(
            "lag",
            "Records in the sources not processed yet",
            self.lag.clone(),
        );
        r.register(
            "call_seconds",
            "Duration of one plugin call",
            self.call_seconds.clone(),
        );
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
    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(()) => status.state = RunState::Stopped,
        Err(e) => {
            error!(pipeline = %name, error = %e, "pipeline stopped");
            status.state = RunState::Failed;
            status.error = Some(e);
        }
    }
}

/// Why a pipeline's cursors could not be placed or forgotten.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// `start` does not parse, or an input topic does not exist.
    #[error("{0}")]
    Invalid(String),
    #[error("pipeline cursors: {0}")]
    Read(#[from] ReadError),
    #[error("pipeline cursors: {0}")]
    Storage(#[from] StorageError),
}

/// The cursor writes for the source partitions of `config` that have none yet,
/// placed where `config.start` says. Committed once, so a restart before the first
/// batch does not move a `latest` start forward.
pub fn initial_cursors(log: &Log, config: &PipelineConfig) -> Result<Vec<WriteOp>, CursorError> {
    let start = config.start_at().map_err(CursorError::Invalid)?;
    let mut ops = Vec::new();
    for (topic, partition) in source_partitions(log, config).map_err(CursorError::Invalid)? {
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
fn source_partitions(log: &Log, config: &PipelineConfig) -> Result<Vec<(String, u32)>, String> {
    let mut all = Vec::new();
    for topic in &config.inputs {
        let info = log
            .topic(topic)
            .ok_or_else(|| format!("input topic {topic} does not exist"))?;
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

struct Partition {
    topic: String,
    partition: u32,
    next: u64,
    changes: watch::Receiver<crate::storage::PartitionOffsets>,
}

/// Where the runner's component comes from; a deployed one can be replaced.
enum Loaded {
    File,
    Deployed {
        registry: PluginRegistry,
        name: String,
        /// The registry's deploy counter, and the value of it this runner has seen.
        changes: watch::Receiver<u64>,
        seen: u64,
    },
}

struct Runner {
    log: Log,
    host: PluginHost,
    module: Module,
    loaded: Loaded,
    instance: Instance,
    config: PipelineConfig,
    limits: Limits,
    params: Vec<(String, String)>,
    batch_size: usize,
    labels: Vec<(String, String)>,
    metrics: PipelineMetrics,
    runtime: Handle,
    stop: watch::Receiver<bool>,
    control: watch::Receiver<Control>,
    status: SharedStatus,
    sources: Vec<Partition>,
    dead_letter: String,
}

/// What a batch became.
struct Outcome {
    outputs: Vec<Emitted>,
    failures: Vec<(usize, String)>,
}

impl Runner {
    fn new(
        config: PipelineConfig,
        context: PipelineContext,
        control: watch::Receiver<Control>,
        status: SharedStatus,
    ) -> Result<Self, String> {
        let PipelineContext {
            log,
            registry,
            defaults,
            metrics,
            runtime,
            stop,
        } = context;
        let host = registry.host().clone();
        let (module, loaded, version) = match config.plugin_ref() {
            PluginRef::File(path) => {
                let wasm = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (
                    host.load(&wasm).map_err(|e| e.to_string())?,
                    Loaded::File,
                    None,
                )
            }
            PluginRef::Deployed(name) => {
                let changes = registry.subscribe();
                let seen = *changes.borrow();
                let (deployed, module) = registry.load(&name).map_err(|e| e.to_string())?;
                let loaded = Loaded::Deployed {
                    registry,
                    name,
                    changes,
                    seen,
                };
                (module, loaded, Some(deployed.version))
            }
        };
        let limits = config.limits(&defaults);
        let params = config.param_list();
        let instance = host
            .instantiate(&module, limits, &config.name, &params)
            .map_err(|e| e.to_string())?;
        let cursors = initial_cursors(&log, &config).map_err(|e| e.to_string())?;
        if !cursors.is_empty() {
            runtime
                .block_on(log.write(cursors))
                .map_err(|e| format!("cannot store the start cursors: {e}"))?;
        }
        let mut sources = Vec::new();
        for (topic, partition) in source_partitions(&log, &config)? {
            let changes = log.watch(&topic, partition).map_err(|e| e.to_string())?;
            let key = cursor_key(&config.name, &topic, partition);
            let next = log
                .get_state::<u64>(NS_CURSOR, &key)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no cursor for {topic}/{partition}"))?;
            sources.push(Partition {
                topic,
                partition,
                next,
                changes,
            });
        }
        info!(pipeline = %config.name, plugin = %config.plugin, hash = &module.hash[..12],
            sources = sources.len(), "pipeline started");
        {
            let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
            s.plugin_hash = module.hash.clone();
            s.plugin_version = version;
        }
        let labels = vec![("pipeline".to_string(), config.name.clone())];
        // Exported at 0 from the start, so that a dashboard's `rate()` sees the first.
        for family in [
            &metrics.records_in,
            &metrics.records_out,
            &metrics.failed,
            &metrics.dropped,
            &metrics.traps,
        ] {
            let _ = family.get_or_create(&labels);
        }
        let runner = Self {
            labels,
            dead_letter: config.dead_letter_topic(),
            batch_size: config.batch_size.unwrap_or(defaults.batch_size).max(1),
            log,
            host,
            module,
            loaded,
            instance,
            config,
            limits,
            params,
            metrics,
            runtime,
            stop,
            control,
            status,
            sources,
        };
        runner.publish_positions();
        Ok(runner)
    }

    fn run(&mut self) -> Result<(), String> {
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            let control = *self.control.borrow_and_update();
            match control {
                Control::Stop => return Ok(()),
                Control::Pause => {
                    self.set_state(RunState::Paused);
                    self.wait(true);
                    continue;
                }
                Control::Run => self.set_state(RunState::Running),
            }
            self.take_new_version();
            let mut progressed = false;
            for i in 0..self.sources.len() {
                progressed |= self.step(i)?;
            }
            let lag: u64 = self
                .sources
                .iter()
                .map(|s| s.changes.borrow().high_watermark.saturating_sub(s.next))
                .sum();
            self.metrics.lag.get_or_create(&self.labels).set(lag as i64);
            self.publish_positions();
            if !progressed {
                self.wait(false);
            }
        }
    }

    fn set_state(&self, state: RunState) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if s.state != state {
            info!(pipeline = %self.config.name, ?state, "pipeline state");
            s.state = state;
        }
    }

    fn publish_positions(&self) {
        let positions = self
            .sources
            .iter()
            .map(|s| Position {
                topic: s.topic.clone(),
                partition: s.partition,
                next_offset: s.next,
                high_watermark: s.changes.borrow().high_watermark,
            })
            .collect();
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .positions = positions;
    }

    /// Swaps in the deployed plugin's current version when it changed. A version
    /// whose instance cannot start is not taken: the old one goes on, and the
    /// status says why.
    fn take_new_version(&mut self) {
        let Loaded::Deployed {
            registry,
            name,
            changes,
            seen,
        } = &mut self.loaded
        else {
            return;
        };
        let current = *changes.borrow();
        if current == *seen {
            return;
        }
        *seen = current;
        let (deployed, module) = match registry.load(name) {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(pipeline = %self.config.name, error = %e, "cannot load the new plugin version");
                return;
            }
        };
        if module.hash == self.module.hash {
            return;
        }
        match self
            .host
            .instantiate(&module, self.limits, &self.config.name, &self.params)
        {
            Ok(instance) => {
                info!(pipeline = %self.config.name, plugin = %name, version = deployed.version,
                    hash = &module.hash[..12], "pipeline now runs the new plugin version");
                self.module = module;
                self.instance = instance;
                let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
                s.plugin_hash = self.module.hash.clone();
                s.plugin_version = Some(deployed.version);
                s.error = None;
            }
            Err(e) => {
                let reason = format!("plugin {name} version {} not taken: {e}", deployed.version);
                error!(pipeline = %self.config.name, "{reason}");
                self.status.lock().unwrap_or_else(|e| e.into_inner()).error = Some(reason);
            }
        }
    }

    /// Waits until a source has new records (unless `paused`), the control or the
    /// deployed plugin changes, the broker stops, or a second passed.
    fn wait(&mut self, paused: bool) {
        let mut waits: Vec<_> = if paused {
            Vec::new()
        } else {
            self.sources
                .iter_mut()
                .map(|s| {
                    Box::pin(async {
                        let _ = s.changes.changed().await;
                    })
                })
                .collect()
        };
        let mut stop = self.stop.clone();
        let control = &mut self.control;
        let deployed = match &mut self.loaded {
            Loaded::Deployed { changes, .. } => Some(changes),
            Loaded::File => None,
        };
        self.runtime.block_on(async move {
            let appended = async {
                if waits.is_empty() {
                    std::future::pending::<()>().await;
                } else {
                    futures::future::select_all(waits.iter_mut()).await;
                }
            };
            let redeployed = async {
                match deployed {
                    Some(changes) => {
                        let _ = changes.changed().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = appended => {}
                _ = control.changed() => {}
                _ = redeployed => {}
                _ = stop.wait_for(|s| *s) => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        });
    }

    /// Processes one batch of source `i`; false when it had nothing new.
    fn step(&mut self, i: usize) -> Result<bool, String> {
        let (topic, partition, next) = {
            let s = &mut self.sources[i];
            // Appends after this point wake the next `wait`.
            s.changes.borrow_and_update();
            (s.topic.clone(), s.partition, s.next)
        };
        let read = match self.log.read(&topic, partition, next, 1024 * 1024) {
            Ok(r) => r,
            Err(ReadError::OffsetOutOfRange { offsets, .. }) => {
                warn!(pipeline = %self.config.name, topic, partition, lost_from = next, lost_to = offsets.log_start,
                    "source records deleted by retention before the pipeline read them");
                self.sources[i].next = offsets.log_start.max(next.min(offsets.high_watermark));
                return Ok(true);
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut inputs = Vec::new();
        let mut end = next;
        'batches: for stored in read.batches {
            let batch_end = stored.base_offset() as u64 + stored.last_offset_delta() as u64 + 1;
            let mut bytes = stored.into_bytes();
            let set = RecordBatchDecoder::decode(&mut bytes)
                .map_err(|e| format!("cannot decode {topic}/{partition}: {e}"))?;
            for r in set.records {
                let offset = r.offset as u64;
                if offset < next {
                    continue;
                }
                if inputs.len() >= self.batch_size {
                    break 'batches;
                }
                inputs.push(InputRecord {
                    key: r.key.map(|k| k.to_vec()),
                    value: r.value.map(|v| v.to_vec()),
                    headers: r
                        .headers
                        .iter()
                        .map(|(k, v)| Header {
                            key: k.to_string(),
                            value: v.as_ref().map(|b| b.to_vec()).unwrap_or_default(),
                        })
                        .collect(),
                    timestamp_ms: r.timestamp,
                    offset,
                });
                end = offset + 1;
            }
            // The whole stored batch was taken (or held nothing past `next`).
            end = end.max(batch_end);
        }
        if end == next {
            return Ok(false);
        }
        let source = Source {
            topic: topic.clone(),
            partition,
        };
        let outcome = self.process(&source, &inputs)?;
        let (ops, tally) = self.ops(&inputs, outcome, &topic, partition, end)?;
        if let Err(e) = self.runtime.block_on(self.log.write(ops)) {
            // Not committed: the cursor stays, the batch runs again.
            warn!(pipeline = %self.config.name, error = %e, "pipeline outputs not stored; retrying");
            std::thread::sleep(Duration::from_secs(1));
            return Ok(true);
        }
        self.sources[i].next = end;
        // Counted once durable: a reader that sees the counter also sees the outputs,
        // and a batch that runs again after a failed write is counted once.
        let count = |family: &Family<Labels, Counter>, n: usize| {
            family.get_or_create(&self.labels).inc_by(n as u64);
        };
        count(&self.metrics.records_in, inputs.len());
        count(&self.metrics.records_out, tally.out);
        count(&self.metrics.failed, tally.failed);
        count(&self.metrics.dropped, tally.dropped);
        Ok(true)
    }

    /// Calls the plugin on the batch; after a trap, record by record on fresh instances.
    fn process(&mut self, source: &Source, inputs: &[InputRecord]) -> Result<Outcome, String> {
        if inputs.is_empty() {
            return Ok(Outcome {
                outputs: Vec::new(),
                failures: Vec::new(),
            });
        }
        match self.call(source, inputs) {
            Ok(outcome) => Ok(outcome),
            Err(reason) => {
                warn!(pipeline = %self.config.name, error = %reason, records = inputs.len(),
                    "plugin failed on a batch; isolating the record that breaks it");
                self.renew()?;
                let mut all = Outcome {
                    outputs: Vec::new(),
                    failures: Vec::new(),
                };
                for (i, input) in inputs.iter().enumerate() {
                    match self.call(source, std::slice::from_ref(input)) {
                        Ok(one) => {
                            all.outputs.extend(one.outputs.into_iter().map(|mut o| {
                                o.0 = i;
                                o
                            }));
                            all.failures
                                .extend(one.failures.into_iter().map(|(_, r)| (i, r)));
                        }
                        Err(reason) => {
                            all.failures.push((i, reason));
                            self.renew()?;
                        }
                    }
                }
                Ok(all)
            }
        }
    }

    /// One call, its result checked: `Err` means the instance is gone (trap) or the
    /// result was unusable as a whole (too large).
    fn call(&mut self, source: &Source, inputs: &[InputRecord]) -> Result<Outcome, String> {
        let started = Instant::now();
        let result = self.instance.process(source, inputs);
        self.metrics
            .call_seconds
            .get_or_create(&self.labels)
            .observe(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(r) => r,
            Err(PluginError::Trap(reason)) => {
                self.metrics.traps.get_or_create(&self.labels).inc();
                return Err(reason);
            }
            Err(e) => return Err(e.to_string()),
        };
        let size: usize = result
            .outputs
            .iter()
            .map(|o| o.value.as_ref().map_or(0, Vec::len) + o.key.as_ref().map_or(0, Vec::len))
            .sum();
        if size > MAX_OUTPUT_BYTES {
            self.renew()?;
            return Err(format!(
                "outputs of {size} bytes exceed the limit of {MAX_OUTPUT_BYTES}"
            ));
        }
        let mut outcome = Outcome {
            outputs: Vec::new(),
            failures: Vec::new(),
        };
        for f in result.failures {
            if (f.input as usize) < inputs.len() {
                outcome.failures.push((f.input as usize, f.reason));
            }
        }
        for o in result.outputs {
            let input = o.input as usize;
            if input >= inputs.len() {
                return Err(format!(
                    "an output names input {input} of a batch of {}",
                    inputs.len()
                ));
            }
            match self.config.outputs.get(&o.target) {
                Some(topic) => outcome.outputs.push((
                    input,
                    topic.clone(),
                    o.key.map(Bytes::from),
                    o.value.map(Bytes::from),
                    o.headers
                        .into_iter()
                        .map(|h| (h.key, Bytes::from(h.value)))
                        .collect(),
                )),
                None => outcome.failures.push((
                    input,
                    format!(
                        "the plugin named output {:?}, which this pipeline does not have",
                        o.target
                    ),
                )),
            }
        }
        // An input that failed emits nothing: all of its outputs or none.
        let failed: std::collections::HashSet<usize> =
            outcome.failures.iter().map(|(i, _)| *i).collect();
        outcome.outputs.retain(|o| !failed.contains(&o.0));
        Ok(outcome)
    }

    /// Throws the instance away and makes a fresh one.
    fn renew(&mut self) -> Result<(), String> {
        self.instance = self
            .host
            .instantiate(&self.module, self.limits, &self.config.name, &self.params)
            .map_err(|e| format!("cannot make a fresh instance: {e}"))?;
        Ok(())
    }

    /// The appends (outputs, dead letters) and the cursor, for one atomic write, and
    /// what they hold.
    fn ops(
        &self,
        inputs: &[InputRecord],
        outcome: Outcome,
        topic: &str,
        partition: u32,
        end: u64,
    ) -> Result<(Vec<WriteOp>, Tally), String> {
        let now = now_ms();
        let mut per_partition: BTreeMap<(String, u32), Vec<NewRecord>> = BTreeMap::new();
        let mut emitted = std::collections::HashSet::new();
        let out = outcome.outputs.len();
        for (input, target, key, value, headers) in outcome.outputs {
            emitted.insert(input);
            let partitions = self.log.topic(&target).map_or(1, |t| t.partitions);
            let p = match &key {
                Some(k) => partition_for_key(k, partitions),
                None => partition % partitions,
            };
            per_partition
                .entry((target, p))
                .or_default()
                .push(NewRecord {
                    key,
                    value,
                    timestamp_ms: inputs[input].timestamp_ms.max(0).min(now),
                    headers,
                });
        }
        let failed = outcome.failures.len();
        let dlq_partitions = self
            .log
            .topic(&self.dead_letter)
            .map_or(1, |t| t.partitions);
        for (input, reason) in outcome.failures {
            emitted.insert(input);
            let r = &inputs[input];
            let mut headers: Vec<(String, Bytes)> = r
                .headers
                .iter()
                .map(|h| (h.key.clone(), Bytes::from(h.value.clone())))
                .collect();
            headers.push(("weir.error".into(), Bytes::from(reason)));
            headers.push((
                "weir.pipeline".into(),
                Bytes::from(self.config.name.clone()),
            ));
            headers.push((
                "weir.source".into(),
                Bytes::from(format!("{topic}/{partition}/{}", r.offset)),
            ));
            per_partition
                .entry((self.dead_letter.clone(), partition % dlq_partitions))
                .or_default()
                .push(NewRecord {
                    key: r.key.clone().map(Bytes::from),
                    value: r.value.clone().map(Bytes::from),
                    timestamp_ms: now,
                    headers,
                });
        }
        let tally = Tally {
            out,
            failed,
            dropped: inputs.len() - emitted.len(),
        };
        let mut ops = Vec::new();
        for ((target, p), records) in per_partition {
            ops.push(WriteOp::AppendRecords {
                topic: target.clone(),
                partition: p,
                records,
            });
        }
        let key = cursor_key(&self.config.name, topic, partition);
        ops.push(put_state_op(NS_CURSOR, &key, &end));
        Ok((ops, tally))
    }
}

/// How many outputs, dead letters and dropped inputs one batch's write holds.
struct Tally {
    out: usize,
    failed: usize,
    dropped: usize,
}

fn cursor_key(pipeline: &str, topic: &str, partition: u32) -> String {
    format!("{pipeline}/{topic}/{partition}")
}
