//! What an acknowledgement promises: redelivery to persistent sessions (rumqttc),
//! PUBACKed messages surviving SIGKILL, simulated devices end to end into a Kafka
//! consumer, and the bridge from a real Mosquitto.

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use weir_tests::{Background, Broker, external, free_addr, mosquitto_pub, run, workspace_bin};

const INGEST: &str = r#"
[topic_defaults]
partitions = 4
[[mqtt.ingest]]
filter = "sensors/{device}/#"
topic = "telemetry"
key = "{device}"
"#;

/// (device, seq) of every record of `topic`, read with `weir consume`, in log order
/// per partition; the value is weir-sim's JSON reading.
fn stored_readings(broker: &Broker, topic: &str) -> Vec<(String, u64)> {
    broker
        .consume_lines(topic, "\t")
        .iter()
        .map(|l| reading(l))
        .collect()
}

fn reading(line: &str) -> (String, u64) {
    let (key, value) = line.split_once('\t').expect("key<TAB>value");
    let v: serde_json::Value = serde_json::from_str(value).expect("JSON reading");
    assert_eq!(v["device"], key, "key is the device id");
    (key.to_string(), v["seq"].as_u64().expect("seq"))
}

fn acked_log(path: &std::path::Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (d, s) = l.split_once(' ').unwrap();
            (d.to_string(), s.parse().unwrap())
        })
        .collect()
}

fn sim(broker: &Broker, args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_bin("weir-sim"));
    cmd.args(["--broker", &broker.mqtt.to_string(), "--quiet"])
        .args(args);
    cmd
}

#[test]
fn unacknowledged_messages_are_redelivered_to_a_returning_session() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("d"), &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = || {
            let mut o = MqttOptions::new("slow-worker", "127.0.0.1", broker.mqtt.port());
            o.set_clean_session(false);
            o.set_manual_acks(true);
            o
        };
        // 1st connection: subscribe, receive three messages, acknowledge none, vanish.
        let (client, mut events) = AsyncClient::new(options(), 10);
        client.subscribe("work/#", QoS::AtLeastOnce).await.unwrap();
        let received = next_publishes(&mut events, 3, Some(&broker)).await;
        assert!(received.iter().all(|p| !p.dup));
        drop(client);
        drop(events);
        // 2nd connection: the same three come again, marked DUP; acknowledge them.
        let (client, mut events) = AsyncClient::new(options(), 10);
        let again = next_publishes(&mut events, 3, None).await;
        assert_eq!(
            again.iter().map(|p| p.payload.clone()).collect::<Vec<_>>(),
            received
                .iter()
                .map(|p| p.payload.clone())
                .collect::<Vec<_>>()
        );
        assert!(again.iter().all(|p| p.dup), "redelivered with DUP");
        for p in &again {
            client.ack(p).await.unwrap();
        }
        // Let the acknowledgements go out, then leave cleanly.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                let _ = events.poll().await;
            }
        })
        .await;
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
        // 3rd connection: nothing is owed any more.
        let (_client, mut events) = AsyncClient::new(options(), 10);
        let none =
            tokio::time::timeout(Duration::from_secs(2), next_publishes(&mut events, 1, None))
                .await;
        assert!(none.is_err(), "acknowledged messages came again");
    });
}

/// Polls until `n` PUBLISH packets arrived. With `publish_via`, sends three QoS 1
/// messages with mosquitto_pub once the subscription is in place.
async fn next_publishes(
    events: &mut rumqttc::EventLoop,
    n: usize,
    publish_via: Option<&Broker>,
) -> Vec<rumqttc::Publish> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages",
            got.len()
        );
        match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                if let Some(broker) = publish_via {
                    for i in 0..3 {
                        let topic = format!("work/{i}");
                        let msg = format!("job {i}");
                        mosquitto_pub(broker.mqtt.port(), &["-q", "1", "-t", &topic, "-m", &msg]);
                    }
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
            _ => {}
        }
    }
    got
}

#[test]
fn pubacked_messages_survive_sigkill_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_with_config(&dir.path().join("d"), INGEST);
    let acked = dir.path().join("acked.txt");
    let load = Background::spawn(&mut sim(
        &broker,
        &[
            "--devices",
            "50",
            "--rate",
            "0",
            "--inflight",
            "10",
            "--duration",
            "8",
            "--acked-log",
            acked.to_str().unwrap(),
        ],
    ));
    broker.wait_metric("weir_mqtt_ingested_total", 2000.0);
    broker.restart(
        true,
        &["--config", dir.path().join("d.toml").to_str().unwrap()],
    );
    let (status, summary) = load.finish(Duration::from_secs(120));
    assert!(status.success(), "{summary}");
    let acked = acked_log(&acked);
    let stored: HashSet<(String, u64)> =
        stored_readings(&broker, "telemetry").into_iter().collect();
    assert!(
        acked.len() > 2000,
        "load too light to mean anything: {summary}"
    );
    let lost: Vec<_> = acked.iter().filter(|a| !stored.contains(*a)).collect();
    assert!(
        lost.is_empty(),
        "{} PUBACKed messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn thousand_devices_reach_a_kafka_consumer_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), INGEST);
    let acked = dir.path().join("acked.txt");
    let out = run(
        &mut sim(
            &broker,
            &[
                "--devices",
                "1000",
                "--messages",
                "10",
                "--rate",
                "5",
                "--qos",
                "1",
                "--duration",
                "60",
                "--acked-log",
                acked.to_str().unwrap(),
            ],
        ),
        Duration::from_secs(180),
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let acked = acked_log(&acked);
    assert_eq!(acked.len(), 10_000, "{}", out.stdout);
    let consumed = weir_tests::python(
        "kafka_collect.py",
        &[&broker.bootstrap(), "telemetry", "10000"],
    );
    assert!(consumed.status.success(), "{}", consumed.stderr);
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in consumed.stdout.lines() {
        let (device, seq) = reading(line);
        per_device.entry(device).or_default().push(seq);
    }
    assert_eq!(per_device.len(), 1000);
    for (device, seqs) in &per_device {
        assert_eq!(
            seqs,
            &(0..10).collect::<Vec<u64>>(),
            "{device}: once each, in order"
        );
    }
}

#[test]
fn bridge_ingests_from_mosquitto_and_catches_up_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _mosquitto, remote) = bridge_catches_up(dir.path(), "5");
    // MQTT 5 (the bridge's default): every message property crosses the bridge.
    let out = weir_tests::python(
        "mqtt5_properties.py",
        &[&broker.mqtt_port(), "bridge", &remote.to_string()],
    );
    assert!(
        out.status.success() && out.stdout.contains("all checks passed"),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn an_mqtt_3_1_1_bridge_catches_up_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    bridge_catches_up(dir.path(), "3.1.1");
}

/// Bridges `farm/#` from a Mosquitto into the topic `bridged`, with Weir down while two
/// of three messages are published; returns the broker, Mosquitto (still running) and
/// its port.
fn bridge_catches_up(dir: &std::path::Path, version: &str) -> (Broker, Background, u16) {
    let remote = free_addr();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\n",
            remote.port()
        ),
    )
    .unwrap();
    let mosquitto = Background::spawn(external("mosquitto").args(["-c", conf.to_str().unwrap()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(remote).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = format!(
        r#"
[[mqtt.ingest]]
filter = "farm/{{device}}/#"
topic = "bridged"
key = "{{device}}"
[[mqtt.bridge]]
address = "{remote}"
client_id = "weir-edge-1"
filters = ["farm/#"]
qos = 1
version = "{version}"
"#
    );
    let mut broker = Broker::start_with_config(&dir.join("d"), &config);
    broker.wait_log("bridge connected");
    let remote_pub = |topic: &str, msg: &str| {
        mosquitto_pub(remote.port(), &["-q", "1", "-t", topic, "-m", msg]);
    };
    remote_pub("farm/cow1/temp", "38.5");
    broker.wait_metric("weir_mqtt_ingested_total", 1.0);
    broker.terminate();
    // Weir is down: Mosquitto queues these for its persistent session.
    remote_pub("farm/cow2/temp", "39.1");
    remote_pub("farm/cow1/temp", "38.7");
    broker.restart(true, &["--config", dir.join("d.toml").to_str().unwrap()]);
    broker.wait_metric("weir_mqtt_ingested_total", 2.0);
    let mut records = broker.consume_lines("bridged", "=");
    records.sort();
    assert_eq!(records, ["cow1=38.5", "cow1=38.7", "cow2=39.1"]);
    (broker, mosquitto, remote.port())
}
