//! Deployed plugins: components uploaded to a running broker by name
//! (`weir plugin deploy NAME FILE.wasm`), which pipelines refer to by that name.
//!
//! A component's bytes are kept in `<data_dir>/plugins/{sha256}.wasm`, written and
//! synced before the name → version record is committed in the log's state table
//! (`plugin.deployed`), so a committed record always has its file. Deploying a name
//! again makes a new version; the pipelines that use the name pick it up between two
//! batches (see `pipeline.rs`), so none of their records is lost or done twice.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::host::{Module, PluginError, PluginHost};
use crate::storage::{Log, StorageError, WriteError, now_ms, put_state_op, state_op};

const NS_DEPLOYED: &str = "plugin.deployed";
/// The largest component a deploy accepts (a JavaScript component is about 12 MB).
pub const MAX_PLUGIN_BYTES: usize = 128 * 1024 * 1024;

/// One deployed plugin: its current version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedPlugin {
    pub name: String,
    /// 1 for the first deploy, one more for each deploy of different bytes.
    pub version: u32,
    /// SHA-256 of the component, hex.
    pub hash: String,
    pub size: u64,
    pub deployed_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid plugin name {0:?}: use 1 to 100 of a-z A-Z 0-9 . _ -, not ending in .wasm")]
    InvalidName(String),
    #[error("no plugin named {0} is deployed")]
    NotFound(String),
    #[error("plugin {name} is used by pipeline(s) {pipelines}")]
    InUse { name: String, pipelines: String },
    #[error("{0}")]
    Rejected(String),
    #[error("plugin store: {0}")]
    Storage(#[from] StorageError),
    #[error("plugin store: {0}")]
    Write(#[from] WriteError),
    #[error("plugin file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load plugin {name}: {source}")]
    Load { name: String, source: PluginError },
}

impl RegistryError {
    /// True when the disk (or its quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            RegistryError::Storage(e) => e.is_disk_full(),
            RegistryError::Write(e) => e.is_disk_full(),
            RegistryError::File { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// Deployed plugins and where their bytes are. Cheap to clone.
#[derive(Clone)]
pub struct PluginRegistry {
    dir: PathBuf,
    log: Log,
    host: PluginHost,
    /// Bumped after every deploy; pipelines watch it.
    changes: watch::Sender<u64>,
}

impl PluginRegistry {
    pub fn new(dir: PathBuf, log: Log, host: PluginHost) -> Self {
        Self {
            dir,
            log,
            host,
            changes: watch::channel(0).0,
        }
    }

    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    /// Wakes when a plugin is deployed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn get(&self, name: &str) -> Result<Option<DeployedPlugin>, RegistryError> {
        Ok(self.log.get_state(NS_DEPLOYED, name)?)
    }

    pub fn list(&self) -> Result<Vec<DeployedPlugin>, RegistryError> {
        Ok(self
            .log
            .list_state(NS_DEPLOYED)?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// The current version of `name`, compiled (from the compile cache when it can).
    pub fn load(&self, name: &str) -> Result<(DeployedPlugin, Module), RegistryError> {
        let deployed = self
            .get(name)?
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let path = self.path(&deployed.hash);
        let wasm = std::fs::read(&path).map_err(|source| RegistryError::File {
            path: path.clone(),
            source,
        })?;
        let module = self
            .host
            .load(&wasm)
            .map_err(|source| RegistryError::Load {
                name: name.to_string(),
                source,
            })?;
        Ok((deployed, module))
    }

    /// Compiles and checks `wasm` against the contract (see `PluginHost::check`).
    /// Blocking: compiling a large component takes seconds.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, RegistryError> {
        let module = self
            .host
            .load(wasm)
            .map_err(|e| RegistryError::Rejected(e.to_string()))?;
        self.host
            .check(&module)
            .map_err(|e| RegistryError::Rejected(format!("not a weir:plugin component: {e}")))?;
        Ok(module)
    }

    /// Makes `wasm` (already compiled into `module` by `compile`) the current version
    /// of `name`. The same bytes as the current version change nothing.
    pub async fn deploy(
        &self,
        name: &str,
        wasm: Vec<u8>,
        module: &Module,
    ) -> Result<DeployedPlugin, RegistryError> {
        if !crate::names::valid_name(name) {
            return Err(RegistryError::InvalidName(name.to_string()));
        }
        let previous = self.get(name)?;
        if let Some(p) = &previous
            && p.hash == module.hash
        {
            return Ok(p.clone());
        }
        let path = self.path(&module.hash);
        let size = wasm.len() as u64;
        let dir = self.dir.clone();
        let file = path.clone();
        tokio::task::spawn_blocking(move || write_synced(&dir, &file, &wasm))
            .await
            .map_err(std::io::Error::other)
            .and_then(|written| written)
            .map_err(|source| RegistryError::File { path, source })?;
        let deployed = DeployedPlugin {
            name: name.to_string(),
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            hash: module.hash.clone(),
            size,
            deployed_ms: now_ms(),
        };
        self.log
            .write(vec![put_state_op(NS_DEPLOYED, name, &deployed)])
            .await?;
        info!(
            plugin = name,
            version = deployed.version,
            hash = &deployed.hash[..12],
            size,
            "plugin deployed"
        );
        self.changes.send_modify(|n| *n += 1);
        self.collect_garbage();
        Ok(deployed)
    }

    /// Forgets `name`; the caller checked that no pipeline uses it.
    pub async fn remove(&self, name: &str) -> Result<(), RegistryError> {
        if self.get(name)?.is_none() {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        self.log
            .write(vec![state_op(NS_DEPLOYED, name, None)])
            .await?;
        info!(plugin = name, "plugin removed");
        self.collect_garbage();
        Ok(())
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}.wasm"))
    }

    /// Removes component files that no deployed plugin's current version uses.
    /// Pipelines still on an older version hold it compiled in memory.
    fn collect_garbage(&self) {
        let Ok(deployed) = self.list() else { return };
        let keep: std::collections::HashSet<String> = deployed
            .into_iter()
            .map(|p| format!("{}.wasm", p.hash))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.ends_with(".wasm")
                && !keep.contains(&file)
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                warn!(file, error = %e, "cannot remove an unused plugin file");
            }
        }
    }
}

/// Writes `bytes` to `path` so that it is complete on disk before it has its name.
fn write_synced(
    dir: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
