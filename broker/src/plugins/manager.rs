//! The owner of a broker's pipelines: those of the config file and those created at
//! runtime through the admin API (`weir pipeline create|pause|resume|delete`), and
//! the deploys of plugins they run.
//!
//! A pipeline created at runtime is kept in the log's state table
//! (`pipeline.def`), committed in the same write as its start cursors, so it comes
//! back after a restart, paused if it was paused, from where it was. Pipelines of
//! the config file are the file's: they cannot be deleted here, and a pause lasts
//! until the broker restarts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::host::Module;
use super::pipeline::{
    self, Control, CursorError, PipelineConfig, PipelineContext, PluginRef, RunState, SharedStatus,
    Status, forget_cursors, initial_cursors,
};
use super::registry::{DeployedPlugin, RegistryError};
use crate::storage::{
    Log, ReadError, StorageError, TopicConfig, TopicError, WriteError, encode_stored, now_ms,
    state_op,
};

const NS_DEFINED: &str = "pipeline.def";

/// Where a pipeline is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `[[plugins.pipeline]]` of the config file.
    Config,
    /// Created through the admin API.
    Api,
}

/// A pipeline created through the API, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Defined {
    config: PipelineConfig,
    paused: bool,
    created_ms: i64,
}

/// A pipeline as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipelineView {
    pub name: String,
    pub origin: Origin,
    pub config: PipelineConfig,
    pub status: Status,
    pub records_in: u64,
    pub records_out: u64,
    pub dropped: u64,
    pub failed: u64,
    /// Records in the sources not processed yet.
    pub lag: u64,
}

/// A deployed plugin and the pipelines that run it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PluginView {
    #[serde(flatten)]
    pub plugin: DeployedPlugin,
    pub used_by: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Creating or checking a pipeline's topics failed.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The log failed to read or commit definitions or cursors.
    #[error("pipeline state: {0}")]
    Storage(#[from] StorageError),
    #[error("pipeline state: {0}")]
    Write(#[from] WriteError),
    #[error("pipeline state: {0}")]
    Read(#[from] ReadError),
    /// The plugin store failed.
    #[error(transparent)]
    Registry(RegistryError),
    /// A pipeline's thread could not start, or blocking work did not finish.
    #[error("{0}")]
    Thread(String),
}

impl ManagerError {
    /// True when the disk (or its quota) is full: the admin API answers 507.
    pub fn is_disk_full(&self) -> bool {
        match self {
            ManagerError::Storage(e)
            | ManagerError::Write(WriteError::Storage(e))
            | ManagerError::Read(ReadError::Storage(e))
            | ManagerError::Topic(TopicError::Storage(e)) => e.is_disk_full(),
            ManagerError::Registry(e) => e.is_disk_full(),
            _ => false,
        }
    }
}

impl From<RegistryError> for ManagerError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidName(_) | RegistryError::Rejected(_) => {
                Self::Invalid(e.to_string())
            }
            RegistryError::NotFound(_) => Self::NotFound(e.to_string()),
            RegistryError::InUse { .. } => Self::Conflict(e.to_string()),
            _ => Self::Registry(e),
        }
    }
}

impl From<CursorError> for ManagerError {
    fn from(e: CursorError) -> Self {
        match e {
            CursorError::Invalid(_) | CursorError::NoInput(_) => Self::Invalid(e.to_string()),
            CursorError::Read(e) => Self::Read(e),
            CursorError::Storage(e) => Self::Storage(e),
        }
    }
}

struct Entry {
    config: PipelineConfig,
    origin: Origin,
    control: watch::Sender<Control>,
    status: SharedStatus,
    thread: Option<JoinHandle<()>>,
}

pub struct Pipelines {
    context: PipelineContext,
    topic_defaults: TopicConfig,
    partitions: u32,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// One change (create, delete, pause, resume, deploy) at a time.
    changing: tokio::sync::Mutex<()>,
}

impl Pipelines {
    /// Starts the pipelines of the config file and those created through the API.
    pub async fn start(
        context: PipelineContext,
        topic_defaults: TopicConfig,
        partitions: u32,
        configured: &[PipelineConfig],
    ) -> anyhow::Result<Arc<Self>> {
        let this = Arc::new(Self {
            context,
            topic_defaults,
            partitions,
            entries: Mutex::new(BTreeMap::new()),
            changing: tokio::sync::Mutex::new(()),
        });
        for config in configured {
            this.ensure_topics(config).await?;
            this.spawn(config.clone(), Origin::Config, false)?;
        }
        let defined: Vec<(String, Defined)> = this.context.log.list_state(NS_DEFINED)?;
        for (name, defined) in defined {
            if configured.iter().any(|c| c.name == name) {
                warn!(pipeline = %name, "a pipeline created through the API has the name of one in the config file; the config file's runs");
                continue;
            }
            this.ensure_topics(&defined.config).await?;
            this.spawn(defined.config, Origin::Api, defined.paused)?;
        }
        Ok(this)
    }

    fn entries(&self) -> parking_lot::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock()
    }

    fn log(&self) -> &Log {
        &self.context.log
    }

    async fn ensure_topics(&self, config: &PipelineConfig) -> Result<(), TopicError> {
        for topic in config.topics() {
            self.log()
                .ensure_topic(&topic, self.partitions, &self.topic_defaults)
                .await?;
        }
        Ok(())
    }

    /// Starts the pipeline's thread and records it.
    fn spawn(&self, config: PipelineConfig, origin: Origin, paused: bool) -> std::io::Result<()> {
        let (control, control_rx) =
            watch::channel(if paused { Control::Pause } else { Control::Run });
        let status = SharedStatus::default();
        let thread = {
            let (config, context, status) = (config.clone(), self.context.clone(), status.clone());
            std::thread::Builder::new()
                .name(format!("pipeline-{}", config.name))
                .spawn(move || pipeline::run(config, context, control_rx, status))?
        };
        self.entries().insert(
            config.name.clone(),
            Entry {
                config,
                origin,
                control,
                status,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    fn view(&self, entry: &Entry) -> PipelineView {
        let labels = vec![("pipeline".to_string(), entry.config.name.clone())];
        let m = &self.context.metrics;
        let status = entry.status.lock().clone();
        let lag = status
            .positions
            .iter()
            .map(|p| p.high_watermark.saturating_sub(p.next_offset))
            .sum();
        PipelineView {
            name: entry.config.name.clone(),
            origin: entry.origin,
            config: entry.config.clone(),
            status,
            records_in: m.records_in.get_or_create(&labels).get(),
            records_out: m.records_out.get_or_create(&labels).get(),
            dropped: m.dropped.get_or_create(&labels).get(),
            failed: m.failed.get_or_create(&labels).get(),
            lag,
        }
    }

    pub fn list(&self) -> Vec<PipelineView> {
        self.entries().values().map(|e| self.view(e)).collect()
    }

    pub fn describe(&self, name: &str) -> Result<PipelineView, ManagerError> {
        self.entries()
            .get(name)
            .map(|e| self.view(e))
            .ok_or_else(|| not_found(name))
    }

    /// Creates a pipeline: checks it (its plugin starts with its params), creates
    /// its topics, commits its definition with its start cursors, starts it.
    pub async fn create(&self, config: PipelineConfig) -> Result<PipelineView, ManagerError> {
        let _changing = self.changing.lock().await;
        config
            .validate()
            .map_err(|e| ManagerError::Invalid(e.to_string()))?;
        if self.entries().contains_key(&config.name) {
            return Err(ManagerError::Conflict(format!(
                "pipeline {} already exists",
                config.name
            )));
        }
        let module = match config.plugin_ref() {
            PluginRef::Deployed(name) => {
                let registry = self.context.registry.clone();
                blocking(move || registry.load(&name).map(|(_, m)| m)).await??
            }
            PluginRef::File(path) => {
                let registry = self.context.registry.clone();
                blocking(move || {
                    let wasm = std::fs::read(&path).map_err(|e| {
                        ManagerError::Invalid(format!("cannot read {}: {e}", path.display()))
                    })?;
                    Ok::<_, ManagerError>(registry.compile(&wasm)?)
                })
                .await??
            }
        };
        self.try_instance(&config, module).await?;
        self.ensure_topics(&config).await?;
        // The name may have been used before: start from `start`, not old cursors.
        let stale = forget_cursors(self.log(), &config.name)?;
        if !stale.is_empty() {
            self.log().write(stale).await?;
        }
        let defined = Defined {
            config: config.clone(),
            paused: false,
            created_ms: now_ms(),
        };
        let value = encode_stored(&defined);
        let mut ops = initial_cursors(self.log(), &config)?;
        ops.push(state_op(NS_DEFINED, &config.name, Some(value)));
        self.log().write(ops).await?;
        info!(pipeline = %config.name, plugin = %config.plugin, start = %config.start, "pipeline created");
        self.spawn(config.clone(), Origin::Api, false)
            .map_err(thread_failed)?;
        self.describe(&config.name)
    }

    /// Makes an instance of `module` with the pipeline's params and limits, so that
    /// a plugin that refuses them is refused now, not when the pipeline runs.
    async fn try_instance(
        &self,
        config: &PipelineConfig,
        module: Module,
    ) -> Result<(), ManagerError> {
        let host = self.context.registry.host().clone();
        let (limits, params, name) = (
            config.limits(&self.context.defaults),
            config.param_list(),
            config.name.clone(),
        );
        blocking(move || {
            host.instantiate(&module, limits, &name, &params)
                .map(drop)
                .map_err(|e| ManagerError::Invalid(format!("pipeline {name}: {e}")))
        })
        .await?
    }

    pub async fn pause(&self, name: &str) -> Result<PipelineView, ManagerError> {
        self.set_control(name, Control::Pause).await
    }

    /// Resumes a paused pipeline, or restarts one that failed.
    pub async fn resume(&self, name: &str) -> Result<PipelineView, ManagerError> {
        self.set_control(name, Control::Run).await
    }

    async fn set_control(
        &self,
        name: &str,
        control: Control,
    ) -> Result<PipelineView, ManagerError> {
        let _changing = self.changing.lock().await;
        let (origin, failed) = {
            let entries = self.entries();
            let entry = entries.get(name).ok_or_else(|| not_found(name))?;
            let state = entry.status.lock().state;
            (
                entry.origin,
                matches!(state, RunState::Failed | RunState::Stopped),
            )
        };
        let paused = control == Control::Pause;
        if origin == Origin::Api {
            let mut defined: Defined = self
                .log()
                .get_state(NS_DEFINED, name)?
                .ok_or_else(|| not_found(name))?;
            defined.paused = paused;
            let value = encode_stored(&defined);
            self.log()
                .write(vec![state_op(NS_DEFINED, name, Some(value))])
                .await?;
        }
        if failed {
            let config = self.take(name).await?.config;
            info!(pipeline = name, "restarting a stopped pipeline");
            self.spawn(config, origin, paused).map_err(thread_failed)?;
        } else if let Some(entry) = self.entries().get(name) {
            entry.control.send_replace(control);
        }
        info!(pipeline = name, ?control, "pipeline control");
        self.describe(name)
    }

    /// Stops the pipeline's thread (after the batch it is on) and removes its entry.
    async fn take(&self, name: &str) -> Result<Entry, ManagerError> {
        let mut entry = self.entries().remove(name).ok_or_else(|| not_found(name))?;
        entry.control.send_replace(Control::Stop);
        if let Some(thread) = entry.thread.take() {
            blocking(move || thread.join()).await?.ok();
        }
        Ok(entry)
    }

    /// Deletes a pipeline created through the API: stops it, forgets its definition
    /// and cursors. Its topics stay.
    pub async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let _changing = self.changing.lock().await;
        match self.entries().get(name) {
            None => return Err(not_found(name)),
            Some(e) if e.origin == Origin::Config => {
                return Err(ManagerError::Conflict(format!(
                    "pipeline {name} is defined in the config file; remove it there"
                )));
            }
            Some(_) => {}
        }
        self.take(name).await?;
        let mut ops = forget_cursors(self.log(), name)?;
        ops.push(state_op(NS_DEFINED, name, None));
        self.log().write(ops).await?;
        info!(pipeline = name, "pipeline deleted");
        Ok(())
    }

    /// Deploys `wasm` as plugin `name`: it must be a plugin component, and every
    /// pipeline that runs `name` must accept it (its `init` takes that pipeline's
    /// params). Those pipelines then switch to it between two batches.
    pub async fn deploy(&self, name: &str, wasm: Vec<u8>) -> Result<PluginView, ManagerError> {
        let _changing = self.changing.lock().await;
        if !crate::names::valid_name(name) {
            return Err(RegistryError::InvalidName(name.to_string()).into());
        }
        let (module, wasm) = {
            let registry = self.context.registry.clone();
            blocking(move || registry.compile(&wasm).map(|m| (m, wasm))).await??
        };
        let users: Vec<PipelineConfig> = self
            .entries()
            .values()
            .filter(|e| e.config.plugin_ref() == PluginRef::Deployed(name.to_string()))
            .map(|e| e.config.clone())
            .collect();
        for config in &users {
            self.try_instance(config, module.clone())
                .await
                .map_err(|e| ManagerError::Invalid(format!("not deployed: {e}")))?;
        }
        let plugin = self.context.registry.deploy(name, wasm, &module).await?;
        Ok(PluginView {
            plugin,
            used_by: users.into_iter().map(|c| c.name).collect(),
        })
    }

    pub fn plugins(&self) -> Result<Vec<PluginView>, ManagerError> {
        let entries = self.entries();
        Ok(self
            .context
            .registry
            .list()?
            .into_iter()
            .map(|plugin| PluginView {
                used_by: entries
                    .values()
                    .filter(|e| e.config.plugin_ref() == PluginRef::Deployed(plugin.name.clone()))
                    .map(|e| e.config.name.clone())
                    .collect(),
                plugin,
            })
            .collect())
    }

    /// Removes a deployed plugin that no pipeline runs.
    pub async fn remove_plugin(&self, name: &str) -> Result<(), ManagerError> {
        let _changing = self.changing.lock().await;
        let users: Vec<String> = self
            .entries()
            .values()
            .filter(|e| e.config.plugin_ref() == PluginRef::Deployed(name.to_string()))
            .map(|e| e.config.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(RegistryError::InUse {
                name: name.to_string(),
                pipelines: users.join(", "),
            }
            .into());
        }
        Ok(self.context.registry.remove(name).await?)
    }

    /// Waits for every pipeline's thread; the broker's stop signal was sent.
    pub async fn join(&self) {
        let threads: Vec<JoinHandle<()>> = self
            .entries()
            .values_mut()
            .filter_map(|e| e.thread.take())
            .collect();
        for thread in threads {
            let _ = blocking(move || thread.join()).await;
        }
    }
}

fn not_found(name: &str) -> ManagerError {
    ManagerError::NotFound(format!("no pipeline named {name}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ManagerError::Thread(format!("blocking work did not finish: {e}")))
}

fn thread_failed(e: std::io::Error) -> ManagerError {
    ManagerError::Thread(format!("cannot start the pipeline's thread: {e}"))
}
