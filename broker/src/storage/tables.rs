//! The redb tables and their on-disk encodings. ARCHITECTURE.md ("On-disk layout")
//! describes them; change both together, and bump `FORMAT_VERSION` on any change.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::topic::TopicConfig;

/// Written to `meta` on creation; a database with another version is refused.
/// 1: the first layout (a `batch_index` table) and, unbumped, the second; 2: the second
/// layout; 3: the same tables with the write-ahead journal beside them (`meta`'s
/// journal keys), which a build of format 2 would ignore, losing what it holds; 4: topic
/// configs stored as Kafka's key/value strings (`TopicConfig`), 1 to 3 migrated on open.
pub(crate) const FORMAT_VERSION: u64 = 4;

/// Kafka's name for a topic id is a UUID; ours is a counter that is never reused,
/// so a topic deleted and created again never sees the old batches.
pub(crate) type TopicId = u32;

/// `format_version`, `next_topic_id`, `journal_generation`, `journal_seq`.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `meta` keys of the journal (`journal.rs`): the generation the database's journal
/// entries belong to, and the last entry applied.
pub(crate) const JOURNAL_GENERATION: &str = "journal_generation";
pub(crate) const JOURNAL_SEQ: &str = "journal_seq";
/// Topic name → postcard `TopicRecord`.
pub(crate) const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// (topic id, partition) → `PartitionRow` as a tuple.
pub(crate) const PARTITIONS: TableDefinition<(TopicId, u32), PartitionTuple> =
    TableDefinition::new("partitions");
/// (topic id, partition, base offset) → append time (i64 big-endian, ms) followed by the
/// RecordBatch v2 bytes as received, with the broker's base offset written in. The
/// batch's own header holds everything else a reader needs (count, size, timestamps).
pub(crate) const BATCHES: TableDefinition<(TopicId, u32, u64), &[u8]> =
    TableDefinition::new("batches");
/// Sparse time index, as Kafka's: (topic id, partition, offset X) → the largest record
/// timestamp at offsets ≤ X. One entry per `TIME_INDEX_INTERVAL_BYTES` appended.
pub(crate) const TIME_INDEX: TableDefinition<(TopicId, u32, u64), i64> =
    TableDefinition::new("time_index");
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

/// A `TopicRecord` as formats 1 to 3 stored it: the config as a fixed struct.
#[derive(Deserialize)]
pub(crate) struct TopicRecordV3 {
    id: TopicId,
    partitions: u32,
    config: TopicConfigV3,
    created_ms: i64,
}

#[derive(Deserialize)]
struct TopicConfigV3 {
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    max_message_bytes: u32,
    /// `Delete`, the only policy those formats knew.
    _cleanup_policy: u32,
}

impl From<TopicRecordV3> for TopicRecord {
    fn from(old: TopicRecordV3) -> Self {
        let c = old.config;
        TopicRecord {
            id: old.id,
            partitions: old.partitions,
            config: TopicConfig {
                retention_ms: c.retention_ms,
                retention_bytes: c.retention_bytes,
                max_message_bytes: c.max_message_bytes,
                ..TopicConfig::default()
            },
            created_ms: old.created_ms,
        }
    }
}

/// Bytes appended between two time-index entries of a partition.
pub(crate) const TIME_INDEX_INTERVAL_BYTES: u64 = 1 << 20;

/// Bytes in front of the batch in a `BATCHES` value.
pub(crate) const STORED_PREFIX: usize = 8;

/// (log start, next offset, bytes, batches, max timestamp, bytes since the last time-index entry)
pub(crate) type PartitionTuple = (u64, u64, u64, u64, i64, u64);

/// One row of `PARTITIONS`, named. Written with every append to the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PartitionRow {
    pub(crate) log_start: u64,
    /// Offset the next record gets: the high watermark.
    pub(crate) next_offset: u64,
    /// Batch bytes stored (without the append-time prefix).
    pub(crate) bytes: u64,
    pub(crate) batches: u64,
    /// Largest record timestamp appended so far, for the time index.
    pub(crate) max_timestamp: i64,
    pub(crate) unindexed_bytes: u64,
}

impl PartitionRow {
    pub(crate) const EMPTY: PartitionRow = PartitionRow {
        log_start: 0,
        next_offset: 0,
        bytes: 0,
        batches: 0,
        max_timestamp: i64::MIN,
        unindexed_bytes: 0,
    };

    pub(crate) fn from_tuple(t: PartitionTuple) -> Self {
        let (log_start, next_offset, bytes, batches, max_timestamp, unindexed_bytes) = t;
        Self {
            log_start,
            next_offset,
            bytes,
            batches,
            max_timestamp,
            unindexed_bytes,
        }
    }

    pub(crate) fn to_tuple(self) -> PartitionTuple {
        (
            self.log_start,
            self.next_offset,
            self.bytes,
            self.batches,
            self.max_timestamp,
            self.unindexed_bytes,
        )
    }
}

/// A `BATCHES` value, split into its parts. `None` if it is too short to be one.
pub(crate) fn split_stored(value: &[u8]) -> Option<(i64, &[u8])> {
    if value.len() < STORED_PREFIX + weir_wire::record_batch::HEADER_LEN {
        return None;
    }
    let (time, batch) = value.split_at(STORED_PREFIX);
    Some((i64::from_be_bytes(time.try_into().ok()?), batch))
}

#[cfg(test)]
mod tests {
    /// ARCHITECTURE.md's on-disk section lists exactly the tables defined here.
    #[test]
    fn architecture_lists_every_table() {
        let source = include_str!("tables.rs");
        let defined: std::collections::BTreeSet<&str> = source
            .split("TableDefinition::new(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(defined.len() >= 7, "{defined:?}");
        let architecture = include_str!("../../../ARCHITECTURE.md");
        let section = architecture
            .split("## On-disk layout")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("ARCHITECTURE.md has an On-disk layout section");
        let documented: std::collections::BTreeSet<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        assert_eq!(
            defined, documented,
            "tables in tables.rs and in ARCHITECTURE.md's on-disk layout differ"
        );
    }
}
