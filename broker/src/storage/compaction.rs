//! Log compaction (`cleanup.policy = compact`): a partition keeps the latest record of
//! each key, as Kafka's log cleaner keeps it.
//!
//! A pass reads a snapshot on the caller's thread (the blocking pool), never the
//! writer's, and hands the writer one command that replaces or removes the batches it
//! changed, committed durably in one transaction with the partition's new clean state:
//! a crash leaves the pass done or not started. Appends go on meanwhile; they only add
//! at the end, beyond the range a pass looks at, and retention only removes from the
//! start, so the writer applies each edit only if its batch is still the one read.
//!
//! What a pass keeps, as Kafka: every record whose key has no later record in the
//! range cleaned; no record without a key; a tombstone (null value) until its batch's
//! delete horizon (KIP-534: set to now + `delete.retention.ms` when a pass first keeps
//! it) has passed; no record of an aborted transaction; every control batch. A kept
//! batch keeps its base and last offset, so offsets never move: the removed ones are
//! gaps, which Kafka clients expect of a compacted topic.
//!
//! Which batches a pass may touch: Weir has no segment files, so `segment.bytes` and
//! `segment.ms` say where Kafka's active segment would end: a batch is cleanable once
//! that many bytes were appended after it or it is that old, it is older than
//! `min.compaction.lag.ms`, it is below the last stable offset, and it is not the
//! partition's last batch. A pass runs when the cleanable bytes not yet compacted are
//! at least `min.cleanable.dirty.ratio` of the cleanable ones, or a tombstone is due.

use std::collections::HashMap;

use bytes::Bytes;
use redb::ReadableDatabase;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::tables::{BATCHES, STATE, TopicId, split_stored};
use super::writer::Command;
use super::{Log, ReadError, StorageError, decode_stored, read_partition_row, stored};
use weir_wire::record_batch::{BatchHeader, RecordBatch, build};

/// The `state` namespace of each partition's [`Cleaned`], keyed `topic/partition`.
pub(super) const NAMESPACE: &str = "compaction";

/// Key bytes the offset map of one pass may hold; a pass that would need more cleans
/// a shorter range, and the next pass the rest.
const MAX_MAP_BYTES: usize = 64 << 20;

/// Where a partition's compaction stands (Kafka's cleaner checkpoint).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Cleaned {
    /// The topic it belongs to: a topic made again under the same name starts afresh.
    topic_id: TopicId,
    /// Offsets from here on were never compacted.
    dirty_from: u64,
    /// The earliest delete horizon of the tombstones kept below `dirty_from`.
    horizon_ms: Option<i64>,
}

/// One batch a pass changes, identified as it was read.
#[derive(Debug)]
pub(super) struct Edit {
    pub(super) base: u64,
    pub(super) crc: u32,
    pub(super) len: usize,
    /// The batch to store instead; `None` removes it.
    pub(super) replacement: Option<Bytes>,
}

/// What the writer did with a pass's edits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub rewritten_batches: u64,
    pub removed_batches: u64,
    /// Batch bytes the partition holds fewer of.
    pub freed_bytes: u64,
    /// Edits not applied because their batch changed since the pass read it.
    pub stale: u64,
}

/// One pass over one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compaction {
    pub topic: String,
    pub partition: u32,
    /// Offsets `from..to` were cleaned; `to` is where the never-compacted part starts.
    pub from: u64,
    pub to: u64,
    pub removed_records: u64,
    pub applied: Applied,
}

/// When a partition is next worth reading: once it holds `bytes_at_least` bytes, or
/// at `at_ms`. Learnt from the last look, so an idle partition costs no reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextLook {
    bytes_at_least: u64,
    at_ms: i64,
}

/// A batch of the never-compacted part, as its header and prefix describe it.
struct Dirty {
    /// One past its last offset.
    end: u64,
    len: u64,
    append_ms: i64,
}

impl Log {
    /// Runs a compaction pass over the partition if one is due (see the module
    /// documentation), as of `now`. Returns the pass, if one ran, and when to look
    /// again. Blocking: reads the partition and waits for the writer.
    pub fn compact(
        &self,
        topic: &str,
        partition: u32,
        now: i64,
        look: Option<NextLook>,
    ) -> Result<(Option<Compaction>, Option<NextLook>), ReadError> {
        let handle = self.handle(topic, partition)?;
        let config = &handle.info.config;
        if !config.cleanup_policy.compacts() {
            return Ok((None, None));
        }
        let id = handle.id;
        let db = self.shared.db.get()?;
        let txn = db.begin_read().map_err(StorageError::from)?;
        let row = read_partition_row(&txn, id, partition, topic)?;
        let state_key = format!("{topic}/{partition}");
        let states = txn.open_table(STATE).map_err(StorageError::from)?;
        let cleaned = match states
            .get((NAMESPACE, state_key.as_str()))
            .map_err(StorageError::from)?
        {
            Some(v) => Some(super::decode::<Cleaned>("state", v.value())?),
            None => None,
        }
        .filter(|c| c.topic_id == id)
        .unwrap_or(Cleaned {
            topic_id: id,
            ..Cleaned::default()
        });
        let dirty_from = cleaned.dirty_from.max(row.log_start);
        let horizon_due = cleaned.horizon_ms.is_some_and(|h| h <= now);
        if let Some(look) = look
            && !horizon_due
            && row.bytes < look.bytes_at_least
            && now < look.at_ms
        {
            return Ok((None, Some(look)));
        }

        // The never-compacted part, and how much of it a pass may clean.
        let table = txn.open_table(BATCHES).map_err(StorageError::from)?;
        let mut dirty = Vec::new();
        for entry in table
            .range((id, partition, dirty_from)..=(id, partition, u64::MAX))
            .map_err(StorageError::from)?
        {
            let (key, value) = entry.map_err(StorageError::from)?;
            let (header, batch) = stored(key.value(), value.value())?;
            dirty.push(Dirty {
                end: key.value().2 + header.offset_count(),
                len: batch.len() as u64,
                append_ms: split_stored(value.value()).map_or(i64::MIN, |(t, _)| t),
            });
        }
        let last_stable = self
            .shared
            .txns
            .last_stable(topic, partition, row.next_offset);
        let lag = now.saturating_sub(config.min_compaction_lag_ms as i64);
        let young = now.saturating_sub(config.segment_ms as i64);
        let mut after: u64 = dirty.iter().map(|d| d.len).sum();
        let dirty_bytes = after;
        let (mut cleanable, mut cleanable_bytes) = (0, 0);
        let mut next = NextLook {
            bytes_at_least: row.bytes + 1,
            at_ms: i64::MAX,
        };
        for (i, d) in dirty.iter().enumerate() {
            after -= d.len;
            let blocked = i + 1 == dirty.len() || d.end > last_stable;
            if blocked {
                break;
            }
            if d.append_ms > lag {
                next = NextLook {
                    bytes_at_least: u64::MAX,
                    at_ms: d
                        .append_ms
                        .saturating_add(config.min_compaction_lag_ms as i64),
                };
                break;
            }
            if after < config.segment_bytes && d.append_ms > young {
                next = NextLook {
                    bytes_at_least: row.bytes + (config.segment_bytes - after),
                    at_ms: d.append_ms.saturating_add(config.segment_ms as i64),
                };
                break;
            }
            cleanable += 1;
            cleanable_bytes += d.len;
        }
        if let Some(h) = cleaned.horizon_ms {
            next.at_ms = next.at_ms.min(h);
        }
        let clean_bytes = row.bytes.saturating_sub(dirty_bytes);
        let ratio_ppm = if cleanable_bytes == 0 {
            0
        } else {
            cleanable_bytes * 1_000_000 / (clean_bytes + cleanable_bytes)
        };
        if !horizon_due
            && (cleanable == 0 || ratio_ppm < u64::from(config.min_cleanable_dirty_ratio_ppm))
        {
            return Ok((None, Some(next)));
        }
        let mut clean_end = dirty[..cleanable].last().map_or(dirty_from, |d| d.end);

        // The latest offset of each key in the part cleaned for the first time.
        let aborted = self.shared.txns.aborted_list(topic, partition);
        let is_aborted = |h: BatchHeader<'_>| {
            let base = h.base_offset() as u64;
            h.is_transactional()
                && !h.is_control()
                && aborted.iter().any(|a| {
                    a.producer_id == h.producer_id()
                        && a.first <= base
                        && a.last.is_none_or(|last| base < last)
                })
        };
        let records_of = |batch: &[u8]| {
            let batch = RecordBatch::from_stored(Bytes::copy_from_slice(batch));
            decode_stored(batch, topic, partition)
        };
        let mut latest: HashMap<Bytes, i64> = HashMap::new();
        let mut map_bytes = 0;
        for entry in table
            .range((id, partition, dirty_from)..(id, partition, clean_end))
            .map_err(StorageError::from)?
        {
            let (key, value) = entry.map_err(StorageError::from)?;
            let (header, batch) = stored(key.value(), value.value())?;
            if header.is_control() || is_aborted(header) {
                continue;
            }
            if map_bytes > MAX_MAP_BYTES && key.value().2 > dirty_from {
                clean_end = key.value().2;
                break;
            }
            let records = records_of(batch)?;
            for r in records {
                if let Some(k) = r.key {
                    map_bytes += k.len() + 48;
                    latest.insert(k, r.offset);
                }
            }
        }

        // Every batch below the end, against that map.
        let mut edits = Vec::new();
        let mut removed_records = 0u64;
        let mut horizon_ms: Option<i64> = None;
        for entry in table
            .range((id, partition, row.log_start)..(id, partition, clean_end))
            .map_err(StorageError::from)?
        {
            let (key, value) = entry.map_err(StorageError::from)?;
            let base = key.value().2;
            let (header, batch) = stored(key.value(), value.value())?;
            let edit = |replacement| Edit {
                base,
                crc: header.crc(),
                len: batch.len(),
                replacement,
            };
            if header.is_control() {
                continue;
            }
            if is_aborted(header) {
                removed_records += header.record_count().max(0) as u64;
                edits.push(edit(None));
                continue;
            }
            let records = records_of(batch)?;
            let count = records.len();
            let horizon = header.delete_horizon_ms();
            let mut tombstones = false;
            let kept: Vec<_> = records
                .into_iter()
                .filter(|r| {
                    let Some(k) = &r.key else { return false };
                    if latest.get(k).is_some_and(|l| r.offset < *l) {
                        return false;
                    }
                    if r.value.is_none() {
                        if horizon.is_some_and(|h| h <= now) {
                            return false;
                        }
                        tombstones = true;
                    }
                    true
                })
                .collect();
            let new_horizon = tombstones.then(|| {
                horizon.unwrap_or_else(|| now.saturating_add(config.delete_retention_ms as i64))
            });
            if let Some(h) = new_horizon {
                horizon_ms = Some(horizon_ms.map_or(h, |m| m.min(h)));
            }
            removed_records += (count - kept.len()) as u64;
            if kept.len() == count && new_horizon == horizon {
                continue;
            }
            if kept.is_empty() {
                edits.push(edit(None));
            } else {
                let bytes = build::retained(header, &kept, new_horizon).map_err(|e| {
                    StorageError::Corrupt {
                        table: "batches",
                        detail: format!("{topic}/{partition} at {base}: cannot rewrite: {e}"),
                    }
                })?;
                edits.push(edit(Some(bytes)));
            }
        }
        drop(table);
        drop(states);
        drop(txn);
        drop(db);

        let state = Cleaned {
            topic_id: id,
            dirty_from: clean_end,
            horizon_ms,
        };
        let (reply, rx) = oneshot::channel();
        self.commands
            .blocking_send(Command::Compact {
                topic: topic.to_string(),
                partition,
                id,
                edits,
                state: (state_key, super::encode_stored(&state)),
                reply,
            })
            .map_err(|_| StorageError::Closed)?;
        let applied = rx.blocking_recv().map_err(|_| StorageError::Closed)??;
        let metrics = &self.shared.metrics;
        metrics.compactions.inc();
        metrics.compaction_removed_records.inc_by(removed_records);
        metrics.compaction_freed_bytes.inc_by(applied.freed_bytes);
        let pass = Compaction {
            topic: topic.to_string(),
            partition,
            from: row.log_start,
            to: clean_end,
            removed_records,
            applied,
        };
        // What is left is known only after another read.
        Ok((Some(pass), None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Appends, LogOptions, TopicConfig, WriteError};
    use super::*;
    use weir_wire::record_batch::build::NewRecord;

    fn keyed(key: &str, value: Option<&str>) -> NewRecord {
        NewRecord {
            key: Some(Bytes::from(key.to_string())),
            value: value.map(|v| Bytes::from(v.to_string())),
            timestamp_ms: 1_000,
            headers: Vec::new(),
        }
    }

    /// A record as read back: offset, key, value.
    type Seen = (i64, String, Option<String>);

    /// Every record from `from`, and the base of each batch.
    fn read_all(log: &Log, from: u64) -> (Vec<Seen>, Vec<i64>) {
        let read = log.read("lkv", 0, from, usize::MAX).unwrap();
        let bases = read.batches.iter().map(|b| b.base_offset()).collect();
        let mut out = Vec::new();
        for b in read.batches {
            for r in decode_stored(b, "lkv", 0).unwrap() {
                let text = |b: Option<Bytes>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
                out.push((r.offset, text(r.key).unwrap(), text(r.value)));
            }
        }
        (out, bases)
    }

    async fn compact(log: &Log, now: i64) -> Option<Compaction> {
        log.blocking(move |log| log.compact("lkv", 0, now, None))
            .await
            .unwrap()
            .0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_latest_record_per_key_stays_at_its_offset_and_tombstones_go_after_their_horizon() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(LogOptions::new(dir.path())).unwrap();
        let config = TopicConfig::default()
            .with_overrides([
                ("cleanup.policy", "compact"),
                ("segment.bytes", "14"),
                ("delete.retention.ms", "1000"),
            ])
            .unwrap();
        log.create_topic("lkv", 1, config).await.unwrap();
        let writes: [&[(&str, Option<&str>)]; 6] = [
            &[("a", Some("a1")), ("b", Some("b1"))],
            &[("a", Some("a2"))],
            &[("c", Some("c1"))],
            &[("b", None)],
            &[("a", Some("a3"))],
            &[("d", Some("d1"))],
        ];
        for records in writes {
            let mut appends = Appends::default();
            for (k, v) in records {
                appends.add("lkv", 0, keyed(k, *v));
            }
            log.write(appends.into_ops().collect()).await.unwrap();
        }
        // Nothing is cleanable before `segment.ms` unless enough bytes came after.
        let now = crate::storage::now_ms();
        let pass = compact(&log, now).await.expect("a pass is due");
        assert_eq!((pass.from, pass.to), (0, 6), "the last batch stays");
        assert_eq!(pass.removed_records, 3);
        assert_eq!(pass.applied.removed_batches, 2);
        let owned = |o: i64, k: &str, v: Option<&str>| (o, k.to_string(), v.map(String::from));
        let (records, bases) = read_all(&log, 0);
        assert_eq!(
            records,
            [
                owned(3, "c", Some("c1")),
                owned(4, "b", None),
                owned(5, "a", Some("a3")),
                owned(6, "d", Some("d1")),
            ]
        );
        assert_eq!(bases, [3, 4, 5, 6]);
        // A reader at a removed offset starts at the next batch; the offsets hold.
        assert_eq!(read_all(&log, 1).1, [3, 4, 5, 6]);
        assert_eq!(log.offsets("lkv", 0).unwrap().high_watermark, 7);
        let (_, parts) = log.describe("lkv").unwrap();
        assert_eq!((parts[0].log_start, parts[0].batches), (0, 4));
        // Nothing new: no pass.
        assert!(compact(&log, now).await.is_none());

        // The clean state survives a restart; the tombstone goes after its horizon.
        log.close().await.unwrap();
        log = Log::open(LogOptions::new(dir.path())).unwrap();
        assert!(compact(&log, now + 500).await.is_none());
        let pass = compact(&log, now + 1_001)
            .await
            .expect("the tombstone is due");
        assert_eq!(pass.removed_records, 1);
        let (records, bases) = read_all(&log, 0);
        assert_eq!(
            records,
            [
                owned(3, "c", Some("c1")),
                owned(5, "a", Some("a3")),
                owned(6, "d", Some("d1")),
            ]
        );
        assert_eq!(bases, [3, 5, 6]);

        // A record without a key is refused, from a producer as from Weir.
        let keyless = NewRecord {
            value: Some(Bytes::from_static(b"v")),
            ..NewRecord::default()
        };
        let mut appends = Appends::default();
        appends.add("lkv", 0, keyless.clone());
        assert!(matches!(
            log.write(appends.into_ops().collect()).await,
            Err(WriteError::KeylessRecord(_))
        ));
        let bytes = build::batch(&[keyless], kafka_protocol::records::Compression::None).unwrap();
        assert!(matches!(
            log.append("lkv", 0, bytes).await,
            Err(WriteError::KeylessRecord(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_record_neither_counts_as_the_latest_nor_stays() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        let config = TopicConfig::default()
            .with_overrides([("cleanup.policy", "compact"), ("segment.bytes", "14")])
            .unwrap();
        log.create_topic("lkv", 1, config).await.unwrap();
        let append = |bytes: Bytes| {
            log.write(vec![super::super::WriteOp::Append {
                topic: "lkv".into(),
                partition: 0,
                batches: vec![RecordBatch::parse(bytes).unwrap()],
            }])
        };
        let plain = |k: &str, v: &str| {
            build::batch(
                &[keyed(k, Some(v))],
                kafka_protocol::records::Compression::None,
            )
            .unwrap()
        };
        append(plain("a", "committed")).await.unwrap();
        // Producer 7's transaction writes a newer "a" at 1, then aborts (marker at 2).
        log.txn_index().begin("lkv", 0, 7, 1);
        let mut txn = bytes::BytesMut::from(&plain("a", "aborted")[..]);
        txn[43..51].copy_from_slice(&7i64.to_be_bytes());
        txn[22] |= 0x10;
        let crc = crc32c::crc32c(&txn[21..]);
        txn[17..21].copy_from_slice(&crc.to_be_bytes());
        append(txn.freeze()).await.unwrap();
        append(build::control(7, 0, false, 0, 0).unwrap())
            .await
            .unwrap();
        log.txn_index().end(
            "lkv",
            0,
            7,
            Some(super::super::txn::Aborted {
                producer_id: 7,
                first: 1,
                last: Some(2),
            }),
        );
        append(plain("b", "last")).await.unwrap();
        let pass = compact(&log, crate::storage::now_ms()).await.unwrap();
        assert_eq!((pass.to, pass.removed_records), (3, 1));
        let (records, bases) = read_all(&log, 0);
        assert_eq!(
            bases,
            [0, 2, 3],
            "the aborted batch went, the marker stayed"
        );
        assert_eq!(records[0], (0, "a".into(), Some("committed".into())));
    }
}
