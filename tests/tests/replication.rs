//! Replication to a central cluster: Tansu (a third-party Kafka-compatible broker)
//! and a second Weir as the centre; a flapping link, an outage with a SIGKILL of the
//! edge, retention outrunning the uplink, and commands coming down to devices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use weir_tests::{
    Background, Broker, Proxy, Tansu, admin_get, dump_records, free_addr, mosquitto_sub,
    run_with_stdin, weir_bin, workspace_bin,
};

const GATEWAY: &str = "gw-test";

fn edge_config(upstream: &str, extra: &str) -> String {
    edge_config_with(upstream, "", extra)
}

fn edge_config_with(upstream: &str, topic_defaults: &str, extra: &str) -> String {
    format!(
        r#"
[topic_defaults]
partitions = 3
{topic_defaults}

[replication]
gateway_id = "{GATEWAY}"

[[replication.upstream]]
name = "centre"
bootstrap_servers = "{upstream}"

[[replication.rule]]
name = "up"
upstream = "centre"
topics = ["telemetry"]
target = "{{gateway}}.{{topic}}"
linger_ms = 20
batch_bytes = 65536
{extra}"#
    )
}

fn produce(broker: &Broker, topic: &str, lines: &str) {
    assert!(run_with_stdin(
        Command::new(weir_bin()).args(["produce", "-b", &broker.bootstrap(), topic, "-K", ":"]),
        lines
    ));
}

fn replicated(edge: &Broker) -> f64 {
    edge.metric("weir_replication_records_total{rule=\"up\"}")
}

/// Waits (bounded) until the edge's rule has `records` acknowledged by the centre.
fn wait_replicated(edge: &Broker, records: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while replicated(edge) < records as f64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {records} replicated; status: {}\nits last warnings:\n{}",
            replicated(edge),
            edge.cli(&["replication", "status"]).stdout,
            edge.log()
                .iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
                .rev()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (bounded) until the edge's rule says it caught up.
fn wait_caught_up(edge: &Broker) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = edge.cli(&["replication", "status", "--json"]).stdout;
        if status.contains("\"caught_up\"") {
            return;
        }
        assert!(Instant::now() < deadline, "never caught up: {status}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn headers(h: &str) -> HashMap<&str, &str> {
    h.split(',').filter_map(|kv| kv.split_once('=')).collect()
}

/// Checks the centre's copy of the edge's `telemetry`: every record once by its
/// provenance, the same key and value as stored at the edge, in the edge's order per
/// source partition, in the partition the key puts it in.
fn assert_exact_copy(edge: &Broker, centre_bootstrap: &str) -> usize {
    assert_exact_copy_over(edge, centre_bootstrap, None, None)
}

/// `assert_exact_copy`, reading the centre over TLS when given the CA, and with a
/// SASL login when given one.
fn assert_exact_copy_over(
    edge: &Broker,
    centre_bootstrap: &str,
    ca: Option<&std::path::Path>,
    sasl: Option<(&str, &str, &str)>,
) -> usize {
    let topic = format!("{GATEWAY}.telemetry");
    let centre = weir_tests::dump_records_over(centre_bootstrap, &topic, ca, sasl);
    let local = dump_records(&edge.bootstrap(), "telemetry");
    // The edge's records by (partition, offset): kcat prints them in offset order.
    let mut by_offset: HashMap<(u32, u64), (&str, &str)> = HashMap::new();
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    for (p, k, v, _) in &local {
        let o = next.entry(*p).or_default();
        by_offset.insert((*p, *o), (k, v));
        *o += 1;
    }
    let mut seen = HashSet::new();
    let mut last: HashMap<u32, u64> = HashMap::new();
    for (p, k, v, h) in &centre {
        let h = headers(h);
        assert_eq!(h.get("weir.gateway"), Some(&GATEWAY), "{h:?}");
        assert_eq!(h.get("weir.source.topic"), Some(&"telemetry"), "{h:?}");
        let sp: u32 = h["weir.source.partition"].parse().unwrap();
        let so: u64 = h["weir.source.offset"].parse().unwrap();
        assert!(seen.insert((sp, so)), "{sp}/{so} arrived twice");
        assert_eq!(
            by_offset.get(&(sp, so)),
            Some(&(k.as_str(), v.as_str())),
            "{sp}/{so}"
        );
        assert_eq!(*p, sp, "the key puts it in the same partition upstream");
        if let Some(prev) = last.insert(sp, so) {
            assert!(so > prev, "{sp}: {so} after {prev}");
        }
    }
    if seen.len() != local.len() {
        let mut missing: Vec<(u32, u64)> = by_offset
            .keys()
            .filter(|k| !seen.contains(*k))
            .copied()
            .collect();
        missing.sort();
        panic!(
            "{} of {} stored records are not upstream, e.g. {:?}",
            missing.len(),
            local.len(),
            &missing[..missing.len().min(20)]
        );
    }
    seen.len()
}

/// Replicates 30,000 records to the centre behind `proxy` while the proxy drops
/// every connection 25 times; the centre must hold an exact copy.
fn replicate_over_a_flapping_link(
    proxy: &Proxy,
    centre_bootstrap: &str,
    dir: &std::path::Path,
    cuts: usize,
) {
    let edge =
        Broker::start_with_config(&dir.join("edge"), &edge_config(&proxy.addr.to_string(), ""));
    let total = 30_000;
    let lines: String = (0..total)
        .map(|i| format!("dev-{:03}:{i}\n", i % 100))
        .collect();
    let producing = {
        let bootstrap = edge.bootstrap();
        std::thread::spawn(move || {
            for chunk in lines.lines().collect::<Vec<_>>().chunks(3000) {
                let mut text = chunk.join("\n");
                text.push('\n');
                assert!(run_with_stdin(
                    Command::new(weir_bin()).args([
                        "produce",
                        "-b",
                        &bootstrap,
                        "telemetry",
                        "-K",
                        ":"
                    ]),
                    &text
                ));
            }
        })
    };
    // The link drops every connection, mid-batch, many times while records flow.
    for _ in 0..cuts {
        std::thread::sleep(Duration::from_millis(150));
        proxy.cut();
    }
    producing.join().unwrap();
    wait_replicated(&edge, total);
    let copied = assert_exact_copy(&edge, centre_bootstrap);
    assert_eq!(copied, total);
    if cuts > 0 {
        assert!(edge.metric("weir_replication_upstream_errors_total{rule=\"up\"}") > 0.0);
    }
    let status = edge.cli(&["replication", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status[0]["state"], "caught_up", "{status}");
    if cuts > 0 {
        // The errors of the flapping link are shown as past: when the last happened,
        // that it is over, and since when they are counted.
        let r = &status[0];
        let last = r["last_error_ms"]
            .as_i64()
            .expect("when the last error happened");
        assert!(r["last_error"].is_string(), "{r}");
        assert_eq!(r["last_error_over"], true, "{r}");
        assert!(r["errors_since_ms"].as_i64().unwrap() <= last, "{r}");
        let text = edge.cli(&["replication", "status"]).stdout;
        assert!(
            text.contains("since start") && text.contains(", over)"),
            "{text}"
        );
    }
}

/// The link goes down for 1 s and comes back for 2 s, ten times, while records flow:
/// the edge replicates again within each up window (librdkafka's reconnect backoff is
/// capped at 1 s, and a session that delivered starts its backoff again), and says
/// how long it took.
#[test]
fn the_edge_reconnects_to_weir_soon_after_the_link_returns() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(free_addr());
    let config = format!("[kafka]\nadvertised = \"{}\"\n", proxy.addr);
    let centre = Broker::start_with_config(&dir.path().join("centre"), &config);
    proxy.set_target(centre.kafka);
    reconnects_soon_after_the_link_returns(&proxy, dir.path());
}

#[test]
fn the_edge_reconnects_to_tansu_soon_after_the_link_returns() {
    let dir = tempfile::tempdir().unwrap();
    let tansu_addr = free_addr();
    let proxy = Proxy::start(tansu_addr);
    let _tansu = Tansu::start(tansu_addr, proxy.addr);
    reconnects_soon_after_the_link_returns(&proxy, dir.path());
}

fn reconnects_soon_after_the_link_returns(proxy: &Proxy, dir: &std::path::Path) {
    let ingest = r#"
[[mqtt.ingest]]
filter = "sensors/{device}/#"
topic = "telemetry"
key = "{device}"
"#;
    let edge = Broker::start_with_config(
        &dir.join("edge"),
        &edge_config(&proxy.addr.to_string(), ingest),
    );
    let sim = Background::spawn(Command::new(workspace_bin("weir-sim")).args([
        "--broker",
        &edge.mqtt.to_string(),
        "--quiet",
        "--devices",
        "5",
        "--rate",
        "20",
        "--duration",
        "60",
    ]));
    wait_replicated(&edge, 100);
    // Unix ms of the rule's last acknowledged record.
    let last_success = || -> i64 {
        let response = admin_get(edge.admin, "/v1/replication").unwrap_or_default();
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str::<serde_json::Value>(body).unwrap_or_default()[0]["last_success_ms"]
            .as_i64()
            .unwrap_or(0)
    };
    let now_ms = || weir::storage::now_ms();
    let mut delays = Vec::new();
    for _ in 0..10 {
        proxy.set_open(false);
        std::thread::sleep(Duration::from_secs(1));
        let back = now_ms();
        proxy.set_open(true);
        // Replicating again: a record acknowledged after the link's return.
        let mut delay = None;
        while now_ms() < back + 2000 {
            if last_success() >= back {
                delay = Some(Duration::from_millis((now_ms() - back) as u64));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis((back + 2000 - now_ms()).max(0) as u64));
        delays.push(delay);
    }
    drop(sim);
    let seen: Vec<String> = delays
        .iter()
        .map(|d| d.map_or("none".into(), |d| format!("{} ms", d.as_millis())))
        .collect();
    println!("reconnected after: {seen:?}");
    // Before the backoff cap it was 4 windows of 10, 0.2-3.9 s after the return. A busy
    // machine may delay a connection past one window; never most of them.
    let within = delays.iter().filter(|d| d.is_some()).count();
    assert!(
        within >= 8,
        "reconnected in only {within} of 10 up windows: {seen:?}"
    );
    wait_caught_up(&edge);
}

#[test]
fn replicates_to_weir_exactly_once_over_a_flapping_link() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(free_addr());
    let config = format!("[kafka]\nadvertised = \"{}\"\n", proxy.addr);
    let centre = Broker::start_with_config(&dir.path().join("centre"), &config);
    proxy.set_target(centre.kafka);
    replicate_over_a_flapping_link(&proxy, &centre.kafka.to_string(), dir.path(), 25);
}

#[test]
fn replicates_to_tansu_exactly_once_over_a_flapping_link() {
    let dir = tempfile::tempdir().unwrap();
    let tansu_addr = free_addr();
    let proxy = Proxy::start(tansu_addr);
    let tansu = Tansu::start(tansu_addr, proxy.addr);
    replicate_over_a_flapping_link(&proxy, &tansu.addr.to_string(), dir.path(), 25);
}

/// The centre of an outage test, and how it goes away and comes back.
enum Centre {
    /// A second Weir, stopped (SIGTERM) and started again on the same data.
    Weir(Broker),
    /// Tansu (memory storage, so it stays up) behind a proxy that refuses
    /// connections: the uplink is down.
    Tansu(Tansu, Proxy),
}

impl Centre {
    fn for_edge(&self) -> String {
        match self {
            Centre::Weir(b) => b.kafka.to_string(),
            Centre::Tansu(_, proxy) => proxy.addr.to_string(),
        }
    }

    fn for_reading(&self) -> String {
        match self {
            Centre::Weir(b) => b.bootstrap(),
            Centre::Tansu(t, _) => t.addr.to_string(),
        }
    }

    fn go_away(&mut self) {
        match self {
            Centre::Weir(b) => assert!(b.terminate().success()),
            Centre::Tansu(_, proxy) => proxy.set_open(false),
        }
    }

    fn come_back(&mut self) {
        match self {
            Centre::Weir(b) => b.relaunch(&[]),
            Centre::Tansu(_, proxy) => proxy.set_open(true),
        }
    }
}

#[test]
fn an_outage_of_weir_and_a_sigkill_of_the_edge_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let centre = Broker::start(&dir.path().join("centre"), &[]);
    outage(Centre::Weir(centre), dir.path());
}

#[test]
fn an_outage_of_tansu_and_a_sigkill_of_the_edge_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tansu_addr = free_addr();
    let proxy = Proxy::start(tansu_addr);
    let tansu = Tansu::start(tansu_addr, proxy.addr);
    outage(Centre::Tansu(tansu, proxy), dir.path());
}

/// Simulated devices publish over MQTT to the edge; the centre goes away; devices
/// keep publishing; the edge is SIGKILLed and restarted during the outage; the centre
/// comes back. Every PUBACKed message must then be upstream, once.
fn outage(mut centre: Centre, dir: &std::path::Path) {
    let ingest = r#"
[[mqtt.ingest]]
filter = "sensors/{device}/#"
topic = "telemetry"
key = "{device}"
"#;
    let config = edge_config(&centre.for_edge(), ingest);
    let mut edge = Broker::start_with_config(&dir.join("edge"), &config);
    let config_path = dir.join("edge.toml");
    let sim = |acked: &std::path::Path, duration: &str| {
        let mut cmd = Command::new(workspace_bin("weir-sim"));
        cmd.args([
            "--broker",
            &edge.mqtt.to_string(),
            "--quiet",
            "--devices",
            "20",
        ])
        .args(["--rate", "40", "--duration", duration, "--persistent"])
        .args(["--acked-log", acked.to_str().unwrap()]);
        cmd
    };
    let before = dir.join("acked-before.txt");
    let (status, summary) =
        Background::spawn(&mut sim(&before, "2")).finish(Duration::from_secs(60));
    assert!(status.success(), "{summary}");
    wait_replicated(&edge, 500);
    // The centre goes away; devices keep publishing; the edge is killed and comes
    // back during the outage.
    centre.go_away();
    let during = dir.join("acked-during.txt");
    let load = Background::spawn(&mut sim(&during, "6"));
    std::thread::sleep(Duration::from_secs(3));
    edge.restart(true, &["--config", config_path.to_str().unwrap()]);
    let (status, summary) = load.finish(Duration::from_secs(120));
    assert!(status.success(), "{summary}");
    // The backlog waits at the edge.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&edge.cli(&["replication", "status", "--json"]).stdout).unwrap();
        let lag: u64 = status[0]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["lag_records"].as_u64().unwrap())
            .sum();
        if lag > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no backlog during the outage: {status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    centre.come_back();
    wait_replicated(&edge, 1);
    // Everything the edge stored, hence everything PUBACKed, reaches the centre once.
    wait_caught_up(&edge);
    let copied = assert_exact_copy(&edge, &centre.for_reading());
    let acked: Vec<String> = [before, during]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    let upstream: HashSet<(String, u64)> =
        dump_records(&centre.for_reading(), &format!("{GATEWAY}.telemetry"))
            .into_iter()
            .map(|(_, _, v, _)| {
                let v: serde_json::Value = serde_json::from_str(&v).unwrap();
                (
                    v["device"].as_str().unwrap().to_string(),
                    v["seq"].as_u64().unwrap(),
                )
            })
            .collect();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|a| {
            let (d, s) = a.split_once(' ').unwrap();
            !upstream.contains(&(d.to_string(), s.parse().unwrap()))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages missing upstream: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        acked.len() > 1000,
        "too few messages to mean anything: {}",
        acked.len()
    );
    assert!(copied >= acked.len());
}

/// The edge writes no cursor while the centre takes every record, then dies
/// (SIGKILL): everything it sent lies past its durable cursors, as the last records
/// before any crash do. Restarted, it must find them at the centre (reading it back)
/// and send none of them again, then go on with new records.
#[test]
fn records_the_centre_took_before_a_crash_are_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let tansu_addr = free_addr();
    let tansu = Tansu::start(tansu_addr, tansu_addr);
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, edge_config(&tansu.addr.to_string(), "")).unwrap();
    let config = config.to_str().unwrap();
    let mut edge = Broker::start(
        &dir.path().join("edge"),
        &["--config", config, "--unsafe-hold-replication-cursors"],
    );
    let lines = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| format!("dev{}:reading {i}\n", i % 40))
            .collect()
    };
    produce(&edge, "telemetry", &lines(0, 3000));
    wait_replicated(&edge, 3000);
    edge.restart(true, &["--config", config]);
    produce(&edge, "telemetry", &lines(3000, 4000));
    wait_replicated(&edge, 1000);
    wait_caught_up(&edge);
    assert_eq!(assert_exact_copy(&edge, &tansu.addr.to_string()), 4000);
    assert_eq!(
        edge.metric("weir_replication_already_upstream_total{rule=\"up\"}"),
        3000.0
    );
    assert_eq!(replicated(&edge), 1000.0, "only the new records were sent");
}

#[test]
fn retention_outrunning_the_uplink_is_a_counted_and_logged_loss() {
    let dir = tempfile::tempdir().unwrap();
    let centre = Broker::start(&dir.path().join("centre"), &[]);
    let proxy = Proxy::start(centre.kafka);
    proxy.set_open(false);
    // The centre is unreachable and the edge keeps about 20 kB per partition.
    let config = edge_config_with(
        &proxy.addr.to_string(),
        "retention_bytes = 20000",
        "[storage]\nretention_check_interval_ms = 100\n",
    );
    let edge = Broker::start_with_config(&dir.path().join("edge"), &config);
    let total = 3000;
    for chunk in (0..total).collect::<Vec<_>>().chunks(100) {
        let lines: String = chunk
            .iter()
            .map(|i| format!("dev-{:03}:reading {i:0>90}\n", i % 30))
            .collect();
        produce(&edge, "telemetry", &lines);
    }
    edge.wait_log("offsets lost");
    let lost = edge.metric("weir_replication_lost_records_total{rule=\"up\"}");
    assert!(lost > 0.0);
    let line = edge
        .log()
        .into_iter()
        .find(|l| l.contains("offsets lost"))
        .unwrap();
    assert!(line.contains("from=0") && line.contains("to="), "{line}");
    // The link comes back: what retention kept goes up, and lost + sent is everything.
    proxy.set_open(true);
    let kept = dump_records(&edge.bootstrap(), "telemetry").len();
    wait_replicated(&edge, kept);
    let lost = edge.metric("weir_replication_lost_records_total{rule=\"up\"}");
    let upstream = dump_records(&centre.bootstrap(), &format!("{GATEWAY}.telemetry")).len();
    assert_eq!(
        lost as usize + upstream,
        total,
        "lost {lost}, upstream {upstream}"
    );
}

#[test]
fn commands_come_down_from_the_centre_to_devices() {
    let dir = tempfile::tempdir().unwrap();
    let centre = Broker::start(&dir.path().join("centre"), &[]);
    produce(&centre, "commands", "dev-1:reboot\n");
    let config = format!(
        r#"
[replication]
gateway_id = "{GATEWAY}"

[[replication.upstream]]
name = "centre"
bootstrap_servers = "{}"

[[replication.rule]]
name = "down"
upstream = "centre"
direction = "down"
topics = ["commands"]
target = "{{topic}}"

[[mqtt.downlink]]
topic = "commands"
mqtt_topic = "devices/{{key}}/commands"
"#,
        centre.kafka
    );
    let mut edge = Broker::start_with_config(&dir.path().join("edge"), &config);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dump_records(&edge.bootstrap(), "commands").is_empty() {
        assert!(Instant::now() < deadline, "reboot never came down");
        std::thread::sleep(Duration::from_millis(200));
    }
    // `reboot` came down before anyone subscribed (it is in the local topic, checked
    // below); `update firmware` is sent while a device listens.
    let sub = mosquitto_sub(
        edge.mqtt.port(),
        30,
        &["-t", "devices/+/commands", "-v", "-C", "1", "-q", "1"],
    );
    std::thread::sleep(Duration::from_millis(500));
    produce(&centre, "commands", "dev-2:update firmware\n");
    let (status, out) = sub.finish(Duration::from_secs(60));
    assert!(status.success(), "{out}");
    assert_eq!(out.trim(), "devices/dev-2/commands update firmware");
    // Exactly once into the local topic, across a restart of the edge.
    edge.restart(
        true,
        &["--config", dir.path().join("edge.toml").to_str().unwrap()],
    );
    produce(&centre, "commands", "dev-3:ping\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let local = dump_records(&edge.bootstrap(), "commands");
        if local.len() >= 3 {
            let values: Vec<&str> = local.iter().map(|r| r.2.as_str()).collect();
            assert_eq!(values, ["reboot", "update firmware", "ping"]);
            break;
        }
        assert!(Instant::now() < deadline, "{local:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The centre goes away: the downlink counts the errors and says it is cut off
    // (disconnected, or backing off between attempts to reconnect).
    let mut centre = centre;
    centre.kill();
    edge.wait_metric_within(
        "weir_replication_upstream_errors_total{rule=\"down\"}",
        1.0,
        Duration::from_secs(60),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = edge.cli(&["replication", "status", "--json"]).stdout;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let rule = &status.as_array().unwrap()[0];
        let cut_off = ["disconnected", "backing_off", "connecting"]
            .contains(&rule["state"].as_str().unwrap_or(""));
        if cut_off && rule["upstream_errors"].as_u64() > Some(0) && rule["last_error"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "{rule}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn with_a_backlog_the_higher_priority_rule_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(free_addr());
    let config = format!("[kafka]\nadvertised = \"{}\"\n", proxy.addr);
    let centre = Broker::start_with_config(&dir.path().join("centre"), &config);
    proxy.set_target(centre.kafka);
    proxy.set_open(false);
    let rules = r#"
[[replication.rule]]
name = "alarms"
upstream = "centre"
topics = ["alarms"]
priority = 10
"#;
    let mut edge = Broker::start_with_config(
        &dir.path().join("edge"),
        &edge_config(&proxy.addr.to_string(), rules),
    );
    // Backlogs build while the link is closed.
    let backlog = 20_000;
    let lines: String = (0..backlog)
        .map(|i| format!("dev-{:03}:{i}\n", i % 100))
        .collect();
    produce(&edge, "telemetry", &lines);
    produce(&edge, "alarms", &lines);
    // Both rules start together on their backlogs (a restart), and the link opens.
    edge.restart(
        false,
        &["--config", dir.path().join("edge.toml").to_str().unwrap()],
    );
    proxy.set_open(true);
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut alarms, mut bulk) = (0.0, 0.0);
    while bulk == 0.0 {
        assert!(
            Instant::now() < deadline,
            "bulk never started: alarms {alarms}"
        );
        alarms = edge.metric("weir_replication_records_total{rule=\"alarms\"}");
        bulk = replicated(&edge);
        std::thread::sleep(Duration::from_millis(20));
    }
    // (Sampled after bulk: alarms can only have grown since bulk's first send.)
    let alarms_after = edge.metric("weir_replication_records_total{rule=\"alarms\"}");
    assert!(
        alarms_after >= (backlog - 1000 - 5000) as f64,
        "bulk started with alarms at {alarms} / {alarms_after} of {backlog}: {}\n{}",
        edge.cli(&["replication", "status"]).stdout,
        edge.log().join("\n")
    );
    wait_replicated(&edge, backlog);
}

#[test]
fn replicates_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = weir_tests::TlsProxy::start(dir.path());
    let config = format!("[kafka]\nadvertised = \"{}\"\n", tls.addr);
    let centre = Broker::start_with_config(&dir.path().join("centre"), &config);
    tls.set_target(centre.kafka);
    let upstream_tls = format!(
        "security_protocol = \"ssl\"\nssl_ca_location = \"{}\"\n",
        tls.ca_pem.display()
    );
    let config = edge_config(&tls.addr.to_string(), "").replace(
        "[[replication.rule]]",
        &format!("{upstream_tls}\n[[replication.rule]]"),
    );
    let edge = Broker::start_with_config(&dir.path().join("edge"), &config);
    let lines: String = (0..1000)
        .map(|i| format!("dev-{:03}:{i}\n", i % 10))
        .collect();
    produce(&edge, "telemetry", &lines);
    wait_replicated(&edge, 1000);
    assert_eq!(
        assert_exact_copy_over(&edge, &tls.addr.to_string(), Some(&tls.ca_pem), None),
        1000
    );
}

/// A centre that lets no one in without a login: the edge replicates over SASL_SSL
/// with SCRAM-SHA-512 (TLS ends at a proxy in front of the centre, which has no TLS
/// listener yet), and the centre's copy is exact.
#[test]
fn replicates_to_a_centre_requiring_sasl_ssl_with_scram_sha_512() {
    let dir = tempfile::tempdir().unwrap();
    let tls = weir_tests::TlsProxy::start(dir.path());
    let config = format!(
        "[kafka]\nadvertised = \"{}\"\n[auth]\nanonymous = \"none\"\n",
        tls.addr
    );
    let centre = Broker::start_with_config(&dir.path().join("centre"), &config);
    tls.set_target(centre.kafka);
    let admin = centre.admin.to_string();
    assert!(run_with_stdin(
        Command::new(weir_bin()).args(["user", "--admin", &admin, "add", "gw-test"]),
        "edge-secret\n"
    ));
    let login = format!(
        "security_protocol = \"sasl_ssl\"\nssl_ca_location = \"{}\"\n\
         sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"gw-test\"\n\
         sasl_password = \"edge-secret\"\n",
        tls.ca_pem.display()
    );
    let config = edge_config(&tls.addr.to_string(), "").replace(
        "[[replication.rule]]",
        &format!("{login}\n[[replication.rule]]"),
    );
    let edge = Broker::start_with_config(&dir.path().join("edge"), &config);
    let lines: String = (0..1000)
        .map(|i| format!("dev-{:03}:{i}\n", i % 10))
        .collect();
    produce(&edge, "telemetry", &lines);
    wait_replicated(&edge, 1000);
    let sasl = Some(("SCRAM-SHA-512", "gw-test", "edge-secret"));
    assert_eq!(
        assert_exact_copy_over(&edge, &tls.addr.to_string(), Some(&tls.ca_pem), sasl),
        1000
    );
    assert!(centre.metric("weir_auth_logins_total") >= 1.0);
    assert_eq!(centre.metric("weir_auth_anonymous_refused_total"), 0.0);
}
