//! Down: upstream topics into local topics (commands for devices, which an MQTT
//! downlink rule then delivers).
//!
//! The rule's task assigns itself every partition of its upstream topics, from
//! positions kept locally (`replication.down/{rule}/{topic}/{partition}`: the next
//! upstream offset), and appends what it receives in one `Log::write` with the new
//! positions: a restart neither loses nor repeats a record. Upstream partition `p`
//! goes to local partition `p` (the local topic is created with as many partitions).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{info, warn};

use super::client::{self, From, UpstreamRecord};
use super::error::ReplicationError;
use super::{
    LinkState, PartitionStatus, ReplicationMetrics, RuleConfig, SharedStatus, UpstreamConfig,
    add_upstream_errors, cursor_key, note_link_errors, record_success, set_state,
};
use crate::backoff::Backoff;
use crate::storage::{Appends, Log, TopicConfig, TopicError, WriteOp, encode_stored, state_op};
use weir_wire::record_batch::build::NewRecord;

const NS_POSITION: &str = "replication.down";
/// Records appended per write, at most.
const BATCH: usize = 1000;

pub struct Downlink {
    pub rule: RuleConfig,
    pub upstream: UpstreamConfig,
    pub client_id: String,
    pub gateway: String,
    pub log: Log,
    pub topic_defaults: TopicConfig,
    pub metrics: ReplicationMetrics,
    pub status: SharedStatus,
    pub stop: watch::Receiver<bool>,
}

impl Downlink {
    pub async fn run(mut self) {
        let mut backoff = Backoff::new();
        loop {
            let before = super::last_success(&self.status);
            match self.session().await {
                Ok(()) => return,
                Err(reason) => {
                    let moved = super::last_success(&self.status) != before;
                    let backoff = backoff.after(moved);
                    warn!(rule = %self.rule.name, error = %reason, backoff_ms = backoff.as_millis() as u64,
                        "replication from upstream failed; retrying");
                    add_upstream_errors(&self.status, &self.metrics, 1, reason);
                    set_state(&self.status, &self.metrics, LinkState::BackingOff);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    async fn session(&mut self) -> Result<(), ReplicationError> {
        set_state(&self.status, &self.metrics, LinkState::Connecting);
        let group = format!("weir-{}-{}", self.gateway, self.rule.name);
        let consumer = client::consumer(&self.upstream, &self.client_id, &group)?;
        // (upstream topic, partition) → (local topic, next upstream offset)
        let mut positions: BTreeMap<(String, u32), (String, u64)> = BTreeMap::new();
        let mut assignment = Vec::new();
        for topic in &self.rule.topics {
            let partitions = tokio::select! {
                p = consumer.partitions(topic) => p?,
                _ = self.stop.wait_for(|s| *s) => return Ok(()),
            };
            let local = self.rule.target_topic(&self.gateway, topic);
            self.log
                .ensure_topic(&local, partitions, &self.topic_defaults)
                .await
                .map_err(|e| match e {
                    TopicError::Storage(e) => ReplicationError::Storage(e),
                    other => ReplicationError::LocalTopic(other),
                })?;
            for partition in 0..partitions {
                let key = cursor_key(&self.rule.name, topic, partition);
                let read = {
                    let key = key.clone();
                    self.log
                        .blocking(move |log| log.get_state::<u64>(NS_POSITION, &key))
                };
                let stored = read.await?;
                let from = match stored {
                    Some(n) => From::Offset(n),
                    None if self.rule.start == "latest" => From::Latest,
                    None => From::Earliest,
                };
                if let Some(n) = stored {
                    positions.insert((topic.clone(), partition), (local.clone(), n));
                }
                assignment.push((topic.clone(), partition, from));
            }
        }
        consumer.assign(&assignment)?;
        let mut link = consumer.link();
        let mut seen_errors = link.borrow_and_update().clone();
        set_state(&self.status, &self.metrics, LinkState::Connected);
        info!(rule = %self.rule.name, partitions = assignment.len(), "replicating from upstream");
        loop {
            let mut received = Vec::new();
            let first = tokio::select! {
                r = consumer.recv() => Some(r),
                _ = self.stop.wait_for(|s| *s) => return Ok(()),
                _ = link.changed() => None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
            };
            let errors = link.borrow_and_update().clone();
            note_link_errors(&self.status, &self.metrics, &mut seen_errors, errors);
            match first {
                Some(r) => received.push(r?),
                None => {
                    self.report(&positions);
                    continue;
                }
            }
            // Records flow again, whatever the client said before.
            set_state(&self.status, &self.metrics, LinkState::Connected);
            // Whatever else is already there, up to a batch.
            while received.len() < BATCH {
                match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                    Ok(r) => received.push(r?),
                    Err(_) => break,
                }
            }
            self.append(received, &mut positions).await?;
            self.report(&positions);
        }
    }

    /// Appends `received` and the new positions in one write.
    async fn append(
        &self,
        received: Vec<UpstreamRecord>,
        positions: &mut BTreeMap<(String, u32), (String, u64)>,
    ) -> Result<(), ReplicationError> {
        let count = received.len() as u64;
        let bytes: usize = received
            .iter()
            .map(|r| r.key.as_ref().map_or(0, Bytes::len) + r.value.as_ref().map_or(0, Bytes::len))
            .sum();
        let mut appends = Appends::default();
        let mut moved = BTreeMap::new();
        for r in received {
            let local = self.rule.target_topic(&self.gateway, &r.topic);
            let partitions = self.log.topic(&local).map_or(1, |t| t.partitions);
            moved.insert(
                (r.topic.clone(), r.partition),
                (local.clone(), r.offset + 1),
            );
            appends.add(
                &local,
                r.partition % partitions,
                NewRecord {
                    key: r.key,
                    value: r.value,
                    timestamp_ms: r.timestamp_ms,
                    headers: r.headers,
                },
            );
        }
        let mut ops: Vec<WriteOp> = appends.into_ops().collect();
        for ((topic, partition), (_, next)) in &moved {
            let value = encode_stored(next);
            ops.push(state_op(
                NS_POSITION,
                &cursor_key(&self.rule.name, topic, *partition),
                Some(value),
            ));
        }
        self.log.write(ops).await?;
        positions.extend(moved);
        record_success(
            &self.metrics,
            &self.status,
            &self.rule.name,
            count,
            bytes as u64,
        );
        Ok(())
    }

    fn report(&self, positions: &BTreeMap<(String, u32), (String, u64)>) {
        let partitions = positions
            .iter()
            .map(|((topic, partition), (_, next))| PartitionStatus {
                topic: topic.clone(),
                partition: *partition,
                cursor: *next,
                ..Default::default()
            })
            .collect();
        self.status.lock().partitions = partitions;
    }
}
