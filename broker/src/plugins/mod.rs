//! WebAssembly plugins (decision 4): the host (`host.rs`, the only module that knows
//! wasmtime) and the pipelines that run plugins over topics (`pipeline.rs`).

pub mod bench;
pub mod harness;
pub mod host;
pub mod ingest;
pub mod pipeline;

pub use host::{Limits, PluginError, PluginHost};
pub use ingest::IngestPlugin;
pub use pipeline::{PipelineConfig, PipelineContext, PipelineDefaults, PipelineMetrics};
