//! Weir: a WebAssembly-extensible message broker for edge and IoT gateways.
//! See ARCHITECTURE.md at the repository root for the map of this crate.

pub mod metrics;
pub mod record_batch;
pub mod storage;
