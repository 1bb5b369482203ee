//! Produce, in two phases (queue every partition's append, then wait for the commit),
//! idempotent producers' sequence checks, and InitProducerId.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;

use crate::acl::{Operation, Subject};
use crate::kafka::KafkaBroker;
use crate::kafka::errors;
use crate::kafka::producers::{SequenceState, Verdict};
use crate::kafka::transactions::Caller;
use crate::storage::{WriteOp, WriteOutcome};
use weir_wire::record_batch::RecordBatch;

use super::{code, s};

/// Batches, records and bytes an append adds, for the metrics.
#[derive(Clone, Copy)]
struct Produced {
    batches: u64,
    records: u64,
    bytes: u64,
}

impl Produced {
    fn of(batches: &[RecordBatch]) -> Self {
        Produced {
            batches: batches.len() as u64,
            records: batches.iter().map(|b| b.offset_count()).sum(),
            bytes: batches.iter().map(|b| b.len() as u64).sum(),
        }
    }
}

impl crate::kafka::KafkaMetrics {
    fn produced(&self, p: Produced) {
        self.produced_batches.inc_by(p.batches);
        self.produced_records.inc_by(p.records);
        self.produced_bytes.inc_by(p.bytes);
    }
}

/// A produce partition after phase one.
enum Started {
    /// Refused, or nothing to wait for.
    Done(Result<(u64, u64), (ResponseError, Option<String>)>),
    /// A plain append, queued, and what it adds once it commits.
    Plain(crate::storage::PendingWrite, Produced),
    /// An idempotent producer's batches: checked and appended in phase two.
    Idempotent {
        topic: String,
        partition: u32,
        batches: Vec<RecordBatch>,
        /// A transactional producer's id.
        txn_id: Option<String>,
    },
}

impl KafkaBroker {
    pub(super) async fn produce(
        self: &Arc<Self>,
        r: ProduceRequest,
        who: Subject<'_>,
    ) -> Option<ProduceResponse> {
        self.start_produce(r, who).await.await
    }

    /// Phase one of a produce, run in request order on the connection: validates each
    /// partition's records and queues plain (non-idempotent) appends, so that the next
    /// request can be read while these commit. Returns phase two, which waits for the
    /// commits (and handles idempotent batches, in order) and builds the response.
    pub(in crate::kafka) async fn start_produce(
        self: &Arc<Self>,
        r: ProduceRequest,
        who: Subject<'_>,
    ) -> impl std::future::Future<Output = Option<ProduceResponse>> + Send + 'static {
        let txn_id = r
            .transactional_id
            .as_ref()
            .map(|t| t.0.to_string())
            .filter(|t| !t.is_empty());
        let early = if !matches!(r.acks, -1..=1) {
            Some(ResponseError::InvalidRequiredAcks)
        } else if txn_id
            .as_ref()
            .is_some_and(|id| !self.may_use_txn_id(who, Operation::Write, id))
        {
            Some(ResponseError::TransactionalIdAuthorizationFailed)
        } else {
            None
        };
        let mut started = Vec::new();
        if early.is_none() {
            for t in &r.topic_data {
                let name = t.name.0.to_string();
                let allowed = self.may(who, Operation::Write, &name);
                for p in &t.partition_data {
                    started.push(if allowed {
                        let records = p.records.clone();
                        self.start_partition(name.clone(), p.index, records, txn_id.clone())
                            .await
                    } else {
                        Started::Done(Err((
                            ResponseError::TopicAuthorizationFailed,
                            Some(format!("not authorized to write to {name}")),
                        )))
                    });
                }
            }
        }
        let broker = self.clone();
        async move {
            if let Some(e) = early {
                return Some(broker.produce_error(&r, e));
            }
            let mut results = Vec::with_capacity(started.len());
            for s in started {
                results.push(broker.finish_partition(s).await);
            }
            if r.acks == 0 {
                return None;
            }
            let mut out = ProduceResponse::default();
            let mut results = results.into_iter();
            for t in r.topic_data {
                let mut topic = TopicProduceResponse::default();
                topic.name = t.name;
                for p in t.partition_data {
                    let mut part = PartitionProduceResponse::default();
                    part.index = p.index;
                    part.log_append_time_ms = -1;
                    match results.next().expect("one result per partition") {
                        Ok((base, log_start)) => {
                            part.base_offset = base as i64;
                            part.log_start_offset = log_start as i64;
                        }
                        Err((e, message)) => {
                            part.error_code = code(e);
                            part.base_offset = -1;
                            part.log_start_offset = -1;
                            part.error_message = message.map(|m| s(&m));
                        }
                    }
                    topic.partition_responses.push(part);
                }
                out.responses.push(topic);
            }
            Some(out)
        }
    }

    fn produce_error(&self, r: &ProduceRequest, e: ResponseError) -> ProduceResponse {
        let mut out = ProduceResponse::default();
        for t in &r.topic_data {
            let mut topic = TopicProduceResponse::default();
            topic.name = t.name.clone();
            for p in &t.partition_data {
                let mut part = PartitionProduceResponse::default();
                part.index = p.index;
                part.error_code = code(e);
                part.base_offset = -1;
                topic.partition_responses.push(part);
            }
            out.responses.push(topic);
        }
        out
    }

    /// Validates one partition's record set and, for a plain producer, queues its append.
    async fn start_partition(
        &self,
        topic: String,
        partition: i32,
        records: Option<Bytes>,
        txn_id: Option<String>,
    ) -> Started {
        let fail = |e: ResponseError, m: String| Started::Done(Err((e, Some(m))));
        let Ok(partition) = u32::try_from(partition) else {
            return fail(
                ResponseError::UnknownTopicOrPartition,
                "negative partition".into(),
            );
        };
        let Some(records) = records else {
            return fail(ResponseError::CorruptMessage, "no records".into());
        };
        let batches = match RecordBatch::parse_all(records) {
            Ok(b) => b,
            Err(e) => return fail(ResponseError::CorruptMessage, e.to_string()),
        };
        let transactional = batches[0].header().is_transactional();
        if transactional != txn_id.is_some() || batches.iter().any(|b| b.header().is_control()) {
            return fail(
                ResponseError::InvalidRecord,
                "transactional batches come with a transactional id, and control batches \
                 only from the broker"
                    .into(),
            );
        }
        if let Err(e) = self.log.check_keys(&topic, partition, &batches) {
            return fail(errors::write(&e), e.to_string());
        }
        if batches[0].header().producer_id() >= 0 {
            return Started::Idempotent {
                topic,
                partition,
                batches,
                txn_id,
            };
        }
        let produced = Produced::of(&batches);
        let op = WriteOp::Append {
            topic,
            partition,
            batches,
        };
        match self.log.submit(vec![op]).await {
            Ok(pending) => Started::Plain(pending, produced),
            Err(e) => fail(errors::write(&e), e.to_string()),
        }
    }

    /// Waits for a started partition's append; returns (base offset, log start offset).
    async fn finish_partition(
        &self,
        started: Started,
    ) -> Result<(u64, u64), (ResponseError, Option<String>)> {
        let fail = |e: ResponseError, m: String| (e, Some(m));
        match started {
            Started::Done(result) => result,
            Started::Plain(pending, produced) => {
                let outcome = pending
                    .await
                    .map_err(|e| fail(errors::write(&e), e.to_string()))?;
                self.metrics.produced(produced);
                match outcome.first() {
                    Some(WriteOutcome::Appended(a)) => Ok((a.base_offset, a.log_start)),
                    _ => Err(fail(
                        ResponseError::UnknownServerError,
                        "no append outcome".into(),
                    )),
                }
            }
            Started::Idempotent {
                topic,
                partition,
                batches,
                txn_id,
            } => {
                if let Some(id) = &txn_id {
                    let h = batches[0].header();
                    let caller = Caller {
                        id,
                        producer_id: h.producer_id(),
                        epoch: h.producer_epoch(),
                    };
                    self.txns
                        .check_produce(caller, &topic, partition)
                        .await
                        .map_err(|e| (e, Some("not in this producer's transaction".into())))?;
                }
                self.produce_idempotent(topic, partition, batches).await
            }
        }
    }

    /// Appends an idempotent producer's batches after checking their sequences.
    async fn produce_idempotent(
        &self,
        topic: String,
        partition: u32,
        batches: Vec<RecordBatch>,
    ) -> Result<(u64, u64), (ResponseError, Option<String>)> {
        let fail = |e: ResponseError, m: String| (e, Some(m));
        let producer_id = batches[0].header().producer_id();
        // Idempotent producer: check each batch's sequence, store the state with it.
        let mut slot = self
            .producers
            .slot(producer_id, &topic, partition)
            .await
            .map_err(|e| fail(errors::storage(&e), e.to_string()))?;
        let mut first_base = None;
        for batch in batches {
            let verdict = SequenceState::check(slot.state(), &batch);
            let state = match verdict {
                Verdict::Duplicate(base) => {
                    first_base.get_or_insert(base);
                    continue;
                }
                Verdict::OutOfOrder { expected, got } => {
                    return Err(fail(
                        ResponseError::OutOfOrderSequenceNumber,
                        format!("expected sequence {expected}, got {got}"),
                    ));
                }
                Verdict::FencedEpoch { current, got } => {
                    return Err(fail(
                        ResponseError::InvalidProducerEpoch,
                        format!("epoch {got} is older than {current}"),
                    ));
                }
                Verdict::Append(state) => state,
            };
            // The state's base offset is only known after the append: store the state
            // as it will be, computed from the partition's end offset in the same write.
            let expected_base = self
                .log
                .offsets(&topic, partition)
                .map_err(|e| fail(errors::read(&e), e.to_string()))?
                .high_watermark;
            let next = state.accepted(&batch, expected_base);
            let produced = Produced::of(std::slice::from_ref(&batch));
            let ops = vec![
                WriteOp::Append {
                    topic: topic.clone(),
                    partition,
                    batches: vec![batch],
                },
                slot.write_op(&next),
            ];
            let outcome = self
                .log
                .write(ops)
                .await
                .map_err(|e| fail(errors::write(&e), e.to_string()))?;
            let Some(WriteOutcome::Appended(a)) = outcome.first() else {
                return Err(fail(
                    ResponseError::UnknownServerError,
                    "no append outcome".into(),
                ));
            };
            // A plain producer on the same partition may have appended in between: then
            // the stored base offset is stale until this producer's next batch stores
            // the corrected one. Only the offset reported for a retried duplicate can
            // be affected, never what is stored.
            slot.set(next.with_last_base(a.base_offset));
            self.metrics.produced(produced);
            first_base.get_or_insert(a.base_offset);
        }
        let log_start = self
            .log
            .offsets(&topic, partition)
            .map(|o| o.log_start)
            .unwrap_or(0);
        Ok((first_base.unwrap_or(0), log_start))
    }

    pub(super) async fn init_producer_id(
        &self,
        r: InitProducerIdRequest,
    ) -> InitProducerIdResponse {
        let mut out = InitProducerIdResponse::default();
        if let Some(id) = r.transactional_id.as_ref().filter(|t| !t.0.is_empty()) {
            match self
                .txns
                .init(id.0.as_str(), r.transaction_timeout_ms, &self.producers)
                .await
            {
                Ok((producer_id, epoch)) => {
                    out.producer_id = ProducerId(producer_id);
                    out.producer_epoch = epoch;
                }
                Err(e) => {
                    out.error_code = code(e);
                    out.producer_id = ProducerId(-1);
                    out.producer_epoch = -1;
                }
            }
            return out;
        }
        if r.producer_id.0 >= 0 && r.producer_epoch >= 0 {
            // KIP-360: an idempotent producer bumps its epoch to reset sequences.
            out.producer_id = r.producer_id;
            out.producer_epoch = r.producer_epoch.wrapping_add(1).max(0);
            return out;
        }
        match self.producers.new_id().await {
            Ok(id) => {
                out.producer_id = ProducerId(id);
                out.producer_epoch = 0;
            }
            Err(e) => {
                out.error_code = code(errors::storage(&e));
                out.producer_id = ProducerId(-1);
                out.producer_epoch = -1;
            }
        }
        out
    }
}
