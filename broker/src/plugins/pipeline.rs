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

use std::collections::BTreeMap;
use std::path::PathBuf;
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
use crate::record_batch::RecordBatch;
use crate::record_batch::build::{NewRecord, batch};
use crate::shell::partition_for_key;
use crate::storage::{Log, ReadError, WriteOp, now_ms, state_op};

const NS_CURSOR: &str = "pipeline.cursor";
/// Bytes of output one call may return per input byte, beyond a floor: more is
/// treated as a runaway plugin.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

/// A `[[plugins.pipeline]]` of the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    /// Path of the component (`.wasm`).
    pub plugin: PathBuf,
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
    /// Where a new pipeline starts: `earliest`, `latest`, or an offset.
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

impl PipelineConfig {
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}-dlq", self.name))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains(['/', ' ']) {
            return Err(format!(
                "pipeline name {:?} is empty or has '/' or ' '",
                self.name
            ));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(format!("pipeline {}: needs inputs and outputs", self.name));
        }
        match self.start.as_str() {
            "earliest" | "latest" => {}
            s if s.parse::<u64>().is_ok() => {}
            s => {
                return Err(format!(
                    "pipeline {}: start {s:?} is not earliest, latest or an offset",
                    self.name
                ));
            }
        }
        for topic in self
            .inputs
            .iter()
            .chain(self.outputs.values())
            .chain([&self.dead_letter_topic()])
        {
            crate::storage::TopicName::new(topic.clone())
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
    pub host: PluginHost,
    pub defaults: PipelineDefaults,
    pub metrics: PipelineMetrics,
    /// The broker's runtime: the pipeline's thread blocks on it for writes and waits.
    pub runtime: Handle,
    pub stop: watch::Receiver<bool>,
}

/// Runs one pipeline until `stop`; returns when it stopped or failed for good.
pub fn run(config: PipelineConfig, context: PipelineContext) {
    let name = config.name.clone();
    if let Err(e) = Runner::new(config, context).and_then(|mut r| r.run()) {
        error!(pipeline = %name, error = %e, "pipeline stopped");
    }
}

struct Partition {
    topic: String,
    partition: u32,
    next: u64,
    changes: watch::Receiver<crate::storage::PartitionOffsets>,
}

struct Runner {
    log: Log,
    host: PluginHost,
    module: Module,
    instance: Instance,
    config: PipelineConfig,
    limits: Limits,
    params: Vec<(String, String)>,
    batch_size: usize,
    labels: Vec<(String, String)>,
    metrics: PipelineMetrics,
    runtime: Handle,
    stop: watch::Receiver<bool>,
    sources: Vec<Partition>,
    dead_letter: String,
}

/// What a batch became.
struct Outcome {
    outputs: Vec<Emitted>,
    failures: Vec<(usize, String)>,
}

impl Runner {
    fn new(config: PipelineConfig, context: PipelineContext) -> Result<Self, String> {
        let PipelineContext {
            log,
            host,
            defaults,
            metrics,
            runtime,
            stop,
        } = context;
        let wasm = std::fs::read(&config.plugin)
            .map_err(|e| format!("cannot read {}: {e}", config.plugin.display()))?;
        let module = host.load(&wasm).map_err(|e| e.to_string())?;
        let limits = Limits {
            memory_bytes: config.memory_mb.unwrap_or(defaults.memory_mb) * 1024 * 1024,
            call_timeout: Duration::from_millis(
                config.call_timeout_ms.unwrap_or(defaults.call_timeout_ms),
            ),
        };
        let params: Vec<(String, String)> = config
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let instance = host
            .instantiate(&module, limits, &config.name, &params)
            .map_err(|e| e.to_string())?;
        let mut sources = Vec::new();
        for topic in &config.inputs {
            let info = log
                .topic(topic)
                .ok_or_else(|| format!("input topic {topic} does not exist"))?;
            for partition in 0..info.partitions {
                let changes = log.watch(topic, partition).map_err(|e| e.to_string())?;
                let key = cursor_key(&config.name, topic, partition);
                let next = match log
                    .get_state::<u64>(NS_CURSOR, &key)
                    .map_err(|e| e.to_string())?
                {
                    Some(offset) => offset,
                    None => {
                        let offsets = *changes.borrow();
                        match config.start.as_str() {
                            "latest" => offsets.high_watermark,
                            "earliest" => offsets.log_start,
                            n => n
                                .parse::<u64>()
                                .unwrap_or(0)
                                .clamp(offsets.log_start, offsets.high_watermark),
                        }
                    }
                };
                sources.push(Partition {
                    topic: topic.clone(),
                    partition,
                    next,
                    changes,
                });
            }
        }
        info!(pipeline = %config.name, plugin = %config.plugin.display(), hash = &module.hash[..12],
            sources = sources.len(), "pipeline started");
        Ok(Self {
            labels: vec![("pipeline".to_string(), config.name.clone())],
            dead_letter: config.dead_letter_topic(),
            batch_size: config.batch_size.unwrap_or(defaults.batch_size).max(1),
            log,
            host,
            module,
            instance,
            config,
            limits,
            params,
            metrics,
            runtime,
            stop,
            sources,
        })
    }

    fn run(&mut self) -> Result<(), String> {
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
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
            if !progressed {
                self.wait();
            }
        }
    }

    /// Waits until a source has new records, the broker stops, or a second passed.
    fn wait(&mut self) {
        let mut waits: Vec<_> = self
            .sources
            .iter()
            .map(|s| {
                let mut rx = s.changes.clone();
                Box::pin(async move {
                    let _ = rx.changed().await;
                })
            })
            .collect();
        let mut stop = self.stop.clone();
        self.runtime.block_on(async move {
            tokio::select! {
                _ = futures::future::select_all(waits.iter_mut()) => {}
                _ = stop.wait_for(|s| *s) => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        });
    }

    /// Processes one batch of source `i`; false when it had nothing new.
    fn step(&mut self, i: usize) -> Result<bool, String> {
        let (topic, partition, next) = {
            let s = &self.sources[i];
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
        let ops = self.ops(&inputs, outcome, &topic, partition, end)?;
        if let Err(e) = self.runtime.block_on(self.log.write(ops)) {
            // Not committed: the cursor stays, the batch runs again.
            warn!(pipeline = %self.config.name, error = %e, "pipeline outputs not stored; retrying");
            std::thread::sleep(Duration::from_secs(1));
            return Ok(true);
        }
        self.sources[i].next = end;
        Ok(true)
    }

    /// Calls the plugin on the batch; after a trap, record by record on fresh instances.
    fn process(&mut self, source: &Source, inputs: &[InputRecord]) -> Result<Outcome, String> {
        self.metrics
            .records_in
            .get_or_create(&self.labels)
            .inc_by(inputs.len() as u64);
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

    /// The appends (outputs, dead letters) and the cursor, for one atomic write.
    fn ops(
        &self,
        inputs: &[InputRecord],
        outcome: Outcome,
        topic: &str,
        partition: u32,
        end: u64,
    ) -> Result<Vec<WriteOp>, String> {
        let now = now_ms();
        let mut per_partition: BTreeMap<(String, u32), Vec<NewRecord>> = BTreeMap::new();
        let mut emitted = std::collections::HashSet::new();
        let out_count = outcome.outputs.len() as u64;
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
        let failed_count = outcome.failures.len() as u64;
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
        let dropped = inputs.len() - emitted.len();
        self.metrics
            .records_out
            .get_or_create(&self.labels)
            .inc_by(out_count);
        self.metrics
            .failed
            .get_or_create(&self.labels)
            .inc_by(failed_count);
        self.metrics
            .dropped
            .get_or_create(&self.labels)
            .inc_by(dropped as u64);
        let mut ops = Vec::new();
        for ((target, p), records) in per_partition {
            // Batches of at most 1,000 records, well under the default max.message.bytes.
            for chunk in records.chunks(1000) {
                let bytes = batch(chunk, kafka_protocol::records::Compression::None)
                    .map_err(|e| e.to_string())?;
                ops.push(WriteOp::Append {
                    topic: target.clone(),
                    partition: p,
                    batches: vec![RecordBatch::parse(bytes).map_err(|e| e.to_string())?],
                });
            }
        }
        let key = cursor_key(&self.config.name, topic, partition);
        ops.push(state_op(
            NS_CURSOR,
            &key,
            Some(postcard::to_stdvec(&end).map_err(|e| e.to_string())?),
        ));
        Ok(ops)
    }
}

fn cursor_key(pipeline: &str, topic: &str, partition: u32) -> String {
    format!("{pipeline}/{topic}/{partition}")
}
