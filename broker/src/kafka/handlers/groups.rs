//! Consumer groups: FindCoordinator, Join/Sync/Heartbeat/Leave, offset commits and
//! fetches, ListGroups and DescribeGroups.

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::*;

use crate::acl::{Operation, Resource, Subject};
use crate::kafka::Client;
use crate::kafka::KafkaBroker;
use crate::kafka::errors;
use crate::kafka::groups::{GroupState, JoinRequest};
use crate::storage::{CommittedOffset, now_ms};

use super::{NONE, code, s, topic_name};

impl KafkaBroker {
    pub(super) fn find_coordinator(
        &self,
        r: FindCoordinatorRequest,
        client: &Client,
    ) -> FindCoordinatorResponse {
        let mut out = FindCoordinatorResponse::default();
        // Key type 0 is a group, 1 a transactional id: this broker coordinates both.
        const GROUP: i8 = 0;
        const TRANSACTION: i8 = 1;
        if r.key_type != GROUP && r.key_type != TRANSACTION {
            out.error_code = code(ResponseError::InvalidRequest);
            out.error_message = Some(s("unknown coordinator key type"));
            out.node_id = BrokerId(-1);
            out.port = -1;
            return out;
        }
        out.node_id = BrokerId(0);
        out.host = s(&self.settings.advertised_host);
        out.port = self.settings.advertised_port(client.tls);
        out
    }

    pub(super) async fn join_group(
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

    pub(super) async fn sync_group(&self, r: SyncGroupRequest) -> SyncGroupResponse {
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

    pub(super) fn heartbeat(&self, r: HeartbeatRequest) -> HeartbeatResponse {
        let mut out = HeartbeatResponse::default();
        out.error_code = self
            .groups
            .heartbeat(r.group_id.0.as_str(), r.member_id.as_str(), r.generation_id)
            .map_or(NONE, code);
        out
    }

    pub(super) fn leave_group(&self, r: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
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

    pub(super) async fn offset_commit(
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

    pub(super) async fn offset_fetch(
        &self,
        r: OffsetFetchRequest,
        who: Subject<'_>,
    ) -> OffsetFetchResponse {
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
                // A consumer that asks for stable offsets (read_committed) waits
                // for a transaction that will commit this one: it retries.
                if r.require_stable
                    && p >= 0
                    && self.txns.has_pending_offset(&group, &name, p as u32).await
                {
                    part.error_code = code(ResponseError::UnstableOffsetCommit);
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

    pub(super) async fn list_groups(&self, who: Subject<'_>) -> ListGroupsResponse {
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

    pub(super) async fn describe_groups(
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
