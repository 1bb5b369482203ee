//! What one group's commands do inside its write transaction: validation, offset
//! assignment and appends, topic changes, and retention.

use std::collections::HashMap;

use redb::{Durability, ReadableTable, WriteTransaction};

use super::super::compaction::{Applied, Edit, NAMESPACE as COMPACTION};
use super::super::tables::*;
use super::super::{
    AppendOutcome, NotFound, RetentionDeletion, StorageError, TopicConfig, TopicError, TopicInfo,
    TopicName, WriteError, WriteOp, WriteOutcome, encode_stored,
};
use super::open::start_generation;
use super::{Changes, Command, Outcome, Tables, TopicState, Writer};
use weir_wire::record_batch::build::{BATCH_OVERHEAD, NewRecord, batch, size_bound};
use weir_wire::record_batch::{self, BatchError, RecordBatch};

/// Most batches one retention run deletes, so that its transaction stays small.
const MAX_RETENTION_BATCHES: usize = 20_000;

/// The largest batch the writer makes of waiting records: big enough that a window's
/// small messages share a header, small enough for any fetch size a client asks.
const MERGED_BATCH_MAX_BYTES: usize = 256 * 1024;

/// Records of `WriteOp::AppendRecords` in this group, per partition, not yet encoded.
#[derive(Default)]
struct Unencoded(HashMap<(String, u32), Vec<NewRecord>>);

impl Writer {
    /// Applies the group in one write transaction, ready to commit. Returns it with one
    /// outcome per command and whether the commit will be durable.
    /// `journal_seq`: the group goes to the journal as that entry, and its commit is
    /// not durable.
    pub(super) fn prepare_group(
        &mut self,
        group: &[Command],
        changes: &mut Changes,
        now: i64,
        journal_seq: Option<u64>,
    ) -> Result<(WriteTransaction, Vec<Outcome>, bool), StorageError> {
        let db = self.shared.db.get()?;
        let mut txn = db.begin_write()?;
        // The test-only early acknowledgement also skips durability, as a broker that
        // acknowledges from memory does.
        let flush = group.iter().any(|c| matches!(c, Command::Flush { .. }));
        let durable = journal_seq.is_none() && (self.options.acks_wait_for_durability() || flush);
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut tables = Tables::open(&txn)?;
            if let Some(journal) = &self.journal {
                match journal_seq {
                    Some(seq) => {
                        tables.meta.insert(JOURNAL_SEQ, seq)?;
                    }
                    // A durable commit is a checkpoint: the next generation starts.
                    None if durable => {
                        start_generation(&mut tables.meta, journal.generation() + 1)?
                    }
                    None => {}
                }
            }
            let mut unencoded = Unencoded::default();
            for command in group {
                if !matches!(command, Command::Write { .. }) {
                    self.encode_all(&mut tables, &mut unencoded, now, changes)?;
                }
                outcomes.push(match command {
                    Command::Write { ops, .. } => Outcome::Write(self.apply_write(
                        &mut tables,
                        &mut unencoded,
                        ops,
                        now,
                        changes,
                    )?),
                    Command::CreateTopic {
                        name,
                        partitions,
                        config,
                        ..
                    } => Outcome::Topic(self.create_topic(
                        &mut tables,
                        name,
                        *partitions,
                        config,
                        now,
                        changes,
                    )?),
                    Command::SetTopicConfig { name, config, .. } => {
                        Outcome::Topic(self.set_topic_config(&mut tables, name, config, changes)?)
                    }
                    Command::DeleteTopic { name, .. } => {
                        Outcome::Deleted(self.delete_topic(&mut tables, name, changes)?)
                    }
                    Command::Retention { now_ms, .. } => {
                        Outcome::Retention(self.retention(&mut tables, *now_ms, changes)?)
                    }
                    Command::Compact {
                        topic,
                        partition,
                        id,
                        edits,
                        state,
                        ..
                    } => Outcome::Compacted(self.compact(
                        &mut tables,
                        topic,
                        *partition,
                        *id,
                        edits,
                        state,
                    )?),
                    Command::Flush { .. } | Command::Shutdown => Outcome::Done,
                });
            }
            self.encode_all(&mut tables, &mut unencoded, now, changes)?;
        }
        Ok((txn, outcomes, durable))
    }

    /// Validates every op of one request against the state, then applies them all.
    /// Validation failures answer this request only; storage errors fail the group.
    fn apply_write(
        &mut self,
        tables: &mut Tables<'_>,
        unencoded: &mut Unencoded,
        ops: &[WriteOp],
        now: i64,
        changes: &mut Changes,
    ) -> Result<Result<Vec<WriteOutcome>, WriteError>, StorageError> {
        for op in ops {
            if let Err(e) = self.validate(op) {
                self.shared.metrics.refused_writes.inc();
                return Ok(Err(e));
            }
        }
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            outcomes.push(match op {
                WriteOp::Append {
                    topic,
                    partition,
                    batches,
                } => {
                    // Records waiting to be encoded come first in the partition.
                    self.encode(tables, unencoded, topic, *partition, now, changes)?;
                    WriteOutcome::Appended(
                        self.append(tables, topic, *partition, batches, now, changes)?,
                    )
                }
                WriteOp::AppendRecords {
                    topic,
                    partition,
                    records,
                } => {
                    WriteOutcome::Appended(self.reserve(unencoded, topic, *partition, records, now))
                }
                WriteOp::CommitOffset {
                    group,
                    topic,
                    partition,
                    offset,
                } => {
                    let value = encode_stored(offset);
                    tables.group_offsets.insert(
                        (group.as_str(), topic.as_str(), *partition),
                        value.as_slice(),
                    )?;
                    WriteOutcome::Done
                }
                WriteOp::DeleteGroupOffsets { group } => {
                    tables
                        .group_offsets
                        .retain_in((group.as_str(), "", 0).., |(g, _, _), _| {
                            g != group.as_str()
                        })?;
                    WriteOutcome::Done
                }
                WriteOp::PutState {
                    namespace,
                    key,
                    value,
                } => {
                    let key = (namespace.as_str(), key.as_str());
                    match value {
                        Some(value) => drop(tables.state.insert(key, value.as_slice())?),
                        None => drop(tables.state.remove(key)?),
                    }
                    WriteOutcome::Done
                }
            });
        }
        Ok(Ok(outcomes))
    }

    fn validate(&self, op: &WriteOp) -> Result<(), WriteError> {
        let (topic, partition) = match op {
            WriteOp::Append {
                topic, partition, ..
            }
            | WriteOp::AppendRecords {
                topic, partition, ..
            } => (topic, *partition),
            WriteOp::CommitOffset {
                topic, partition, ..
            } => (topic, *partition),
            WriteOp::DeleteGroupOffsets { .. } | WriteOp::PutState { .. } => return Ok(()),
        };
        let state = self
            .state
            .topics
            .get(topic)
            .ok_or_else(|| NotFound::Topic(topic.clone()))?;
        NotFound::check(topic, partition, state.record.partitions)?;
        let max = state.record.config.max_message_bytes;
        match op {
            WriteOp::Append { batches, .. } => {
                if let Some(b) = batches.iter().find(|b| b.len() > max as usize) {
                    return Err(WriteError::MessageTooLarge { size: b.len(), max });
                }
            }
            WriteOp::AppendRecords { records, .. } => {
                if records.is_empty() {
                    return Err(WriteError::InvalidBatch(BatchError::Empty));
                }
                if state.record.config.cleanup_policy.compacts()
                    && records.iter().any(|r| r.key.is_none())
                {
                    return Err(WriteError::KeylessRecord(topic.clone()));
                }
                let largest = records.iter().map(size_bound).max().unwrap_or(0);
                if BATCH_OVERHEAD + largest > max as usize {
                    return Err(WriteError::MessageTooLarge {
                        size: BATCH_OVERHEAD + largest,
                        max,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Gives `records` their offsets, after the partition's records already waiting, and
    /// keeps them to be encoded with those (`encode`) before the commit.
    fn reserve(
        &self,
        unencoded: &mut Unencoded,
        topic: &str,
        partition: u32,
        records: &[NewRecord],
        now: i64,
    ) -> AppendOutcome {
        let state = self.state.topics.get(topic).expect("validated");
        let part = &state.partitions[partition as usize];
        let waiting = unencoded
            .0
            .entry((topic.to_string(), partition))
            .or_default();
        let base_offset = part.next_offset + waiting.len() as u64;
        waiting.extend_from_slice(records);
        AppendOutcome {
            base_offset,
            last_offset: base_offset + records.len() as u64 - 1,
            log_start: part.log_start,
            append_time_ms: now,
        }
    }

    /// Appends the records waiting for one partition as few batches as the topic's
    /// max.message.bytes (and `MERGED_BATCH_MAX_BYTES`) allow.
    fn encode(
        &mut self,
        tables: &mut Tables<'_>,
        unencoded: &mut Unencoded,
        topic: &str,
        partition: u32,
        now: i64,
        changes: &mut Changes,
    ) -> Result<(), StorageError> {
        let Some(records) = unencoded.0.remove(&(topic.to_string(), partition)) else {
            return Ok(());
        };
        let state = self.state.topics.get(topic).expect("validated");
        let limit = MERGED_BATCH_MAX_BYTES.min(state.record.config.max_message_bytes as usize);
        let codec = state.record.config.compression_type.for_broker_batches();
        let mut rest = records.as_slice();
        while !rest.is_empty() {
            // Validation saw every record fit alone; the first always goes in.
            let mut size = BATCH_OVERHEAD + size_bound(&rest[0]);
            let mut n = 1;
            while n < rest.len() && size + size_bound(&rest[n]) <= limit {
                size += size_bound(&rest[n]);
                n += 1;
            }
            let (chunk, after) = rest.split_at(n);
            let corrupt = |detail: String| StorageError::Corrupt {
                table: "batches",
                detail: format!("cannot encode records made by the broker: {detail}"),
            };
            let bytes = batch(chunk, codec).map_err(|e| corrupt(e.to_string()))?;
            let encoded = RecordBatch::parse(bytes).map_err(|e| corrupt(e.to_string()))?;
            self.append(tables, topic, partition, &[encoded], now, changes)?;
            rest = after;
        }
        Ok(())
    }

    fn encode_all(
        &mut self,
        tables: &mut Tables<'_>,
        unencoded: &mut Unencoded,
        now: i64,
        changes: &mut Changes,
    ) -> Result<(), StorageError> {
        let waiting: Vec<(String, u32)> = unencoded.0.keys().cloned().collect();
        for (topic, partition) in waiting {
            self.encode(tables, unencoded, &topic, partition, now, changes)?;
        }
        Ok(())
    }

    fn append(
        &mut self,
        tables: &mut Tables<'_>,
        topic: &str,
        partition: u32,
        batches: &[RecordBatch],
        now: i64,
        changes: &mut Changes,
    ) -> Result<AppendOutcome, StorageError> {
        let state = self.state.topics.get_mut(topic).expect("validated");
        let id = state.record.id;
        let part = &mut state.partitions[partition as usize];
        let base_offset = part.next_offset;
        for batch in batches {
            let key = (id, partition, part.next_offset);
            let bytes = batch.as_bytes();
            {
                // Copy once, straight into the page, and stamp the broker's fields.
                let mut slot = tables
                    .batches
                    .insert_reserve(key, STORED_PREFIX + bytes.len())?;
                let (time, out) = slot.as_mut().split_at_mut(STORED_PREFIX);
                time.copy_from_slice(&now.to_be_bytes());
                out.copy_from_slice(bytes);
                record_batch::stamp(out, part.next_offset as i64, 0);
            }
            let size = bytes.len() as u64;
            part.next_offset += batch.offset_count();
            part.bytes += size;
            part.batches += 1;
            part.max_timestamp = part.max_timestamp.max(batch.max_timestamp());
            part.unindexed_bytes += size;
            if part.unindexed_bytes >= TIME_INDEX_INTERVAL_BYTES {
                tables
                    .time_index
                    .insert((id, partition, part.next_offset - 1), part.max_timestamp)?;
                part.unindexed_bytes = 0;
            }
            changes.appended_bytes += size;
            changes.appended_batches += 1;
        }
        tables.partitions.insert((id, partition), part.to_tuple())?;
        changes.advanced.insert((topic.to_string(), partition));
        Ok(AppendOutcome {
            base_offset,
            last_offset: part.next_offset - 1,
            log_start: part.log_start,
            append_time_ms: now,
        })
    }

    fn create_topic(
        &mut self,
        tables: &mut Tables<'_>,
        name: &TopicName,
        partitions: u32,
        config: &TopicConfig,
        now: i64,
        changes: &mut Changes,
    ) -> Result<Result<TopicInfo, TopicError>, StorageError> {
        if self.state.topics.contains_key(name.as_str()) {
            return Ok(Err(TopicError::AlreadyExists(name.to_string())));
        }
        let collision = name.collision_form();
        if let Some(existing) = self
            .state
            .topics
            .keys()
            .find(|t| TopicName::new(t.as_str()).is_ok_and(|t| t.collision_form() == collision))
        {
            return Ok(Err(TopicError::Collides {
                name: name.to_string(),
                existing: existing.clone(),
            }));
        }
        let id = self.state.next_topic_id;
        self.state.next_topic_id += 1;
        let record = TopicRecord {
            id,
            partitions,
            config: config.clone(),
            created_ms: now,
        };
        let encoded = encode_stored(&record);
        tables
            .meta
            .insert("next_topic_id", u64::from(self.state.next_topic_id))?;
        tables.topics.insert(name.as_str(), encoded.as_slice())?;
        for p in 0..partitions {
            tables
                .partitions
                .insert((id, p), PartitionRow::EMPTY.to_tuple())?;
        }
        let empty = PartitionRow::EMPTY;
        self.state.topics.insert(
            name.to_string(),
            TopicState {
                record,
                partitions: vec![empty; partitions as usize],
            },
        );
        changes.created.push(name.to_string());
        Ok(Ok(self.state.info(name.as_str())))
    }

    fn set_topic_config(
        &mut self,
        tables: &mut Tables<'_>,
        name: &str,
        config: &TopicConfig,
        changes: &mut Changes,
    ) -> Result<Result<TopicInfo, TopicError>, StorageError> {
        let Some(topic) = self.state.topics.get_mut(name) else {
            return Ok(Err(TopicError::NotFound(name.to_string())));
        };
        topic.record.config = config.clone();
        let encoded = encode_stored(&topic.record);
        tables.topics.insert(name, encoded.as_slice())?;
        changes.reconfigured.push(name.to_string());
        Ok(Ok(self.state.info(name)))
    }

    fn delete_topic(
        &mut self,
        tables: &mut Tables<'_>,
        name: &str,
        changes: &mut Changes,
    ) -> Result<Result<(), TopicError>, StorageError> {
        let Some(topic) = self.state.topics.remove(name) else {
            return Ok(Err(TopicError::NotFound(name.to_string())));
        };
        let id = topic.record.id;
        tables
            .batches
            .retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
        tables
            .time_index
            .retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
        tables
            .partitions
            .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
        tables.group_offsets.retain(|(_, t, _), _| t != name)?;
        for p in 0..topic.record.partitions {
            let key = format!("{name}/{p}");
            tables.state.remove((COMPACTION, key.as_str()))?;
        }
        tables.topics.remove(name)?;
        changes.deleted.push(name.to_string());
        Ok(Ok(()))
    }

    /// Deletes, per partition and from the oldest, whole batches appended more than
    /// `retention.ms` ago or beyond `retention.bytes`, and moves the log start offset.
    fn retention(
        &mut self,
        tables: &mut Tables<'_>,
        now: i64,
        changes: &mut Changes,
    ) -> Result<Vec<RetentionDeletion>, StorageError> {
        let mut deletions = Vec::new();
        let mut budget = MAX_RETENTION_BATCHES;
        for (name, topic) in &mut self.state.topics {
            let config = &topic.record.config;
            if !config.cleanup_policy.deletes()
                || config.retention_ms.is_none() && config.retention_bytes.is_none()
            {
                continue;
            }
            let cutoff = config.retention_ms.map(|ms| now.saturating_sub(ms as i64));
            let id = topic.record.id;
            for (p, part) in topic.partitions.iter_mut().enumerate() {
                let p = p as u32;
                let from = part.log_start;
                let mut freed = 0u64;
                let mut doomed = Vec::new();
                for entry in tables.batches.range((id, p, 0)..=(id, p, u64::MAX))? {
                    if budget == 0 {
                        break;
                    }
                    let (key, value) = entry?;
                    let key = key.value();
                    let (header, batch) = super::super::stored(key, value.value())?;
                    let append_time = split_stored(value.value()).map_or(i64::MIN, |(t, _)| t);
                    let expired = cutoff.is_some_and(|c| append_time < c);
                    let oversize = config
                        .retention_bytes
                        .is_some_and(|max| part.bytes - freed > max);
                    if !(expired || oversize) {
                        break;
                    }
                    doomed.push(key.2);
                    freed += batch.len() as u64;
                    part.log_start = key.2 + header.offset_count();
                    budget -= 1;
                }
                if doomed.is_empty() {
                    continue;
                }
                for base in &doomed {
                    tables.batches.remove((id, p, *base))?;
                }
                // Time-index entries for deleted offsets go too.
                tables
                    .time_index
                    .retain_in((id, p, 0)..(id, p, part.log_start), |_, _| false)?;
                part.bytes -= freed;
                part.batches -= doomed.len() as u64;
                changes.retention_batches += doomed.len() as u64;
                changes.retention_bytes += freed;
                tables.partitions.insert((id, p), part.to_tuple())?;
                changes.advanced.insert((name.clone(), p));
                deletions.push(RetentionDeletion {
                    topic: name.clone(),
                    partition: p,
                    from,
                    to: part.log_start,
                    bytes: freed,
                });
            }
        }
        Ok(deletions)
    }

    /// Applies a compaction pass's edits to one partition, each only if its batch is
    /// still the one the pass read (retention may have removed it since), keeping the
    /// batch's append time, and stores the partition's new clean state.
    fn compact(
        &mut self,
        tables: &mut Tables<'_>,
        topic: &str,
        partition: u32,
        id: TopicId,
        edits: &[Edit],
        state: &(String, Vec<u8>),
    ) -> Result<Applied, StorageError> {
        let mut applied = Applied::default();
        let Some(topic_state) = self
            .state
            .topics
            .get_mut(topic)
            .filter(|t| t.record.id == id && partition < t.record.partitions)
        else {
            applied.stale = edits.len() as u64;
            return Ok(applied);
        };
        let part = &mut topic_state.partitions[partition as usize];
        for edit in edits {
            let key = (id, partition, edit.base);
            let append_time = match tables.batches.get(key)? {
                Some(value) => {
                    let (header, batch) = super::super::stored(key, value.value())?;
                    (header.crc() == edit.crc && batch.len() == edit.len)
                        .then(|| split_stored(value.value()).map_or(0, |(t, _)| t))
                }
                None => None,
            };
            let Some(append_time) = append_time else {
                applied.stale += 1;
                continue;
            };
            match &edit.replacement {
                Some(bytes) => {
                    let mut value = Vec::with_capacity(STORED_PREFIX + bytes.len());
                    value.extend_from_slice(&append_time.to_be_bytes());
                    value.extend_from_slice(bytes);
                    tables.batches.insert(key, value.as_slice())?;
                    part.bytes = part.bytes.saturating_sub(edit.len as u64) + bytes.len() as u64;
                    applied.freed_bytes += (edit.len as u64).saturating_sub(bytes.len() as u64);
                    applied.rewritten_batches += 1;
                }
                None => {
                    tables.batches.remove(key)?;
                    part.bytes = part.bytes.saturating_sub(edit.len as u64);
                    part.batches = part.batches.saturating_sub(1);
                    applied.freed_bytes += edit.len as u64;
                    applied.removed_batches += 1;
                }
            }
        }
        tables.partitions.insert((id, partition), part.to_tuple())?;
        tables
            .state
            .insert((COMPACTION, state.0.as_str()), state.1.as_slice())?;
        Ok(applied)
    }
}
