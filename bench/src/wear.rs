//! Flash wear at an everyday load: devices publishing QoS 1 through an ingest rule
//! and a Kafka producer at a steady rate with acks=all, against Weir with each
//! durability window asked for, one after the other in the same run. Disk bytes are
//! the broker process's `write_bytes` (`/proc/PID/io`): with an fsync per commit,
//! every one of them reaches the device. With `--policies 'delete;compact'` the ingest
//! topic is also run compacted (the "last value per device" topic), to show what the
//! compactor's passes add to the writes and what they save in what is stored.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};

/// Endurance assumed for the card life estimate: a 32 GB consumer SD card rated
/// for about 1,000 program/erase cycles of its capacity, i.e. 32 TB written.
const SD_CARD_ENDURANCE_BYTES: f64 = 32e12;

pub(crate) struct WearRun<'a> {
    pub(crate) weir: &'a Path,
    pub(crate) sim: &'a Path,
    pub(crate) devices: usize,
    pub(crate) seconds: u64,
    pub(crate) kafka_rate: u64,
    pub(crate) size: usize,
    pub(crate) intervals: &'a [u64],
    pub(crate) checkpoints: &'a [u64],
    /// The ingest topic's `cleanup.policy` values, one broker run each.
    pub(crate) policies: &'a [String],
    /// The ingest topic's `segment.ms`: how soon a batch may be compacted.
    pub(crate) segment_ms: u64,
    pub(crate) dir: &'a Path,
}

/// One broker run's figures.
struct Figures {
    interval_ms: u64,
    checkpoint_ms: u64,
    policy: String,
    /// The ingest topic's stored bytes at the end (the admin API's partition sizes).
    stored_bytes: u64,
    compactions: f64,
    compacted_away: f64,
    payload_bytes: f64,
    disk_bytes: f64,
    commits: f64,
    seconds: f64,
    mqtt: Latency,
    kafka: Latency,
    /// QoS 0 messages no rule stores, publisher to subscriber.
    probe: Latency,
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Latency {
    pub(crate) acked: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

pub(crate) fn wear(run: &WearRun<'_>) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for policy in run.policies {
        for &checkpoint in run.checkpoints {
            for &interval in run.intervals {
                all.push(one_run(run, interval, checkpoint, policy)?);
            }
        }
    }
    println!(
        "| cleanup.policy | commit_interval_ms | checkpoint_interval_ms | disk bytes / payload byte | disk MB/s | commits/s | PUBACK p50 / p99 ms | produce ack p50 / p99 ms | QoS 0 pub→sub p50 / p99 ms | messages + records acked | ingest topic stored KB | compactions (records removed) | SD card life (32 TB written) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        let per_second = f.disk_bytes / f.seconds;
        let years = SD_CARD_ENDURANCE_BYTES / per_second / (365.0 * 86_400.0);
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {} + {} | {:.0} | {} ({}) | {} |",
            f.policy,
            f.interval_ms,
            f.checkpoint_ms,
            f.disk_bytes / f.payload_bytes,
            per_second / 1e6,
            f.commits / f.seconds,
            f.mqtt.p50_ms,
            f.mqtt.p99_ms,
            f.kafka.p50_ms,
            f.kafka.p99_ms,
            f.probe.p50_ms,
            f.probe.p99_ms,
            f.mqtt.acked,
            f.kafka.acked,
            f.stored_bytes as f64 / 1e3,
            f.compactions,
            f.compacted_away,
            if years >= 2.0 {
                format!("{years:.0} years")
            } else {
                format!("{:.0} days", years * 365.0)
            }
        );
    }
    let _ = std::fs::remove_dir_all(run.dir);
    Ok(())
}

fn one_run(
    run: &WearRun<'_>,
    interval_ms: u64,
    checkpoint_ms: u64,
    policy: &str,
) -> anyhow::Result<Figures> {
    // The ingest topic takes the defaults (one partition), as a new user's would, but
    // for its cleanup policy: it is created first, by a broker without the rule (which
    // would create it with the defaults).
    let setup = crate::start_weir_config(run.weir, run.dir, "")?;
    let configs = [
        format!("cleanup.policy={policy}"),
        format!("segment.ms={}", run.segment_ms),
    ];
    let admin = setup.admin.to_string();
    let mut create = vec!["topic", "--admin", &admin, "create", "telemetry"];
    for config in &configs {
        create.extend(["--config", config]);
    }
    crate::create_topic(run.weir, &create, 1)?;
    drop(setup);
    let weir = crate::restart_weir_config(
        run.weir,
        run.dir,
        &format!(
            "[storage]\ncommit_interval_ms = {interval_ms}\ncheckpoint_interval_ms = {checkpoint_ms}\n\
             [[mqtt.ingest]]\nfilter = \"sensors/{{device}}/#\"\ntopic = \"telemetry\"\nkey = \"{{device}}\"\n"
        ),
    )?;
    let (kafka, admin, mqtt) = (weir.kafka, weir.admin, weir.mqtt);
    let pid = weir.server.0.id();
    crate::create_topic_weir(run.weir, &admin.to_string(), "apps", 4)?;

    let disk_before = write_bytes(pid)?;
    let commits_before = weir_tests::metric_at(admin, "weir_storage_commits_total");
    let started = Instant::now();
    let sim = Command::new(run.sim)
        .args([
            "--broker",
            &mqtt.to_string(),
            "--quiet",
            "--json",
            "--qos",
            "1",
        ])
        .args(["--rate", "1", "--devices", &run.devices.to_string()])
        .args(["--duration", &run.seconds.to_string(), "--prefix", "wear-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let probe = std::thread::spawn({
        let seconds = run.seconds;
        move || probe_latency(mqtt, Duration::from_secs(seconds))
    });
    let kafka_latency = paced_producer(
        &kafka.to_string(),
        "apps",
        run.kafka_rate,
        run.size,
        Duration::from_secs(run.seconds),
    )?;
    let out = sim.wait_with_output()?;
    let probe = probe
        .join()
        .map_err(|_| anyhow::anyhow!("the probe panicked"))??;
    anyhow::ensure!(out.status.success(), "weir-sim failed");
    let seconds = started.elapsed().as_secs_f64();
    let disk_bytes = (write_bytes(pid)? - disk_before) as f64;
    let commits = weir_tests::metric_at(admin, "weir_storage_commits_total") - commits_before;
    let compactions = weir_tests::metric_at(admin, "weir_storage_compactions_total");
    let compacted_away =
        weir_tests::metric_at(admin, "weir_storage_compaction_removed_records_total");
    let stored_bytes = stored_bytes(admin, "telemetry")?;
    drop(weir);

    let sim: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let field = |name: &str| sim[name].as_f64().unwrap_or(0.0);
    let mqtt_latency = Latency {
        acked: field("acked") as u64,
        p50_ms: field("ack_ms_p50"),
        p99_ms: field("ack_ms_p99"),
    };
    Ok(Figures {
        interval_ms,
        checkpoint_ms,
        policy: policy.to_string(),
        stored_bytes,
        compactions,
        compacted_away,
        payload_bytes: field("payload_bytes") + (kafka_latency.acked as usize * run.size) as f64,
        disk_bytes,
        commits,
        seconds,
        mqtt: mqtt_latency,
        kafka: kafka_latency,
        probe,
    })
}

/// The bytes a topic's partitions hold, from the admin API's description of it.
fn stored_bytes(admin: std::net::SocketAddr, topic: &str) -> anyhow::Result<u64> {
    let response = weir_tests::admin_get(admin, &format!("/v1/topics/{topic}"))
        .ok_or_else(|| anyhow::anyhow!("the admin API did not answer"))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let description: serde_json::Value = serde_json::from_str(body)?;
    let partitions = description["partitions"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no partitions in {body}"))?;
    Ok(partitions.iter().filter_map(|p| p["bytes"].as_u64()).sum())
}

/// Bytes the process caused to be written to storage (`/proc/PID/io`).
fn write_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no write_bytes in /proc/{pid}/io"))
}

/// Records each delivery's latency from the moment it was handed to the client.
struct Timing {
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

impl ClientContext for Timing {}

impl ProducerContext for Timing {
    type DeliveryOpaque = Box<Instant>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Self::DeliveryOpaque) {
        if result.as_ref().is_ok_and(|m| m.offset() >= 0)
            && let Ok(mut l) = self.latencies_us.lock()
        {
            l.push(sent.elapsed().as_micros() as u64);
        }
    }
}

/// Produces `rate` records a second of `size` bytes with acks=all for `duration`
/// (a local app writing steadily); returns the acknowledgement latencies.
fn paced_producer(
    bootstrap: &str,
    topic: &str,
    rate: u64,
    size: usize,
    duration: Duration,
) -> anyhow::Result<Latency> {
    if rate == 0 {
        return Ok(Latency::default());
    }
    let producer: ThreadedProducer<Timing> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .create_with_context(Timing {
            latencies_us: std::sync::Mutex::new(Vec::new()),
        })?;
    let payload = vec![b'x'; size];
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let total = rate * duration.as_secs();
    for i in 0..total {
        let at = started + every * i as u32;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let key = format!("app-{}", i % 16);
        let record = BaseRecord::with_opaque_to(topic, Box::new(Instant::now()))
            .key(&key)
            .payload(&payload[..]);
        if let Err((e, _)) = producer.send(record) {
            anyhow::bail!("produce: {e}");
        }
    }
    producer.flush(Duration::from_secs(30))?;
    let mut latencies = std::mem::take(
        &mut *producer
            .context()
            .latencies_us
            .lock()
            .map_err(|_| anyhow::anyhow!("a delivery callback panicked"))?,
    );
    Ok(percentiles(&mut latencies))
}

/// Publishes 100 QoS 0 messages a second on a topic no rule stores and measures how
/// long each takes to reach a subscriber on the same broker.
fn probe_latency(mqtt: std::net::SocketAddr, duration: Duration) -> anyhow::Result<Latency> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let connect = |id: &str| {
        let mut options = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
        options.set_keep_alive(Duration::from_secs(30));
        Client::new(options, 100)
    };
    let origin = Instant::now();
    let (subscriber, mut incoming) = connect("wear-probe-sub");
    subscriber.subscribe("probe/latency", QoS::AtMostOnce)?;
    let receiver = std::thread::spawn(move || {
        let mut latencies_us = Vec::new();
        let mut subscribed = false;
        // Ends when the subscriber disconnects, after the last message.
        for event in incoming.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => subscribed = true,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(sent) = <[u8; 16]>::try_from(&p.payload[..]) else {
                        continue;
                    };
                    let took = origin.elapsed().as_nanos() - u128::from_be_bytes(sent);
                    latencies_us.push((took / 1000) as u64);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (subscribed, latencies_us)
    });
    let (publisher, mut outgoing) = connect("wear-probe-pub");
    let driver = std::thread::spawn(move || for _ in outgoing.iter().take_while(Result::is_ok) {});
    // Let the subscription settle before the first message.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    for i in 0..100 * duration.as_secs() {
        let at = started + Duration::from_millis(10 * i);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = origin.elapsed().as_nanos().to_be_bytes().to_vec();
        publisher.publish("probe/latency", QoS::AtMostOnce, false, now)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = subscriber.disconnect();
    let (subscribed, mut latencies) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the probe's subscriber panicked"))?;
    anyhow::ensure!(subscribed, "the probe never subscribed");
    let _ = publisher.disconnect();
    let _ = driver.join();
    Ok(percentiles(&mut latencies))
}

pub(crate) fn percentiles(latencies_us: &mut [u64]) -> Latency {
    latencies_us.sort_unstable();
    let at = |q: f64| {
        latencies_us
            .get(
                ((latencies_us.len() as f64 * q) as usize)
                    .min(latencies_us.len().saturating_sub(1)),
            )
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    Latency {
        acked: latencies_us.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// The default path of the `weir-sim` binary beside `weir`.
pub(crate) fn sim_beside(weir: &Path) -> PathBuf {
    weir.with_file_name("weir-sim")
}
