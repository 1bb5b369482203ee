//! One function per Kafka API, on top of `storage::Log`: this file dispatches a request
//! and checks `[[auth.acl]]` for groups; each API family has its own file.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::Client;
use super::KafkaBroker;
use crate::acl::{Operation, Resource, Subject};
use weir_wire::kafka_codec::Request;

mod fetch;
mod groups;
mod produce;
mod topics;
mod transactions;

const NONE: i16 = 0;

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
        if let Some(refused) = self
            .txn_refusal(who, &request.body)
            .or_else(|| self.group_refusal(who, &request.body))
        {
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
            RequestKind::AddPartitionsToTxn(r) => {
                ResponseKind::AddPartitionsToTxn(self.add_partitions_to_txn(r, who).await)
            }
            RequestKind::AddOffsetsToTxn(r) => {
                ResponseKind::AddOffsetsToTxn(self.add_offsets_to_txn(r).await)
            }
            RequestKind::TxnOffsetCommit(r) => {
                ResponseKind::TxnOffsetCommit(self.txn_offset_commit(r, version, who).await)
            }
            RequestKind::EndTxn(r) => ResponseKind::EndTxn(self.end_txn(r).await),
            RequestKind::DescribeTransactions(r) => {
                ResponseKind::DescribeTransactions(self.describe_transactions(r, who).await)
            }
            RequestKind::ListTransactions(r) => {
                ResponseKind::ListTransactions(self.list_transactions(r, who).await)
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

    /// The answer to a transactional request for an id `who` may not use:
    /// TRANSACTIONAL_ID_AUTHORIZATION_FAILED. Running a transaction needs `write` on
    /// its id; finding its coordinator, `describe`.
    fn txn_refusal(&self, who: Subject<'_>, body: &RequestKind) -> Option<ResponseKind> {
        const TRANSACTION_KEY: i8 = 1;
        let (id, op) = match body {
            RequestKind::InitProducerId(r) => {
                (r.transactional_id.as_ref()?.0.as_str(), Operation::Write)
            }
            RequestKind::AddPartitionsToTxn(r) => {
                (r.v3_and_below_transactional_id.0.as_str(), Operation::Write)
            }
            RequestKind::AddOffsetsToTxn(r) => (r.transactional_id.0.as_str(), Operation::Write),
            RequestKind::TxnOffsetCommit(r) => (r.transactional_id.0.as_str(), Operation::Write),
            RequestKind::EndTxn(r) => (r.transactional_id.0.as_str(), Operation::Write),
            RequestKind::FindCoordinator(r) if r.key_type == TRANSACTION_KEY => {
                (r.key.as_str(), Operation::Describe)
            }
            _ => return None,
        };
        if id.is_empty() || self.may_use_txn_id(who, op, id) {
            return None;
        }
        let denied = code(ResponseError::TransactionalIdAuthorizationFailed);
        Some(match body {
            RequestKind::InitProducerId(_) => {
                let mut out = InitProducerIdResponse::default();
                out.error_code = denied;
                out.producer_id = ProducerId(-1);
                out.producer_epoch = -1;
                ResponseKind::InitProducerId(out)
            }
            RequestKind::AddPartitionsToTxn(r) => {
                ResponseKind::AddPartitionsToTxn(transactions::add_partitions_refused(r, denied))
            }
            RequestKind::AddOffsetsToTxn(_) => {
                let mut out = AddOffsetsToTxnResponse::default();
                out.error_code = denied;
                ResponseKind::AddOffsetsToTxn(out)
            }
            RequestKind::TxnOffsetCommit(r) => {
                ResponseKind::TxnOffsetCommit(transactions::txn_offset_commit_refused(r, denied))
            }
            RequestKind::EndTxn(_) => {
                let mut out = EndTxnResponse::default();
                out.error_code = denied;
                ResponseKind::EndTxn(out)
            }
            _ => {
                let mut out = FindCoordinatorResponse::default();
                out.error_code = denied;
                out.error_message = Some(s("not authorized to use this transactional id"));
                out.node_id = BrokerId(-1);
                out.port = -1;
                ResponseKind::FindCoordinator(out)
            }
        })
    }

    /// Whether `[[auth.acl]]` lets `who` do `op` with a transactional id (counted).
    fn may_use_txn_id(&self, who: Subject<'_>, op: Operation, id: &str) -> bool {
        self.gate.authorize(who, op, Resource::TransactionalId(id))
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
            RequestKind::AddOffsetsToTxn(r) => (&r.group_id.0, Operation::Read),
            RequestKind::TxnOffsetCommit(r) => (&r.group_id.0, Operation::Read),
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
            RequestKind::AddOffsetsToTxn(_) => {
                let mut out = AddOffsetsToTxnResponse::default();
                out.error_code = denied;
                ResponseKind::AddOffsetsToTxn(out)
            }
            RequestKind::TxnOffsetCommit(r) => {
                ResponseKind::TxnOffsetCommit(transactions::txn_offset_commit_refused(r, denied))
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
}
