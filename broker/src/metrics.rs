//! Prometheus metrics, served as text on the admin port's `/metrics`.
//!
//! Each subsystem owns a struct of its metrics and registers it; counters are cheap
//! atomics, so hot paths update them directly.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The log's metrics (`weir_storage_*`).
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    pub commits: Counter,
    pub checkpoints: Counter,
    pub commit_errors: Counter,
    pub disk_full_errors: Counter,
    pub commit_seconds: Histogram,
    pub appended_bytes: Counter,
    pub appended_batches: Counter,
    pub invalid_batches: Counter,
    pub refused_writes: Counter,
    pub retention_deleted_batches: Counter,
    pub retention_deleted_bytes: Counter,
    /// Bytes the process wrote to the disk (`/proc/self/io`), brought up to date every
    /// 5 s by the status sampler: the flash wear figure.
    pub disk_written_bytes: Counter,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        Self {
            commits: Counter::default(),
            checkpoints: Counter::default(),
            commit_errors: Counter::default(),
            disk_full_errors: Counter::default(),
            // 50 µs … ~1.6 s
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            appended_bytes: Counter::default(),
            appended_batches: Counter::default(),
            invalid_batches: Counter::default(),
            refused_writes: Counter::default(),
            retention_deleted_batches: Counter::default(),
            retention_deleted_bytes: Counter::default(),
            disk_written_bytes: Counter::default(),
        }
    }
}

impl StorageMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("storage");
        r.register(
            "commits",
            "Write transactions committed",
            self.commits.clone(),
        );
        r.register(
            "checkpoints",
            "Durable commits that start a new generation of the write-ahead journal",
            self.checkpoints.clone(),
        );
        r.register(
            "commit_errors",
            "Write transactions that failed",
            self.commit_errors.clone(),
        );
        r.register(
            "disk_full_errors",
            "Commits that failed because the disk was full",
            self.disk_full_errors.clone(),
        );
        r.register(
            "commit_seconds",
            "Group commit duration, including fsync",
            self.commit_seconds.clone(),
        );
        r.register(
            "appended_bytes",
            "Record batch bytes appended",
            self.appended_bytes.clone(),
        );
        r.register(
            "appended_batches",
            "Record batches appended",
            self.appended_batches.clone(),
        );
        r.register(
            "invalid_batches",
            "Record batches refused by validation (CRC, length, magic)",
            self.invalid_batches.clone(),
        );
        r.register(
            "refused_writes",
            "Writes refused (unknown topic or partition, too large)",
            self.refused_writes.clone(),
        );
        r.register(
            "retention_deleted_batches",
            "Batches deleted by retention",
            self.retention_deleted_batches.clone(),
        );
        r.register(
            "retention_deleted_bytes",
            "Bytes deleted by retention",
            self.retention_deleted_bytes.clone(),
        );
        r.register(
            "disk_written_bytes",
            "Bytes the broker process wrote to the disk (write_bytes of /proc/self/io), every 5 s",
            self.disk_written_bytes.clone(),
        );
    }
}

/// Every metric of the process, under the `weir_` prefix.
pub fn registry(storage: &StorageMetrics) -> Registry {
    let mut registry = Registry::with_prefix("weir");
    storage.register(&mut registry);
    registry
}

/// Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
