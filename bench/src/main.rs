//! `kafka-bench`: produce and consume throughput through librdkafka (the `rdkafka`
//! crate), against Weir and against a peer broker (Tansu), started side by side on
//! loopback in the same run.
//!
//!   kafka-bench compare --weir target/release/weir --tansu PATH [--records N]
//!     [--sizes 100,1024 --acks 1,all]   (rates, and each broker's CPU per 1M records)
//!   kafka-bench run --bootstrap HOST:PORT --topic T --records N --size S --acks all
//!   kafka-bench catchup --weir target/release/weir --tansu PATH [--records N]
//!   kafka-bench wear --weir target/release/weir [--devices N --seconds S --intervals 0,50
//!     --checkpoints 0,30000 --policies 'delete;compact' --segment-ms 10000]
//!   kafka-bench spinner --weir target/release/weir --plugin hostile.wasm [--spinners 4]

mod spinner;
mod wear;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One produce-then-consume run against a running broker.
    Run {
        #[arg(long)]
        bootstrap: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 200_000)]
        records: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value = "all")]
        acks: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
    },
    /// Start Weir and Tansu on free loopback ports and run every scenario on both.
    Compare {
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        #[arg(long)]
        tansu: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Record value sizes, one scenario each with each `--acks`.
        #[arg(long, value_delimiter = ',', default_value = "100,1024")]
        sizes: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "1,all")]
        acks: Vec<String>,
        /// Scratch directory for Weir's data.
        #[arg(long, default_value = "weir-kafka-bench")]
        dir: PathBuf,
    },
    /// Replication catch-up: a backlog at the edge replicated to Tansu, against a
    /// plain librdkafka producer writing the same records to the same Tansu.
    Catchup {
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        #[arg(long)]
        tansu: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Scratch directory for the edge's data.
        #[arg(long, default_value = "weir-catchup-bench")]
        dir: PathBuf,
    },
    /// Flash wear: devices at 1 msg/s QoS 1 through an ingest rule and a steady Kafka
    /// producer (acks=all), once per durability window; disk bytes per payload byte.
    Wear {
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        /// weir-sim; default: beside `--weir`.
        #[arg(long)]
        sim: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Records per second the Kafka producer sends (0: none).
        #[arg(long, default_value_t = 1000)]
        kafka_rate: u64,
        /// Kafka record value size, bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// `storage.commit_interval_ms` values, one broker run each.
        #[arg(long, value_delimiter = ',', default_value = "0,50")]
        intervals: Vec<u64>,
        /// `storage.checkpoint_interval_ms` values (0: no journal), one broker run for
        /// each with each commit interval.
        #[arg(long, value_delimiter = ',', default_value = "30000")]
        checkpoints: Vec<u64>,
        /// The ingest topic's `cleanup.policy` values, one broker run each with each of
        /// the above ("delete", "compact", "compact,delete"; separated by `;`).
        #[arg(long, value_delimiter = ';', default_value = "delete")]
        policies: Vec<String>,
        /// The ingest topic's `segment.ms`: a batch this old may be compacted (Weir's
        /// default is an hour, too long for a run).
        #[arg(long, default_value_t = 10_000)]
        segment_ms: u64,
        #[arg(long, default_value = "weir-wear-bench")]
        dir: PathBuf,
    },
    /// An MQTT ingest plugin spinning to its time limit: PUBACK latency of other
    /// devices and Kafka produce-to-fetch latency, without and with spinners.
    Spinner {
        #[arg(long, default_value = "target/release/weir")]
        weir: PathBuf,
        /// weir-sim; default: beside `--weir`.
        #[arg(long)]
        sim: Option<PathBuf>,
        /// The hostile example plugin (plugins/hostile).
        #[arg(
            long,
            default_value = "plugins/target/wasm32-wasip2/release/hostile.wasm"
        )]
        plugin: PathBuf,
        /// Clients each keeping one spinning message in flight.
        #[arg(long, default_value_t = 4)]
        spinners: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value = "weir-spinner-bench")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug)]
struct Rates {
    produce_records: f64,
    produce_mb: f64,
    consume_records: f64,
    consume_mb: f64,
}

fn produce_consume(
    bootstrap: &str,
    topic: &str,
    records: usize,
    size: usize,
    acks: &str,
    partitions: i32,
) -> anyhow::Result<Rates> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", acks)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", "false")
        .create()?;
    let payload = vec![b'x'; size];
    let started = Instant::now();
    send_all(&producer, topic, records, &payload, Some(partitions), false)?;
    producer.flush(Duration::from_secs(120))?;
    let produce_secs = started.elapsed().as_secs_f64();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "kafka-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .create()?;
    // librdkafka asked to start a partition whose leader it does not know yet retries
    // on a 500 ms timer: learning the leaders first keeps that client-side wait (the
    // same against any broker) out of the measurement.
    consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    let started = Instant::now();
    consumer.assign(&assignment)?;
    let deadline = started + Duration::from_secs(300);
    let mut got = 0usize;
    while got < records && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            if m.payload().is_some() {
                got += 1;
            }
        }
    }
    anyhow::ensure!(got == records, "consumed {got} of {records} records");
    let consume_secs = started.elapsed().as_secs_f64();
    let mb = (records * size) as f64 / 1e6;
    Ok(Rates {
        produce_records: records as f64 / produce_secs,
        produce_mb: mb / produce_secs,
        consume_records: records as f64 / consume_secs,
        consume_mb: mb / consume_secs,
    })
}

/// A child process killed on drop.
struct Server(Child);

impl Server {
    /// CPU time (user + system) the process has used so far, from `/proc/PID/stat`.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.0.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name, which may hold spaces: state is
        // field 3, utime 14 and stime 15 (proc(5)).
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            let field = fields
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?;
            Ok(field.parse()?)
        };
        let (utime, stime) = (ticks(14 - 3)?, ticks(15 - 3)?);
        let hz = rustix::param::clock_ticks_per_second() as f64;
        Ok((utime + stime) as f64 / hz)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("nothing listens on {addr}")
}

fn start_weir(bin: &Path, dir: &Path) -> anyhow::Result<(Server, String, String)> {
    let _ = std::fs::remove_dir_all(dir);
    start_weir_with(bin, dir, &[])
}

/// Starts Weir on `dir` as it is, with `extra` arguments.
fn start_weir_with(
    bin: &Path,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<(Server, String, String)> {
    let (kafka, admin) = (weir_tests::free_addr(), weir_tests::free_addr());
    let child = Command::new(bin)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(extra)
        .args([
            "--kafka-listen",
            &kafka.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args(["--mqtt-listen", &weir_tests::free_addr().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Server(child);
    wait_port(&kafka.to_string())?;
    wait_port(&admin.to_string())?;
    Ok((server, kafka.to_string(), admin.to_string()))
}

/// A Weir started on `dir` with a config file: free loopback listeners, then `extra`
/// (TOML) appended. The listeners are up when it returns.
struct ConfiguredWeir {
    server: Server,
    kafka: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    mqtt: std::net::SocketAddr,
}

fn start_weir_config(bin: &Path, dir: &Path, extra: &str) -> anyhow::Result<ConfiguredWeir> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    restart_weir_config(bin, dir, extra)
}

/// [`start_weir_config`] on what an earlier run left in `dir`.
fn restart_weir_config(bin: &Path, dir: &Path, extra: &str) -> anyhow::Result<ConfiguredWeir> {
    let (kafka, admin, mqtt) = (
        weir_tests::free_addr(),
        weir_tests::free_addr(),
        weir_tests::free_addr(),
    );
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\
             [kafka]\nlisten = \"{kafka}\"\n\
             [admin]\nlisten = \"{admin}\"\n\
             [mqtt]\nlisten = \"{mqtt}\"\n{extra}",
            data = dir.join("data"),
        ),
    )?;
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Server(child);
    wait_port(&kafka.to_string())?;
    wait_port(&mqtt.to_string())?;
    wait_port(&admin.to_string())?;
    Ok(ConfiguredWeir {
        server,
        kafka,
        admin,
        mqtt,
    })
}

fn start_tansu(bin: &Path) -> anyhow::Result<(Server, String)> {
    let addr = weir_tests::free_addr().to_string();
    let url = format!("tcp://{addr}");
    let child = Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Server(child);
    wait_port(&addr)?;
    Ok((server, addr))
}

fn create_topic_tansu(
    bin: &Path,
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let broker = format!("tcp://{bootstrap}");
    let args = ["topic", "create", "--broker", &broker, topic];
    create_topic(bin, &args, partitions)
}

fn create_topic_weir(bin: &Path, admin: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic(
        bin,
        &["topic", "--admin", admin, "create", topic],
        partitions,
    )
}

/// Runs a broker's own topic-creation command with `--partitions`.
fn create_topic(bin: &Path, args: &[&str], partitions: i32) -> anyhow::Result<()> {
    let status = Command::new(bin)
        .args(args)
        .args(["--partitions", &partitions.to_string()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "{} {args:?} failed", bin.display());
    Ok(())
}

/// Every scenario (size × acks) on a fresh Weir, then on a fresh Tansu.
struct Scenarios {
    records: usize,
    partitions: i32,
    sizes: Vec<usize>,
    acks: Vec<String>,
}

fn compare(weir: &Path, tansu: &Path, scenarios: &Scenarios, dir: &Path) -> anyhow::Result<()> {
    let Scenarios {
        records,
        partitions,
        ..
    } = *scenarios;
    println!(
        "| scenario | broker | produce records/s | produce MB/s | consume records/s | consume MB/s | broker CPU s per 1M records |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    // Broker CPU is counted from after the topic exists to the last record consumed.
    let per_million = |cpu: f64| cpu * 1e6 / records as f64;
    let runs = scenarios
        .sizes
        .iter()
        .flat_map(|&size| scenarios.acks.iter().map(move |acks| (size, acks.as_str())));
    for (size, acks) in runs {
        let topic = format!("bench-{size}-{acks}");
        let (weir_server, weir_addr, weir_admin) = start_weir(weir, dir)?;
        create_topic_weir(weir, &weir_admin, &topic, partitions)?;
        let before = weir_server.cpu_seconds()?;
        let w = produce_consume(&weir_addr, &topic, records, size, acks, partitions)?;
        let w_cpu = per_million(weir_server.cpu_seconds()? - before);
        drop(weir_server);
        let (tansu_server, tansu_addr) = start_tansu(tansu)?;
        create_topic_tansu(tansu, &tansu_addr, &topic, partitions)?;
        let before = tansu_server.cpu_seconds()?;
        let t = produce_consume(&tansu_addr, &topic, records, size, acks, partitions)?;
        let t_cpu = per_million(tansu_server.cpu_seconds()? - before);
        drop(tansu_server);
        let scenario = format!("{size} B, acks={acks}");
        for (name, r, cpu) in [("weir", w, w_cpu), ("tansu", t, t_cpu)] {
            println!(
                "| {scenario} | {name} | {:.0} | {:.1} | {:.0} | {:.1} | {cpu:.2} |",
                r.produce_records, r.produce_mb, r.consume_records, r.consume_mb
            );
        }
        ratios.push((
            scenario,
            w.produce_records / t.produce_records,
            w.consume_records / t.consume_records,
            w_cpu / t_cpu,
        ));
    }
    println!(
        "\n| scenario | produce weir/tansu | consume weir/tansu | broker CPU weir/tansu |\n|---|---|---|---|"
    );
    for (scenario, p, c, cpu) in ratios {
        println!("| {scenario} | {p:.2} | {c:.2} | {cpu:.2} |");
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Queues `records` records with keys `dev-0000`..`dev-0999` (to `partitions`
/// round robin, or by key), waiting whenever the client's queue is full.
fn send_all(
    producer: &BaseProducer,
    topic: &str,
    records: usize,
    payload: &[u8],
    partitions: Option<i32>,
    provenance: bool,
) -> anyhow::Result<()> {
    let mut sent = 0usize;
    while sent < records {
        let key = format!("dev-{:04}", sent % 1000);
        let mut record = BaseRecord::<String, [u8]>::to(topic)
            .key(&key)
            .payload(payload);
        if let Some(n) = partitions {
            record = record.partition(sent as i32 % n);
        }
        if provenance {
            // What the replicator adds to each record: the baseline sends the same
            // bytes (source partition and offset approximated).
            let offset = (sent / 3).to_string();
            let partition = (sent % 3).to_string();
            record = record.headers(
                OwnedHeaders::new_with_capacity(4)
                    .insert(Header {
                        key: "weir.gateway",
                        value: Some("edge"),
                    })
                    .insert(Header {
                        key: "weir.source.topic",
                        value: Some("telemetry"),
                    })
                    .insert(Header {
                        key: "weir.source.partition",
                        value: Some(&partition),
                    })
                    .insert(Header {
                        key: "weir.source.offset",
                        value: Some(&offset),
                    }),
            );
        }
        match producer.send(record) {
            Ok(()) => sent += 1,
            Err((e, _))
                if matches!(
                    e.rdkafka_error_code(),
                    Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                ) =>
            {
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
    }
    Ok(())
}

/// Produces `records` keyed records of `size` bytes as the replicator does
/// (idempotent, acks=all, lz4, linger 5 ms, 1 MB batches, Java's partitioner);
/// returns the seconds until every one was acknowledged.
fn produce_like_the_replicator(
    bootstrap: &str,
    topic: &str,
    records: usize,
    size: usize,
    provenance: bool,
) -> anyhow::Result<f64> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.size", "1048576")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "65536")
        .create()?;
    let payload = vec![b'x'; size];
    let started = Instant::now();
    send_all(&producer, topic, records, &payload, None, provenance)?;
    producer.flush(Duration::from_secs(600))?;
    Ok(started.elapsed().as_secs_f64())
}

fn catchup(
    weir: &Path,
    tansu: &Path,
    records: usize,
    size: usize,
    partitions: i32,
    dir: &Path,
) -> anyhow::Result<()> {
    let (_tansu_server, tansu_addr) = start_tansu(tansu)?;
    // The peer: a plain librdkafka producer, the same records, the same Tansu.
    create_topic_tansu(tansu, &tansu_addr, "baseline", partitions)?;
    let baseline = produce_like_the_replicator(&tansu_addr, "baseline", records, size, true)?;
    create_topic_tansu(tansu, &tansu_addr, "bare", partitions)?;
    let bare = produce_like_the_replicator(&tansu_addr, "bare", records, size, false)?;
    // A backlog at the edge: stored while no rule replicates it.
    let (edge, kafka, admin) = start_weir(weir, dir)?;
    create_topic_weir(weir, &admin, "telemetry", partitions)?;
    produce_like_the_replicator(&kafka, "telemetry", records, size, false)?;
    // SIGTERM, so that the restart below does not include redb's crash repair.
    let mut edge = edge;
    Command::new("kill")
        .args(["-TERM", &edge.0.id().to_string()])
        .status()?;
    edge.0.wait()?;
    drop(edge);
    let config = dir.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "[replication]\ngateway_id = \"edge\"\n\n[[replication.upstream]]\nname = \"centre\"\nbootstrap_servers = \"{tansu_addr}\"\n\n[[replication.rule]]\nname = \"bench\"\nupstream = \"centre\"\ntopics = [\"telemetry\"]\ntarget = \"{{gateway}}.{{topic}}\"\n"
        ),
    )?;
    // The edge comes back with the rule: the whole backlog goes up.
    let started = Instant::now();
    let (_edge, _, admin) = start_weir_with(
        weir,
        dir,
        &["--config", config.to_str().unwrap_or_default()],
    )?;
    let deadline = started + Duration::from_secs(900);
    let admin: std::net::SocketAddr = admin.parse()?;
    while weir_tests::metric_at(admin, "weir_replication_records_total{rule=\"bench\"}")
        < records as f64
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not go up in 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let replicated = started.elapsed().as_secs_f64();
    let mb = (records * size) as f64 / 1e6;
    println!("| sender | records | seconds | records/s | MB/s (values) |\n|---|---|---|---|---|");
    for (name, secs) in [
        ("librdkafka producer, records without headers", bare),
        (
            "librdkafka producer, the same records (with provenance headers)",
            baseline,
        ),
        ("weir replication catch-up", replicated),
    ] {
        println!(
            "| {name} | {records} | {secs:.2} | {:.0} | {:.1} |",
            records as f64 / secs,
            mb / secs
        );
    }
    println!(
        "\ncatch-up / producer of the same records: {:.2} (/ producer without headers: {:.2})",
        baseline / replicated,
        bare / replicated
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(config);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            bootstrap,
            topic,
            records,
            size,
            acks,
            partitions,
        } => {
            let r = produce_consume(&bootstrap, &topic, records, size, &acks, partitions)?;
            println!("{r:?}");
        }
        Cmd::Compare {
            weir,
            tansu,
            records,
            partitions,
            sizes,
            acks,
            dir,
        } => {
            let scenarios = Scenarios {
                records,
                partitions,
                sizes,
                acks,
            };
            compare(&weir, &tansu, &scenarios, &dir)?
        }
        Cmd::Catchup {
            weir,
            tansu,
            records,
            size,
            partitions,
            dir,
        } => catchup(&weir, &tansu, records, size, partitions, &dir)?,
        Cmd::Wear {
            weir,
            sim,
            devices,
            seconds,
            kafka_rate,
            size,
            intervals,
            checkpoints,
            policies,
            segment_ms,
            dir,
        } => wear::wear(&wear::WearRun {
            sim: &sim.unwrap_or_else(|| wear::sim_beside(&weir)),
            weir: &weir,
            devices,
            seconds,
            kafka_rate,
            size,
            intervals: &intervals,
            checkpoints: &checkpoints,
            policies: &policies,
            segment_ms,
            dir: &dir,
        })?,
        Cmd::Spinner {
            weir,
            sim,
            plugin,
            spinners,
            seconds,
            dir,
        } => spinner::spinner(&spinner::SpinnerRun {
            sim: &sim.unwrap_or_else(|| wear::sim_beside(&weir)),
            weir: &weir,
            plugin: &plugin,
            spinners,
            seconds,
            dir: &dir,
        })?,
    }
    Ok(())
}
