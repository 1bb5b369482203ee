//! A plugin on the MQTT ingest path: messages an ingest rule matches go through it
//! before they are stored (decode a device's binary frame into JSON at the edge).
//! One instance per rule, behind a lock; a call that traps is retried record by
//! record on fresh instances, and the record that breaks it is reported failed.

use std::sync::Arc;

use parking_lot::Mutex;

use super::host::{Header, InputRecord, Instance, Limits, Module, PluginError, PluginHost, Source};

/// What became of one input: its outputs (key, value, headers), or why it failed.
pub type IngestResult = Result<Vec<(Option<Vec<u8>>, Option<Vec<u8>>, Vec<Header>)>, String>;

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
        match self.call(&mut slot, source, inputs) {
            Ok(results) => results,
            Err(_) => inputs
                .iter()
                .map(
                    |input| match self.call(&mut slot, source, std::slice::from_ref(input)) {
                        Ok(mut one) => one.pop().unwrap_or_else(|| Ok(Vec::new())),
                        Err(reason) => Err(reason),
                    },
                )
                .collect(),
        }
    }

    /// One call on the current instance (made fresh if the last one broke).
    fn call(
        &self,
        slot: &mut Option<Instance>,
        source: &Source,
        inputs: &[InputRecord],
    ) -> Result<Vec<IngestResult>, String> {
        if slot.is_none() {
            *slot = Some(
                self.host
                    .instantiate(&self.module, self.limits, &self.name, &self.params)
                    .map_err(|e| e.to_string())?,
            );
        }
        let instance = slot.as_mut().expect("made above");
        let result = match instance.process(source, inputs) {
            Ok(r) => r,
            Err(e) => {
                *slot = None;
                return Err(e.to_string());
            }
        };
        let mut per_input: Vec<IngestResult> = inputs.iter().map(|_| Ok(Vec::new())).collect();
        for f in result.failures {
            if let Some(r) = per_input.get_mut(f.input as usize) {
                *r = Err(f.reason);
            }
        }
        for o in result.outputs {
            match per_input.get_mut(o.input as usize) {
                Some(Ok(outputs)) => outputs.push((o.key, o.value, o.headers)),
                Some(Err(_)) => {}
                None => {
                    return Err(format!(
                        "an output names input {} of {}",
                        o.input,
                        inputs.len()
                    ));
                }
            }
        }
        Ok(per_input)
    }
}
