//! Fetch (long-polling passes over the log on the blocking pool), ListOffsets and
//! OffsetForLeaderEpoch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::*;

use crate::acl::{Operation, Subject};
use crate::kafka::KafkaBroker;
use crate::kafka::errors;
use crate::storage::{Log, PartitionOffsets, ReadError};

use super::code;

impl KafkaBroker {
    pub(super) async fn fetch(&self, r: FetchRequest, who: Subject<'_>) -> FetchResponse {
        let denied: HashSet<String> = r
            .topics
            .iter()
            .map(|t| t.topic.0.to_string())
            .filter(|name| !self.may(who, Operation::Read, name))
            .collect();
        let deadline = Instant::now() + Duration::from_millis(r.max_wait_ms.max(0) as u64);
        let max_bytes = if r.max_bytes <= 0 {
            usize::MAX
        } else {
            r.max_bytes as usize
        };
        let min_bytes = r.min_bytes.max(0) as usize;
        // Subscribe before reading, so that no append between read and wait is missed.
        let mut watchers = Vec::new();
        for t in &r.topics {
            for p in &t.partitions {
                if denied.contains(t.topic.0.as_str()) {
                    continue;
                }
                if let Ok(rx) = self
                    .log
                    .watch(t.topic.0.as_str(), p.partition.max(0) as u32)
                {
                    watchers.push(rx);
                }
            }
        }
        const READ_COMMITTED: i8 = 1;
        let pass = Arc::new(FetchPass {
            read_committed: r.isolation_level == READ_COMMITTED,
            request: r,
            max_bytes,
            denied,
        });
        loop {
            let (response, bytes, errors) = self.fetch_pass(&pass).await;
            // min_bytes 0 means "answer now", as in Kafka.
            if (bytes >= min_bytes && (bytes > 0 || min_bytes == 0))
                || errors
                || Instant::now() >= deadline
                || watchers.is_empty()
            {
                self.metrics.fetched_bytes.inc_by(bytes as u64);
                return response;
            }
            let changed = watchers.iter_mut().map(|w| Box::pin(w.changed()));
            let wait = futures::future::select_all(changed);
            if tokio::time::timeout_at(deadline.into(), wait)
                .await
                .is_err()
            {
                let (response, bytes, _) = self.fetch_pass(&pass).await;
                self.metrics.fetched_bytes.inc_by(bytes as u64);
                return response;
            }
        }
    }

    async fn fetch_pass(&self, pass: &Arc<FetchPass>) -> (FetchResponse, usize, bool) {
        let pass = pass.clone();
        self.log.blocking(move |log| pass.run(log)).await
    }

    pub(super) async fn list_offsets(
        &self,
        r: ListOffsetsRequest,
        version: i16,
        who: Subject<'_>,
    ) -> ListOffsetsResponse {
        const LATEST: i64 = -1;
        const EARLIEST: i64 = -2;
        let mut out = ListOffsetsResponse::default();
        let read_committed = r.isolation_level == 1;
        for t in r.topics {
            let name = t.name.0.to_string();
            let allowed = self.may(who, Operation::Describe, &name);
            let mut topic = ListOffsetsTopicResponse::default();
            topic.name = t.name;
            for p in t.partitions {
                let mut part = ListOffsetsPartitionResponse::default();
                part.partition_index = p.partition_index;
                part.timestamp = -1;
                part.offset = -1;
                if version >= 4 {
                    part.leader_epoch = 0;
                }
                let partition = p.partition_index.max(0) as u32;
                let result = match p.timestamp {
                    LATEST | EARLIEST => self.log.offsets(&name, partition).map(|o| {
                        Some((
                            match p.timestamp {
                                // read_committed: the end is the last stable offset.
                                LATEST if read_committed => self.log.txn_index().last_stable(
                                    &name,
                                    partition,
                                    o.high_watermark,
                                ),
                                LATEST => o.high_watermark,
                                _ => o.log_start,
                            },
                            -1,
                        ))
                    }),
                    ts if ts >= 0 => {
                        let name = name.clone();
                        let found = self
                            .log
                            .blocking(move |log| log.offset_for_timestamp(&name, partition, ts));
                        found.await
                    }
                    _ => Ok(None),
                };
                match result {
                    Ok(Some((offset, timestamp))) => {
                        part.offset = offset as i64;
                        part.timestamp = timestamp;
                    }
                    Ok(None) => {}
                    Err(e) => part.error_code = code(errors::read(&e)),
                }
                if p.partition_index < 0 {
                    part.error_code = code(ResponseError::UnknownTopicOrPartition);
                }
                if !allowed {
                    part.error_code = code(ResponseError::TopicAuthorizationFailed);
                    part.offset = -1;
                    part.timestamp = -1;
                }
                topic.partitions.push(part);
            }
            out.topics.push(topic);
        }
        out
    }

    pub(super) fn offset_for_leader_epoch(
        &self,
        r: OffsetForLeaderEpochRequest,
        who: Subject<'_>,
    ) -> OffsetForLeaderEpochResponse {
        let mut out = OffsetForLeaderEpochResponse::default();
        for t in r.topics {
            let allowed = self.may(who, Operation::Describe, t.topic.0.as_str());
            let mut topic = offset_for_leader_epoch_response::OffsetForLeaderTopicResult::default();
            for p in t.partitions {
                let mut part = offset_for_leader_epoch_response::EpochEndOffset::default();
                part.partition = p.partition;
                // One leader, epoch 0, forever: its end is the log end.
                let offsets = if allowed {
                    self.log
                        .offsets(t.topic.0.as_str(), p.partition.max(0) as u32)
                        .map_err(|e| errors::read(&e))
                } else {
                    Err(ResponseError::TopicAuthorizationFailed)
                };
                match offsets {
                    Ok(o) => {
                        part.leader_epoch = 0;
                        part.end_offset = o.high_watermark as i64;
                    }
                    Err(e) => {
                        part.error_code = code(e);
                        part.leader_epoch = -1;
                        part.end_offset = -1;
                    }
                }
                topic.partitions.push(part);
            }
            topic.topic = t.topic;
            out.topics.push(topic);
        }
        out
    }
}

fn set_offsets(part: &mut PartitionData, offsets: PartitionOffsets, last_stable: u64) {
    part.high_watermark = offsets.high_watermark as i64;
    part.last_stable_offset = last_stable as i64;
    part.log_start_offset = offsets.log_start as i64;
}

/// One pass of a Fetch over its partitions, on the blocking pool (it reads the log);
/// a Fetch waiting for `min_bytes` makes one per append it is woken by.
struct FetchPass {
    request: FetchRequest,
    max_bytes: usize,
    /// Topics the client may not read: answered TOPIC_AUTHORIZATION_FAILED.
    denied: HashSet<String>,
    /// Only below the last stable offset, with the aborted transactions listed.
    read_committed: bool,
}

impl FetchPass {
    /// One pass over the requested partitions: (response, record bytes, any error).
    /// Blocking: it reads the log.
    fn run(&self, log: &Log) -> (FetchResponse, usize, bool) {
        let (r, max_bytes, denied) = (&self.request, self.max_bytes, &self.denied);
        let mut out = FetchResponse::default();
        let mut total = 0usize;
        let mut any_error = false;
        for t in &r.topics {
            let name = t.topic.0.to_string();
            let mut topic = FetchableTopicResponse::default();
            topic.topic = t.topic.clone();
            for p in &t.partitions {
                let mut part = PartitionData::default();
                part.partition_index = p.partition;
                part.high_watermark = -1;
                part.last_stable_offset = -1;
                part.log_start_offset = -1;
                part.preferred_read_replica = BrokerId(-1);
                let room = max_bytes.saturating_sub(total);
                let result = if denied.contains(&name) {
                    Err(ResponseError::TopicAuthorizationFailed)
                } else if p.partition < 0 || p.fetch_offset < 0 {
                    Err(if p.partition < 0 {
                        ResponseError::UnknownTopicOrPartition
                    } else {
                        ResponseError::OffsetOutOfRange
                    })
                } else if room == 0 && total > 0 {
                    // The response is full: report offsets only.
                    log.offsets(&name, p.partition as u32)
                        .map(|o| {
                            let last_stable = log.txn_index().last_stable(
                                &name,
                                p.partition as u32,
                                o.high_watermark,
                            );
                            (Bytes::new(), o, last_stable, None)
                        })
                        .map_err(|e| errors::read(&e))
                } else {
                    let limit = (p.partition_max_bytes.max(0) as usize).min(room.max(1));
                    let (partition, from) = (p.partition as u32, p.fetch_offset as u64);
                    if self.read_committed {
                        log.read_committed(&name, partition, from, limit).map(|c| {
                            let hw = c.read.offsets;
                            (c.read.records, hw, c.last_stable, Some(c.aborted))
                        })
                    } else {
                        log.read(&name, partition, from, limit).map(|read| {
                            let hw = read.offsets.high_watermark;
                            (read.records, read.offsets, hw, None)
                        })
                    }
                    .map_err(|e| match e {
                        ReadError::OffsetOutOfRange { offsets, .. } => {
                            part.high_watermark = offsets.high_watermark as i64;
                            part.log_start_offset = offsets.log_start as i64;
                            ResponseError::OffsetOutOfRange
                        }
                        other => errors::read(&other),
                    })
                };
                match result {
                    Ok((records, offsets, last_stable, aborted)) => {
                        set_offsets(&mut part, offsets, last_stable);
                        part.aborted_transactions = aborted.map(|list| {
                            list.iter()
                                .map(|a| {
                                    let mut out = fetch_response::AbortedTransaction::default();
                                    out.producer_id = ProducerId(a.producer_id);
                                    out.first_offset = a.first as i64;
                                    out
                                })
                                .collect()
                        });
                        if !records.is_empty() {
                            total += records.len();
                            part.records = Some(records);
                        }
                    }
                    Err(e) => {
                        any_error = true;
                        part.error_code = code(e);
                    }
                }
                topic.partitions.push(part);
            }
            out.responses.push(topic);
        }
        (out, total, any_error)
    }
}
