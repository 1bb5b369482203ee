//! A pipeline's thread: reads its sources from the cursors, calls the plugin, and
//! commits outputs, dead letters and cursors in one write per batch.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::metrics::{Labels, PipelineMetrics};
use super::{
    Control, CursorError, NS_CURSOR, PipelineConfig, PipelineContext, PluginRef, Position,
    RunState, SharedStatus, cursor_key, initial_cursors, source_partitions,
};
use crate::backoff::Backoff;
use crate::plugins::host::{
    Header, InputRecord, Instance, Limits, Module, PluginError, PluginHost, Source,
};
use crate::plugins::outcome::{NoSuchInput, PerInput, isolating, per_input};
use crate::plugins::registry::{PluginRegistry, RegistryError};
use crate::storage::{
    Appends, Log, ReadError, StorageError, WriteError, WriteOp, decode_stored, now_ms, put_state_op,
};
use weir_wire::partition::partition_for_key;
use weir_wire::record_batch::build::NewRecord;

/// Bytes of output one call may return: more is treated as a runaway plugin.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;
/// Bytes read from a source partition at a time (at least one whole batch).
const SOURCE_READ_BYTES: usize = 1024 * 1024;

/// Why a pipeline stopped for good (its status shows the text).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error("cannot store the start cursors: {0}")]
    StartCursors(WriteError),
    #[error("no cursor for {topic}/{partition}")]
    NoCursor { topic: String, partition: u32 },
    #[error("pipeline source: {0}")]
    Read(#[from] ReadError),
    #[error("pipeline state: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot make a fresh instance: {0}")]
    Renew(PluginError),
}

/// Why one plugin call's result is unusable as a whole; the text goes to the dead
/// letter of the record that caused it.
#[derive(Debug, thiserror::Error)]
enum CallFailure {
    /// Trapped, out of time or of memory: the instance is gone.
    #[error("{0}")]
    Trap(String),
    #[error(transparent)]
    Plugin(PluginError),
    #[error("outputs of {0} bytes exceed the limit of {MAX_OUTPUT_BYTES}")]
    TooLarge(usize),
    #[error(transparent)]
    NoSuchInput(#[from] NoSuchInput),
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

pub(super) struct Runner {
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
    /// The wait before a batch whose write failed runs again.
    write_backoff: Backoff,
}

impl Runner {
    pub(super) fn new(
        config: PipelineConfig,
        context: PipelineContext,
        control: watch::Receiver<Control>,
        status: SharedStatus,
    ) -> Result<Self, RunError> {
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
                let wasm = std::fs::read(&path).map_err(|source| RunError::File {
                    path: path.clone(),
                    source,
                })?;
                (host.load(&wasm)?, Loaded::File, None)
            }
            PluginRef::Deployed(name) => {
                let changes = registry.subscribe();
                let seen = *changes.borrow();
                let (deployed, module) = registry.load(&name)?;
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
        let instance = host.instantiate(&module, limits, &config.name, &params)?;
        let cursors = initial_cursors(&log, &config)?;
        if !cursors.is_empty() {
            runtime
                .block_on(log.write(cursors))
                .map_err(RunError::StartCursors)?;
        }
        let mut sources = Vec::new();
        for (topic, partition) in source_partitions(&log, &config)? {
            let changes = log.watch(&topic, partition)?;
            let key = cursor_key(&config.name, &topic, partition);
            let Some(next) = log.get_state::<u64>(NS_CURSOR, &key)? else {
                return Err(RunError::NoCursor { topic, partition });
            };
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
            let mut s = status.lock();
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
            write_backoff: Backoff::new(),
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

    pub(super) fn run(&mut self) -> Result<(), RunError> {
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
        let mut s = self.status.lock();
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
        self.status.lock().positions = positions;
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
                let mut s = self.status.lock();
                s.plugin_hash = self.module.hash.clone();
                s.plugin_version = Some(deployed.version);
                s.error = None;
            }
            Err(e) => {
                let reason = format!("plugin {name} version {} not taken: {e}", deployed.version);
                error!(pipeline = %self.config.name, "{reason}");
                self.status.lock().error = Some(reason);
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
    fn step(&mut self, i: usize) -> Result<bool, RunError> {
        let (topic, partition, next) = {
            let s = &mut self.sources[i];
            // Appends after this point wake the next `wait`.
            s.changes.borrow_and_update();
            (s.topic.clone(), s.partition, s.next)
        };
        // As a read_committed consumer: open and aborted transactions are not input.
        let mut read = match self
            .log
            .read_committed(&topic, partition, next, SOURCE_READ_BYTES)
        {
            Ok(r) => r,
            Err(ReadError::OffsetOutOfRange { offsets, .. }) => {
                warn!(pipeline = %self.config.name, topic, partition, lost_from = next, lost_to = offsets.log_start,
                    "source records deleted by retention before the pipeline read them");
                self.sources[i].next = offsets.log_start.max(next.min(offsets.high_watermark));
                return Ok(true);
            }
            Err(e) => return Err(e.into()),
        };
        let mut inputs = Vec::new();
        let mut end = next;
        let batches = std::mem::take(&mut read.read.batches);
        'batches: for stored in batches {
            let batch_end = stored.base_offset() as u64 + stored.last_offset_delta() as u64 + 1;
            if !read.is_data(&stored) {
                end = end.max(batch_end);
                continue;
            }
            let records = decode_stored(stored, &topic, partition)?;
            for r in records {
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
        let (ops, tally) = self.ops(&inputs, outcome, &topic, partition, end);
        if let Err(e) = self.runtime.block_on(self.log.write(ops)) {
            // Not committed: the cursor stays, the batch runs again.
            let wait = self.write_backoff.after(false);
            warn!(pipeline = %self.config.name, error = %e, backoff_ms = wait.as_millis() as u64,
                "pipeline outputs not stored; retrying");
            let mut stop = self.stop.clone();
            self.runtime.block_on(async {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
            return Ok(true);
        }
        self.write_backoff.reset();
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

    /// Calls the plugin on the batch; after a failure, record by record on fresh
    /// instances.
    fn process(&mut self, source: &Source, inputs: &[InputRecord]) -> Result<PerInput, RunError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let name = self.config.name.clone();
        let call = |runner: &mut Self, inputs: &[InputRecord]| runner.call(source, inputs);
        isolating(&name, self, inputs, call, Self::renew)
    }

    /// One call, its result checked: `Err` means the instance is gone (trap) or the
    /// result was unusable as a whole; the caller makes a fresh instance.
    fn call(&mut self, source: &Source, inputs: &[InputRecord]) -> Result<PerInput, CallFailure> {
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
                return Err(CallFailure::Trap(reason));
            }
            Err(e) => return Err(CallFailure::Plugin(e)),
        };
        let size: usize = result
            .outputs
            .iter()
            .map(|o| o.value.as_ref().map_or(0, Vec::len) + o.key.as_ref().map_or(0, Vec::len))
            .sum();
        if size > MAX_OUTPUT_BYTES {
            return Err(CallFailure::TooLarge(size));
        }
        let mut per_input = per_input(result, inputs.len())?;
        // An output to a name the pipeline lacks fails its input, with all its outputs.
        for result in &mut per_input {
            let unknown = result.as_ref().ok().and_then(|outputs| {
                outputs
                    .iter()
                    .find(|o| !self.config.outputs.contains_key(&o.target))
            });
            if let Some(o) = unknown {
                *result = Err(format!(
                    "the plugin named output {:?}, which this pipeline does not have",
                    o.target
                ));
            }
        }
        Ok(per_input)
    }

    /// Throws the instance away and makes a fresh one.
    fn renew(&mut self) -> Result<(), RunError> {
        self.instance = self
            .host
            .instantiate(&self.module, self.limits, &self.config.name, &self.params)
            .map_err(RunError::Renew)?;
        Ok(())
    }

    /// The appends (outputs, dead letters) and the cursor, for one atomic write, and
    /// what they hold.
    fn ops(
        &self,
        inputs: &[InputRecord],
        outcome: PerInput,
        topic: &str,
        partition: u32,
        end: u64,
    ) -> (Vec<WriteOp>, Tally) {
        let now = now_ms();
        let mut appends = Appends::default();
        let dlq_partitions = self
            .log
            .topic(&self.dead_letter)
            .map_or(1, |t| t.partitions);
        let mut tally = Tally {
            out: 0,
            failed: 0,
            dropped: 0,
        };
        for (r, result) in inputs.iter().zip(outcome) {
            match result {
                Ok(outputs) if outputs.is_empty() => tally.dropped += 1,
                Ok(outputs) => {
                    tally.out += outputs.len();
                    for o in outputs {
                        // `call` failed the inputs whose outputs name an unknown output.
                        let Some(target) = self.config.outputs.get(&o.target) else {
                            continue;
                        };
                        let partitions = self.log.topic(target).map_or(1, |t| t.partitions);
                        let p = match &o.key {
                            Some(k) => partition_for_key(k, partitions),
                            None => partition % partitions,
                        };
                        appends.add(
                            target,
                            p,
                            NewRecord {
                                key: o.key.map(Bytes::from),
                                value: o.value.map(Bytes::from),
                                timestamp_ms: r.timestamp_ms.max(0).min(now),
                                headers: o
                                    .headers
                                    .into_iter()
                                    .map(|h| (h.key, Bytes::from(h.value)))
                                    .collect(),
                            },
                        );
                    }
                }
                Err(reason) => {
                    tally.failed += 1;
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
                    appends.add(
                        &self.dead_letter,
                        partition % dlq_partitions,
                        NewRecord {
                            key: r.key.clone().map(Bytes::from),
                            value: r.value.clone().map(Bytes::from),
                            timestamp_ms: now,
                            headers,
                        },
                    );
                }
            }
        }
        let mut ops: Vec<WriteOp> = appends.into_ops().collect();
        let key = cursor_key(&self.config.name, topic, partition);
        ops.push(put_state_op(NS_CURSOR, &key, &end));
        (ops, tally)
    }
}

/// How many outputs, dead letters and dropped inputs one batch's write holds.
struct Tally {
    out: usize,
    failed: usize,
    dropped: usize,
}
