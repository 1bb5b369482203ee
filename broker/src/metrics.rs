//! Prometheus metrics, served as text on the admin port's `/metrics`.
//!
//! Each subsystem owns a struct of its metrics and registers it; counters are cheap
//! atomics, so hot paths update them directly.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Declares a subsystem's metrics struct and its `register`, which adds each field as
/// `weir_<prefix>_<field>` with the field's doc comment as its help text: the name, the
/// type and the help of a metric are written once, in one place.
///
/// ```ignore
/// metrics::group! {
///     /// The TLS metrics (`weir_tls_*`).
///     #[derive(Clone, Debug, Default)]
///     pub struct TlsMetrics in "tls" {
///         /// TLS handshakes completed.
///         handshakes: Counter,
///     }
/// }
/// ```
macro_rules! group {
    (
        $(#[$attr:meta])*
        pub struct $name:ident in $prefix:literal {
            $(
                $(#[doc = $doc:literal])+
                $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $(
                $(#[doc = $doc])+
                pub $field: $ty,
            )*
        }

        impl $name {
            pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
                let r = registry.sub_registry_with_prefix($prefix);
                $(
                    r.register(
                        stringify!($field),
                        $crate::metrics::help(concat!($($doc),+)),
                        self.$field.clone(),
                    );
                )*
            }
        }
    };
}
pub(crate) use group;

/// A metric's help text from its field's doc comment: one line, without the final full
/// stop (the exposition adds one).
pub fn help(doc: &str) -> String {
    let text = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    text.strip_suffix('.').unwrap_or(&text).to_owned()
}

group! {
    /// The log's metrics (`weir_storage_*`).
    #[derive(Clone, Debug)]
    pub struct StorageMetrics in "storage" {
        /// Write transactions committed.
        commits: Counter,
        /// Durable commits that start a new generation of the write-ahead journal.
        checkpoints: Counter,
        /// Write transactions that failed.
        commit_errors: Counter,
        /// Commits that failed because the disk was full.
        disk_full_errors: Counter,
        /// Group commit duration, including fsync.
        commit_seconds: Histogram,
        /// Record batch bytes appended.
        appended_bytes: Counter,
        /// Record batches appended.
        appended_batches: Counter,
        /// Record batches refused by validation (CRC, length, magic).
        invalid_batches: Counter,
        /// Writes refused (unknown topic or partition, too large).
        refused_writes: Counter,
        /// Batches deleted by retention.
        retention_deleted_batches: Counter,
        /// Bytes deleted by retention.
        retention_deleted_bytes: Counter,
        /// Compaction passes committed (`cleanup.policy=compact`).
        compactions: Counter,
        /// Records compaction removed: superseded, expired tombstones, aborted, keyless.
        compaction_removed_records: Counter,
        /// Batch bytes compaction freed.
        compaction_freed_bytes: Counter,
        /// Compaction passes that failed (logged).
        compaction_errors: Counter,
        // The flash wear figure, brought up to date by the status sampler.
        /// Bytes the broker process wrote to the disk (write_bytes of /proc/self/io),
        /// every 5 s.
        disk_written_bytes: Counter,
    }
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
            compactions: Counter::default(),
            compaction_removed_records: Counter::default(),
            compaction_freed_bytes: Counter::default(),
            compaction_errors: Counter::default(),
            disk_written_bytes: Counter::default(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_registers_each_field_with_its_doc_as_help() {
        let text = render(&registry(&StorageMetrics::default()));
        assert!(
            text.contains(
                "# HELP weir_storage_disk_written_bytes Bytes the broker process wrote to the \
                 disk (write_bytes of /proc/self/io), every 5 s.\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE weir_storage_commit_seconds histogram\n"));
        assert_eq!(text.matches("# HELP weir_storage_").count(), 16);
    }
}
