//! A pipeline's counters (`weir_pipeline_*{pipeline="…"}`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A metric's labels: `pipeline="…"`.
pub(super) type Labels = Vec<(String, String)>;

/// Per-pipeline metrics (`weir_pipeline_*{pipeline="…"}`).
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    pub records_in: Family<Labels, Counter>,
    pub records_out: Family<Labels, Counter>,
    pub dropped: Family<Labels, Counter>,
    pub failed: Family<Labels, Counter>,
    pub traps: Family<Labels, Counter>,
    pub lag: Family<Labels, Gauge>,
    pub call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
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

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("pipeline");
        r.register(
            "records_in",
            "Records given to the plugin",
            self.records_in.clone(),
        );
        r.register(
            "records_out",
            "Records the plugin emitted, appended to outputs",
            self.records_out.clone(),
        );
        r.register(
            "dropped",
            "Records the plugin filtered out",
            self.dropped.clone(),
        );
        r.register(
            "failed",
            "Records sent to the dead-letter topic",
            self.failed.clone(),
        );
        r.register(
            "traps",
            "Instances thrown away after a trap, timeout or memory limit",
            self.traps.clone(),
        );
        r.register(
            "lag",
            "Records in the sources not processed yet",
            self.lag.clone(),
        );
        r.register(
            "call_seconds",
            "Duration of one plugin call",
            self.call_seconds.clone(),
        );
    }
}
