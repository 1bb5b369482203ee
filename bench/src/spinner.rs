//! An MQTT ingest plugin that spins to its time limit on every message, and what the
//! rest of the broker feels meanwhile: PUBACK latency of ordinary devices (whose
//! rule has no plugin) and Kafka produce-to-fetch latency, with no spinner and with
//! `--spinners` clients each keeping one spinning call in flight.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::wear::{Latency, percentiles};

pub(crate) struct SpinnerRun<'a> {
    pub(crate) weir: &'a Path,
    pub(crate) sim: &'a Path,
    /// The hostile example plugin: it spins on a message whose payload is `loop`.
    pub(crate) plugin: &'a Path,
    pub(crate) spinners: usize,
    pub(crate) seconds: u64,
    pub(crate) dir: &'a Path,
}

struct Figures {
    spinners: usize,
    puback: Latency,
    puback_max_ms: f64,
    fetch: Latency,
    fetch_max_ms: f64,
    spins_acked: u64,
}

pub(crate) fn spinner(run: &SpinnerRun<'_>) -> anyhow::Result<()> {
    let quiet = one_run(run, 0)?;
    let spinning = one_run(run, run.spinners)?;
    println!("weir: {}", run.weir.display());
    println!(
        "| spinning ingest calls in flight | PUBACK p50 / p99 / max ms | Kafka produce→fetch p50 / p99 / max ms | PUBACKs + records fetched | spinning messages answered |"
    );
    println!("|---|---|---|---|---|");
    for f in [quiet, spinning] {
        println!(
            "| {} | {:.1} / {:.1} / {:.0} | {:.1} / {:.1} / {:.0} | {} + {} | {} |",
            f.spinners,
            f.puback.p50_ms,
            f.puback.p99_ms,
            f.puback_max_ms,
            f.fetch.p50_ms,
            f.fetch.p99_ms,
            f.fetch_max_ms,
            f.puback.acked,
            f.fetch.acked,
            f.spins_acked,
        );
    }
    let _ = std::fs::remove_dir_all(run.dir);
    Ok(())
}

fn one_run(run: &SpinnerRun<'_>, spinners: usize) -> anyhow::Result<Figures> {
    // The plugin's limits are the defaults (a call may take 1 s).
    let weir = crate::start_weir_config(
        run.weir,
        run.dir,
        &format!(
            "[[mqtt.ingest]]\nfilter = \"sensors/{{device}}/#\"\ntopic = \"telemetry\"\nkey = \"{{device}}\"\n\
             [[mqtt.ingest]]\nfilter = \"spin/#\"\ntopic = \"spun\"\nplugin = {plugin:?}\n",
            plugin = run.plugin,
        ),
    )?;
    let (kafka, mqtt) = (weir.kafka, weir.mqtt);
    crate::create_topic_weir(run.weir, &weir.admin.to_string(), "probe", 1)?;

    let duration = Duration::from_secs(run.seconds);
    let spinning: Vec<_> = (0..spinners)
        .map(|i| std::thread::spawn(move || spin(mqtt, i, duration)))
        .collect();
    // The spinners' first calls are under way before the measurement starts.
    std::thread::sleep(Duration::from_millis(if spinners > 0 { 500 } else { 0 }));
    let fetch = std::thread::spawn({
        let bootstrap = kafka.to_string();
        move || fetch_latency(&bootstrap, "probe", duration)
    });
    // 20 devices at 5 messages a second each, QoS 1.
    let out = Command::new(run.sim)
        .args(["--broker", &mqtt.to_string(), "--quiet", "--json"])
        .args(["--qos", "1", "--rate", "5", "--devices", "20"])
        .args(["--duration", &run.seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(out.status.success(), "weir-sim failed");
    let (fetch, fetch_max_ms) = fetch
        .join()
        .map_err(|_| anyhow::anyhow!("the fetch probe panicked"))??;
    let mut spins_acked = 0;
    for s in spinning {
        spins_acked += s
            .join()
            .map_err(|_| anyhow::anyhow!("a spinner panicked"))??;
    }
    drop(weir);

    let sim: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let field = |name: &str| sim[name].as_f64().unwrap_or(0.0);
    Ok(Figures {
        spinners,
        puback: Latency {
            acked: field("acked") as u64,
            p50_ms: field("ack_ms_p50"),
            p99_ms: field("ack_ms_p99"),
        },
        puback_max_ms: field("ack_ms_max"),
        fetch,
        fetch_max_ms,
        spins_acked,
    })
}

/// Publishes `loop` at QoS 1 on `spin/{i}` one at a time for `duration`: the next
/// as soon as the last is acknowledged. Returns how many were.
fn spin(mqtt: SocketAddr, i: usize, duration: Duration) -> anyhow::Result<u64> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(format!("spinner-{i}"), mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(1);
    let (client, mut connection) = Client::new(options, 1);
    let acks = std::thread::spawn(move || {
        let mut acked = 0;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        acked
    });
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        // Blocks while the one message in flight is unacknowledged.
        client.publish(format!("spin/{i}"), QoS::AtLeastOnce, false, "loop")?;
    }
    let _ = client.disconnect();
    acks.join()
        .map_err(|_| anyhow::anyhow!("a spinner's connection panicked"))
}

/// Produces 50 records a second (acks=1) whose values are the time they were sent,
/// and fetches them with a consumer on the same topic: returns the latencies from
/// send to fetch, and the largest.
fn fetch_latency(
    bootstrap: &str,
    topic: &str,
    duration: Duration,
) -> anyhow::Result<(Latency, f64)> {
    let origin = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "spinner-probe")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "1")
        .set("linger.ms", "0")
        .create()?;
    let total = 50 * duration.as_secs();
    let mut latencies_us = Vec::new();
    let mut sent = 0u64;
    let deadline = origin + duration + Duration::from_secs(30);
    while (latencies_us.len() as u64) < total && Instant::now() < deadline {
        let due = origin + Duration::from_millis(20 * sent);
        if sent < total && Instant::now() >= due {
            let now = origin.elapsed().as_nanos().to_be_bytes();
            if producer
                .send(BaseRecord::<(), [u8]>::to(topic).payload(&now[..]))
                .is_ok()
            {
                sent += 1;
            }
        }
        producer.poll(Duration::ZERO);
        if let Some(message) = consumer.poll(Duration::from_millis(5)) {
            let message = message?;
            if let Some(Ok(sent_at)) = message.payload().map(<[u8; 16]>::try_from) {
                let took = origin.elapsed().as_nanos() - u128::from_be_bytes(sent_at);
                latencies_us.push((took / 1000) as u64);
            }
        }
    }
    producer.flush(Duration::from_secs(10))?;
    let max_ms = latencies_us
        .iter()
        .max()
        .map_or(0.0, |&us| us as f64 / 1000.0);
    Ok((percentiles(&mut latencies_us), max_ms))
}
