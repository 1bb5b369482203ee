//! The WebAssembly host: one `wasmtime` engine, components compiled once and cached
//! on disk, and instances with a memory limit and a time limit per call.
//!
//! This is the only module that knows wasmtime. A plugin gets the `weir:plugin/host`
//! import (logging) and WASI 0.2 with nothing granted: no preopened directories, no
//! sockets, no environment, no arguments (components from Python and JavaScript
//! toolchains import WASI even when they use none of it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, error, info, trace, warn};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use weir_wire::packed;

mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wasm-sdk/wit",
    });
}

/// World `packed-plugin`: the same contract, batches packed in one buffer each way.
mod packed_bindings {
    wasmtime::component::bindgen!({
        world: "packed-plugin",
        path: "../wasm-sdk/wit",
        with: {
            "weir:plugin/types": super::bindings::weir::plugin::types,
            "weir:plugin/host": super::bindings::weir::plugin::host,
        },
    });
}

pub use bindings::weir::plugin::types::{
    BatchResult, Failure, Header, InputRecord, Level, OutputRecord, Source,
};

/// How often the epoch advances; call time limits are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Address space reserved for each linear memory when the process's address space is
/// small: limited (`ulimit -v`), or a kernel with 39-bit virtual addresses (512 GiB,
/// as some Raspberry Pi kernels). wasmtime's default (4 GiB plus guards, so that no
/// bounds check is needed) is more than a limit of 1 GiB allows, and a few hundred
/// instances exhaust 512 GiB (wasmtime #8607); a plugin's
/// memory is limited to `[plugins] memory_mb` (16 MiB by default) anyway. Beyond this
/// a memory is moved as it grows. The explicit bounds checks this needs cost
/// json-filter about a fifth of its speed (BENCHMARKS.md), so without a limit the
/// default stays.
const MEMORY_RESERVATION: u64 = 32 << 20;
/// Extra room reserved when a memory is moved, so that the next growth need not move it.
const MEMORY_RESERVATION_FOR_GROWTH: u64 = 16 << 20;
/// Guard pages after (and before) each memory: accesses at small constant offsets need
/// no bounds check of their own.
const MEMORY_GUARD: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot compile the component: {0}")]
    Compile(String),
    #[error("cannot instantiate the component: {0}")]
    Instantiate(String),
    #[error("init refused the params: {0}")]
    Init(String),
    /// The call trapped, ran out of time or memory: the instance is unusable.
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin cache: {0}")]
    Cache(String),
}

/// Limits of one instance.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory_bytes: usize,
    pub call_timeout: Duration,
}

/// The engine and linker every plugin shares. Cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<State>>,
    cache_dir: PathBuf,
    ticker: Arc<Ticker>,
}

struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a store holds: the WASI context (empty), limits, and whose logs these are.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    pipeline: String,
}

/// wasmtime's `StoreLimits`, noting when it refused to grow a memory: a call that
/// then fails ran out of memory, whatever wasmtime's message says.
struct Limiter {
    limits: StoreLimits,
    refused_memory: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.refused_memory = true;
        }
        allowed
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::weir::plugin::types::Host for State {}

impl bindings::weir::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let pipeline = self.pipeline.as_str();
        match level {
            Level::Trace => trace!(pipeline, "plugin: {message}"),
            Level::Debug => debug!(pipeline, "plugin: {message}"),
            Level::Info => info!(pipeline, "plugin: {message}"),
            Level::Warn => warn!(pipeline, "plugin: {message}"),
            Level::Error => error!(pipeline, "plugin: {message}"),
        }
    }
}

/// Whether this process's address space is too small for wasmtime's default
/// reservations: a `ulimit -v`, or a top of the stack (the top of the user address
/// space on Linux) below 4 TiB, i.e. fewer than 42 bits of virtual address.
fn small_address_space() -> bool {
    let limited = rustix::process::getrlimit(rustix::process::Resource::As)
        .current
        .is_some();
    let top = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| top_of_stack(&maps));
    let small = limited || top.is_some_and(|top| top < 1 << 42);
    if small {
        info!(
            limited,
            top_of_stack = format!("{:#x}", top.unwrap_or_default()),
            "small address space: plugin memories reserve {} MiB each",
            MEMORY_RESERVATION >> 20
        );
    }
    small
}

/// The end address of the `[stack]` mapping in a `/proc/PID/maps` text.
fn top_of_stack(maps: &str) -> Option<u64> {
    let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
    let range = line.split_whitespace().next()?;
    let (_, end) = range.split_once('-')?;
    u64::from_str_radix(end, 16).ok()
}

/// A compiled component, ready to instantiate.
#[derive(Clone)]
pub struct Module {
    component: Component,
    /// SHA-256 of the component bytes, hex.
    pub hash: String,
}

impl PluginHost {
    /// An engine with epoch interruption, a linker with WASI (nothing granted) and
    /// the host interface, and a thread that advances the epoch every 10 ms.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        if small_address_space() {
            config.memory_reservation(MEMORY_RESERVATION);
            config.memory_reservation_for_growth(MEMORY_RESERVATION_FOR_GROWTH);
            config.memory_guard_size(MEMORY_GUARD);
        }
        if std::env::var_os("WEIR_PLUGIN_PERFMAP").is_some() {
            // `perf record` then names plugin functions (/tmp/perf-PID.map).
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| PluginError::Compile(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        }
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cache_dir: cache_dir.into(),
            ticker: Arc::new(Ticker(stop)),
        })
    }

    /// Compiles `wasm` (a component), or loads it from the cache: compiled code is
    /// kept in `cache_dir` under the content hash and the engine's compatibility
    /// hash (wasmtime version and settings), so an upgrade never loads stale code.
    pub fn load(&self, wasm: &[u8]) -> Result<Module, PluginError> {
        let hash = hex(&Sha256::digest(wasm));
        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.engine.precompile_compatibility_hash().hash(&mut h);
            h.finish()
        };
        let path = self
            .cache_dir
            .join(format!("{hash}-{engine_hash:016x}.cwasm"));
        if path.exists() {
            match load_cached(&self.engine, &path) {
                Ok(component) => return Ok(Module { component, hash }),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "plugin cache entry unusable; compiling again")
                }
            }
        }
        let started = Instant::now();
        let component = Component::new(&self.engine, wasm)
            .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        info!(
            hash = &hash[..12],
            ms = started.elapsed().as_millis() as u64,
            "plugin compiled"
        );
        let bytes = component
            .serialize()
            .map_err(|e| PluginError::Cache(e.to_string()))?;
        std::fs::create_dir_all(&self.cache_dir).map_err(|e| PluginError::Cache(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| PluginError::Cache(e.to_string()))?;
        Ok(Module { component, hash })
    }

    /// Checks that `module` is a Weir plugin this host can run: its imports are ones
    /// the host offers and it exports `init` and `process` (world `plugin`) or
    /// `process-packed` (world `packed-plugin`) with the contract's types. Runs none
    /// of its code.
    pub fn check(&self, module: &Module) -> Result<(), PluginError> {
        self.pre(module).map(drop)
    }

    fn pre(&self, module: &Module) -> Result<Pre, PluginError> {
        let pre = self
            .linker
            .instantiate_pre(&module.component)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        if let Ok(packed) = packed_bindings::PackedPluginPre::new(pre.clone()) {
            return Ok(Pre::Packed(packed));
        }
        bindings::PluginPre::new(pre)
            .map(Pre::Typed)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))
    }

    /// A fresh instance of `module`, initialised with `params`.
    pub fn instantiate(
        &self,
        module: &Module,
        limits: Limits,
        pipeline: &str,
        params: &[(String, String)],
    ) -> Result<Instance, PluginError> {
        let state = State {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            limits: Limiter {
                limits: StoreLimitsBuilder::new()
                    .memory_size(limits.memory_bytes)
                    .instances(64)
                    .tables(64)
                    .memories(16)
                    .trap_on_grow_failure(true)
                    .build(),
                refused_memory: false,
            },
            pipeline: pipeline.to_string(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let ticks = ticks(limits.call_timeout);
        store.set_epoch_deadline(ticks);
        let instantiated = match self.pre(module)? {
            Pre::Typed(pre) => pre.instantiate(&mut store).map(Exports::Typed),
            Pre::Packed(pre) => pre.instantiate(&mut store).map(Exports::Packed),
        };
        let plugin = instantiated.map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        store.set_epoch_deadline(ticks);
        let init = match &plugin {
            Exports::Typed(p) => p.call_init(&mut store, params),
            Exports::Packed(p) => p.call_init(&mut store, params),
        };
        match init {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(PluginError::Init(message)),
            Err(trap) => return Err(trapped(&trap, limits, &store)),
        }
        let _ = &self.ticker;
        Ok(Instance {
            store,
            plugin,
            ticks,
            limits,
            packed: Vec::new(),
        })
    }
}

/// A component checked against one of the two worlds.
enum Pre {
    Typed(bindings::PluginPre<State>),
    Packed(packed_bindings::PackedPluginPre<State>),
}

enum Exports {
    Typed(bindings::Plugin),
    Packed(packed_bindings::PackedPlugin),
}

/// A live plugin instance. After a `Trap` error it must be dropped.
pub struct Instance {
    store: Store<State>,
    plugin: Exports,
    ticks: u64,
    limits: Limits,
    /// The buffer a packed batch is written to, kept for the next call.
    packed: Vec<u8>,
}

impl Instance {
    pub fn process(
        &mut self,
        source: &Source,
        records: &[InputRecord],
    ) -> Result<BatchResult, PluginError> {
        self.store.set_epoch_deadline(self.ticks);
        let plugin = match &self.plugin {
            Exports::Typed(plugin) => {
                let result = plugin.call_process(&mut self.store, source, records);
                return result.map_err(|trap| trapped(&trap, self.limits, &self.store));
            }
            Exports::Packed(plugin) => plugin,
        };
        let mut batch = packed::Writer::new(std::mem::take(&mut self.packed));
        for r in records {
            let headers = r
                .headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_slice()));
            let body = packed::Body {
                key: r.key.as_deref(),
                value: r.value.as_deref(),
                headers: packed::RawHeaders::default(),
            };
            batch.input(r.offset, r.timestamp_ms, body, headers);
        }
        let batch = batch.finish();
        let result = plugin.call_process_packed(&mut self.store, source, &batch);
        self.packed = batch;
        let result = result.map_err(|trap| trapped(&trap, self.limits, &self.store))?;
        let outputs = unpack_outputs(&result.outputs)
            .map_err(|e| PluginError::Trap(format!("the plugin returned a {e}")))?;
        Ok(BatchResult {
            outputs,
            failures: result.failures,
        })
    }
}

/// The outputs of a packed result, checked: they come from the plugin.
fn unpack_outputs(buf: &[u8]) -> Result<Vec<OutputRecord>, packed::Malformed> {
    let mut reader = packed::Reader::new(buf);
    let count = reader.count()?;
    // Each output takes at least 28 bytes, so `count` cannot ask for more than the
    // buffer's worth of room.
    let mut outputs = Vec::with_capacity((count as usize).min(buf.len() / 28));
    for _ in 0..count {
        let (input, target, body) = reader.output()?;
        let headers = body
            .headers
            .iter()
            .map(|h| {
                h.map(|(key, value)| Header {
                    key: key.to_string(),
                    value: value.to_vec(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        outputs.push(OutputRecord {
            input,
            target: target.to_string(),
            key: body.key.map(<[u8]>::to_vec),
            value: body.value.map(<[u8]>::to_vec),
            headers,
        });
    }
    if !reader.is_empty() {
        return Err(packed::Malformed("bytes after the last output"));
    }
    Ok(outputs)
}

/// The reason a call failed, in the words a plugin author needs: the trap itself,
/// not wasmtime's backtrace of unnamed functions.
fn trapped(error: &wasmtime::Error, limits: Limits, store: &Store<State>) -> PluginError {
    let reason = match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => format!(
            "the call ran longer than its limit of {} ms",
            limits.call_timeout.as_millis()
        ),
        Some(trap) => format!("trap: {trap}"),
        None if store.data().limits.refused_memory => format!(
            "memory limit of {} MiB reached ({})",
            limits.memory_bytes >> 20,
            error.root_cause()
        ),
        None => error.root_cause().to_string(),
    };
    PluginError::Trap(reason)
}

fn ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

/// Loads a compiled component written by `PluginHost::load`.
#[allow(unsafe_code)]
fn load_cached(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: wasmtime runs precompiled code without validating it. The file is one
    // this process (or an earlier one) wrote with `Component::serialize` into the
    // broker's own data directory, named by the hash of the source component and of
    // the engine's settings; wasmtime checks the version and settings again.
    unsafe { Component::deserialize_file(engine, path) }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_of_the_stack_tells_the_address_space_size() {
        let x86_64 =
            "7ffd1c5e2000-7ffd1c603000 rw-p 00000000 00:00 0                          [stack]";
        let va39 = "55a0000000-55a0021000 r-xp 00000000 b3:02 1234  /usr/bin/weir\n\
                    7fd7e1c000-7fd7e3d000 rw-p 00000000 00:00 0      [stack]";
        assert_eq!(top_of_stack(x86_64), Some(0x7ffd1c603000));
        assert_eq!(top_of_stack(va39), Some(0x7fd7e3d000));
        assert!(top_of_stack(x86_64).unwrap() >= 1 << 42);
        assert!(top_of_stack(va39).unwrap() < 1 << 42);
        assert_eq!(top_of_stack("no stack here"), None);
        let ours = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(top_of_stack(&ours).is_some());
    }

    fn output(input: u32, target: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Vec<u8> {
        let mut w = packed::Writer::default();
        let body = packed::Body {
            key,
            value,
            headers: packed::RawHeaders::default(),
        };
        let headers = [("h", &b"1"[..]), ("h", &b""[..])];
        w.output(input, target, body, headers.iter().copied());
        w.finish()
    }

    #[test]
    fn packed_outputs_round_trip() {
        let buf = output(3, "alarms", None, Some(b"hot"));
        let outputs = unpack_outputs(&buf).unwrap();
        assert_eq!(outputs.len(), 1);
        let o = &outputs[0];
        assert_eq!((o.input, o.target.as_str()), (3, "alarms"));
        assert_eq!(
            (o.key.as_deref(), o.value.as_deref()),
            (None, Some(&b"hot"[..]))
        );
        let headers: Vec<_> = o
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_slice()))
            .collect();
        assert_eq!(headers, [("h", &b"1"[..]), ("h", &b""[..])]);
        assert!(
            unpack_outputs(&packed::Writer::default().finish())
                .unwrap()
                .is_empty()
        );
    }

    /// Whatever a plugin returns, unpacking gives outputs or an error, never a panic
    /// or an allocation sized by a count it claims.
    #[test]
    fn malformed_packed_outputs_are_errors() {
        let good = output(0, "out", Some(b"k"), Some(b"v"));
        for cut in 0..good.len() {
            assert!(unpack_outputs(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(unpack_outputs(&trailing).is_err());
        let mut huge_count = good.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_outputs(&huge_count).is_err());
        let mut bad_target = good.clone();
        bad_target[12] = 0xff; // the first byte of "out"
        assert!(unpack_outputs(&bad_target).is_err());
        let mut long_value = good;
        long_value[19..23].copy_from_slice(&1000u32.to_le_bytes()); // value_len
        assert!(unpack_outputs(&long_value).is_err());
    }
}
