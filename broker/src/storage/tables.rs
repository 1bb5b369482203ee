//! The redb tables and their on-disk encodings. ARCHITECTURE.md ("On-disk layout")
//! describes them; change both together, and bump `FORMAT_VERSION` on any change.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::topic::TopicConfig;

/// Written to `meta` on creation; a database with another version is refused.
pub(crate) const FORMAT_VERSION: u64 = 1;

/// Kafka's name for a topic id is a UUID; ours is a counter that is never reused,
/// so a topic deleted and created again never sees the old batches.
pub(crate) type TopicId = u32;

/// `format_version`, `next_topic_id`.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Topic name → postcard `TopicRecord`.
pub(crate) const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// (topic id, partition) → (log start offset, next offset, stored bytes).
pub(crate) const PARTITIONS: TableDefinition<(TopicId, u32), (u64, u64, u64)> =
    TableDefinition::new("partitions");
/// (topic id, partition, base offset) → RecordBatch v2 bytes as received, with the
/// broker's base offset written in.
pub(crate) const BATCHES: TableDefinition<(TopicId, u32, u64), &[u8]> =
    TableDefinition::new("batches");
/// Same key as `BATCHES` → (last offset delta, size in bytes, max timestamp, append time ms).
/// Lets retention, offset look-ups and fetch planning run without loading batches.
pub(crate) const BATCH_INDEX: TableDefinition<(TopicId, u32, u64), (u32, u32, i64, i64)> =
    TableDefinition::new("batch_index");
/// (group, topic, partition) → postcard `CommittedOffset`.
pub(crate) const GROUP_OFFSETS: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("group_offsets");
/// (namespace, key) → postcard value of the owner's type (cursors, sessions, plugin state).
pub(crate) const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("state");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TopicRecord {
    pub(crate) id: TopicId,
    pub(crate) partitions: u32,
    pub(crate) config: TopicConfig,
    pub(crate) created_ms: i64,
}

/// One row of `BATCH_INDEX`, named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    pub(crate) last_offset_delta: u32,
    pub(crate) size: u32,
    pub(crate) max_timestamp: i64,
    pub(crate) append_time_ms: i64,
}

impl BatchMeta {
    pub(crate) fn from_row(row: (u32, u32, i64, i64)) -> Self {
        let (last_offset_delta, size, max_timestamp, append_time_ms) = row;
        Self {
            last_offset_delta,
            size,
            max_timestamp,
            append_time_ms,
        }
    }

    pub(crate) fn to_row(self) -> (u32, u32, i64, i64) {
        (
            self.last_offset_delta,
            self.size,
            self.max_timestamp,
            self.append_time_ms,
        )
    }

    pub(crate) fn offset_count(self) -> u64 {
        u64::from(self.last_offset_delta) + 1
    }
}
