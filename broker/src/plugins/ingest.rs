//! A plugin on the MQTT ingest path: messages an ingest rule matches go through it
//! before they are stored (decode a device's binary frame into JSON at the edge).
//! One instance per rule, behind a lock; a call that traps is retried record by
//! record on fresh instances, and the record that breaks it is reported failed.

use std::convert::Infallible;
use std::sync::Arc;

use parking_lot::Mutex;

use super::host::{
    InputRecord, Instance, Limits, Module, OutputRecord, PluginError, PluginHost, Source,
};
use super::outcome::{NoSuchInput, PerInput, isolating, per_input};

/// What became of one input: its outputs, or why it failed.
pub type IngestResult = Result<Vec<OutputRecord>, String>;

pub struct IngestPlugin {
    host: PluginHost,
    module: Module,
    limits: Limits,
    params: Vec<(String, String)>,
    name: String,
    instance: Mutex<Option<Instance>>,
}

impl std::fmt::Debug for IngestPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestPlugin")
            .field("name", &self.name)
            .finish()
    }
}

impl IngestPlugin {
    /// Compiles (or loads from the cache) and instantiates once, so that a component
    /// or params the plugin refuses stop the broker at start, not at the first message.
    pub fn load(
        host: &PluginHost,
        name: &str,
        wasm: &[u8],
        params: Vec<(String, String)>,
        limits: Limits,
    ) -> Result<Self, PluginError> {
        let module = host.load(wasm)?;
        let instance = host.instantiate(&module, limits, name, &params)?;
        Ok(Self {
            host: host.clone(),
            module,
            limits,
            params,
            name: name.to_string(),
            instance: Mutex::new(Some(instance)),
        })
    }

    /// [`IngestPlugin::run`] on tokio's blocking pool: a call may take up to the
    /// plugin's time limit, and the workers serve every connection meanwhile.
    pub async fn run_blocking(
        self: &Arc<Self>,
        source: Source,
        inputs: Vec<InputRecord>,
    ) -> Vec<IngestResult> {
        let plugin = self.clone();
        let count = inputs.len();
        match tokio::task::spawn_blocking(move || plugin.run(&source, &inputs)).await {
            Ok(results) => results,
            Err(e) => {
                let reason = format!("the plugin call did not finish: {e}");
                vec![Err(reason); count]
            }
        }
    }

    /// Runs the plugin on `inputs`; one result per input, in order. Blocking.
    pub fn run(&self, source: &Source, inputs: &[InputRecord]) -> Vec<IngestResult> {
        let mut slot = self.instance.lock();
        let call =
            |slot: &mut Option<Instance>, inputs: &[InputRecord]| self.call(slot, source, inputs);
        // The next call makes a fresh instance.
        let renew = |slot: &mut Option<Instance>| {
            *slot = None;
            Ok::<(), Infallible>(())
        };
        let Ok(per_input) = isolating(&self.name, &mut *slot, inputs, call, renew);
        per_input
    }

    /// One call on the current instance (made fresh if the last one broke).
    fn call(
        &self,
        slot: &mut Option<Instance>,
        source: &Source,
        inputs: &[InputRecord],
    ) -> Result<PerInput, CallError> {
        let instance = match slot {
            Some(instance) => instance,
            None => slot.insert(self.host.instantiate(
                &self.module,
                self.limits,
                &self.name,
                &self.params,
            )?),
        };
        let result = instance.process(source, inputs)?;
        Ok(per_input(result, inputs.len())?)
    }
}

/// Why a call failed as a whole.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    NoSuchInput(#[from] NoSuchInput),
}
