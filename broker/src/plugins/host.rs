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
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wasm-sdk/wit",
    });
}

pub use bindings::weir::plugin::types::{
    BatchResult, Failure, Header, InputRecord, Level, OutputRecord, Source,
};

/// How often the epoch advances; call time limits are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

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
    limits: StoreLimits,
    pipeline: String,
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
    /// the host offers and it exports `init` and `process` with the contract's types.
    /// Runs none of its code.
    pub fn check(&self, module: &Module) -> Result<(), PluginError> {
        let pre = self
            .linker
            .instantiate_pre(&module.component)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        bindings::PluginPre::new(pre)
            .map(drop)
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
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(64)
                .tables(64)
                .memories(16)
                .trap_on_grow_failure(true)
                .build(),
            pipeline: pipeline.to_string(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let ticks = ticks(limits.call_timeout);
        store.set_epoch_deadline(ticks);
        let plugin = bindings::Plugin::instantiate(&mut store, &module.component, &self.linker)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        store.set_epoch_deadline(ticks);
        match plugin.call_init(&mut store, params) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(PluginError::Init(message)),
            Err(trap) => return Err(PluginError::Trap(describe(&trap, limits))),
        }
        let _ = &self.ticker;
        Ok(Instance {
            store,
            plugin,
            ticks,
            limits,
        })
    }
}

/// A live plugin instance. After a `Trap` error it must be dropped.
pub struct Instance {
    store: Store<State>,
    plugin: bindings::Plugin,
    ticks: u64,
    limits: Limits,
}

impl Instance {
    pub fn process(
        &mut self,
        source: &Source,
        records: &[InputRecord],
    ) -> Result<BatchResult, PluginError> {
        self.store.set_epoch_deadline(self.ticks);
        self.plugin
            .call_process(&mut self.store, source, records)
            .map_err(|trap| PluginError::Trap(describe(&trap, self.limits)))
    }
}

/// The reason a call failed, in the words a plugin author needs: the trap itself,
/// not wasmtime's backtrace of unnamed functions.
fn describe(error: &wasmtime::Error, limits: Limits) -> String {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => format!(
            "the call ran longer than its limit of {} ms",
            limits.call_timeout.as_millis()
        ),
        Some(trap) => format!("trap: {trap}"),
        None => {
            let root = error.root_cause().to_string();
            if root.contains("growing memory") {
                format!(
                    "memory limit of {} MiB reached ({root})",
                    limits.memory_bytes >> 20
                )
            } else {
                root
            }
        }
    }
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
