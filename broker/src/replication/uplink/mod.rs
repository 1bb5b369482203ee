//! Up: local topics to the centre, store-and-forward.
//!
//! A rule's task reads each source partition from its cursor, sends every record
//! with its key (so key partitioning holds upstream), its timestamp, its headers and
//! four provenance headers (`weir.gateway`, `weir.source.topic`,
//! `weir.source.partition`, `weir.source.offset`) through an idempotent producer, and
//! moves the cursor (`replication.cursor/{rule}/{topic}/{partition}`) only over
//! records the centre acknowledged, in order. An outage only delays: the producer
//! never gives a record up, and the local log is the buffer; what it holds in memory
//! is bounded by `MAX_PENDING` records. A producer that fails for good is replaced and
//! sending starts again from the cursor. Before a target sends, each producer reads
//! the centre back from the rule's floor (`readback`), so records the centre took
//! before a crash or a failed producer, past the durable cursor, are not sent twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::client::{
    self, Connector, Delivered, DeliveryError, LinkErrors, OutRecord, Position, ProducerSettings,
    SendError,
};
use super::error::ReplicationError;
use super::readback::{self, Floor, Found, Source};
use super::{
    LinkState, PRIORITY_BACKLOG, PartitionStatus, ReplicationMetrics, RuleConfig, SharedStatus,
    cursor_key, note_link_errors, partition_labels, record_success, rule_labels, set_state,
};
use crate::backoff::Backoff;
use crate::storage::{
    Log, PartitionOffsets, ReadError, WriteError, decode_stored, encode_stored, put_state_op,
    state_op,
};
pub use limits::PriorityGate;
use limits::TokenBucket;

mod limits;
#[cfg(test)]
mod tests;

const NS_CURSOR: &str = "replication.cursor";
/// `{rule}/{target}` → the target's floor (`readback`).
const NS_FLOOR: &str = "replication.floor";
/// Records sent and not yet acknowledged, per rule, at most; and records a
/// partition holds past its cursor (acknowledged behind one that is not yet).
const MAX_PENDING: usize = 100_000;
/// Bytes read from the log at a time, per partition.
const READ_BYTES: usize = 512 * 1024;

struct Part {
    topic: String,
    target: String,
    partition: u32,
    partition_text: String,
    /// Next offset to send.
    next_read: u64,
    committed: u64,
    /// Sent records, in offset order.
    pending: VecDeque<Pending>,
    changes: watch::Receiver<PartitionOffsets>,
    last_lag: u64,
    /// This producer read its target back and wrote the floor: it may send.
    armed: bool,
    /// Its cursor was placed by this run and nothing was sent since.
    fresh: bool,
    /// Records past the cursor the read-back found upstream, not sent again:
    /// source offset → position upstream.
    copies: BTreeMap<u64, Position>,
    /// Upstream partition → one past the highest position this producer's
    /// deliveries reached (the partition's end before it sent, until one does).
    top: BTreeMap<u32, u64>,
    /// Upstream partition → its end before this producer sent: where a delivery
    /// whose offset the client does not know is at least.
    start: BTreeMap<u32, u64>,
}

/// A record sent (or found upstream) and not yet under the cursor.
struct Pending {
    offset: u64,
    bytes: u32,
    acked: bool,
    /// Where it is upstream, once acknowledged.
    at: Option<Position>,
}

impl Part {
    /// Every record before this one is acknowledged.
    fn acked(&self) -> u64 {
        self.pending.front().map_or(self.next_read, |p| p.offset)
    }

    /// Drops the acknowledged records at the front.
    fn settle(&mut self) {
        while self.pending.front().is_some_and(|p| p.acked) {
            self.pending.pop_front();
        }
    }

    /// Back to the last acknowledged record, for a new producer.
    fn rewind(&mut self) {
        self.next_read = self.acked();
        self.pending.clear();
        self.armed = false;
        self.copies.clear();
        self.top.clear();
        self.start.clear();
    }
}

pub struct Uplink {
    pub rule: RuleConfig,
    /// The upstream's clients (librdkafka's, or a test's fakes).
    pub connector: Arc<dyn Connector>,
    pub gateway: String,
    pub log: Log,
    pub metrics: ReplicationMetrics,
    pub status: SharedStatus,
    pub gate: PriorityGate,
    /// Passed once every up rule reported its first backlog to the gate.
    pub registered: Arc<tokio::sync::Barrier>,
    pub stop: watch::Receiver<bool>,
    /// Test only: never write cursors (see `ReplicationConfig`).
    pub hold_cursors: bool,
}

impl Uplink {
    pub async fn run(mut self) {
        let parts = self.parts().await;
        if let Ok((parts, _)) = &parts {
            let backlog = parts
                .iter()
                .map(|p| {
                    p.changes
                        .borrow()
                        .high_watermark
                        .saturating_sub(p.next_read)
                })
                .sum();
            self.gate.report(&self.rule, backlog);
        }
        tokio::select! {
            _ = self.registered.wait() => {}
            _ = self.stop.wait_for(|s| *s) => return,
        }
        let (mut parts, mut floors) = match parts {
            Ok(p) => p,
            Err(e) => {
                error!(rule = %self.rule.name, error = %e, "replication rule cannot start");
                self.status.lock().error(e);
                return;
            }
        };
        let mut backoff = Backoff::new();
        loop {
            let before = super::last_success(&self.status);
            match self.session(&mut parts, &mut floors).await {
                Ok(()) => return,
                Err(reason) => {
                    let moved = super::last_success(&self.status) != before;
                    let backoff = backoff.after(moved);
                    warn!(rule = %self.rule.name, error = %reason, backoff_ms = backoff.as_millis() as u64,
                        "upstream producer failed; sending again from the last acknowledged record");
                    self.status.lock().error(reason);
                    set_state(&self.status, &self.metrics, LinkState::BackingOff);
                    // The floor as it is now, so the next producer finds what this
                    // one delivered past the cursors.
                    self.commit(&mut parts, &mut floors).await;
                    for part in &mut parts {
                        part.rewind();
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    /// The source partitions, from their cursors (placed at `start` the first time),
    /// and each target's floor.
    async fn parts(&self) -> Result<(Vec<Part>, HashMap<String, Floor>), ReplicationError> {
        let mut parts = Vec::new();
        let mut first = Vec::new();
        for topic in &self.rule.topics {
            let info = self
                .log
                .topic(topic)
                .ok_or_else(|| ReplicationError::NoLocalTopic(topic.clone()))?;
            for partition in 0..info.partitions {
                let changes = self.log.watch(topic, partition)?;
                let key = cursor_key(&self.rule.name, topic, partition);
                let read = {
                    let key = key.clone();
                    self.log
                        .blocking(move |log| log.get_state::<u64>(NS_CURSOR, &key))
                };
                let stored = read.await?;
                let next = match stored {
                    Some(n) => n,
                    None => {
                        let offsets = *changes.borrow();
                        let n = if self.rule.start == "latest" {
                            offsets.high_watermark
                        } else {
                            offsets.log_start
                        };
                        first.push(put_state_op(NS_CURSOR, &key, &n));
                        n
                    }
                };
                parts.push(Part {
                    topic: topic.clone(),
                    target: self.rule.target_topic(&self.gateway, topic),
                    partition,
                    partition_text: partition.to_string(),
                    next_read: next,
                    committed: next,
                    pending: VecDeque::new(),
                    changes,
                    last_lag: 0,
                    armed: false,
                    fresh: stored.is_none(),
                    copies: BTreeMap::new(),
                    top: BTreeMap::new(),
                    start: BTreeMap::new(),
                });
            }
        }
        if parts.len() > MAX_RULE_PARTITIONS {
            return Err(ReplicationError::TooManyPartitions(parts.len()));
        }
        if !first.is_empty() {
            self.log.write(first).await?;
        }
        let mut floors = HashMap::new();
        for part in &parts {
            if floors.contains_key(&part.target) {
                continue;
            }
            let key = self.floor_key(&part.target);
            let read = self
                .log
                .blocking(move |log| log.get_state::<BTreeMap<u32, u64>>(NS_FLOOR, &key));
            let stored = read.await?;
            let floor = match stored {
                Some(at) => Floor::At(at),
                None if parts.iter().all(|p| p.target != part.target || p.fresh) => Floor::Fresh,
                None => Floor::Unknown,
            };
            floors.insert(part.target.clone(), floor);
        }
        Ok((parts, floors))
    }

    fn floor_key(&self, target: &str) -> String {
        format!("{}/{target}", self.rule.name)
    }

    /// One producer's life: returns Ok when the broker stops, Err when the producer
    /// failed for good.
    async fn session(
        &mut self,
        parts: &mut [Part],
        floors: &mut HashMap<String, Floor>,
    ) -> Result<(), ReplicationError> {
        let settings = ProducerSettings {
            compression: self.rule.compression.clone(),
            batch_bytes: self.rule.batch_bytes,
            linger_ms: self.rule.linger_ms,
            queue_kbytes: 64 * 1024,
        };
        let (producer, mut deliveries) = self.connector.producer(&settings)?;
        let mut link = producer.link();
        let mut seen_errors = LinkErrors::default();
        let mut in_flight = 0usize;
        let mut committing: Option<Commit> = None;
        let mut bucket = TokenBucket::new(self.rule.max_bytes_per_sec);
        let mut last_commit = Instant::now();
        let mut last_report = Instant::now() - Duration::from_secs(10);
        // The target topics are created upstream (unless they exist) and read back
        // beside the loop; a partition sends once its target is ready (records sent
        // to a topic that does not exist yet would sit in librdkafka's queue, slowly).
        let prepared = Arc::new(Prepared::default());
        let _preparing = AbortOnDrop(tokio::spawn(prepare_targets(
            producer.clone(),
            self.connector.clone(),
            self.gateway.clone(),
            self.targets(parts, floors),
            prepared.clone(),
            self.status.clone(),
        )));
        let mut start_at = 0usize;
        set_state(&self.status, &self.metrics, LinkState::Connecting);
        loop {
            if *self.stop.borrow() {
                if let Some(c) = committing.take() {
                    let result = c.write.await.map(drop);
                    self.committed(parts, floors, c.moved, c.floors, result);
                }
                return self.finish(parts, floors, deliveries, in_flight).await;
            }
            self.arm(parts, floors, &prepared).await?;
            // Send what is new, within the bounds.
            let mut blocked = false;
            if self.gate.open(&self.rule) && !parts.is_empty() {
                start_at = (start_at + 1) % parts.len();
                for k in 0..parts.len() {
                    let i = (start_at + k) % parts.len();
                    if blocked || !parts[i].armed {
                        continue;
                    }
                    blocked = self
                        .fill(
                            i,
                            &mut parts[i],
                            producer.as_ref(),
                            &mut bucket,
                            &mut in_flight,
                        )
                        .await?;
                }
            }
            // Wait for a delivery, new records, a link event, the stop, or a moment.
            let nap = if blocked { 20 } else { 200 };
            let done = {
                let mut waits: Vec<_> = parts
                    .iter_mut()
                    .map(|p| Box::pin(p.changes.changed().map(drop)))
                    .collect();
                let appended = async {
                    if waits.is_empty() {
                        std::future::pending::<()>().await
                    } else {
                        futures::future::select_all(waits.iter_mut()).await;
                    }
                };
                tokio::select! {
                    Some(done) = deliveries.recv(), if in_flight > 0 => Some(done),
                    _ = appended, if !blocked => None,
                    _ = link.changed() => None,
                    _ = prepared.notify.notified() => None,
                    _ = tokio::time::sleep(Duration::from_millis(nap)) => None,
                    _ = self.stop.wait_for(|s| *s) => None,
                }
            };
            let mut all_done: Vec<Delivered> = done.into_iter().collect();
            while let Ok(d) = deliveries.try_recv() {
                all_done.push(d);
            }
            in_flight -= all_done.len().min(in_flight);
            self.delivered(parts, all_done)?;
            let errors = link.borrow_and_update().clone();
            note_link_errors(&self.status, &self.metrics, &mut seen_errors, errors);
            if let Some(c) = &mut committing
                && let Some(result) = (&mut c.write).now_or_never()
            {
                let c = committing.take().expect("checked");
                let result = result.map(drop);
                self.committed(parts, floors, c.moved, c.floors, result);
            }
            if committing.is_none()
                && parts.iter().any(|p| p.acked() != p.committed)
                && (last_commit.elapsed() >= Duration::from_millis(100) || in_flight == 0)
            {
                committing = self.start_commit(parts, floors).await;
                last_commit = Instant::now();
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                self.report(parts).await;
            }
        }
    }

    /// Each target topic: what preparing it needs.
    fn targets(&self, parts: &[Part], floors: &HashMap<String, Floor>) -> Vec<Target> {
        let mut targets: Vec<Target> = Vec::new();
        for p in parts {
            let source = (p.topic.clone(), p.partition, p.acked(), p.fresh);
            match targets.iter_mut().find(|t| t.topic == p.target) {
                Some(t) => t.sources.push(source),
                None => targets.push(Target {
                    topic: p.target.clone(),
                    partitions: self.log.topic(&p.topic).map_or(1, |t| t.partitions),
                    floor: floors.get(&p.target).cloned().unwrap_or(Floor::Unknown),
                    sources: vec![source],
                }),
            }
        }
        targets
    }

    /// Arms the parts of each target that was read back: what the centre has past
    /// their cursors is noted (and not sent), and the floor is made durable before
    /// anything is sent.
    async fn arm(
        &self,
        parts: &mut [Part],
        floors: &mut HashMap<String, Floor>,
        prepared: &Prepared,
    ) -> Result<(), ReplicationError> {
        let ready: Vec<(String, Found)> = prepared.ready.lock().drain().collect();
        for (target, mut found) in ready {
            if found.count() > 0 {
                info!(rule = %self.rule.name, target = %target, records = found.count(),
                    "records past the cursors are at the centre already (sent before a restart); not sending them again");
            }
            for p in parts.iter_mut().filter(|p| p.target == target) {
                p.copies = found
                    .copies
                    .remove(&(p.topic.clone(), p.partition))
                    .unwrap_or_default();
                p.top = found.ends.clone();
                p.start = found.ends.clone();
                p.armed = true;
                p.fresh = false;
            }
            let floor = target_floor(parts, &target);
            self.log
                .write(vec![state_op(
                    NS_FLOOR,
                    &self.floor_key(&target),
                    Some(encode_stored(&floor)),
                )])
                .await?;
            floors.insert(target, Floor::At(floor));
            // The centre answered the read-back: the link is up.
            if matches!(
                self.state(),
                LinkState::Connecting | LinkState::Disconnected | LinkState::BackingOff
            ) {
                set_state(&self.status, &self.metrics, LinkState::Connected);
            }
        }
        Ok(())
    }

    fn state(&self) -> LinkState {
        self.status.lock().state
    }

    /// Sends records of `part` from `next_read` until the bounds; true when blocked
    /// (queue full, too much pending, bandwidth cap).
    async fn fill(
        &self,
        index: usize,
        part: &mut Part,
        producer: &dyn client::UpstreamProducer,
        bucket: &mut TokenBucket,
        in_flight: &mut usize,
    ) -> Result<bool, ReplicationError> {
        loop {
            if *in_flight >= MAX_PENDING || part.pending.len() >= MAX_PENDING {
                return Ok(true);
            }
            let (topic, partition, from) = (part.topic.clone(), part.partition, part.next_read);
            // As a read_committed consumer: open and aborted transactions stay here.
            let read = self
                .log
                .blocking(move |log| log.read_committed(&topic, partition, from, READ_BYTES));
            let mut read = match read.await {
                Ok(r) => r,
                Err(ReadError::OffsetOutOfRange { offsets, .. })
                    if part.next_read < offsets.log_start =>
                {
                    self.lost(part, offsets.log_start);
                    continue;
                }
                Err(ReadError::OffsetOutOfRange { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            if read.read.batches.is_empty() {
                return Ok(false);
            }
            for stored in std::mem::take(&mut read.read.batches) {
                let last = stored.base_offset() as u64 + stored.last_offset_delta() as u64;
                if !read.is_data(&stored) {
                    // Markers and aborted records are done as soon as read.
                    if last >= part.next_read {
                        part.pending.push_back(Pending {
                            offset: last,
                            bytes: 0,
                            acked: true,
                            at: None,
                        });
                        part.settle();
                        part.next_read = last + 1;
                    }
                    continue;
                }
                let records = decode_stored(stored, &part.topic, part.partition)?;
                for r in records {
                    let offset = r.offset as u64;
                    if offset < part.next_read {
                        continue;
                    }
                    let size = r.key.as_ref().map_or(0, Bytes::len)
                        + r.value.as_ref().map_or(0, Bytes::len);
                    if let Some(at) = part.copies.remove(&offset) {
                        part.pending.push_back(Pending {
                            offset,
                            bytes: size as u32,
                            acked: true,
                            at: Some(at),
                        });
                        part.settle();
                        part.next_read = offset + 1;
                        self.metrics
                            .already_upstream
                            .get_or_create(&rule_labels(&self.rule.name))
                            .inc();
                        continue;
                    }
                    if *in_flight >= MAX_PENDING
                        || part.pending.len() >= MAX_PENDING
                        || !bucket.take(size)
                    {
                        return Ok(true);
                    }
                    let offset_text = offset.to_string();
                    let mut headers: Vec<(&str, &[u8])> = r
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or_default()))
                        .collect();
                    headers.extend([
                        ("weir.gateway", self.gateway.as_bytes()),
                        ("weir.source.topic", part.topic.as_bytes()),
                        ("weir.source.partition", part.partition_text.as_bytes()),
                        ("weir.source.offset", offset_text.as_bytes()),
                    ]);
                    let out = OutRecord {
                        topic: &part.target,
                        key: r.key.as_deref(),
                        value: r.value.as_deref(),
                        headers: &headers,
                        timestamp_ms: r.timestamp,
                    };
                    match producer.send(&out, token(index, offset)) {
                        Ok(()) => {
                            part.pending.push_back(Pending {
                                offset,
                                bytes: size as u32,
                                acked: false,
                                at: None,
                            });
                            *in_flight += 1;
                            part.next_read = offset + 1;
                        }
                        Err(SendError::QueueFull) => return Ok(true),
                        Err(SendError::Permanent(reason)) => {
                            self.failed(part, offset, &reason);
                            part.next_read = offset + 1;
                        }
                        Err(SendError::Fatal(reason)) => {
                            return Err(ReplicationError::Producer(reason));
                        }
                    }
                }
                // Compaction may have removed the batch's last records: past them.
                part.next_read = part.next_read.max(last + 1);
            }
        }
    }

    /// Retention deleted records before they were sent: said, counted, skipped.
    fn lost(&self, part: &mut Part, log_start: u64) {
        let lost = log_start - part.next_read;
        error!(rule = %self.rule.name, topic = %part.topic, partition = part.partition,
            from = part.next_read, to = log_start - 1, records = lost,
            "records deleted by retention before they were replicated: offsets lost");
        self.metrics
            .lost_records
            .get_or_create(&rule_labels(&self.rule.name))
            .inc_by(lost);
        self.status.lock().lost_records += lost;
        part.next_read = log_start;
    }

    fn failed(&self, part: &Part, offset: u64, reason: &str) {
        error!(rule = %self.rule.name, topic = %part.topic, partition = part.partition, offset,
            error = reason, "the upstream refused a record for good; skipped");
        self.metrics
            .failed_records
            .get_or_create(&rule_labels(&self.rule.name))
            .inc();
    }

    /// Takes delivery results: marks the records acknowledged, counts them once.
    fn delivered(&self, parts: &mut [Part], done: Vec<Delivered>) -> Result<(), ReplicationError> {
        let (mut records, mut bytes) = (0u64, 0u64);
        let mut fatal = None;
        for Delivered { token, result } in done {
            let (index, offset) = untoken(token);
            let Some(part) = parts.get_mut(index) else {
                continue;
            };
            let Ok(i) = part.pending.binary_search_by_key(&offset, |p| p.offset) else {
                continue;
            };
            match result {
                Ok(landed) => {
                    records += 1;
                    bytes += u64::from(part.pending[i].bytes);
                    let offset = match landed.offset {
                        Some(offset) => {
                            let top = part.top.entry(landed.partition).or_default();
                            *top = (*top).max(offset.saturating_add(1));
                            offset
                        }
                        // Somewhere this producer put it: not before where it began.
                        None => part.start.get(&landed.partition).copied().unwrap_or(0),
                    };
                    part.pending[i].at = Some(Position {
                        partition: landed.partition,
                        offset,
                    });
                }
                Err(DeliveryError::Permanent(reason)) => self.failed(part, offset, &reason),
                Err(DeliveryError::Fatal(reason)) => {
                    fatal = Some(reason);
                    continue;
                }
            }
            part.pending[i].acked = true;
            part.settle();
        }
        if records > 0 {
            record_success(&self.metrics, &self.status, &self.rule.name, records, bytes);
            if matches!(
                self.state(),
                LinkState::Connecting | LinkState::Disconnected | LinkState::BackingOff
            ) {
                set_state(&self.status, &self.metrics, LinkState::Connected);
            }
        }
        fatal.map_or(Ok(()), |reason| Err(ReplicationError::Producer(reason)))
    }

    /// Queues the write of every partition's acknowledged position, with the floor
    /// of each target; the loop goes on meanwhile, and `committed` moves when the
    /// write is durable.
    async fn start_commit(
        &self,
        parts: &[Part],
        floors: &HashMap<String, Floor>,
    ) -> Option<Commit> {
        if self.hold_cursors {
            return None;
        }
        let mut ops = Vec::new();
        let mut moved = Vec::new();
        let mut new_floors = Vec::new();
        for (target, known) in floors {
            if !parts.iter().any(|p| p.target == *target && p.armed) {
                continue;
            }
            let floor = target_floor(parts, target);
            if *known != Floor::At(floor.clone()) {
                ops.push(put_state_op(NS_FLOOR, &self.floor_key(target), &floor));
                new_floors.push((target.clone(), floor));
            }
        }
        for (i, p) in parts.iter().enumerate() {
            let acked = p.acked();
            if acked != p.committed {
                ops.push(state_op(
                    NS_CURSOR,
                    &cursor_key(&self.rule.name, &p.topic, p.partition),
                    Some(encode_stored(&acked)),
                ));
                moved.push((i, acked));
            }
        }
        if ops.is_empty() {
            return None;
        }
        match self.log.submit(ops).await {
            Ok(write) => Some(Commit {
                moved,
                floors: new_floors,
                write,
            }),
            Err(e) => {
                warn!(rule = %self.rule.name, error = %e, "cannot commit the replication cursors; retrying");
                None
            }
        }
    }

    /// Applies a finished commit.
    fn committed(
        &self,
        parts: &mut [Part],
        floors: &mut HashMap<String, Floor>,
        moved: Vec<(usize, u64)>,
        new_floors: Vec<(String, BTreeMap<u32, u64>)>,
        result: Result<(), WriteError>,
    ) {
        match result {
            Ok(()) => {
                for (i, acked) in moved {
                    parts[i].committed = acked;
                }
                for (target, floor) in new_floors {
                    floors.insert(target, Floor::At(floor));
                }
            }
            Err(e) => {
                warn!(rule = %self.rule.name, error = %e, "cannot commit the replication cursors; retrying")
            }
        }
    }

    /// Commits now and waits for it (at the end of a session).
    async fn commit(&self, parts: &mut [Part], floors: &mut HashMap<String, Floor>) {
        if let Some(c) = self.start_commit(parts, floors).await {
            let result = c.write.await.map(drop);
            self.committed(parts, floors, c.moved, c.floors, result);
        }
    }

    /// Lag per partition into the metrics, the status and the priority gate; loss
    /// to retention noticed even while nothing can be sent.
    async fn report(&self, parts: &mut [Part]) {
        for p in parts.iter_mut() {
            let log_start = p.changes.borrow().log_start;
            if p.next_read < log_start {
                self.lost(p, log_start);
            }
        }
        let mut total = 0;
        let mut statuses = Vec::new();
        let mut sizes: HashMap<String, Vec<crate::storage::PartitionInfo>> = HashMap::new();
        for p in parts.iter_mut() {
            let offsets = *p.changes.borrow();
            let acked = p.acked();
            let lag = offsets.high_watermark.saturating_sub(acked);
            if !sizes.contains_key(&p.topic) {
                let topic = p.topic.clone();
                let described = self.log.blocking(move |log| log.describe(&topic)).await;
                let infos = described.map(|(_, d)| d).unwrap_or_default();
                sizes.insert(p.topic.clone(), infos);
            }
            let infos = &sizes[&p.topic];
            let lag_bytes = infos
                .iter()
                .find(|i| i.partition == p.partition)
                .map_or(0, |i| {
                    let stored = i.high_watermark.saturating_sub(i.log_start).max(1);
                    (i.bytes as u128 * u128::from(lag.min(stored)) / u128::from(stored)) as u64
                });
            let labels = partition_labels(&self.rule.name, &p.topic, p.partition);
            self.metrics
                .lag_records
                .get_or_create(&labels)
                .set(lag as i64);
            self.metrics
                .lag_bytes
                .get_or_create(&labels)
                .set(lag_bytes as i64);
            total += lag;
            p.last_lag = lag;
            // The first batch still to send: its first record's timestamp, at most
            // one batch older than the oldest record to send.
            let oldest_unsent_ms = if lag > 0 {
                let (topic, partition) = (p.topic.clone(), p.partition);
                let first = self
                    .log
                    .blocking(move |log| log.read(&topic, partition, acked, 1));
                first
                    .await
                    .ok()
                    .and_then(|r| r.batches.first().map(|b| b.header().base_timestamp()))
            } else {
                None
            };
            statuses.push(PartitionStatus {
                topic: p.topic.clone(),
                partition: p.partition,
                cursor: acked,
                high_watermark: offsets.high_watermark,
                lag_records: lag,
                lag_bytes,
                oldest_unsent_ms,
            });
        }
        self.gate.report(&self.rule, total);
        self.status.lock().partitions = statuses;
        match self.state() {
            LinkState::Connected if total == 0 => {
                set_state(&self.status, &self.metrics, LinkState::CaughtUp)
            }
            LinkState::CaughtUp if total > PRIORITY_BACKLOG => {
                set_state(&self.status, &self.metrics, LinkState::Connected)
            }
            _ => {}
        }
    }

    /// On stop: gives deliveries in flight a few seconds, then commits.
    async fn finish(
        &self,
        parts: &mut [Part],
        floors: &mut HashMap<String, Floor>,
        mut deliveries: client::Deliveries,
        mut in_flight: usize,
    ) -> Result<(), ReplicationError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while in_flight > 0 {
            match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                Ok(Some(d)) => {
                    in_flight -= 1;
                    if self.delivered(parts, vec![d]).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.commit(parts, floors).await;
        Ok(())
    }
}

/// The floor of `target` now, over its armed parts (see `readback`).
fn target_floor(parts: &[Part], target: &str) -> BTreeMap<u32, u64> {
    let of_target = || parts.iter().filter(|p| p.target == target && p.armed);
    readback::floor(
        of_target().map(|p| &p.top),
        of_target().flat_map(|p| {
            p.pending
                .iter()
                .filter_map(|r| r.at)
                .chain(p.copies.values().copied())
        }),
    )
}

/// A cursor write under way: which partitions and floors move where once it is
/// durable.
struct Commit {
    moved: Vec<(usize, u64)>,
    floors: Vec<(String, BTreeMap<u32, u64>)>,
    write: crate::storage::PendingWrite,
}

/// A target topic to prepare: its partition count (that of its source), its floor
/// and its sources (topic, partition, cursor, fresh).
struct Target {
    topic: String,
    partitions: u32,
    floor: Floor,
    sources: Vec<(String, u32, u64, bool)>,
}

/// Creates each target topic upstream unless it exists, then reads it back (with a
/// new consumer each time); retries each step every 2 s.
async fn prepare_targets(
    producer: Arc<dyn client::UpstreamProducer>,
    connector: Arc<dyn Connector>,
    gateway: String,
    targets: Vec<Target>,
    prepared: Arc<Prepared>,
    status: SharedStatus,
) {
    let failed = |e: ReplicationError| {
        status.lock().error(e);
        tokio::time::sleep(Duration::from_secs(2))
    };
    for target in targets {
        while let Err(e) = producer
            .ensure_topic(&target.topic, target.partitions)
            .await
        {
            failed(e).await;
        }
        let sources: Vec<Source<'_>> = target
            .sources
            .iter()
            .map(|(topic, partition, cursor, fresh)| Source {
                topic,
                partition: *partition,
                cursor: *cursor,
                fresh: *fresh,
            })
            .collect();
        let found = loop {
            let read = async {
                let reader = connector.reader()?;
                readback::read_back(
                    reader.as_ref(),
                    &target.topic,
                    &gateway,
                    &target.floor,
                    &sources,
                )
                .await
            };
            match read.await {
                Ok(found) => break found,
                Err(e) => failed(e).await,
            }
        };
        prepared.ready.lock().insert(target.topic.clone(), found);
        prepared.notify.notify_one();
    }
}

/// Target topics created and read back, for the session loop to arm; it is woken
/// when one is added.
#[derive(Default)]
struct Prepared {
    ready: Mutex<HashMap<String, Found>>,
    notify: tokio::sync::Notify,
}

/// Aborts the task when the session that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bits of a delivery token that hold the offset (2^48 records per partition); the
/// rest hold the partition's index in the rule.
const TOKEN_OFFSET_BITS: u32 = 48;
const TOKEN_OFFSET_MASK: u64 = (1 << TOKEN_OFFSET_BITS) - 1;
/// Source partitions a rule may have: what a token can tell apart.
const MAX_RULE_PARTITIONS: usize = 1 << (64 - TOKEN_OFFSET_BITS);

/// A delivery's token: the partition's index in the rule and the offset.
fn token(index: usize, offset: u64) -> u64 {
    ((index as u64) << TOKEN_OFFSET_BITS) | (offset & TOKEN_OFFSET_MASK)
}

fn untoken(token: u64) -> (usize, u64) {
    (
        (token >> TOKEN_OFFSET_BITS) as usize,
        token & TOKEN_OFFSET_MASK,
    )
}
