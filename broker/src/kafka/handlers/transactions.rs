//! The transactional APIs: AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit and
//! EndTxn (InitProducerId is in `produce.rs`), on `kafka::transactions`.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::*;

use crate::acl::{Operation, Resource, Subject};
use crate::kafka::KafkaBroker;
use crate::kafka::transactions::{Caller, KAFKA_STATES, Status};
use crate::storage::{CommittedOffset, now_ms};

use super::{NONE, code, s};

fn caller(id: &TransactionalId, producer_id: ProducerId, epoch: i16) -> Caller<'_> {
    Caller {
        id: id.0.as_str(),
        producer_id: producer_id.0,
        epoch,
    }
}

impl KafkaBroker {
    /// v0–3: one transaction's partitions; each needs `write` on its topic.
    pub(super) async fn add_partitions_to_txn(
        &self,
        r: AddPartitionsToTxnRequest,
        who: Subject<'_>,
    ) -> AddPartitionsToTxnResponse {
        // (topic, partition, whether `who` may write the topic), asked once per topic:
        // each refusal is counted once.
        let mut wanted = Vec::new();
        for t in &r.v3_and_below_topics {
            let name = t.name.0.to_string();
            let allowed = self.may(who, Operation::Write, &name);
            for &p in &t.partitions {
                wanted.push((name.clone(), p, allowed));
            }
        }
        let results: Vec<Result<(), ResponseError>> = if wanted.iter().any(|w| !w.2) {
            // As Kafka: the refused topics say why, the others were not attempted.
            wanted
                .iter()
                .map(|&(_, _, allowed)| {
                    Err(if allowed {
                        ResponseError::OperationNotAttempted
                    } else {
                        ResponseError::TopicAuthorizationFailed
                    })
                })
                .collect()
        } else if let Some(i) = wanted.iter().position(|w| w.1 < 0) {
            (0..wanted.len())
                .map(|j| {
                    Err(if i == j {
                        ResponseError::UnknownTopicOrPartition
                    } else {
                        ResponseError::OperationNotAttempted
                    })
                })
                .collect()
        } else {
            let partitions: Vec<(String, u32)> = wanted
                .iter()
                .map(|(t, p, _)| (t.clone(), *p as u32))
                .collect();
            let caller = caller(
                &r.v3_and_below_transactional_id,
                r.v3_and_below_producer_id,
                r.v3_and_below_producer_epoch,
            );
            self.txns.add_partitions(caller, &partitions).await
        };
        let mut results = results.into_iter();
        add_partitions_response(&r, |_| match results.next() {
            Some(Err(e)) => code(e),
            _ => NONE,
        })
    }

    /// The group's `read` permission is checked with the other group requests.
    pub(super) async fn add_offsets_to_txn(
        &self,
        r: AddOffsetsToTxnRequest,
    ) -> AddOffsetsToTxnResponse {
        let caller = caller(&r.transactional_id, r.producer_id, r.producer_epoch);
        let mut out = AddOffsetsToTxnResponse::default();
        if let Err(e) = self.txns.add_group(caller, r.group_id.0.as_str()).await {
            out.error_code = code(e);
        }
        out
    }

    /// Offsets committed with the transaction. A member of a live group must be of
    /// its current generation (v3 says which), so that a consumer that lost its
    /// partitions in a rebalance cannot commit them.
    pub(super) async fn txn_offset_commit(
        &self,
        r: TxnOffsetCommitRequest,
        version: i16,
        who: Subject<'_>,
    ) -> TxnOffsetCommitResponse {
        let group = r.group_id.0.to_string();
        let stale = (version >= 3)
            .then(|| {
                self.groups
                    .check_commit(&group, r.member_id.as_str(), r.generation_id)
            })
            .flatten();
        // Each partition's own refusal, if any; then the transaction's answer for all.
        let mut offsets = Vec::new();
        let mut refusals = Vec::new();
        for t in &r.topics {
            let name = t.name.0.to_string();
            let allowed = self.may(who, Operation::Read, &name);
            for p in &t.partitions {
                let known = p.partition_index >= 0
                    && self.log.offsets(&name, p.partition_index as u32).is_ok();
                refusals.push(if !allowed {
                    Some(ResponseError::TopicAuthorizationFailed)
                } else if !known {
                    Some(ResponseError::UnknownTopicOrPartition)
                } else {
                    None
                });
                offsets.push((
                    name.clone(),
                    p.partition_index.max(0) as u32,
                    CommittedOffset {
                        offset: p.committed_offset,
                        leader_epoch: p.committed_leader_epoch,
                        metadata: p
                            .committed_metadata
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                        commit_time_ms: now_ms(),
                    },
                ));
            }
        }
        let result = match stale {
            Some(e) => Err(e),
            None if refusals.iter().any(Option::is_some) => {
                Err(ResponseError::OperationNotAttempted)
            }
            None => {
                let caller = caller(&r.transactional_id, r.producer_id, r.producer_epoch);
                self.txns.commit_offsets(caller, &group, offsets).await
            }
        };
        let mut refusals = refusals.into_iter();
        txn_offset_commit_response(&r, |_| match refusals.next().flatten() {
            Some(e) => code(e),
            None => result.map_or_else(code, |()| NONE),
        })
    }

    /// The ids `who` may describe, with their states; an unknown id says so.
    pub(super) async fn describe_transactions(
        &self,
        r: DescribeTransactionsRequest,
        who: Subject<'_>,
    ) -> DescribeTransactionsResponse {
        use describe_transactions_response::{TopicData, TransactionState};
        let states = self.txns.states().await;
        let mut out = DescribeTransactionsResponse::default();
        for id in r.transactional_ids {
            let mut d = TransactionState::default();
            d.transaction_start_time_ms = -1;
            d.producer_id = ProducerId(-1);
            d.producer_epoch = -1;
            let found = states.iter().find(|(k, _)| *k == id.0.as_str());
            if !self.may_use_txn_id(who, Operation::Describe, id.0.as_str()) {
                d.error_code = code(ResponseError::TransactionalIdAuthorizationFailed);
            } else if let Some((_, state)) = found {
                d.transaction_state = state.status.name().into();
                d.transaction_timeout_ms = state.timeout_ms;
                if state.status == Status::Ongoing {
                    d.transaction_start_time_ms = state.started_ms;
                }
                d.producer_id = ProducerId(state.producer_id);
                d.producer_epoch = state.epoch;
                for (topic, partition, _) in &state.partitions {
                    match d.topics.iter_mut().find(|t| t.topic.0.as_str() == topic) {
                        Some(t) => t.partitions.push(*partition as i32),
                        None => {
                            let mut t = TopicData::default();
                            t.topic = TopicName(s(topic));
                            t.partitions = vec![*partition as i32];
                            d.topics.push(t);
                        }
                    }
                }
            } else {
                d.error_code = code(ResponseError::TransactionalIdNotFound);
            }
            d.transactional_id = id;
            out.transaction_states.push(d);
        }
        out
    }

    /// The ids `who` may describe, filtered by state, producer id and (v1) how long
    /// the open transaction has run.
    pub(super) async fn list_transactions(
        &self,
        r: ListTransactionsRequest,
        who: Subject<'_>,
    ) -> ListTransactionsResponse {
        let mut out = ListTransactionsResponse::default();
        out.unknown_state_filters = r
            .state_filters
            .iter()
            .filter(|f| !KAFKA_STATES.contains(&f.as_str()))
            .cloned()
            .collect();
        let now = now_ms();
        for (id, state) in self.txns.states().await {
            let wanted = (r.state_filters.is_empty()
                || r.state_filters
                    .iter()
                    .any(|f| f.as_str() == state.status.name()))
                && (r.producer_id_filters.is_empty()
                    || r.producer_id_filters
                        .contains(&ProducerId(state.producer_id)))
                && (r.duration_filter < 0
                    || (state.status == Status::Ongoing
                        && now - state.started_ms >= r.duration_filter));
            if !wanted || !self.visible(who, Resource::TransactionalId(&id)) {
                continue;
            }
            let mut t = list_transactions_response::TransactionState::default();
            t.transactional_id = TransactionalId(id.into());
            t.producer_id = ProducerId(state.producer_id);
            t.transaction_state = state.status.name().into();
            out.transaction_states.push(t);
        }
        out
    }

    pub(super) async fn end_txn(&self, r: EndTxnRequest) -> EndTxnResponse {
        let caller = caller(&r.transactional_id, r.producer_id, r.producer_epoch);
        let mut out = EndTxnResponse::default();
        if let Err(e) = self.txns.end(caller, r.committed).await {
            out.error_code = code(e);
        }
        out
    }
}

/// An AddPartitionsToTxn (v0–3) response with `error(partition)` for each partition.
fn add_partitions_response(
    r: &AddPartitionsToTxnRequest,
    mut error: impl FnMut(i32) -> i16,
) -> AddPartitionsToTxnResponse {
    let mut out = AddPartitionsToTxnResponse::default();
    for t in &r.v3_and_below_topics {
        let mut topic = AddPartitionsToTxnTopicResult::default();
        topic.name = t.name.clone();
        for &p in &t.partitions {
            let mut part = AddPartitionsToTxnPartitionResult::default();
            part.partition_index = p;
            part.partition_error_code = error(p);
            topic.results_by_partition.push(part);
        }
        out.results_by_topic_v3_and_below.push(topic);
    }
    out
}

/// A TxnOffsetCommit response with `error(partition)` for each partition.
fn txn_offset_commit_response(
    r: &TxnOffsetCommitRequest,
    mut error: impl FnMut(i32) -> i16,
) -> TxnOffsetCommitResponse {
    let mut out = TxnOffsetCommitResponse::default();
    for t in &r.topics {
        let mut topic = TxnOffsetCommitResponseTopic::default();
        topic.name = t.name.clone();
        for p in &t.partitions {
            let mut part = TxnOffsetCommitResponsePartition::default();
            part.partition_index = p.partition_index;
            part.error_code = error(p.partition_index);
            topic.partitions.push(part);
        }
        out.topics.push(topic);
    }
    out
}

/// Every partition refused with `code`.
pub(super) fn add_partitions_refused(
    r: &AddPartitionsToTxnRequest,
    code: i16,
) -> AddPartitionsToTxnResponse {
    add_partitions_response(r, |_| code)
}

/// Every partition refused with `code`.
pub(super) fn txn_offset_commit_refused(
    r: &TxnOffsetCommitRequest,
    code: i16,
) -> TxnOffsetCommitResponse {
    txn_offset_commit_response(r, |_| code)
}
