//! Transactions (exactly-once read-process-write): the coordinator of transactional
//! ids, and per partition the last stable offset and the aborted transactions that a
//! `read_committed` consumer skips.
//!
//! A transactional id's state (producer id, epoch, the partitions and group offsets of
//! its ongoing transaction) is stored in the log's `state` table, written before the
//! producer is answered. Ending a transaction is **one** write: a control batch (the
//! commit or abort marker) in each of its partitions, its group offsets on commit, its
//! new state and, on abort, each partition's aborted-transaction list: a crash leaves
//! it either ended or ongoing, and a transaction found ongoing at start is aborted.
//! The per-partition view readers need (last stable offset, aborted transactions) is
//! `storage::txn::TxnIndex`, kept here.

use std::collections::HashMap;

use kafka_protocol::error::ResponseError;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::kafka::errors;
use crate::kafka::producers::Producers;
use crate::storage::txn::{Aborted, TxnIndex};
use crate::storage::{CommittedOffset, Log, WriteOp, WriteOutcome, now_ms, put_state_op};
use weir_wire::record_batch::{RecordBatch, build};

/// Transactional id → [`TxnState`].
const NAMESPACE: &str = "kafka.txn";
/// "topic/partition" → the partition's aborted transactions, `Vec<Aborted>`.
const ABORTED: &str = "kafka.aborted";
/// Kafka's `transaction.max.timeout.ms` default: a longer timeout is refused.
pub(super) const MAX_TIMEOUT_MS: i32 = 15 * 60 * 1000;
/// The coordinator epoch in markers: one coordinator, never moved.
const COORDINATOR_EPOCH: i32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Status {
    Empty,
    Ongoing,
    CompleteCommit,
    CompleteAbort,
}

impl Status {
    /// Kafka's name, as DescribeTransactions and ListTransactions give it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Status::Empty => "Empty",
            Status::Ongoing => "Ongoing",
            Status::CompleteCommit => "CompleteCommit",
            Status::CompleteAbort => "CompleteAbort",
        }
    }
}

/// Kafka's transaction states; the ones not listed in `Status` are never seen here
/// (ending a transaction is one write, and ids never expire).
pub(super) const KAFKA_STATES: [&str; 8] = [
    "Empty",
    "Ongoing",
    "PrepareCommit",
    "PrepareAbort",
    "CompleteCommit",
    "CompleteAbort",
    "Dead",
    "PrepareEpochFence",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TxnState {
    pub(super) producer_id: i64,
    pub(super) epoch: i16,
    pub(super) timeout_ms: i32,
    pub(super) status: Status,
    /// When the ongoing transaction began (its first partition or group).
    pub(super) started_ms: i64,
    /// The ongoing transaction's partitions, each with its first-offset bound.
    pub(super) partitions: Vec<(String, u32, u64)>,
    /// Groups whose offsets it may commit (AddOffsetsToTxn).
    groups: Vec<String>,
    /// (group, topic, partition, offset) committed with the transaction.
    offsets: Vec<(String, String, u32, CommittedOffset)>,
}

fn partition_key(topic: &str, partition: u32) -> String {
    format!("{topic}/{partition}")
}

/// The coordinator of every transactional id (one broker: all of them).
pub(super) struct Transactions {
    log: Log,
    /// Every transactional id's state, loaded at start; the lock serializes changes.
    txns: tokio::sync::Mutex<HashMap<String, TxnState>>,
    index: TxnIndex,
}

/// A transactional request's (id, producer id, epoch).
#[derive(Clone, Copy)]
pub(super) struct Caller<'a> {
    pub(super) id: &'a str,
    pub(super) producer_id: i64,
    pub(super) epoch: i16,
}

impl Transactions {
    pub(super) fn new(log: Log) -> Self {
        Self {
            txns: tokio::sync::Mutex::new(HashMap::new()),
            index: log.txn_index().clone(),
            log,
        }
    }

    /// Loads the stored states and aborted-transaction lists, and aborts every
    /// transaction a stop left ongoing (fencing its producer with a new epoch).
    pub(super) async fn recover(&self) -> anyhow::Result<()> {
        let mut txns = self.txns.lock().await;
        let (states, lists) = self
            .log
            .blocking(|log| {
                Ok::<_, crate::storage::StorageError>((
                    log.list_state::<TxnState>(NAMESPACE)?,
                    log.list_state::<Vec<Aborted>>(ABORTED)?,
                ))
            })
            .await?;
        for (key, list) in lists {
            let Some((topic, partition)) = key
                .rsplit_once('/')
                .and_then(|(t, p)| Some((t.to_string(), p.parse::<u32>().ok()?)))
            else {
                warn!(key, "unreadable aborted-transaction key; ignored");
                continue;
            };
            let mut resolved = Vec::with_capacity(list.len());
            for a in list {
                let t = topic.clone();
                let found = self
                    .log
                    .blocking(move |log| find_abort_marker(log, &t, partition, a))
                    .await;
                // A marker retention removed: the transaction's records went with it.
                if let Some(a) = found {
                    resolved.push(a);
                }
            }
            self.index.set_aborted(&topic, partition, resolved);
        }
        for (id, state) in states {
            if state.status == Status::Ongoing {
                for (topic, partition, bound) in &state.partitions {
                    self.index
                        .begin(topic, *partition, state.producer_id, *bound);
                }
            }
            txns.insert(id, state);
        }
        let ongoing: Vec<String> = txns
            .iter()
            .filter(|(_, s)| s.status == Status::Ongoing)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ongoing {
            info!(
                transactional_id = id,
                "aborting a transaction left ongoing by the last stop"
            );
            self.finish(&mut txns, &id, false, true)
                .await
                .map_err(|e| anyhow::anyhow!("aborting transaction {id}: {e:?}"))?;
        }
        Ok(())
    }

    /// InitProducerId for a transactional id: a producer id and a new epoch, which
    /// fences every older producer of the id; a transaction it left ongoing is aborted.
    pub(super) async fn init(
        &self,
        id: &str,
        timeout_ms: i32,
        producers: &Producers,
    ) -> Result<(i64, i16), ResponseError> {
        if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(ResponseError::InvalidTransactionTimeout);
        }
        let mut txns = self.txns.lock().await;
        if txns.get(id).is_some_and(|s| s.status == Status::Ongoing) {
            self.finish(&mut txns, id, false, true).await?;
        }
        let next = match txns.get(id) {
            // The epoch's last value is left for the abort that may fence it.
            Some(s) if s.epoch < i16::MAX - 1 => TxnState {
                epoch: s.epoch + 1,
                timeout_ms,
                status: Status::Empty,
                ..s.clone()
            },
            _ => TxnState {
                producer_id: producers.new_id().await.map_err(|e| errors::storage(&e))?,
                epoch: 0,
                timeout_ms,
                status: Status::Empty,
                started_ms: 0,
                partitions: Vec::new(),
                groups: Vec::new(),
                offsets: Vec::new(),
            },
        };
        self.store(&mut txns, id, next.clone(), Vec::new()).await?;
        Ok((next.producer_id, next.epoch))
    }

    /// AddPartitionsToTxn: each partition's result.
    pub(super) async fn add_partitions(
        &self,
        caller: Caller<'_>,
        partitions: &[(String, u32)],
    ) -> Vec<Result<(), ResponseError>> {
        let mut txns = self.txns.lock().await;
        let failed = |e| partitions.iter().map(|_| Err(e)).collect();
        let mut next = match current(&txns, caller) {
            Ok(s) => s.clone(),
            Err(e) => return failed(e),
        };
        // Kafka adds all or none: one unknown partition and the rest are not attempted.
        let mut bounds = Vec::new();
        let mut results: Vec<Result<(), ResponseError>> = Vec::new();
        for (topic, partition) in partitions {
            match self.log.offsets(topic, *partition) {
                Ok(o) => {
                    bounds.push((topic.clone(), *partition, o.high_watermark));
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(errors::read(&e))),
            }
        }
        if results.iter().any(Result::is_err) {
            return results
                .into_iter()
                .map(|r| r.and(Err(ResponseError::OperationNotAttempted)))
                .collect();
        }
        begin(&mut next);
        for (topic, partition, bound) in bounds {
            if !next
                .partitions
                .iter()
                .any(|(t, p, _)| *t == topic && *p == partition)
            {
                next.partitions.push((topic, partition, bound));
            }
        }
        let added = next.partitions.clone();
        if let Err(e) = self.store(&mut txns, caller.id, next, Vec::new()).await {
            return failed(e);
        }
        for (topic, partition, bound) in added {
            self.index
                .begin(&topic, partition, caller.producer_id, bound);
        }
        results
    }

    /// AddOffsetsToTxn: the transaction may commit `group`'s offsets.
    pub(super) async fn add_group(
        &self,
        caller: Caller<'_>,
        group: &str,
    ) -> Result<(), ResponseError> {
        let mut txns = self.txns.lock().await;
        let mut next = current(&txns, caller)?.clone();
        begin(&mut next);
        if !next.groups.iter().any(|g| g == group) {
            next.groups.push(group.to_string());
        }
        self.store(&mut txns, caller.id, next, Vec::new()).await
    }

    /// TxnOffsetCommit: offsets committed when the transaction commits. Kept in memory
    /// only: a stop aborts the transaction, and its offsets with it.
    pub(super) async fn commit_offsets(
        &self,
        caller: Caller<'_>,
        group: &str,
        offsets: Vec<(String, u32, CommittedOffset)>,
    ) -> Result<(), ResponseError> {
        let mut txns = self.txns.lock().await;
        current(&txns, caller)?;
        let state = txns.get_mut(caller.id).expect("checked by current");
        if state.status != Status::Ongoing || !state.groups.iter().any(|g| g == group) {
            return Err(ResponseError::InvalidTxnState);
        }
        for (topic, partition, offset) in offsets {
            state
                .offsets
                .retain(|(g, t, p, _)| !(g == group && *t == topic && *p == partition));
            state
                .offsets
                .push((group.to_string(), topic, partition, offset));
        }
        Ok(())
    }

    /// Whether a transaction has offsets of `group` in `topic`/`partition` waiting
    /// (OffsetFetch with `require_stable` answers UNSTABLE_OFFSET_COMMIT then).
    pub(super) async fn has_pending_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> bool {
        let txns = self.txns.lock().await;
        txns.values().any(|s| {
            s.status == Status::Ongoing
                && s.offsets
                    .iter()
                    .any(|(g, t, p, _)| g == group && t == topic && *p == partition)
        })
    }

    /// Every transactional id's state, for DescribeTransactions and ListTransactions.
    pub(super) async fn states(&self) -> Vec<(String, TxnState)> {
        let txns = self.txns.lock().await;
        let mut all: Vec<_> = txns.iter().map(|(id, s)| (id.clone(), s.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Whether the producer may append a transactional batch to this partition now.
    pub(super) async fn check_produce(
        &self,
        caller: Caller<'_>,
        topic: &str,
        partition: u32,
    ) -> Result<(), ResponseError> {
        let txns = self.txns.lock().await;
        let state = current(&txns, caller)?;
        let added = state
            .partitions
            .iter()
            .any(|(t, p, _)| t == topic && *p == partition);
        if state.status != Status::Ongoing || !added {
            return Err(ResponseError::InvalidTxnState);
        }
        Ok(())
    }

    /// EndTxn: commits or aborts the ongoing transaction. A retry of an end that
    /// already happened is answered as it was.
    pub(super) async fn end(&self, caller: Caller<'_>, commit: bool) -> Result<(), ResponseError> {
        let mut txns = self.txns.lock().await;
        let status = current(&txns, caller)?.status;
        match (status, commit) {
            (Status::Ongoing, _) => self.finish(&mut txns, caller.id, commit, false).await,
            (Status::CompleteCommit, true) | (Status::CompleteAbort, false) => Ok(()),
            _ => Err(ResponseError::InvalidTxnState),
        }
    }

    /// Aborts the transactions that outlived their timeout, fencing their producers
    /// (a new epoch), as Kafka does.
    pub(super) async fn expire(&self, now_ms: i64) {
        let mut txns = self.txns.lock().await;
        let expired: Vec<String> = txns
            .iter()
            .filter(|(_, s)| {
                s.status == Status::Ongoing && now_ms - s.started_ms > i64::from(s.timeout_ms)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            match self.finish(&mut txns, &id, false, true).await {
                Ok(()) => info!(transactional_id = id, "transaction timed out: aborted"),
                Err(e) => {
                    warn!(transactional_id = id, error = ?e, "aborting a timed-out transaction failed; retrying")
                }
            }
        }
    }

    /// Ends the ongoing transaction of `id` in one write: markers, offsets (on commit),
    /// its state, the partitions' aborted lists (on abort). `fence`: bump the epoch.
    async fn finish(
        &self,
        txns: &mut HashMap<String, TxnState>,
        id: &str,
        commit: bool,
        fence: bool,
    ) -> Result<(), ResponseError> {
        let state = txns
            .get(id)
            .expect("finish is called for a known id")
            .clone();
        let epoch = if fence {
            state.epoch.saturating_add(1)
        } else {
            state.epoch
        };
        let now = now_ms();
        // A partition deleted since it joined has nothing left to mark.
        let partitions: Vec<(String, u32, u64)> = state
            .partitions
            .iter()
            .filter(|(t, p, _)| self.log.offsets(t, *p).is_ok())
            .cloned()
            .collect();
        let mut ops = Vec::new();
        for (topic, partition, _) in &partitions {
            let marker = build::control(state.producer_id, epoch, commit, COORDINATOR_EPOCH, now)
                .and_then(|b| Ok(RecordBatch::parse(b)?))
                .map_err(|e| {
                    warn!(error = %e, "building a transaction marker failed");
                    ResponseError::UnknownServerError
                })?;
            ops.push(WriteOp::Append {
                topic: topic.clone(),
                partition: *partition,
                batches: vec![marker],
            });
        }
        if commit {
            for (group, topic, partition, offset) in &state.offsets {
                if self.log.offsets(topic, *partition).is_ok() {
                    ops.push(WriteOp::CommitOffset {
                        group: group.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        offset: offset.clone(),
                    });
                }
            }
        } else {
            for (topic, partition, bound) in &partitions {
                let log_start = self
                    .log
                    .offsets(topic, *partition)
                    .map_or(0, |o| o.log_start);
                let mut list = self.index.aborted_list(topic, *partition);
                list.retain(|a| a.last.is_none_or(|last| last >= log_start));
                list.push(Aborted {
                    producer_id: state.producer_id,
                    first: *bound,
                    last: None,
                });
                ops.push(put_state_op(
                    ABORTED,
                    &partition_key(topic, *partition),
                    &list,
                ));
            }
        }
        let next = TxnState {
            epoch,
            status: if commit {
                Status::CompleteCommit
            } else {
                Status::CompleteAbort
            },
            partitions: Vec::new(),
            groups: Vec::new(),
            offsets: Vec::new(),
            ..state.clone()
        };
        let outcomes = self
            .log
            .write({
                ops.push(put_state_op(NAMESPACE, id, &next));
                ops
            })
            .await
            .map_err(|e| errors::write(&e))?;
        for (i, (topic, partition, bound)) in partitions.iter().enumerate() {
            let aborted = match (&outcomes[i], commit) {
                (WriteOutcome::Appended(a), false) => Some(Aborted {
                    producer_id: state.producer_id,
                    first: *bound,
                    last: Some(a.base_offset),
                }),
                _ => None,
            };
            self.index
                .end(topic, *partition, state.producer_id, aborted);
        }
        // Partitions deleted meanwhile leave no index behind either.
        for (topic, partition, _) in &state.partitions {
            self.index.end(topic, *partition, state.producer_id, None);
        }
        txns.insert(id.to_string(), next);
        Ok(())
    }

    /// Stores `next` as the state of `id` (with `ops`), then keeps it.
    async fn store(
        &self,
        txns: &mut HashMap<String, TxnState>,
        id: &str,
        next: TxnState,
        mut ops: Vec<WriteOp>,
    ) -> Result<(), ResponseError> {
        ops.push(put_state_op(NAMESPACE, id, &next));
        self.log.write(ops).await.map_err(|e| errors::write(&e))?;
        txns.insert(id.to_string(), next);
        Ok(())
    }
}

/// The state of the caller's transactional id, if the caller is its current producer.
fn current<'a>(
    txns: &'a HashMap<String, TxnState>,
    caller: Caller<'_>,
) -> Result<&'a TxnState, ResponseError> {
    let state = txns
        .get(caller.id)
        .ok_or(ResponseError::InvalidProducerIdMapping)?;
    if state.producer_id != caller.producer_id {
        return Err(ResponseError::InvalidProducerIdMapping);
    }
    if state.epoch != caller.epoch {
        // An older epoch is a zombie: Kafka answers PRODUCER_FENCED (clients treat
        // INVALID_PRODUCER_EPOCH the same in transactional requests).
        return Err(ResponseError::ProducerFenced);
    }
    Ok(state)
}

/// A transaction begins with its first partition or group.
fn begin(state: &mut TxnState) {
    if state.status != Status::Ongoing {
        state.status = Status::Ongoing;
        state.started_ms = now_ms();
        state.partitions.clear();
        state.groups.clear();
        state.offsets.clear();
    }
}

/// `a` with the offset of its abort marker, found by reading the partition from the
/// transaction's first offset; `None` when retention removed it (or the partition).
/// Blocking: it reads the log.
fn find_abort_marker(log: &Log, topic: &str, partition: u32, a: Aborted) -> Option<Aborted> {
    let log_start = log.offsets(topic, partition).ok()?.log_start;
    if a.last.is_some() {
        return (a.last >= Some(log_start)).then_some(a);
    }
    // Retention may have removed the transaction's first records, not its marker.
    let mut next = a.first.max(log_start);
    loop {
        let read = log.read(topic, partition, next, 1 << 20).ok()?;
        if read.batches.is_empty() {
            return None;
        }
        for batch in &read.batches {
            let h = batch.header();
            if h.is_control() && h.producer_id() == a.producer_id && !is_commit(batch) {
                return Some(Aborted {
                    last: Some(h.base_offset() as u64),
                    ..a
                });
            }
            next = h.base_offset() as u64 + h.offset_count();
        }
    }
}

/// Whether a control batch is a commit marker (its record's key type is 1).
fn is_commit(batch: &RecordBatch) -> bool {
    let mut bytes = batch.as_bytes().clone();
    kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes)
        .ok()
        .and_then(|set| {
            let key = set.records.first()?.key.clone()?;
            Some(key.len() >= 4 && key[2..4] == [0, 1])
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{LogOptions, TopicConfig};
    use weir_wire::record_batch::build::NewRecord;

    async fn append(log: &Log, n: usize) {
        let records = (0..n)
            .map(|i| NewRecord {
                value: Some(format!("v{i}").into()),
                ..Default::default()
            })
            .collect();
        log.write(vec![WriteOp::AppendRecords {
            topic: "t".into(),
            partition: 0,
            records,
        }])
        .await
        .unwrap();
    }

    fn markers(log: &Log) -> Vec<(u64, bool)> {
        let read = log.read("t", 0, 0, usize::MAX).unwrap();
        read.batches
            .iter()
            .filter(|b| b.header().is_control())
            .map(|b| (b.base_offset() as u64, is_commit(b)))
            .collect()
    }

    fn offset(log: &Log) -> Option<i64> {
        let committed = log.committed_offsets("g").unwrap();
        committed.first().map(|(_, _, c)| c.offset)
    }

    /// Commit, abort, and a transaction left open by a stop: aborted at the next
    /// start, its aborted range found again at the start after that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_aborts_and_a_restart_ends_what_was_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let producers = Producers::new(log.clone());
        let txns = Transactions::new(log.clone());
        txns.recover().await.unwrap();
        let (pid, epoch) = txns.init("app", 60_000, &producers).await.unwrap();
        let me = Caller {
            id: "app",
            producer_id: pid,
            epoch,
        };
        let part = [("t".to_string(), 0)];

        // Committed: a commit marker after the records, the offsets stored with it.
        assert!(
            txns.add_partitions(me, &part)
                .await
                .iter()
                .all(Result::is_ok)
        );
        txns.add_group(me, "g").await.unwrap();
        append(&log, 3).await;
        let offset42 = CommittedOffset {
            offset: 42,
            leader_epoch: 0,
            metadata: String::new(),
            commit_time_ms: 0,
        };
        let offsets = vec![("t".to_string(), 0, offset42)];
        txns.commit_offsets(me, "g", offsets).await.unwrap();
        assert_eq!(log.txn_index().last_stable("t", 0, 3), 0);
        assert_eq!(offset(&log), None);
        txns.end(me, true).await.unwrap();
        assert_eq!(markers(&log), vec![(3, true)]);
        assert_eq!(offset(&log), Some(42));
        assert_eq!(log.txn_index().last_stable("t", 0, 4), 4);
        // A retried EndTxn is answered as the first; the other outcome is refused.
        txns.end(me, true).await.unwrap();
        assert_eq!(
            txns.end(me, false).await,
            Err(ResponseError::InvalidTxnState)
        );

        // Aborted: an abort marker, and the range listed for read_committed readers.
        txns.add_partitions(me, &part).await;
        append(&log, 2).await;
        txns.end(me, false).await.unwrap();
        assert_eq!(markers(&log), vec![(3, true), (6, false)]);
        let aborted = Aborted {
            producer_id: pid,
            first: 4,
            last: Some(6),
        };
        assert_eq!(log.txn_index().aborted("t", 0, 0, 7), vec![aborted]);

        // Open when the broker stops: the next start aborts it and fences the producer.
        txns.add_partitions(me, &part).await;
        append(&log, 1).await;
        assert_eq!(log.txn_index().last_stable("t", 0, 8), 7);
        drop(txns);
        log.close().await.unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        let txns = Transactions::new(log.clone());
        txns.recover().await.unwrap();
        assert_eq!(markers(&log), vec![(3, true), (6, false), (8, false)]);
        assert_eq!(log.txn_index().last_stable("t", 0, 9), 9);
        let second = Aborted {
            first: 7,
            last: Some(8),
            ..aborted
        };
        assert_eq!(log.txn_index().aborted("t", 0, 0, 9), vec![aborted, second]);
        assert_eq!(txns.end(me, true).await, Err(ResponseError::ProducerFenced));

        // The last abort's marker offset was not stored with it: found again by reading.
        log.close().await.unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        let txns = Transactions::new(log.clone());
        txns.recover().await.unwrap();
        assert_eq!(log.txn_index().aborted("t", 0, 0, 9), vec![aborted, second]);
        // A new producer of the id gets a newer epoch.
        let (again, newer) = txns.init("app", 60_000, &producers).await.unwrap();
        assert_eq!(again, pid);
        assert!(newer > epoch + 1);
    }
}
