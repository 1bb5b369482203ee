//! The MQTT broker's shared state: sessions, the subscription tree, retained
//! messages and delayed wills, behind one lock; and the publish path that turns a
//! message into log writes (ingest records, retained messages, queued messages of
//! persistent sessions) and, once those committed, into deliveries.
//!
//! Persistence, all in the log's `state` table (postcard), written in the same
//! `Log::write` as the publish that caused it:
//! - `mqtt.session/{client_id}`: a persistent session's expiry and subscriptions;
//! - `mqtt.msg/{client_id}\x1f{seq:016x}`: a QoS 1/2 message owed to a persistent
//!   session, deleted once the client acknowledged it;
//! - `mqtt.retained/{topic}`: retained messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::rules::CompiledIngest;
use crate::plugins::IngestPlugin;
use crate::plugins::host::{Header, InputRecord, OutputRecord, Source};
use crate::storage::{
    Appends, Log, NotFound, StorageError, WriteError, WriteOp, encode_stored, now_ms, state_op,
};
use weir_wire::partition::partition_for_key;
use weir_wire::record_batch::build::NewRecord;
use weir_wire::topics::{self, SubscriptionFilter, SubscriptionTree};

mod mailbox;
mod message;
mod metrics;

pub use mailbox::Inbox;
use mailbox::{Outbox, mailbox};
pub use message::{
    Delivery, Message, MessageProperties, NEVER_EXPIRES, SubOptions, ToConnection, Will,
};
pub use metrics::MqttMetrics;

const NS_SESSION: &str = "mqtt.session";
const NS_MSG: &str = "mqtt.msg";
const NS_RETAINED: &str = "mqtt.retained";
const KEY_SEP: char = '\x1f';

#[derive(Debug, Default, Serialize, Deserialize)]
struct SessionRecord {
    expiry_secs: u32,
    subscriptions: Vec<(String, SubOptions)>,
}

struct Link {
    id: u64,
    tx: Outbox,
}

struct Session {
    expiry_secs: u32,
    subscriptions: HashMap<String, SubOptions>,
    link: Option<Link>,
    queue: VecDeque<Delivery>,
    /// Inbound QoS 2 packet ids awaiting PUBREL, kept across connections.
    awaiting_rel: HashSet<u16>,
    expires_at: Option<Instant>,
}

impl Session {
    fn new(expiry_secs: u32) -> Self {
        Self {
            expiry_secs,
            subscriptions: HashMap::new(),
            link: None,
            queue: VecDeque::new(),
            awaiting_rel: HashSet::new(),
            expires_at: None,
        }
    }

    fn persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    fn record(&self) -> SessionRecord {
        SessionRecord {
            expiry_secs: self.expiry_secs,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(f, o)| (f.clone(), o.clone()))
                .collect(),
        }
    }
}

struct DelayedWill {
    client_id: String,
    at: Instant,
    message: Message,
}

/// A retained message (or, `None`, its deletion) prepared and not yet committed.
/// It already counts as the topic's retained message for a subscription made
/// meanwhile, which gets it once it committed: the subscription saw the publish
/// first, so it must not fall between the live delivery and the retained store.
struct InflightRetained {
    id: u64,
    message: Option<Arc<Message>>,
    /// Subscriptions made while it was in flight: (client, options).
    late: Vec<(String, SubOptions)>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    tree: SubscriptionTree<SubOptions>,
    retained: HashMap<String, Arc<Message>>,
    /// Of `retained`, the broker's own `$SYS` messages (not counted as retained).
    sys_retained: usize,
    /// Per topic, the retained writes in flight, oldest first.
    inflight_retained: HashMap<String, Vec<InflightRetained>>,
    next_inflight: u64,
    share_turn: HashMap<String, usize>,
    wills: Vec<DelayedWill>,
    next_link: u64,
}

/// A publish, prepared: the writes that must commit before it is acknowledged, and
/// the deliveries to make once they did. Every one ends in [`MqttBroker::complete`]
/// (committed) or [`MqttBroker::abandon`] (not), which retire its retained writes
/// in flight.
#[derive(Debug, Default)]
pub struct Prepared {
    pub ops: Vec<WriteOp>,
    deliveries: Vec<(String, Delivery)>,
    /// Retained writes in flight: (topic, id in `State::inflight_retained`).
    retained: Vec<(String, u64)>,
    /// Per message: no subscriber and no ingest rule took it (MQTT 5 reason 0x10).
    pub unrouted: Vec<bool>,
    /// Records the ingest rules append.
    appends: u64,
}

impl Prepared {
    pub fn needs_write(&self) -> bool {
        !self.ops.is_empty()
    }

    pub fn take_ops(&mut self) -> Vec<WriteOp> {
        std::mem::take(&mut self.ops)
    }
}

/// The result of a CONNECT, for the connection to act on.
pub struct Connected {
    pub link_id: u64,
    pub rx: Inbox,
    pub session_present: bool,
    pub queued: Vec<Delivery>,
    pub awaiting_rel: HashSet<u16>,
}

/// Cheap handle; clones share the state.
#[derive(Clone)]
pub struct MqttBroker {
    inner: Arc<Inner>,
}

struct Inner {
    log: Log,
    rules: Vec<CompiledIngest>,
    state: Mutex<State>,
    seq: AtomicU64,
    max_queued: usize,
    metrics: MqttMetrics,
}

impl MqttBroker {
    /// Loads persisted sessions, queued messages and retained messages.
    pub fn open(
        log: Log,
        rules: Vec<CompiledIngest>,
        max_queued: usize,
        metrics: MqttMetrics,
    ) -> Result<Self, StorageError> {
        let mut state = State::default();
        let now = Instant::now();
        for (client, record) in log.list_state::<SessionRecord>(NS_SESSION)? {
            let mut session = Session::new(record.expiry_secs);
            session.expires_at = expiry_instant(now, record.expiry_secs);
            for (raw, opts) in record.subscriptions {
                if let Some(filter) = SubscriptionFilter::parse(&raw) {
                    state.tree.insert(&filter, &client, opts.clone());
                    session.subscriptions.insert(raw, opts);
                }
            }
            state.sessions.insert(client, session);
        }
        let mut max_seq = 0;
        let mut orphans = Vec::new();
        for (key, delivery) in log.list_state::<Delivery>(NS_MSG)? {
            let Some((client, seq)) = key.split_once(KEY_SEP) else {
                continue;
            };
            max_seq = max_seq.max(u64::from_str_radix(seq, 16).unwrap_or(0));
            match state.sessions.get_mut(client) {
                Some(s) => s.queue.push_back(delivery),
                None => orphans.push(key),
            }
        }
        for (topic, message) in log.list_state::<Message>(NS_RETAINED)? {
            state.retained.insert(topic, Arc::new(message));
        }
        if !orphans.is_empty() {
            warn!(
                count = orphans.len(),
                "queued MQTT messages without a session; deleting"
            );
        }
        let broker = Self {
            inner: Arc::new(Inner {
                log,
                rules,
                state: Mutex::new(state),
                seq: AtomicU64::new(max_seq + 1),
                max_queued,
                metrics,
            }),
        };
        broker.gauges(&broker.inner.state.lock());
        if !orphans.is_empty() {
            let ops = orphans.iter().map(|k| state_op(NS_MSG, k, None)).collect();
            let log = broker.inner.log.clone();
            tokio::spawn(async move {
                if let Err(e) = log.write(ops).await {
                    warn!(error = %e, "cannot delete orphan MQTT messages");
                }
            });
        }
        Ok(broker)
    }

    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    pub fn metrics(&self) -> &MqttMetrics {
        &self.inner.metrics
    }

    pub fn session_count(&self) -> usize {
        self.inner.state.lock().sessions.len()
    }

    /// Opens (or resumes) the session of `client_id` for a new connection. Returns the
    /// writes to commit before CONNACK (the session record, or the deletion of a
    /// discarded one) with the connection's handles.
    pub fn connect(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry_secs: u32,
    ) -> (Connected, Vec<WriteOp>) {
        let mut st = self.inner.state.lock();
        let (tx, rx) = mailbox();
        st.next_link += 1;
        let link_id = st.next_link;
        // A delayed will of this client is cancelled by its return [MQTT-3.1.3-9].
        st.wills.retain(|w| w.client_id != client_id);
        let mut ops = Vec::new();
        let mut session_present = false;
        if let Some(old) = st.sessions.get_mut(client_id)
            && let Some(link) = old.link.take()
        {
            link.tx.send(ToConnection::TakenOver);
        }
        if clean_start {
            if let Some(old) = st.sessions.remove(client_id) {
                ops.extend(self.discard(&mut st, client_id, old));
            }
        } else if st.sessions.contains_key(client_id) {
            session_present = true;
        }
        let session = st
            .sessions
            .entry(client_id.to_string())
            .or_insert_with(|| Session::new(expiry_secs));
        session.expiry_secs = expiry_secs;
        session.expires_at = None;
        session.link = Some(Link { id: link_id, tx });
        let queued: Vec<Delivery> = session.queue.drain(..).collect();
        let persistent = session.persistent();
        let record = persistent.then(|| self.session_op(client_id, session));
        self.gauges(&st);
        let session = st.sessions.get_mut(client_id).expect("inserted above");
        let awaiting_rel = std::mem::take(&mut session.awaiting_rel);
        if let Some(record) = record {
            ops.push(record);
        } else if !persistent && session_present {
            ops.push(state_op(NS_SESSION, client_id, None));
        }
        (
            Connected {
                link_id,
                rx,
                session_present,
                queued,
                awaiting_rel,
            },
            ops,
        )
    }

    /// A connection ended. `leftover`: deliveries it had not completed; `will`: to
    /// publish (the connection ended without a clean DISCONNECT).
    pub fn disconnected(
        &self,
        client_id: &str,
        link_id: u64,
        leftover: Vec<Delivery>,
        awaiting_rel: HashSet<u16>,
        will: Option<Will>,
        expiry_secs: u32,
    ) {
        let mut ops = Vec::new();
        let mut publish_now = None;
        {
            let mut st = self.inner.state.lock();
            let st = &mut *st;
            let Some(session) = st.sessions.get_mut(client_id) else {
                // Discarded by a clean start of a newer connection.
                ops.extend(
                    leftover
                        .iter()
                        .filter_map(|d| d.store_key.as_ref())
                        .map(|k| state_op(NS_MSG, k, None)),
                );
                self.spawn_write(ops);
                return;
            };
            let mine = session.link.as_ref().is_some_and(|l| l.id == link_id);
            if !mine {
                // Taken over: the new connection inherits what this one had not completed.
                if let Some(link) = &session.link {
                    for mut d in leftover {
                        d.sent = d.sent || d.released;
                        link.tx.send(ToConnection::Deliver(d));
                    }
                }
                if let Some(w) = will.filter(|w| w.delay_secs == 0) {
                    publish_now = Some(w.message);
                }
            } else {
                // Routed to this connection after it stopped taking them: queued after
                // what it had not completed.
                let stranded = session
                    .link
                    .take()
                    .map(|l| l.tx.take_stranded())
                    .unwrap_or_default();
                session.expiry_secs = expiry_secs;
                session.awaiting_rel = awaiting_rel;
                for d in leftover.into_iter().chain(stranded).rev() {
                    session.queue.push_front(d);
                }
                if let Some(w) = will {
                    let delay = w.delay_secs.min(expiry_secs);
                    if delay == 0 {
                        publish_now = Some(w.message);
                    } else {
                        st.wills.push(DelayedWill {
                            client_id: client_id.to_string(),
                            at: Instant::now() + Duration::from_secs(u64::from(delay)),
                            message: w.message,
                        });
                    }
                }
                if session.persistent() {
                    session.expires_at = expiry_instant(Instant::now(), expiry_secs);
                    ops.push(self.session_op(client_id, session));
                } else if let Some(s) = st.sessions.remove(client_id) {
                    ops.extend(self.discard(st, client_id, s));
                }
            }
            self.gauges(st);
        }
        self.spawn_write(ops);
        if let Some(message) = publish_now {
            self.publish_internal(message);
        }
    }

    /// Expires sessions and fires delayed wills whose time has come. Called every second.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut ops = Vec::new();
        let mut wills = Vec::new();
        {
            let mut st = self.inner.state.lock();
            let st = &mut *st;
            let (due, later): (Vec<_>, Vec<_>) = st.wills.drain(..).partition(|w| w.at <= now);
            st.wills = later;
            wills.extend(due.into_iter().map(|w| w.message));
            let expired: Vec<String> = st
                .sessions
                .iter()
                .filter(|(_, s)| s.link.is_none() && s.expires_at.is_some_and(|at| at <= now))
                .map(|(c, _)| c.clone())
                .collect();
            for client in expired {
                if let Some(s) = st.sessions.remove(&client) {
                    debug!(client = %client, "MQTT session expired");
                    ops.extend(self.discard(st, &client, s));
                }
            }
            self.gauges(st);
        }
        self.spawn_write(ops);
        for w in wills {
            self.publish_internal(w);
        }
    }

    /// Applies SUBSCRIBE filters; returns per filter the granted QoS or `Err(reason)`,
    /// the retained messages to send, and the writes to commit before SUBACK.
    pub fn subscribe(
        &self,
        client_id: &str,
        filters: Vec<(String, SubOptions)>,
    ) -> (
        Vec<Result<u8, SubscribeRefusal>>,
        Vec<Delivery>,
        Vec<WriteOp>,
    ) {
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        let mut results = Vec::new();
        let mut retained = Vec::new();
        let now = now_ms();
        for (raw, opts) in filters {
            let Some(filter) = SubscriptionFilter::parse(&raw) else {
                results.push(Err(SubscribeRefusal::InvalidFilter));
                continue;
            };
            if filter.share_group.is_some() && opts.no_local {
                results.push(Err(SubscribeRefusal::SharedNoLocal));
                continue;
            }
            let existed = st.tree.insert(&filter, client_id, opts.clone());
            if let Some(s) = st.sessions.get_mut(client_id) {
                s.subscriptions.insert(raw.clone(), opts.clone());
            }
            let send_retained = filter.share_group.is_none()
                && match opts.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if send_retained {
                for (topic, msg) in &st.retained {
                    // A retained write in flight supersedes the committed message.
                    if topics::matches(&filter.filter, topic)
                        && !msg.expired(now)
                        && !st.inflight_retained.contains_key(topic)
                    {
                        retained.push(retained_delivery(msg, &opts));
                    }
                }
                for (topic, inflight) in &mut st.inflight_retained {
                    if topics::matches(&filter.filter, topic)
                        && let Some(latest) = inflight.last_mut()
                    {
                        latest.late.push((client_id.to_string(), opts.clone()));
                    }
                }
            }
            results.push(Ok(opts.qos));
        }
        let ops = match st.sessions.get(client_id) {
            Some(s) if s.persistent() => vec![self.session_op(client_id, s)],
            _ => Vec::new(),
        };
        self.gauges(st);
        (results, retained, ops)
    }

    /// Removes filters; per filter whether it existed; the writes to commit.
    pub fn unsubscribe(&self, client_id: &str, filters: &[String]) -> (Vec<bool>, Vec<WriteOp>) {
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        let found = filters
            .iter()
            .map(|raw| {
                let removed =
                    SubscriptionFilter::parse(raw).is_some_and(|f| st.tree.remove(&f, client_id));
                if let Some(s) = st.sessions.get_mut(client_id) {
                    s.subscriptions.remove(raw);
                }
                removed
            })
            .collect();
        let ops = match st.sessions.get(client_id) {
            Some(s) if s.persistent() => vec![self.session_op(client_id, s)],
            _ => Vec::new(),
        };
        self.gauges(st);
        (found, ops)
    }

    /// Works out what a publish writes and whom it reaches. Nothing is delivered
    /// until [`MqttBroker::complete`] is called after the writes committed.
    pub async fn prepare(&self, message: Message) -> Result<Prepared, WriteError> {
        self.prepare_many(vec![message]).await
    }

    /// [`MqttBroker::prepare`] for several messages at once (a device pipelining its
    /// publishes): their ingest records share one batch per partition, in order.
    pub async fn prepare_many(&self, messages: Vec<Message>) -> Result<Prepared, WriteError> {
        let mut prepared = Prepared::default();
        let mut appends = Appends::default();
        let mut ingested = vec![false; messages.len()];
        // Per rule with a plugin: the records that go through it together.
        let mut through_plugin: Vec<Vec<(u32, NewRecord)>> =
            vec![Vec::new(); self.inner.rules.len()];
        for (i, message) in messages.iter().enumerate() {
            for (r, rule) in self.inner.rules.iter().enumerate() {
                let Some(key) = rule.key_for(&message.topic, &message.from) else {
                    continue;
                };
                let (partition, record) = self.record(rule, key, message)?;
                ingested[i] = true;
                if rule.plugin.is_some() {
                    through_plugin[r].push((partition, record));
                    continue;
                }
                appends.add(&rule.topic, partition, record);
                prepared.appends += 1;
            }
        }
        for (rule, records) in self.inner.rules.iter().zip(through_plugin) {
            if let Some(plugin) = &rule.plugin
                && !records.is_empty()
            {
                prepared.appends += self
                    .through_plugin(rule, plugin, records, &mut appends)
                    .await;
            }
        }
        prepared.ops.extend(appends.into_ops());
        let mut st = self.inner.state.lock();
        for (i, message) in messages.into_iter().enumerate() {
            if message.retain {
                let stored = (!message.payload.is_empty()).then(|| Arc::new(message.clone()));
                let value = stored.as_deref().map(encode_stored);
                prepared
                    .ops
                    .push(state_op(NS_RETAINED, &message.topic, value));
                st.next_inflight += 1;
                let id = st.next_inflight;
                st.inflight_retained
                    .entry(message.topic.clone())
                    .or_default()
                    .push(InflightRetained {
                        id,
                        message: stored,
                        late: Vec::new(),
                    });
                prepared.retained.push((message.topic.clone(), id));
            }
            let before = prepared.deliveries.len();
            self.route(&mut st, Arc::new(message), &mut prepared);
            prepared
                .unrouted
                .push(prepared.deliveries.len() == before && !ingested[i]);
        }
        Ok(prepared)
    }

    /// Adds the deliveries of `message` (and the stored copies persistent sessions
    /// need) to `prepared`.
    fn route(&self, st: &mut State, message: Arc<Message>, prepared: &mut Prepared) {
        // Per client: granted QoS, retain flag and subscription ids over all its matches.
        let mut per_client: HashMap<&str, (u8, bool, Vec<u32>)> = HashMap::new();
        let mut shared: HashMap<(&str, &str), Vec<(&str, &SubOptions)>> = HashMap::new();
        st.tree
            .for_each_match(&message.topic, |group, filter, client, opts| {
                if !group.is_empty() {
                    shared
                        .entry((group, filter))
                        .or_default()
                        .push((client, opts));
                    return;
                }
                if opts.no_local && client == message.from {
                    return;
                }
                let entry = per_client.entry(client).or_insert((0, false, Vec::new()));
                entry.0 = entry.0.max(opts.qos);
                entry.1 |= opts.retain_as_published && message.retain;
                entry.2.extend(opts.id);
            });
        let mut chosen: Vec<(String, u8, bool, Vec<u32>)> = per_client
            .into_iter()
            .map(|(c, (q, r, ids))| (c.to_string(), q, r, ids))
            .collect();
        for ((group, filter), mut members) in shared {
            members.sort_by(|a, b| a.0.cmp(b.0));
            let online: Vec<_> = members
                .iter()
                .filter(|(c, _)| st.sessions.get(*c).is_some_and(|s| s.link.is_some()))
                .collect();
            let pool: Vec<_> = if online.is_empty() {
                members.iter().collect()
            } else {
                online
            };
            let turn = st
                .share_turn
                .entry(format!("{group}/{filter}"))
                .or_insert(0);
            let (client, opts) = pool[*turn % pool.len()];
            *turn += 1;
            chosen.push((
                client.to_string(),
                opts.qos,
                opts.retain_as_published && message.retain,
                opts.id.into_iter().collect(),
            ));
        }
        for (client, sub_qos, retain, ids) in chosen {
            let Some(session) = st.sessions.get(&client) else {
                continue;
            };
            let qos = message.qos.min(sub_qos);
            let mut delivery = Delivery {
                message: message.clone(),
                qos,
                retain,
                subscription_ids: ids,
                store_key: None,
                sent: false,
                released: false,
            };
            if qos > 0 && session.persistent() {
                let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
                let key = format!("{client}{KEY_SEP}{seq:016x}");
                delivery.store_key = Some(key.clone());
                prepared
                    .ops
                    .push(state_op(NS_MSG, &key, Some(encode_stored(&delivery))));
            }
            prepared.deliveries.push((client, delivery));
        }
    }

    /// Delivers a prepared publish whose writes committed (or that had none).
    pub fn complete(&self, prepared: Prepared) {
        self.inner.metrics.ingested.inc_by(prepared.appends);
        let mut st = self.inner.state.lock();
        let mut deliveries = prepared.deliveries;
        if !prepared.retained.is_empty() {
            for (topic, id) in prepared.retained {
                let Some(inflight) = take_inflight(&mut st, &topic, id) else {
                    continue;
                };
                match &inflight.message {
                    Some(m) => st.retained.insert(topic, m.clone()),
                    None => st.retained.remove(&topic),
                };
                if let Some(m) = &inflight.message {
                    for (client, opts) in inflight.late {
                        deliveries.push((client, retained_delivery(m, &opts)));
                    }
                }
            }
            self.gauges(&st);
        }
        self.deliver(st, deliveries);
    }

    /// Retires a prepared publish whose writes failed: nothing of it is delivered,
    /// and subscriptions made meanwhile get the retained message that stays.
    pub fn abandon(&self, prepared: Prepared) {
        let mut st = self.inner.state.lock();
        let now = now_ms();
        let mut deliveries = Vec::new();
        for (topic, id) in prepared.retained {
            let Some(inflight) = take_inflight(&mut st, &topic, id) else {
                continue;
            };
            if let Some(m) = st.retained.get(&topic).filter(|m| !m.expired(now)) {
                for (client, opts) in inflight.late {
                    deliveries.push((client, retained_delivery(m, &opts)));
                }
            }
        }
        self.deliver(st, deliveries);
    }

    /// Hands deliveries to their sessions: to the connection, or to the queue of an
    /// offline persistent session.
    fn deliver(
        &self,
        mut st: parking_lot::MutexGuard<'_, State>,
        deliveries: Vec<(String, Delivery)>,
    ) {
        let mut drop_keys = Vec::new();
        for (client, delivery) in deliveries {
            let Some(session) = st.sessions.get_mut(&client) else {
                drop_keys.extend(delivery.store_key);
                continue;
            };
            match &session.link {
                Some(link) => {
                    link.tx.send(ToConnection::Deliver(delivery));
                }
                None if delivery.qos > 0 && session.queue.len() < self.inner.max_queued => {
                    session.queue.push_back(delivery);
                }
                None => {
                    self.inner.metrics.dropped.inc();
                    drop_keys.extend(delivery.store_key);
                }
            }
        }
        drop(st);
        self.spawn_write(
            drop_keys
                .iter()
                .map(|k| state_op(NS_MSG, k, None))
                .collect(),
        );
    }

    /// Publishes a message of the broker's own (a will, a bridged or downlink
    /// message): writes, then delivers, in a task of its own.
    pub fn publish_internal(&self, message: Message) {
        let broker = self.clone();
        tokio::spawn(async move {
            if let Err(e) = broker.publish(message).await {
                warn!(error = %e, "cannot publish an MQTT message of the broker's own");
            }
        });
    }

    /// Publishes one of the broker's own `$SYS` messages: QoS 0, retained in memory
    /// only. It changes every interval; writing it would wear the card for nothing.
    pub fn publish_sys(&self, topic: &str, payload: String) {
        let message = Arc::new(Message {
            topic: topic.to_string(),
            payload: Bytes::from(payload),
            qos: 0,
            retain: true,
            properties: MessageProperties::default(),
            from: String::new(),
            expires_at_ms: None,
        });
        let mut st = self.inner.state.lock();
        if st
            .retained
            .insert(topic.to_string(), message.clone())
            .is_none()
        {
            st.sys_retained += 1;
        }
        let mut prepared = Prepared::default();
        self.route(&mut st, message, &mut prepared);
        self.gauges(&st);
        self.deliver(st, prepared.deliveries);
    }

    /// Prepares, writes and delivers one message; returns once it is durable.
    pub async fn publish(&self, message: Message) -> Result<(), WriteError> {
        let mut prepared = self.prepare(message).await?;
        if prepared.needs_write()
            && let Err(e) = self.inner.log.write(prepared.take_ops()).await
        {
            self.inner.metrics.ingest_errors.inc();
            self.abandon(prepared);
            return Err(e);
        }
        self.complete(prepared);
        Ok(())
    }

    /// The write that forgets a delivered message of a persistent session.
    pub fn acknowledged_op(key: &str) -> WriteOp {
        state_op(NS_MSG, key, None)
    }

    /// Runs records of an ingest rule through its plugin: outputs go to the rule's
    /// topic (partitioned by their key, else where the input was), failures to
    /// `{topic}-dlq` with `weir.error`. Returns the number of records appended.
    async fn through_plugin(
        &self,
        rule: &CompiledIngest,
        plugin: &Arc<IngestPlugin>,
        records: Vec<(u32, NewRecord)>,
        appends: &mut Appends,
    ) -> u64 {
        let inputs: Vec<InputRecord> = records
            .iter()
            .enumerate()
            .map(|(i, (_, r))| InputRecord {
                key: r.key.as_ref().map(|k| k.to_vec()),
                value: r.value.as_ref().map(|v| v.to_vec()),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| Header {
                        key: k.clone(),
                        value: v.to_vec(),
                    })
                    .collect(),
                timestamp_ms: r.timestamp_ms,
                offset: i as u64,
            })
            .collect();
        let source = Source {
            topic: rule.topic.clone(),
            partition: 0,
        };
        let results = plugin.run_blocking(source, inputs).await;
        let partitions = self
            .inner
            .log
            .topic(&rule.topic)
            .map_or(1, |t| t.partitions);
        let dead_letter = format!("{}-dlq", rule.topic);
        let mut appended = 0;
        for ((partition, input), result) in records.into_iter().zip(results) {
            match result {
                Ok(outputs) => {
                    for OutputRecord {
                        key,
                        value,
                        headers,
                        ..
                    } in outputs
                    {
                        let p = key
                            .as_deref()
                            .map_or(partition, |k| partition_for_key(k, partitions));
                        appends.add(
                            &rule.topic,
                            p,
                            NewRecord {
                                key: key.map(Bytes::from),
                                value: value.map(Bytes::from),
                                timestamp_ms: input.timestamp_ms,
                                headers: headers
                                    .into_iter()
                                    .map(|h| (h.key, Bytes::from(h.value)))
                                    .collect(),
                            },
                        );
                        appended += 1;
                    }
                }
                Err(reason) => {
                    self.inner.metrics.ingest_plugin_failures.inc();
                    let mut record = input;
                    record
                        .headers
                        .push(("weir.error".into(), Bytes::from(reason)));
                    appends.add(&dead_letter, 0, record);
                    appended += 1;
                }
            }
        }
        appended
    }

    /// The partition and record an ingest rule makes of a message.
    fn record(
        &self,
        rule: &CompiledIngest,
        key: Option<String>,
        message: &Message,
    ) -> Result<(u32, NewRecord), WriteError> {
        let partitions = self
            .inner
            .log
            .topic(&rule.topic)
            .ok_or_else(|| WriteError::from(NotFound::Topic(rule.topic.clone())))?
            .partitions;
        let partition = match &key {
            Some(k) => partition_for_key(k.as_bytes(), partitions),
            None => (self.inner.seq.fetch_add(1, Ordering::Relaxed) % u64::from(partitions)) as u32,
        };
        let mut headers = vec![
            ("mqtt.topic".to_string(), Bytes::from(message.topic.clone())),
            (
                "mqtt.client_id".to_string(),
                Bytes::from(message.from.clone()),
            ),
            ("mqtt.qos".to_string(), Bytes::from(message.qos.to_string())),
        ];
        let expiry_secs = message.expires_at_ms.map(|at| {
            u32::try_from((at - now_ms() + 999) / 1000)
                .unwrap_or(0)
                .max(1)
        });
        message.properties.to_headers(expiry_secs, &mut headers);
        let record = NewRecord {
            key: key.map(Bytes::from),
            value: Some(message.payload.clone()),
            timestamp_ms: now_ms(),
            headers,
        };
        Ok((partition, record))
    }

    /// Refreshes the gauges from the state; called with the lock held after changes.
    fn gauges(&self, st: &State) {
        let m = &self.inner.metrics;
        m.subscriptions.set(st.tree.len() as i64);
        m.sessions.set(st.sessions.len() as i64);
        m.retained.set((st.retained.len() - st.sys_retained) as i64);
    }

    fn session_op(&self, client_id: &str, session: &Session) -> WriteOp {
        state_op(
            NS_SESSION,
            client_id,
            Some(encode_stored(&session.record())),
        )
    }

    /// Forgets a session: its subscriptions, its record and its queued messages.
    fn discard(&self, st: &mut State, client_id: &str, session: Session) -> Vec<WriteOp> {
        for raw in session.subscriptions.keys() {
            if let Some(f) = SubscriptionFilter::parse(raw) {
                st.tree.remove(&f, client_id);
            }
        }
        let mut ops = vec![state_op(NS_SESSION, client_id, None)];
        ops.extend(
            session
                .queue
                .iter()
                .filter_map(|d| d.store_key.as_ref())
                .map(|k| state_op(NS_MSG, k, None)),
        );
        ops
    }

    fn spawn_write(&self, ops: Vec<WriteOp>) {
        if ops.is_empty() {
            return;
        }
        let log = self.inner.log.clone();
        tokio::spawn(async move {
            if let Err(e) = log.write(ops).await {
                warn!(error = %e, "cannot persist MQTT session state");
            }
        });
    }
}

/// Takes the retained write `id` of `topic` out of the in-flight set.
fn take_inflight(st: &mut State, topic: &str, id: u64) -> Option<InflightRetained> {
    let inflight = st.inflight_retained.get_mut(topic)?;
    let i = inflight.iter().position(|r| r.id == id)?;
    let taken = inflight.remove(i);
    if inflight.is_empty() {
        st.inflight_retained.remove(topic);
    }
    Some(taken)
}

/// A retained message sent because of a subscription.
fn retained_delivery(message: &Arc<Message>, opts: &SubOptions) -> Delivery {
    Delivery {
        message: message.clone(),
        qos: message.qos.min(opts.qos),
        retain: true,
        subscription_ids: opts.id.into_iter().collect(),
        store_key: None,
        sent: false,
        released: false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeRefusal {
    InvalidFilter,
    SharedNoLocal,
}

fn expiry_instant(now: Instant, expiry_secs: u32) -> Option<Instant> {
    (expiry_secs != NEVER_EXPIRES).then(|| now + Duration::from_secs(u64::from(expiry_secs)))
}

#[cfg(test)]
mod tests;
