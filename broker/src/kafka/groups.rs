//! The classic consumer-group coordinator: JoinGroup / SyncGroup / Heartbeat /
//! LeaveGroup, generations, session and rebalance timeouts, and the protocol chosen
//! from what members offer. Membership lives in memory (members rejoin after a
//! restart, as they do after a coordinator move in Kafka); committed offsets live
//! in the log.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Bounds on a member's session timeout (Kafka's group.min/max.session.timeout.ms,
/// with a lower minimum so that tests and small gateways can fail over quickly).
const MIN_SESSION: Duration = Duration::from_millis(1000);
const MAX_SESSION: Duration = Duration::from_secs(1800);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub(super) fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Member {
    pub(super) id: String,
    pub(super) instance_id: Option<String>,
    pub(super) client_id: String,
    pub(super) client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    /// (protocol name, metadata) in the member's order of preference.
    pub(super) protocols: Vec<(String, Bytes)>,
    pub(super) assignment: Bytes,
    last_seen: Instant,
    joined: bool,
}

impl Member {
    pub(super) fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(p, _)| p == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

/// What a JoinGroup gets back.
#[derive(Clone, Debug, Default)]
pub(super) struct JoinOutcome {
    pub(super) error: Option<ResponseError>,
    pub(super) generation: i32,
    pub(super) protocol_type: Option<String>,
    pub(super) protocol: Option<String>,
    pub(super) leader: String,
    pub(super) member_id: String,
    /// Filled for the leader only: (member id, instance id, metadata).
    pub(super) members: Vec<(String, Option<String>, Bytes)>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct SyncOutcome {
    pub(super) error: Option<ResponseError>,
    pub(super) protocol_type: Option<String>,
    pub(super) protocol: Option<String>,
    pub(super) assignment: Bytes,
}

pub(super) struct Group {
    pub(super) state: GroupState,
    pub(super) generation: i32,
    pub(super) protocol_type: Option<String>,
    pub(super) protocol: Option<String>,
    pub(super) leader: Option<String>,
    pub(super) members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not joined yet.
    pending_ids: Vec<String>,
    joins: HashMap<String, oneshot::Sender<JoinOutcome>>,
    syncs: HashMap<String, oneshot::Sender<SyncOutcome>>,
    rebalance_deadline: Option<Instant>,
}

impl Group {
    fn new() -> Self {
        Self {
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending_ids: Vec::new(),
            joins: HashMap::new(),
            syncs: HashMap::new(),
            rebalance_deadline: None,
        }
    }

    /// Starts (or continues) a rebalance: every member must join again.
    fn prepare_rebalance(&mut self, now: Instant) {
        if self.state != GroupState::PreparingRebalance {
            for member in self.members.values_mut() {
                member.joined = false;
            }
            let timeout = self
                .members
                .values()
                .map(|m| m.rebalance_timeout)
                .max()
                .unwrap_or_default();
            self.rebalance_deadline = Some(now + timeout);
            self.state = GroupState::PreparingRebalance;
        }
        // Members waiting for their assignment must rejoin.
        for (_, tx) in self.syncs.drain() {
            let _ = tx.send(SyncOutcome {
                error: Some(ResponseError::RebalanceInProgress),
                ..Default::default()
            });
        }
    }

    /// Ends the join phase if every member has joined (or `force`, at the deadline,
    /// which drops the members that did not).
    fn maybe_complete_join(&mut self, force: bool) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        if !force && self.members.values().any(|m| !m.joined) {
            return;
        }
        self.members.retain(|_, m| m.joined);
        self.rebalance_deadline = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        self.protocol = self.choose_protocol();
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        self.state = GroupState::CompletingRebalance;
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let roster: Vec<(String, Option<String>, Bytes)> = self
            .members
            .values()
            .map(|m| (m.id.clone(), m.instance_id.clone(), m.metadata(&protocol)))
            .collect();
        for (id, tx) in self.joins.drain() {
            let _ = tx.send(JoinOutcome {
                error: None,
                generation: self.generation,
                protocol_type: self.protocol_type.clone(),
                protocol: self.protocol.clone(),
                leader: leader.clone(),
                members: if id == leader {
                    roster.clone()
                } else {
                    Vec::new()
                },
                member_id: id,
            });
        }
        for member in self.members.values_mut() {
            member.assignment = Bytes::new();
            member.joined = false;
        }
    }

    /// The protocol every member supports with the most first-choice votes.
    fn choose_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        let candidates: Vec<&String> = first
            .protocols
            .iter()
            .map(|(p, _)| p)
            .filter(|p| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(q, _)| q == *p))
            })
            .collect();
        let mut votes: Vec<(usize, &String)> = candidates.iter().map(|c| (0, *c)).collect();
        for member in self.members.values() {
            let choice = member
                .protocols
                .iter()
                .map(|(p, _)| p)
                .find(|p| candidates.contains(p));
            if let Some(v) = votes.iter_mut().find(|(_, c)| Some(*c) == choice) {
                v.0 += 1;
            }
        }
        // Most votes; ties go to the first member's earlier preference.
        let best = votes.iter().map(|(n, _)| *n).max()?;
        votes
            .into_iter()
            .find(|(n, _)| *n == best)
            .map(|(_, c)| c.clone())
    }

    fn remove_member(&mut self, id: &str, now: Instant) {
        if self.members.remove(id).is_none() {
            return;
        }
        if let Some(tx) = self.joins.remove(id) {
            let _ = tx.send(JoinOutcome {
                error: Some(ResponseError::UnknownMemberId),
                ..Default::default()
            });
        }
        self.syncs.remove(id);
        if self.members.is_empty() && self.joins.is_empty() {
            self.state = GroupState::Empty;
            self.generation += 1;
            self.protocol = None;
            self.leader = None;
            self.rebalance_deadline = None;
            return;
        }
        self.prepare_rebalance(now);
        self.maybe_complete_join(false);
    }

    /// Checks that `member` may act in `generation` (heartbeats, syncs, commits).
    fn check_member(&self, member: &str, generation: i32) -> Result<(), ResponseError> {
        if !self.members.contains_key(member) {
            return Err(ResponseError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        Ok(())
    }
}

/// Everything a JoinGroup request carries.
pub(super) struct JoinRequest {
    pub(super) group: String,
    pub(super) member_id: String,
    pub(super) instance_id: Option<String>,
    pub(super) client_id: String,
    pub(super) client_host: String,
    pub(super) session_timeout: Duration,
    pub(super) rebalance_timeout: Duration,
    pub(super) protocol_type: String,
    pub(super) protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new member first gets an id with MEMBER_ID_REQUIRED.
    pub(super) require_known_member_id: bool,
}

/// All groups of this broker.
#[derive(Default)]
pub(super) struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
}

fn error_join(error: ResponseError, member_id: String) -> JoinOutcome {
    JoinOutcome {
        error: Some(error),
        generation: -1,
        member_id,
        ..Default::default()
    }
}

impl Coordinator {
    pub(super) async fn join(&self, req: JoinRequest) -> JoinOutcome {
        let rx = {
            let mut groups = self.groups.lock();
            let now = Instant::now();
            if req.group.is_empty() {
                return error_join(ResponseError::InvalidGroupId, req.member_id);
            }
            if req.session_timeout < MIN_SESSION || req.session_timeout > MAX_SESSION {
                return error_join(ResponseError::InvalidSessionTimeout, req.member_id);
            }
            if req.protocol_type.is_empty() || req.protocols.is_empty() {
                return error_join(ResponseError::InconsistentGroupProtocol, req.member_id);
            }
            let group = groups.entry(req.group.clone()).or_insert_with(Group::new);
            if group.state != GroupState::Empty
                && group.protocol_type.as_deref() != Some(req.protocol_type.as_str())
            {
                return error_join(ResponseError::InconsistentGroupProtocol, req.member_id);
            }
            let member_id = if req.member_id.is_empty() {
                let id = format!("{}-{}", req.client_id, random_suffix());
                if req.require_known_member_id {
                    group.pending_ids.push(id.clone());
                    return error_join(ResponseError::MemberIdRequired, id);
                }
                id
            } else {
                let known = group.members.contains_key(&req.member_id)
                    || group.pending_ids.contains(&req.member_id);
                if !known {
                    return error_join(ResponseError::UnknownMemberId, req.member_id);
                }
                req.member_id.clone()
            };
            group.pending_ids.retain(|id| *id != member_id);
            // Every member must support one protocol in common with the rest.
            if !group.members.is_empty()
                && !req.protocols.iter().any(|(p, _)| {
                    group
                        .members
                        .values()
                        .filter(|m| m.id != member_id)
                        .all(|m| m.protocols.iter().any(|(q, _)| q == p))
                })
            {
                return error_join(ResponseError::InconsistentGroupProtocol, member_id);
            }
            group.protocol_type = Some(req.protocol_type.clone());
            let member = Member {
                id: member_id.clone(),
                instance_id: req.instance_id,
                client_id: req.client_id,
                client_host: req.client_host,
                session_timeout: req.session_timeout,
                rebalance_timeout: req.rebalance_timeout.max(req.session_timeout),
                protocols: req.protocols,
                assignment: Bytes::new(),
                last_seen: now,
                joined: true,
            };
            group.prepare_rebalance(now);
            group.members.insert(
                member_id.clone(),
                Member {
                    joined: true,
                    ..member
                },
            );
            let (tx, rx) = oneshot::channel();
            if let Some(old) = group.joins.insert(member_id.clone(), tx) {
                let _ = old.send(error_join(
                    ResponseError::UnknownMemberId,
                    member_id.clone(),
                ));
            }
            group.maybe_complete_join(false);
            rx
        };
        rx.await
            .unwrap_or_else(|_| error_join(ResponseError::RebalanceInProgress, String::new()))
    }

    pub(super) async fn sync(
        &self,
        group_id: &str,
        member: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> SyncOutcome {
        let fail = |e| SyncOutcome {
            error: Some(e),
            ..Default::default()
        };
        let rx = {
            let mut groups = self.groups.lock();
            let Some(group) = groups.get_mut(group_id) else {
                return fail(ResponseError::UnknownMemberId);
            };
            if let Err(e) = group.check_member(member, generation) {
                return fail(e);
            }
            let ok = |g: &Group, assignment: Bytes| SyncOutcome {
                error: None,
                protocol_type: g.protocol_type.clone(),
                protocol: g.protocol.clone(),
                assignment,
            };
            match group.state {
                GroupState::Empty | GroupState::PreparingRebalance => {
                    return fail(ResponseError::RebalanceInProgress);
                }
                GroupState::Stable => {
                    let assignment = group.members[member].assignment.clone();
                    return ok(group, assignment);
                }
                GroupState::CompletingRebalance => {}
            }
            if let Some(m) = group.members.get_mut(member) {
                m.last_seen = Instant::now();
            }
            if group.leader.as_deref() == Some(member) {
                for (id, assignment) in assignments {
                    if let Some(m) = group.members.get_mut(&id) {
                        m.assignment = assignment;
                    }
                }
                group.state = GroupState::Stable;
                let waiting: Vec<_> = group.syncs.drain().collect();
                for (id, tx) in waiting {
                    let assignment = group
                        .members
                        .get(&id)
                        .map(|m| m.assignment.clone())
                        .unwrap_or_default();
                    let _ = tx.send(ok(group, assignment));
                }
                let assignment = group.members[member].assignment.clone();
                return ok(group, assignment);
            }
            let (tx, rx) = oneshot::channel();
            group.syncs.insert(member.to_string(), tx);
            rx
        };
        rx.await
            .unwrap_or_else(|_| fail(ResponseError::RebalanceInProgress))
    }

    pub(super) fn heartbeat(
        &self,
        group_id: &str,
        member: &str,
        generation: i32,
    ) -> Option<ResponseError> {
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return Some(ResponseError::UnknownMemberId);
        };
        if let Some(m) = group.members.get_mut(member) {
            m.last_seen = Instant::now();
        }
        if let Err(e) = group.check_member(member, generation) {
            // A member heartbeating an old generation during a rebalance must rejoin.
            if e == ResponseError::IllegalGeneration
                && group.state == GroupState::PreparingRebalance
            {
                return Some(ResponseError::RebalanceInProgress);
            }
            return Some(e);
        }
        match group.state {
            GroupState::PreparingRebalance => Some(ResponseError::RebalanceInProgress),
            _ => None,
        }
    }

    /// Removes members; returns the error for each, in order.
    pub(super) fn leave(&self, group_id: &str, members: &[String]) -> Vec<Option<ResponseError>> {
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return members
                .iter()
                .map(|_| Some(ResponseError::UnknownMemberId))
                .collect();
        };
        let now = Instant::now();
        members
            .iter()
            .map(|id| {
                if group.members.contains_key(id) {
                    group.remove_member(id, now);
                    None
                } else {
                    Some(ResponseError::UnknownMemberId)
                }
            })
            .collect()
    }

    /// May `member` of `generation` commit offsets for the group now?
    pub(super) fn check_commit(
        &self,
        group_id: &str,
        member: &str,
        generation: i32,
    ) -> Option<ResponseError> {
        let mut groups = self.groups.lock();
        let group = groups.get_mut(group_id)?;
        if generation < 0 && member.is_empty() {
            // A consumer that assigns partitions itself: allowed while no group runs.
            return (group.state != GroupState::Empty).then_some(ResponseError::UnknownMemberId);
        }
        if let Some(m) = group.members.get_mut(member) {
            m.last_seen = Instant::now();
        }
        if let Err(e) = group.check_member(member, generation) {
            return Some(e);
        }
        (group.state == GroupState::PreparingRebalance)
            .then_some(ResponseError::RebalanceInProgress)
    }

    /// Expires members whose session ran out and ends rebalances whose time is up.
    /// Called periodically.
    pub(super) fn tick(&self) {
        let now = Instant::now();
        let mut groups = self.groups.lock();
        for (name, group) in groups.iter_mut() {
            if group.state == GroupState::PreparingRebalance {
                if group.rebalance_deadline.is_some_and(|d| now >= d) {
                    tracing::info!(group = %name, "rebalance timed out; dropping members that did not rejoin");
                    group.maybe_complete_join(true);
                }
                continue;
            }
            let expired: Vec<String> = group
                .members
                .values()
                .filter(|m| now.duration_since(m.last_seen) > m.session_timeout)
                .map(|m| m.id.clone())
                .collect();
            for id in expired {
                tracing::info!(group = %name, member = %id, "session expired; removing member");
                group.remove_member(&id, now);
            }
        }
    }

    /// Runs `f` on a group if it exists.
    pub(super) fn with_group<T>(&self, group_id: &str, f: impl FnOnce(&Group) -> T) -> Option<T> {
        self.groups.lock().get(group_id).map(f)
    }

    /// Every group with members or a known state.
    pub(super) fn list(&self) -> Vec<(String, Option<String>, GroupState)> {
        self.groups
            .lock()
            .iter()
            .map(|(name, g)| (name.clone(), g.protocol_type.clone(), g.state))
            .collect()
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}
