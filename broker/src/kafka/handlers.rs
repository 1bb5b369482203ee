//! One function per Kafka API, on top of `storage::Log`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::Client;
use super::KafkaBroker;
use super::errors;
use super::groups::{GroupState, JoinRequest};
use super::producers::{SequenceState, Verdict};
use crate::acl::{Operation, Resource, Subject};
use crate::storage::{
    CommittedOffset, Log, PartitionOffsets, ReadError, TopicError, WriteOp, WriteOutcome, now_ms,
};
use weir_wire::kafka_codec::Request;
use weir_wire::record_batch::RecordBatch;

const NONE: i16 = 0;

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

impl super::KafkaMetrics {
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
    },
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn topic_name(v: &str) -> TopicName {
    TopicName(s(v))
}

impl KafkaBroker {
    /// Answers one request; `None` for requests that get no response (acks=0).
    pub(super) async fn handle(
        self: &Arc<Self>,
        request: Request,
        client: &Client,
    ) -> Option<ResponseKind> {
        let client_host = client.host.as_str();
        let version = request.version();
        let client_id = request.header.client_id.as_deref().unwrap_or_default();
        let who = client.subject(client_id);
        if let Some(refused) = self.group_refusal(who, &request.body) {
            return Some(refused);
        }
        Some(match request.body {
            RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(self.api_versions()),
            RequestKind::Metadata(r) => {
                ResponseKind::Metadata(self.metadata(r, version, client, who).await)
            }
            RequestKind::Produce(r) => {
                return self.produce(r, who).await.map(ResponseKind::Produce);
            }
            RequestKind::Fetch(r) => ResponseKind::Fetch(self.fetch(r, who).await),
            RequestKind::ListOffsets(r) => {
                ResponseKind::ListOffsets(self.list_offsets(r, version, who).await)
            }
            RequestKind::InitProducerId(r) => {
                ResponseKind::InitProducerId(self.init_producer_id(r).await)
            }
            RequestKind::CreateTopics(r) => {
                ResponseKind::CreateTopics(self.create_topics(r, who).await)
            }
            RequestKind::DeleteTopics(r) => {
                ResponseKind::DeleteTopics(self.delete_topics(r, who).await)
            }
            RequestKind::DescribeConfigs(r) => {
                ResponseKind::DescribeConfigs(self.describe_configs(r, who))
            }
            RequestKind::OffsetForLeaderEpoch(r) => {
                ResponseKind::OffsetForLeaderEpoch(self.offset_for_leader_epoch(r, who))
            }
            RequestKind::FindCoordinator(r) => {
                ResponseKind::FindCoordinator(self.find_coordinator(r, client))
            }
            RequestKind::JoinGroup(r) => {
                let client_id = client_id.to_string();
                ResponseKind::JoinGroup(self.join_group(r, version, client_id, client_host).await)
            }
            RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(self.sync_group(r).await),
            RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(self.heartbeat(r)),
            RequestKind::LeaveGroup(r) => ResponseKind::LeaveGroup(self.leave_group(r, version)),
            RequestKind::OffsetCommit(r) => {
                ResponseKind::OffsetCommit(self.offset_commit(r, who).await)
            }
            RequestKind::OffsetFetch(r) => {
                ResponseKind::OffsetFetch(self.offset_fetch(r, who).await)
            }
            RequestKind::ListGroups(_) => ResponseKind::ListGroups(self.list_groups(who).await),
            RequestKind::DescribeGroups(r) => {
                ResponseKind::DescribeGroups(self.describe_groups(r, who).await)
            }
            // The connection answers these itself (`gatekeep`); here only out of place.
            RequestKind::SaslHandshake(_) => {
                let mut body = kafka_protocol::messages::SaslHandshakeResponse::default();
                body.error_code = ResponseError::IllegalSaslState.code();
                ResponseKind::SaslHandshake(body)
            }
            RequestKind::SaslAuthenticate(_) => {
                let mut body = kafka_protocol::messages::SaslAuthenticateResponse::default();
                body.error_code = ResponseError::IllegalSaslState.code();
                ResponseKind::SaslAuthenticate(body)
            }
            other => {
                // decode_request only lets through the APIs in SUPPORTED_APIS.
                tracing::error!(request = ?other, "internal: a served API has no handler");
                return None;
            }
        })
    }

    // ---- authorization ----

    /// Whether `[[auth.acl]]` lets `who` do `op` on `topic`; a refusal is counted.
    fn may(&self, who: Subject<'_>, op: Operation, topic: &str) -> bool {
        self.gate.authorize(who, op, Resource::Topic(topic))
    }

    /// Whether `who` may see `resource` in a listing (not counted as a refusal).
    fn visible(&self, who: Subject<'_>, resource: Resource<'_>) -> bool {
        self.gate.acl().allows(who, Operation::Describe, resource)
    }

    /// The answer to a request about one group `who` may not use:
    /// GROUP_AUTHORIZATION_FAILED. Joining, syncing, heartbeats, leaving and commits
    /// need `read` on the group; finding its coordinator and fetching its offsets,
    /// `describe`.
    fn group_refusal(&self, who: Subject<'_>, body: &RequestKind) -> Option<ResponseKind> {
        const GROUP_KEY: i8 = 0;
        let (group, op) = match body {
            RequestKind::JoinGroup(r) => (&r.group_id.0, Operation::Read),
            RequestKind::SyncGroup(r) => (&r.group_id.0, Operation::Read),
            RequestKind::Heartbeat(r) => (&r.group_id.0, Operation::Read),
            RequestKind::LeaveGroup(r) => (&r.group_id.0, Operation::Read),
            RequestKind::OffsetCommit(r) => (&r.group_id.0, Operation::Read),
            RequestKind::OffsetFetch(r) => (&r.group_id.0, Operation::Describe),
            RequestKind::FindCoordinator(r) if r.key_type == GROUP_KEY => {
                (&r.key, Operation::Describe)
            }
            _ => return None,
        };
        if self
            .gate
            .authorize(who, op, Resource::Group(group.as_str()))
        {
            return None;
        }
        let denied = code(ResponseError::GroupAuthorizationFailed);
        Some(match body {
            RequestKind::JoinGroup(_) => {
                let mut out = JoinGroupResponse::default();
                out.error_code = denied;
                out.generation_id = -1;
                ResponseKind::JoinGroup(out)
            }
            RequestKind::SyncGroup(_) => {
                let mut out = SyncGroupResponse::default();
                out.error_code = denied;
                ResponseKind::SyncGroup(out)
            }
            RequestKind::Heartbeat(_) => {
                let mut out = HeartbeatResponse::default();
                out.error_code = denied;
                ResponseKind::Heartbeat(out)
            }
            RequestKind::LeaveGroup(_) => {
                let mut out = LeaveGroupResponse::default();
                out.error_code = denied;
                ResponseKind::LeaveGroup(out)
            }
            RequestKind::OffsetCommit(r) => {
                let mut out = OffsetCommitResponse::default();
                for t in &r.topics {
                    let mut topic = OffsetCommitResponseTopic::default();
                    topic.name = t.name.clone();
                    for p in &t.partitions {
                        let mut part = OffsetCommitResponsePartition::default();
                        part.partition_index = p.partition_index;
                        part.error_code = denied;
                        topic.partitions.push(part);
                    }
                    out.topics.push(topic);
                }
                ResponseKind::OffsetCommit(out)
            }
            RequestKind::OffsetFetch(_) => {
                let mut out = OffsetFetchResponse::default();
                out.error_code = denied;
                ResponseKind::OffsetFetch(out)
            }
            _ => {
                let mut out = FindCoordinatorResponse::default();
                out.error_code = denied;
                out.error_message = Some(s("not authorized to use this group"));
                out.node_id = BrokerId(-1);
                out.port = -1;
                ResponseKind::FindCoordinator(out)
            }
        })
    }

    // ---- topics and metadata ----

    async fn metadata(
        &self,
        r: MetadataRequest,
        version: i16,
        client: &Client,
        who: Subject<'_>,
    ) -> MetadataResponse {
        let mut out = MetadataResponse::default();
        let mut broker = MetadataResponseBroker::default();
        broker.node_id = BrokerId(0);
        broker.host = s(&self.settings.advertised_host);
        broker.port = self.settings.advertised_port(client.tls);
        out.brokers = vec![broker];
        out.cluster_id = Some(s(&self.cluster_id));
        out.controller_id = BrokerId(0);
        // All topics: those `who` may describe.
        let all = || -> Vec<String> {
            self.log
                .topics()
                .into_iter()
                .map(|t| t.name)
                .filter(|name| self.visible(who, Resource::Topic(name)))
                .collect()
        };
        let names: Vec<String> = match r.topics {
            // v0 used an empty list for "all topics"; later versions use null.
            None => all(),
            Some(t) if t.is_empty() && version == 0 => all(),
            Some(t) => t
                .into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        };
        let allow_create =
            self.settings.auto_create_topics && (version < 4 || r.allow_auto_topic_creation);
        for name in names {
            let mut topic = MetadataResponseTopic::default();
            topic.name = Some(topic_name(&name));
            let info = match self.log.topic(&name) {
                _ if !self.may(who, Operation::Describe, &name) => {
                    Err(ResponseError::TopicAuthorizationFailed)
                }
                Some(info) => Ok(info),
                None if allow_create && self.may(who, Operation::Create, &name) => {
                    self.auto_create(&name).await
                }
                None => Err(ResponseError::UnknownTopicOrPartition),
            };
            match info {
                Ok(info) => {
                    topic.partitions = (0..info.partitions as i32)
                        .map(|p| {
                            let mut part = MetadataResponsePartition::default();
                            part.partition_index = p;
                            part.leader_id = BrokerId(0);
                            part.leader_epoch = 0;
                            part.replica_nodes = vec![BrokerId(0)];
                            part.isr_nodes = vec![BrokerId(0)];
                            part
                        })
                        .collect();
                }
                Err(e) => topic.error_code = code(e),
            }
            out.topics.push(topic);
        }
        out
    }

    /// Creates a topic with the defaults, as Kafka's auto.create.topics.enable does.
    async fn auto_create(&self, name: &str) -> Result<crate::storage::TopicInfo, ResponseError> {
        let defaults = self.settings.topic_defaults.clone();
        match self
            .log
            .create_topic(name, self.settings.default_partitions, defaults)
            .await
        {
            Ok(info) => {
                tracing::info!(topic = %name, partitions = info.partitions, "topic auto-created");
                Ok(info)
            }
            Err(TopicError::AlreadyExists(_)) => self
                .log
                .topic(name)
                .ok_or(ResponseError::UnknownTopicOrPartition),
            Err(e) => Err(errors::topic(&e)),
        }
    }

    async fn create_topics(
        &self,
        r: CreateTopicsRequest,
        who: Subject<'_>,
    ) -> CreateTopicsResponse {
        let mut out = CreateTopicsResponse::default();
        for t in r.topics {
            let name = t.name.0.to_string();
            let mut result = CreatableTopicResult::default();
            result.name = t.name.clone();
            let created = if self.may(who, Operation::Create, &name) {
                self.create_topic(&name, &t, r.validate_only).await
            } else {
                Err((
                    ResponseError::TopicAuthorizationFailed,
                    format!("not authorized to create {name}"),
                ))
            };
            match created {
                Ok(info) => {
                    result.num_partitions = info.partitions as i32;
                    result.replication_factor = 1;
                    result.configs = Some(
                        info.config
                            .entries()
                            .into_iter()
                            .map(|(k, v)| {
                                let mut c =
                                    create_topics_response::CreatableTopicConfigs::default();
                                c.name = s(&k);
                                c.value = Some(s(&v));
                                c.config_source = 5; // DEFAULT_CONFIG
                                c
                            })
                            .collect(),
                    );
                }
                Err((e, message)) => {
                    result.error_code = code(e);
                    result.error_message = Some(s(&message));
                    result.num_partitions = -1;
                    result.replication_factor = -1;
                }
            }
            out.topics.push(result);
        }
        out
    }

    async fn create_topic(
        &self,
        name: &str,
        t: &CreatableTopic,
        validate_only: bool,
    ) -> Result<crate::storage::TopicInfo, (ResponseError, String)> {
        if t.replication_factor > 1 {
            return Err((
                ResponseError::InvalidReplicationFactor,
                format!(
                    "replication factor {} is more than the 1 broker here",
                    t.replication_factor
                ),
            ));
        }
        if !t.assignments.is_empty() {
            return Err((
                ResponseError::InvalidRequest,
                "manual replica assignment is not supported".into(),
            ));
        }
        let partitions = if t.num_partitions == -1 {
            self.settings.default_partitions as i32
        } else {
            t.num_partitions
        };
        let config = self
            .settings
            .topic_defaults
            .clone()
            .with_overrides(
                t.configs
                    .iter()
                    .filter_map(|c| Some((c.name.as_str(), c.value.as_ref()?.as_str()))),
            )
            .map_err(|e| (ResponseError::InvalidConfig, e.to_string()))?;
        if partitions < 1 {
            return Err((
                ResponseError::InvalidPartitions,
                format!("partition count {partitions} is below 1"),
            ));
        }
        if validate_only {
            crate::storage::TopicName::new(name)
                .map_err(|e| (ResponseError::InvalidTopicException, e.to_string()))?;
            if self.log.topic(name).is_some() {
                return Err((
                    ResponseError::TopicAlreadyExists,
                    format!("topic {name:?} already exists"),
                ));
            }
            return Ok(crate::storage::TopicInfo {
                name: name.to_string(),
                partitions: partitions as u32,
                config,
                created_ms: 0,
            });
        }
        self.log
            .create_topic(name, partitions as u32, config)
            .await
            .map_err(|e| (errors::topic(&e), e.to_string()))
    }

    async fn delete_topics(
        &self,
        r: DeleteTopicsRequest,
        who: Subject<'_>,
    ) -> DeleteTopicsResponse {
        let mut out = DeleteTopicsResponse::default();
        for name in r.topic_names {
            let mut result = DeletableTopicResult::default();
            if !self.may(who, Operation::Delete, name.0.as_str()) {
                result.error_code = code(ResponseError::TopicAuthorizationFailed);
                result.error_message = Some(s("not authorized to delete this topic"));
            } else if let Err(e) = self.log.delete_topic(name.0.as_str()).await {
                result.error_code = code(errors::topic(&e));
                result.error_message = Some(s(&e.to_string()));
            }
            result.name = Some(name);
            out.responses.push(result);
        }
        out
    }

    fn describe_configs(
        &self,
        r: DescribeConfigsRequest,
        who: Subject<'_>,
    ) -> DescribeConfigsResponse {
        const TOPIC: i8 = 2;
        let defaults = &self.settings.topic_defaults;
        let mut out = DescribeConfigsResponse::default();
        for res in r.resources {
            let mut result = DescribeConfigsResult::default();
            result.resource_type = res.resource_type;
            result.resource_name = res.resource_name.clone();
            // Null or empty: every key.
            let wanted = |k: &str| {
                res.configuration_keys
                    .as_ref()
                    .is_none_or(|keys| keys.is_empty() || keys.iter().any(|w| w.as_str() == k))
            };
            if res.resource_type == TOPIC {
                match self.log.topic(res.resource_name.as_str()) {
                    _ if !self.may(who, Operation::Describe, res.resource_name.as_str()) => {
                        result.error_code = code(ResponseError::TopicAuthorizationFailed);
                        result.error_message = Some(s("not authorized to describe this topic"));
                    }
                    Some(info) => {
                        result.configs = info
                            .config
                            .entries()
                            .into_iter()
                            .filter(|(k, _)| wanted(k))
                            .map(|(k, v)| {
                                let mut c = describe_configs_response::DescribeConfigsResourceResult::default();
                                // DYNAMIC_TOPIC_CONFIG when set on the topic, DEFAULT_CONFIG otherwise.
                                c.config_source = if defaults.get(&k).as_deref() == Some(v.as_str()) { 5 } else { 1 };
                                c.name = s(&k);
                                c.value = Some(s(&v));
                                c
                            })
                            .collect();
                    }
                    None => {
                        result.error_code = code(ResponseError::UnknownTopicOrPartition);
                        result.error_message = Some(s("unknown topic"));
                    }
                }
            }
            // Broker and other resources: no configs to show yet, and no error.
            out.results.push(result);
        }
        out
    }

    // ---- produce ----

    async fn produce(
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
    pub(super) async fn start_produce(
        self: &Arc<Self>,
        r: ProduceRequest,
        who: Subject<'_>,
    ) -> impl std::future::Future<Output = Option<ProduceResponse>> + Send + 'static {
        let early = if r.transactional_id.as_ref().is_some_and(|t| !t.0.is_empty()) {
            Some(ResponseError::TransactionalIdAuthorizationFailed)
        } else if !matches!(r.acks, -1..=1) {
            Some(ResponseError::InvalidRequiredAcks)
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
                        self.start_partition(name.clone(), p.index, p.records.clone())
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
        if batches[0].header().producer_id() >= 0 {
            return Started::Idempotent {
                topic,
                partition,
                batches,
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
            } => self.produce_idempotent(topic, partition, batches).await,
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

    async fn init_producer_id(&self, r: InitProducerIdRequest) -> InitProducerIdResponse {
        let mut out = InitProducerIdResponse::default();
        if r.transactional_id.as_ref().is_some_and(|t| !t.0.is_empty()) {
            // Transactions are not implemented: say so rather than pretend.
            out.error_code = code(ResponseError::TransactionalIdAuthorizationFailed);
            out.producer_id = ProducerId(-1);
            out.producer_epoch = -1;
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

    // ---- fetch and offsets ----

    async fn fetch(&self, r: FetchRequest, who: Subject<'_>) -> FetchResponse {
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
        let pass = Arc::new(FetchPass {
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

    async fn list_offsets(
        &self,
        r: ListOffsetsRequest,
        version: i16,
        who: Subject<'_>,
    ) -> ListOffsetsResponse {
        const LATEST: i64 = -1;
        const EARLIEST: i64 = -2;
        let mut out = ListOffsetsResponse::default();
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
                            if p.timestamp == LATEST {
                                o.high_watermark
                            } else {
                                o.log_start
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

    fn offset_for_leader_epoch(
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

    // ---- groups ----

    fn find_coordinator(
        &self,
        r: FindCoordinatorRequest,
        client: &Client,
    ) -> FindCoordinatorResponse {
        let mut out = FindCoordinatorResponse::default();
        const GROUP: i8 = 0;
        if r.key_type != GROUP {
            out.error_code = code(ResponseError::CoordinatorNotAvailable);
            out.error_message = Some(s("transactions are not supported"));
            out.node_id = BrokerId(-1);
            out.port = -1;
            return out;
        }
        out.node_id = BrokerId(0);
        out.host = s(&self.settings.advertised_host);
        out.port = self.settings.advertised_port(client.tls);
        out
    }

    async fn join_group(
        &self,
        r: JoinGroupRequest,
        version: i16,
        client_id: String,
        client_host: &str,
    ) -> JoinGroupResponse {
        let req = JoinRequest {
            group: r.group_id.0.to_string(),
            member_id: r.member_id.to_string(),
            instance_id: r.group_instance_id.map(|i| i.to_string()),
            client_id,
            client_host: format!("/{client_host}"),
            session_timeout: Duration::from_millis(r.session_timeout_ms.max(0) as u64),
            // v0 has no rebalance timeout; Kafka uses the session timeout.
            rebalance_timeout: Duration::from_millis(
                if version == 0 {
                    r.session_timeout_ms
                } else {
                    r.rebalance_timeout_ms
                }
                .max(0) as u64,
            ),
            protocol_type: r.protocol_type.to_string(),
            protocols: r
                .protocols
                .into_iter()
                .map(|p| (p.name.to_string(), p.metadata))
                .collect(),
            require_known_member_id: version >= 4,
        };
        let joined = self.groups.join(req).await;
        let mut out = JoinGroupResponse::default();
        out.error_code = joined.error.map_or(NONE, code);
        out.generation_id = joined.generation;
        out.protocol_type = joined.protocol_type.map(|p| s(&p));
        out.protocol_name = Some(s(&joined.protocol.unwrap_or_default()));
        out.leader = s(&joined.leader);
        out.member_id = s(&joined.member_id);
        out.members = joined
            .members
            .into_iter()
            .map(|(id, instance, metadata)| {
                let mut m = join_group_response::JoinGroupResponseMember::default();
                m.member_id = s(&id);
                m.group_instance_id = instance.map(|i| s(&i));
                m.metadata = metadata;
                m
            })
            .collect();
        out
    }

    async fn sync_group(&self, r: SyncGroupRequest) -> SyncGroupResponse {
        let assignments = r
            .assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect();
        let synced = self
            .groups
            .sync(
                r.group_id.0.as_str(),
                r.member_id.as_str(),
                r.generation_id,
                assignments,
            )
            .await;
        let mut out = SyncGroupResponse::default();
        out.error_code = synced.error.map_or(NONE, code);
        out.protocol_type = synced.protocol_type.map(|p| s(&p));
        out.protocol_name = synced.protocol.map(|p| s(&p));
        out.assignment = synced.assignment;
        out
    }

    fn heartbeat(&self, r: HeartbeatRequest) -> HeartbeatResponse {
        let mut out = HeartbeatResponse::default();
        out.error_code = self
            .groups
            .heartbeat(r.group_id.0.as_str(), r.member_id.as_str(), r.generation_id)
            .map_or(NONE, code);
        out
    }

    fn leave_group(&self, r: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        let group = r.group_id.0.to_string();
        let mut out = LeaveGroupResponse::default();
        if version < 3 {
            let errors = self.groups.leave(&group, &[r.member_id.to_string()]);
            out.error_code = errors[0].map_or(NONE, code);
            return out;
        }
        let ids: Vec<String> = r.members.iter().map(|m| m.member_id.to_string()).collect();
        let errors = self.groups.leave(&group, &ids);
        for (m, e) in r.members.into_iter().zip(errors) {
            let mut resp = leave_group_response::MemberResponse::default();
            resp.member_id = m.member_id;
            resp.group_instance_id = m.group_instance_id;
            resp.error_code = e.map_or(NONE, code);
            out.members.push(resp);
        }
        out
    }

    async fn offset_commit(
        &self,
        r: OffsetCommitRequest,
        who: Subject<'_>,
    ) -> OffsetCommitResponse {
        let group = r.group_id.0.to_string();
        let denied = self.groups.check_commit(
            &group,
            r.member_id.as_str(),
            r.generation_id_or_member_epoch,
        );
        let mut out = OffsetCommitResponse::default();
        let mut to_commit = Vec::new();
        let mut errors_by_tp: BTreeMap<(String, i32), i16> = BTreeMap::new();
        for t in &r.topics {
            let name = t.name.0.to_string();
            let allowed = self.may(who, Operation::Read, &name);
            for p in &t.partitions {
                let error = if let Some(e) = denied {
                    Some(e)
                } else if !allowed {
                    Some(ResponseError::TopicAuthorizationFailed)
                } else if p.partition_index < 0
                    || self.log.offsets(&name, p.partition_index as u32).is_err()
                {
                    Some(ResponseError::UnknownTopicOrPartition)
                } else {
                    to_commit.push((
                        name.clone(),
                        p.partition_index as u32,
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
                    None
                };
                errors_by_tp.insert((name.clone(), p.partition_index), error.map_or(NONE, code));
            }
        }
        if !to_commit.is_empty()
            && let Err(e) = self.log.commit_offsets(&group, to_commit.clone()).await
        {
            let c = code(errors::write(&e));
            for (topic, p, _) in &to_commit {
                errors_by_tp.insert((topic.clone(), *p as i32), c);
            }
        }
        for t in r.topics {
            let mut topic = OffsetCommitResponseTopic::default();
            let name = t.name.0.to_string();
            topic.name = t.name;
            for p in t.partitions {
                let mut part = OffsetCommitResponsePartition::default();
                part.partition_index = p.partition_index;
                part.error_code = errors_by_tp
                    .get(&(name.clone(), p.partition_index))
                    .copied()
                    .unwrap_or(NONE);
                topic.partitions.push(part);
            }
            out.topics.push(topic);
        }
        out
    }

    async fn offset_fetch(&self, r: OffsetFetchRequest, who: Subject<'_>) -> OffsetFetchResponse {
        let group = r.group_id.0.to_string();
        let mut out = OffsetFetchResponse::default();
        let read = {
            let group = group.clone();
            self.log.blocking(move |log| log.committed_offsets(&group))
        };
        let committed = match read.await {
            Ok(c) => c,
            Err(e) => {
                out.error_code = code(errors::storage(&e));
                return out;
            }
        };
        let find = |topic: &str, p: i32| {
            committed
                .iter()
                .find(|(t, q, _)| t == topic && *q as i32 == p)
                .map(|(_, _, c)| c.clone())
        };
        let wanted: Vec<(String, Vec<i32>)> = match r.topics {
            Some(topics) => topics
                .into_iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes))
                .collect(),
            None => {
                let mut all: BTreeMap<String, Vec<i32>> = BTreeMap::new();
                for (t, p, _) in &committed {
                    if self.visible(who, Resource::Topic(t)) {
                        all.entry(t.clone()).or_default().push(*p as i32);
                    }
                }
                all.into_iter().collect()
            }
        };
        for (name, partitions) in wanted {
            let mut topic = offset_fetch_response::OffsetFetchResponseTopic::default();
            topic.name = topic_name(&name);
            let allowed = self.may(who, Operation::Describe, &name);
            for p in partitions {
                let mut part = offset_fetch_response::OffsetFetchResponsePartition::default();
                part.partition_index = p;
                if !allowed {
                    part.error_code = code(ResponseError::TopicAuthorizationFailed);
                    part.committed_offset = -1;
                    part.committed_leader_epoch = -1;
                    topic.partitions.push(part);
                    continue;
                }
                match find(&name, p) {
                    Some(c) => {
                        part.committed_offset = c.offset;
                        part.committed_leader_epoch = c.leader_epoch;
                        part.metadata = Some(s(&c.metadata));
                    }
                    None => {
                        part.committed_offset = -1;
                        part.committed_leader_epoch = -1;
                        part.metadata = Some(s(""));
                    }
                }
                topic.partitions.push(part);
            }
            out.topics.push(topic);
        }
        out
    }

    async fn list_groups(&self, who: Subject<'_>) -> ListGroupsResponse {
        let mut out = ListGroupsResponse::default();
        let mut seen: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
        let stored = self.log.blocking(|log| log.groups_with_offsets());
        if let Ok(groups) = stored.await {
            for g in groups {
                seen.insert(g, ("consumer".into(), GroupState::Empty.name()));
            }
        }
        for (name, protocol_type, state) in self.groups.list() {
            seen.insert(
                name,
                (
                    protocol_type.unwrap_or_else(|| "consumer".into()),
                    state.name(),
                ),
            );
        }
        seen.retain(|name, _| self.visible(who, Resource::Group(name)));
        for (name, (protocol_type, state)) in seen {
            let mut g = list_groups_response::ListedGroup::default();
            g.group_id = GroupId(s(&name));
            g.protocol_type = s(&protocol_type);
            g.group_state = s(state);
            g.group_type = s("classic");
            out.groups.push(g);
        }
        out
    }

    async fn describe_groups(
        &self,
        r: DescribeGroupsRequest,
        who: Subject<'_>,
    ) -> DescribeGroupsResponse {
        let mut out = DescribeGroupsResponse::default();
        for id in r.groups {
            let mut d = describe_groups_response::DescribedGroup::default();
            if !self
                .gate
                .authorize(who, Operation::Describe, Resource::Group(id.0.as_str()))
            {
                d.error_code = code(ResponseError::GroupAuthorizationFailed);
                d.group_id = id;
                out.groups.push(d);
                continue;
            }
            let described = self.groups.with_group(id.0.as_str(), |g| {
                d.group_state = s(g.state.name());
                d.protocol_type = s(g.protocol_type.as_deref().unwrap_or(""));
                let protocol = g.protocol.clone().unwrap_or_default();
                d.protocol_data = s(&protocol);
                d.members = g
                    .members
                    .values()
                    .map(|m| {
                        let mut dm = describe_groups_response::DescribedGroupMember::default();
                        dm.member_id = s(&m.id);
                        dm.group_instance_id = m.instance_id.as_ref().map(|i| s(i));
                        dm.client_id = s(&m.client_id);
                        dm.client_host = s(&m.client_host);
                        dm.member_metadata = m.metadata(&protocol);
                        dm.member_assignment = m.assignment.clone();
                        dm
                    })
                    .collect();
            });
            if described.is_none() {
                let group = id.0.to_string();
                let stored = self.log.blocking(move |log| log.committed_offsets(&group));
                let has_offsets = stored.await.is_ok_and(|c| !c.is_empty());
                d.group_state = s(if has_offsets { "Empty" } else { "Dead" });
                d.protocol_type = s(if has_offsets { "consumer" } else { "" });
            }
            d.group_id = id;
            out.groups.push(d);
        }
        out
    }
}

fn set_offsets(part: &mut PartitionData, offsets: PartitionOffsets) {
    part.high_watermark = offsets.high_watermark as i64;
    part.last_stable_offset = offsets.high_watermark as i64;
    part.log_start_offset = offsets.log_start as i64;
}

/// One pass of a Fetch over its partitions, on the blocking pool (it reads the log);
/// a Fetch waiting for `min_bytes` makes one per append it is woken by.
struct FetchPass {
    request: FetchRequest,
    max_bytes: usize,
    /// Topics the client may not read: answered TOPIC_AUTHORIZATION_FAILED.
    denied: HashSet<String>,
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
                        .map(|o| (Vec::new(), o))
                        .map_err(|e| errors::read(&e))
                } else {
                    let limit = (p.partition_max_bytes.max(0) as usize).min(room.max(1));
                    log.read(&name, p.partition as u32, p.fetch_offset as u64, limit)
                        .map(|read| (read.batches, read.offsets))
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
                    Ok((batches, offsets)) => {
                        set_offsets(&mut part, offsets);
                        if !batches.is_empty() {
                            let size = batches.iter().map(RecordBatch::len).sum();
                            let mut buf = BytesMut::with_capacity(size);
                            for b in &batches {
                                buf.extend_from_slice(b.as_bytes());
                            }
                            total += size;
                            part.records = Some(buf.freeze());
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
