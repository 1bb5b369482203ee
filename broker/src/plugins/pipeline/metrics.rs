//! A pipeline's counters (`weir_pipeline_*{pipeline="…"}`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// A metric's labels: `pipeline="…"`.
pub(super) type Labels = Vec<(String, String)>;
crate::metrics::group! {
    /// Per-pipeline metrics (`weir_pipeline_*{pipeline="…"}`).
    #[derive(Clone, Debug)]
    pub struct PipelineMetrics in "pipeline" {
        /// Records given to the plugin.
        records_in: Family<Labels, Counter>,
        /// Records the plugin emitted, appended to outputs.
        records_out: Family<Labels, Counter>,
        /// Records the plugin filtered out.
        dropped: Family<Labels, Counter>,
        /// Records sent to the dead-letter topic.
        failed: Family<Labels, Counter>,
        /// Instances thrown away after a trap, timeout or memory limit.
        traps: Family<Labels, Counter>,
        /// Records in the sources not processed yet.
        lag: Family<Labels, Gauge>,
        /// Duration of one plugin call.
        call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    }
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineMetrics {
    pub fn new() -> Self {
        Self {
            records_in: Family::default(),
            records_out: Family::default(),
            dropped: Family::default(),
            failed: Family::default(),
            traps: Family::default(),
            lag: Family::default(),
            call_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
            }),
        }
    }
}
