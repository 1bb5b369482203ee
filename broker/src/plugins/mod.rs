//! WebAssembly plugins (decision 4): the host (`host.rs`, the only module that knows
//! wasmtime), the pipelines that run plugins over topics (`pipeline.rs`), the
//! plugins deployed at runtime (`registry.rs`) and the pipelines' owner (`manager.rs`).

pub mod bench;
#[cfg(feature = "componentize")]
pub mod componentize;
pub mod harness;
pub mod host;
pub mod ingest;
pub mod manager;
pub mod outcome;
pub mod pipeline;
pub mod registry;

pub use host::{Limits, PluginError, PluginHost};
pub use ingest::IngestPlugin;
pub use manager::Pipelines;
pub use pipeline::{PipelineConfig, PipelineContext, PipelineDefaults, PipelineMetrics};
pub use registry::PluginRegistry;
