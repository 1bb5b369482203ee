//! What readers need of Kafka transactions, per partition: the last stable offset
//! (below it every transaction has ended) and the aborted transactions, whose records
//! a `read_committed` reader skips. `kafka::transactions` keeps it; Kafka's Fetch,
//! and Weir's own readers (pipelines, downlinks, replication) read through it.
//!
//! No write per append: a partition's high watermark when it joins a transaction
//! bounds the transaction's first offset there (the producer's records all come
//! later), so the LSO is the least bound of the ongoing transactions, or the high
//! watermark. Kafka allows this: the LSO is a bound.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ReadResult;
use weir_wire::record_batch::RecordBatch;

/// One aborted transaction in a partition: its producer's records from `first` up to
/// the abort marker at `last` are not data. `last` is learnt from the write that
/// stores the marker, so it is `None` in that write until a later one stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aborted {
    pub producer_id: i64,
    pub first: u64,
    pub last: Option<u64>,
}

impl Aborted {
    /// Whether this transaction's records overlap `from..to`.
    fn overlaps(&self, from: u64, to: u64) -> bool {
        self.first < to && self.last.is_none_or(|last| last >= from)
    }
}

#[derive(Default)]
struct PartitionTxns {
    /// Producer id → first-offset bound of its ongoing transaction here.
    ongoing: HashMap<i64, u64>,
    aborted: Vec<Aborted>,
}

/// Every partition's transactions (topic → partition → …), shared by the coordinator
/// and the readers. Looked up by `&str`: a Fetch allocates nothing here.
#[derive(Clone, Default)]
pub struct TxnIndex(Arc<parking_lot::Mutex<HashMap<String, HashMap<u32, PartitionTxns>>>>);

impl TxnIndex {
    /// Runs `f` on the partition's entry, if it has one.
    fn with<T>(
        &self,
        topic: &str,
        partition: u32,
        f: impl FnOnce(&PartitionTxns) -> T,
    ) -> Option<T> {
        let index = self.0.lock();
        index.get(topic).and_then(|t| t.get(&partition)).map(f)
    }

    /// Runs `f` on the partition's entry, made if missing.
    fn with_mut<T>(
        &self,
        topic: &str,
        partition: u32,
        f: impl FnOnce(&mut PartitionTxns) -> T,
    ) -> T {
        let mut index = self.0.lock();
        let t = match index.get_mut(topic) {
            Some(t) => t,
            None => index.entry(topic.to_string()).or_default(),
        };
        f(t.entry(partition).or_default())
    }

    /// The last stable offset of a partition whose high watermark is `hw`.
    pub fn last_stable(&self, topic: &str, partition: u32, hw: u64) -> u64 {
        self.with(topic, partition, |p| p.ongoing.values().min().copied())
            .flatten()
            .map_or(hw, |bound| bound.min(hw))
    }

    /// The aborted transactions with records in `from..to`.
    pub fn aborted(&self, topic: &str, partition: u32, from: u64, to: u64) -> Vec<Aborted> {
        self.with(topic, partition, |p| {
            p.aborted
                .iter()
                .filter(|a| a.overlaps(from, to))
                .copied()
                .collect()
        })
        .unwrap_or_default()
    }

    /// A partition's whole aborted list, to store it with one more.
    pub fn aborted_list(&self, topic: &str, partition: u32) -> Vec<Aborted> {
        self.with(topic, partition, |p| p.aborted.clone())
            .unwrap_or_default()
    }

    /// Sets a partition's aborted list (at start, from the stored one).
    pub fn set_aborted(&self, topic: &str, partition: u32, aborted: Vec<Aborted>) {
        self.with_mut(topic, partition, |p| p.aborted = aborted);
    }

    /// The producer's transaction includes this partition from `bound` on.
    pub fn begin(&self, topic: &str, partition: u32, producer_id: i64, bound: u64) {
        self.with_mut(topic, partition, |p| {
            p.ongoing.entry(producer_id).or_insert(bound);
        });
    }

    /// The producer's transaction ended here; `aborted` when it was aborted.
    pub fn end(&self, topic: &str, partition: u32, producer_id: i64, aborted: Option<Aborted>) {
        self.with_mut(topic, partition, |p| {
            p.ongoing.remove(&producer_id);
            p.aborted.extend(aborted);
        });
    }

    /// `read` as a `read_committed` reader sees it: cut at the last stable offset,
    /// with the aborted transactions among what is left.
    pub fn committed(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        mut read: ReadResult,
    ) -> CommittedRead {
        let last_stable = self.last_stable(topic, partition, read.offsets.high_watermark);
        // The LSO is a partition's high watermark at some time: a batch boundary.
        let keep = read
            .batches
            .iter()
            .take_while(|b| (b.base_offset() as u64) < last_stable)
            .count();
        read.batches.truncate(keep);
        read.records
            .truncate(read.batches.iter().map(RecordBatch::len).sum());
        let to = read
            .batches
            .last()
            .map_or(from, |b| b.base_offset() as u64 + b.offset_count());
        CommittedRead {
            aborted: self.aborted(topic, partition, from, to),
            read,
            last_stable,
        }
    }
}

/// A read below the last stable offset.
pub struct CommittedRead {
    pub read: ReadResult,
    pub last_stable: u64,
    /// The aborted transactions with records in the read.
    pub aborted: Vec<Aborted>,
}

impl CommittedRead {
    /// Whether `batch` holds data: not a transaction's marker, not an aborted
    /// transaction's records.
    pub fn is_data(&self, batch: &RecordBatch) -> bool {
        let h = batch.header();
        if h.is_control() {
            return false;
        }
        let offset = h.base_offset() as u64;
        !(h.is_transactional()
            && self.aborted.iter().any(|a| {
                a.producer_id == h.producer_id()
                    && a.first <= offset
                    && a.last.is_none_or(|last| offset < last)
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_stable_offset_is_the_least_ongoing_bound() {
        let index = TxnIndex::default();
        assert_eq!(index.last_stable("t", 0, 10), 10);
        index.begin("t", 0, 1, 4);
        index.begin("t", 0, 2, 7);
        // A producer's bound is set when its transaction first adds the partition.
        index.begin("t", 0, 1, 9);
        assert_eq!(index.last_stable("t", 0, 10), 4);
        assert_eq!(index.last_stable("t", 1, 10), 10);
        let aborted = Aborted {
            producer_id: 1,
            first: 4,
            last: Some(8),
        };
        index.end("t", 0, 1, Some(aborted));
        assert_eq!(index.last_stable("t", 0, 10), 7);
        index.end("t", 0, 2, None);
        assert_eq!(index.last_stable("t", 0, 10), 10);
        // Listed for a read whose range overlaps 4..=8, not for one after it.
        assert_eq!(index.aborted("t", 0, 0, 5), vec![aborted]);
        assert_eq!(index.aborted("t", 0, 8, 20), vec![aborted]);
        assert!(index.aborted("t", 0, 9, 20).is_empty());
        assert!(index.aborted("t", 0, 0, 4).is_empty());
    }
}
