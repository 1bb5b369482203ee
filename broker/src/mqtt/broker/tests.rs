//! The broker's session and routing logic against a real log, without sockets: what
//! it writes, whom it delivers to, and what it finds again when it reopens.

use std::collections::HashSet;

use super::*;
use crate::mqtt::rules::IngestRule;
use crate::storage::{LogOptions, TopicConfig};

fn options(qos: u8) -> SubOptions {
    SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        id: None,
    }
}

fn message(topic: &str, payload: &'static str, qos: u8, retain: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        retain,
        properties: MessageProperties::default(),
        from: "publisher".into(),
        expires_at_ms: None,
    }
}

fn open(log: &Log, rules: Vec<CompiledIngest>) -> MqttBroker {
    MqttBroker::open(log.clone(), rules, 100, MqttMetrics::default()).unwrap()
}

/// A publish as a connection makes it: prepared, its writes committed, delivered.
async fn publish(broker: &MqttBroker, m: Message) -> Prepared {
    let mut prepared = broker.prepare(m).await.unwrap();
    let ops = prepared.take_ops();
    if !ops.is_empty() {
        broker.log().write(ops).await.unwrap();
    }
    let unrouted = prepared.unrouted.clone();
    broker.complete(prepared);
    Prepared {
        unrouted,
        ..Prepared::default()
    }
}

async fn write(log: &Log, ops: Vec<WriteOp>) {
    if !ops.is_empty() {
        log.write(ops).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_subscription_and_queue_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogOptions::new(dir.path())).unwrap();
    let broker = open(&log, Vec::new());
    let (connected, ops) = broker.connect("device", false, 3600);
    assert!(!connected.session_present);
    write(&log, ops).await;
    let (granted, retained, ops) =
        broker.subscribe("device", vec![("alerts/+".into(), options(1))]);
    assert_eq!(granted, [Ok(1)]);
    assert!(retained.is_empty());
    write(&log, ops).await;
    // Gone without a clean DISCONNECT, no will: the session stays for an hour.
    broker.disconnected(
        "device",
        connected.link_id,
        Vec::new(),
        HashSet::new(),
        None,
        3600,
    );
    let sent = publish(&broker, message("alerts/fire", "hot", 1, false)).await;
    assert_eq!(sent.unrouted, [false]);

    // A new broker on the same log: the session, its subscription and the queued
    // message were all stored.
    let broker = open(&log, Vec::new());
    assert_eq!(broker.session_count(), 1);
    let (connected, _) = broker.connect("device", false, 3600);
    assert!(connected.session_present);
    let queued: Vec<_> = connected
        .queued
        .iter()
        .map(|d| (d.message.topic.as_str(), d.qos))
        .collect();
    assert_eq!(queued, [("alerts/fire", 1)]);
    let sent = publish(&broker, message("alerts/flood", "wet", 0, false)).await;
    assert_eq!(sent.unrouted, [false], "the subscription came back too");

    // A clean start throws the stored session away.
    let (connected, ops) = broker.connect("device", true, 0);
    assert!(!connected.session_present);
    assert!(connected.queued.is_empty());
    write(&log, ops).await;
    let broker = open(&log, Vec::new());
    let (connected, _) = broker.connect("device", false, 0);
    assert!(!connected.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_takes_the_client_id_over() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogOptions::new(dir.path())).unwrap();
    let broker = open(&log, Vec::new());
    let (mut first, _) = broker.connect("device", false, 0);
    let (second, _) = broker.connect("device", false, 0);
    assert!(second.session_present);
    assert!(matches!(
        first.rx.recv().await,
        Some(ToConnection::TakenOver)
    ));
    // The first connection's end does not end the second's session.
    broker.disconnected("device", first.link_id, Vec::new(), HashSet::new(), None, 0);
    assert_eq!(broker.session_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_replaced_cleared_and_sent_to_new_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogOptions::new(dir.path())).unwrap();
    let broker = open(&log, Vec::new());
    let (_c, _) = broker.connect("reader", true, 0);
    publish(&broker, message("lamp/1", "on", 1, true)).await;
    publish(&broker, message("lamp/1", "off", 1, true)).await;
    publish(&broker, message("lamp/2", "on", 0, true)).await;
    let (_, retained, _) = broker.subscribe("reader", vec![("lamp/#".into(), options(1))]);
    let mut got: Vec<_> = retained
        .iter()
        .map(|d| (d.message.topic.clone(), d.message.payload.clone(), d.qos))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("lamp/1".into(), Bytes::from("off"), 1),
            ("lamp/2".into(), Bytes::from("on"), 0),
        ]
    );
    // An empty retained payload clears the topic, and that survives a restart.
    publish(&broker, message("lamp/1", "", 1, true)).await;
    let broker = open(&log, Vec::new());
    let (_c, _) = broker.connect("late", true, 0);
    let (_, retained, _) = broker.subscribe("late", vec![("lamp/#".into(), options(1))]);
    let topics: Vec<_> = retained.iter().map(|d| d.message.topic.as_str()).collect();
    assert_eq!(topics, ["lamp/2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_rule_appends_in_the_publish_write_and_an_unmatched_message_is_unrouted() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogOptions::new(dir.path())).unwrap();
    log.create_topic("readings", 2, TopicConfig::default())
        .await
        .unwrap();
    let rule = CompiledIngest::compile(&IngestRule {
        filter: "sensors/{device}/temp".into(),
        topic: "readings".into(),
        key: "{device}".into(),
        ..Default::default()
    })
    .unwrap();
    let broker = open(&log, vec![rule]);
    let prepared = broker
        .prepare_many(vec![
            message("sensors/a/temp", "21.5", 1, false),
            message("sensors/a/temp", "21.6", 1, false),
            message("other/topic", "x", 1, false),
        ])
        .await
        .unwrap();
    assert_eq!(prepared.unrouted, [false, false, true]);
    // Both readings of device `a` in one batch of one partition, keyed by the device.
    let appends: Vec<_> = prepared
        .ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::AppendRecords {
                topic,
                partition,
                records,
            } => Some((topic.as_str(), *partition, records.len())),
            _ => None,
        })
        .collect();
    let partition = partition_for_key(b"a", 2);
    assert_eq!(appends, [("readings", partition, 2)]);
    let record = match &prepared.ops[0] {
        WriteOp::AppendRecords { records, .. } => &records[0],
        other => panic!("not an append: {other:?}"),
    };
    assert_eq!(record.key.as_deref(), Some(&b"a"[..]));
    assert!(
        record
            .headers
            .iter()
            .any(|(k, v)| k == "mqtt.topic" && v == "sensors/a/temp")
    );
}
