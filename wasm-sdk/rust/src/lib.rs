//! Weir plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`] (`init` once with the pipeline's
//! params, `process` per batch of records), exported with [`plugin!`], built for
//! `wasm32-wasip2`:
//!
//! ```ignore
//! use weir_plugin::{BatchResult, InputRecord, Output, Plugin, Source};
//!
//! struct Upper;
//!
//! impl Plugin for Upper {
//!     fn init(_params: Vec<(String, String)>) -> Result<(), String> {
//!         Ok(())
//!     }
//!     fn process(_source: Source, records: Vec<InputRecord>) -> BatchResult {
//!         let mut result = BatchResult::default();
//!         for (i, r) in records.iter().enumerate() {
//!             let value = r.value.clone().unwrap_or_default().to_ascii_uppercase();
//!             result.emit(Output::to("out", i).key(r.key.clone()).value(value));
//!         }
//!         result
//!     }
//! }
//!
//! weir_plugin::plugin!(Upper);
//! ```

/// The bindings `wit-bindgen` generates from `wasm-sdk/wit`.
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_plugin_bindings",
        default_bindings_module: "weir_plugin::bindings",
    });
}

pub use bindings::weir::plugin::types::{
    BatchResult, Failure, Header, InputRecord, Level, OutputRecord, Source,
};

/// What a plugin implements: the world's exports.
pub use bindings::Guest as Plugin;

/// Exports `$t` (a type implementing [`Plugin`]) as the component's plugin.
#[macro_export]
macro_rules! plugin {
    ($t:ident) => {
        $crate::bindings::export_plugin_bindings!($t with_types_in $crate::bindings);
    };
}

/// Logs through the broker (the line carries the pipeline's name).
pub fn log(level: Level, message: &str) {
    bindings::weir::plugin::host::log(level, message);
}

impl Default for BatchResult {
    fn default() -> Self {
        BatchResult {
            outputs: Vec::new(),
            failures: Vec::new(),
        }
    }
}

impl BatchResult {
    /// Adds an output record.
    pub fn emit(&mut self, output: OutputRecord) {
        self.outputs.push(output);
    }

    /// Sends input `input` to the dead-letter topic with `reason`.
    pub fn fail(&mut self, input: usize, reason: impl Into<String>) {
        self.failures.push(Failure {
            input: input as u32,
            reason: reason.into(),
        });
    }

    /// The common shape of a converter: each record's value through `convert`, out
    /// to `target` with the record's key and headers, or to the dead-letter topic
    /// with the error.
    pub fn map_values(
        records: Vec<InputRecord>,
        target: &str,
        mut convert: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, String>,
    ) -> BatchResult {
        let mut result = BatchResult::default();
        result.outputs.reserve(records.len());
        for (i, record) in records.into_iter().enumerate() {
            match convert(record.value.as_deref()) {
                Ok(value) => result.emit(
                    Output::to(target, i)
                        .key(record.key)
                        .value(value)
                        .headers(record.headers),
                ),
                Err(reason) => result.fail(i, reason),
            }
        }
        result
    }
}

/// Builds an [`OutputRecord`]: `Output::to("alarms", i).key(k).value(v)`.
pub struct Output;

impl Output {
    /// An output to the pipeline output named `target`, coming from input `input`.
    #[allow(clippy::new_ret_no_self)]
    pub fn to(target: &str, input: usize) -> OutputRecord {
        OutputRecord {
            input: input as u32,
            target: target.to_string(),
            key: None,
            value: None,
            headers: Vec::new(),
        }
    }
}

impl OutputRecord {
    pub fn key(mut self, key: Option<Vec<u8>>) -> Self {
        self.key = key;
        self
    }

    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = Some(value.into());
        self
    }

    pub fn header(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header {
            key: key.to_string(),
            value: value.into(),
        });
        self
    }

    /// Adds `headers` (an input's, to pass them on).
    pub fn headers(mut self, headers: Vec<Header>) -> Self {
        self.headers.extend(headers);
        self
    }
}

impl InputRecord {
    /// The value as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        self.value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// A header's value.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_slice())
    }
}
