//! The operator's view against a broker with traffic: `/v1/status`, `weir status`, and
//! the `$SYS` topics as `mosquitto_sub` receives them.

use std::process::Command;
use std::time::{Duration, Instant};

use weir_tests::*;

/// `/v1/status` as JSON.
fn status(broker: &Broker) -> serde_json::Value {
    let response = admin_get(broker.admin, "/v1/status").expect("admin API reachable");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("JSON")
}

/// Waits (bounded) until `check` holds for `/v1/status`; returns that status.
fn wait_status(
    broker: &Broker,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(broker);
        if check(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never showed in /v1/status: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn status_json_weir_status_and_sys_topics_show_live_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(
        dir.path(),
        r#"
[[mqtt.ingest]]
filter = "sensors/{device}/#"
topic = "telemetry"
key = "{device}"
"#,
    );
    let port = broker.mqtt.port();
    for i in 0..20 {
        mosquitto_pub(
            port,
            &[
                "-q",
                "1",
                "-t",
                &format!("sensors/d{}/t", i % 4),
                "-m",
                &format!("{{\"n\":{i}}}"),
            ],
        );
    }
    broker.wait_metric("weir_mqtt_received_total", 20.0);
    // A consumer group that read 20 records of 20: lag 0.
    let out = run_weir(&[
        "consume",
        "-b",
        &broker.bootstrap(),
        "telemetry",
        "-g",
        "dash",
        "-e",
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    // A frame no Kafka client sends: a warning in the broker's log.
    {
        use std::io::Write;
        let mut garbage = std::net::TcpStream::connect(broker.kafka).unwrap();
        garbage.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 0]).unwrap();
    }
    broker.wait_metric("weir_kafka_bad_frames_total", 1.0);

    // The history samples every 5 s: wait for the one that saw the publishes.
    let s = wait_status(&broker, "the publishes' rate", |s| {
        s["history"].as_array().is_some_and(|h| {
            h.iter()
                .any(|x| x["messages_in"].as_f64().unwrap_or(0.0) > 0.0)
        })
    });
    assert_eq!(s["health"], "ok", "{s:#}");
    assert!(s["uptime_s"].as_u64().is_some());
    let topics = s["topics"].as_array().unwrap();
    let telemetry = topics
        .iter()
        .find(|t| t["name"] == "telemetry")
        .expect("telemetry listed");
    assert_eq!(telemetry["records"], 20, "{telemetry}");
    assert!(telemetry["bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["mqtt"]["received"], 20);
    // The broker's own `$SYS` messages are not counted as retained.
    assert_eq!(s["mqtt"]["retained"], 0);
    let listeners: Vec<&str> = s["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(listeners, ["admin", "kafka", "mqtt"]);
    let mqtt_addr = &s["listeners"][2]["address"];
    assert_eq!(mqtt_addr.as_str().unwrap(), broker.mqtt.to_string());
    assert!(s["storage"]["database_bytes"].as_u64().unwrap() > 0);
    assert!(s["storage"]["free_bytes"].as_u64().unwrap() > 0);
    let group = &s["groups"][0];
    assert_eq!(group["group"], "dash", "{s:#}");
    assert_eq!(group["lag"], 0, "{group}");
    assert_eq!(group["partitions"][0]["committed"], 20, "{group}");
    let warning = s["recent_log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("frame size out of range")
        })
        .unwrap_or_else(|| panic!("no warning in {:#}", s["recent_log"]));
    assert_eq!(warning["level"], "WARN");

    // A client's connection shows in the count while it is connected.
    let sub = mosquitto_sub(port, 60, &["-t", "$SYS/#", "-C", "70"]);
    // Its CONNECT and its SUBSCRIBE are two packets: wait for both.
    wait_status(&broker, "the subscriber", |s| {
        s["mqtt"]["connections"] == 1 && s["mqtt"]["subscriptions"] == 1
    });

    let out = broker.cli(&["status"]);
    assert!(out.status.success(), "{}", out.stderr);
    for expected in [
        "frame size out of range",
        "dash",
        "health ok",
        "telemetry",
        "1 clients connected",
        "20 received",
        "listeners:",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected:?} missing from:\n{}",
            out.stdout
        );
    }

    // $SYS: the retained snapshot on subscribing, then the next interval's, which
    // counts the 20 publishes and the subscriber.
    let (status, lines) = sub.finish(Duration::from_secs(60));
    assert!(status.success(), "mosquitto_sub: {lines}");
    let last = |topic: &str| -> String {
        lines
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("{topic} ")))
            .unwrap_or_else(|| panic!("no {topic} in:\n{lines}"))
            .to_string()
    };
    assert!(last("$SYS/broker/version").starts_with("weir version "));
    assert!(last("$SYS/broker/uptime").ends_with(" seconds"));
    assert_eq!(last("$SYS/broker/clients/connected"), "1");
    assert_eq!(last("$SYS/broker/messages/received"), "20");
    assert!(last("$SYS/broker/bytes/received").parse::<u64>().unwrap() > 20 * 8);
    assert_eq!(last("$SYS/broker/subscriptions/count"), "1");
    let load: f64 = last("$SYS/broker/load/messages/received/1min")
        .parse()
        .unwrap();
    assert!(load >= 0.0, "{load}");
    last("$SYS/broker/retained messages/count");

    // A client cannot publish there.
    mosquitto_pub(
        port,
        &["-q", "1", "-t", "$SYS/broker/version", "-m", "forged"],
    );
    let sub = mosquitto_sub(port, 10, &["-t", "$SYS/broker/version", "-C", "1"]);
    let (_, line) = sub.finish(Duration::from_secs(30));
    assert!(line.contains("weir version"), "{line}");
}

/// `chromium --headless` with its own profile directory, bounded.
fn chromium(profile: &std::path::Path, args: &[&str], url: &str) -> CliOutput {
    run(
        external("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            // Console messages (and uncaught errors) go to stderr as `:CONSOLE` lines.
            .args(["--enable-logging=stderr", "--v=0"])
            // Virtual time runs the page's first fetch and render (not its 5 s refresh,
            // which would age the "ago" figures) before the dump.
            .arg("--virtual-time-budget=4000")
            .args(args)
            .arg(url),
        Duration::from_secs(120),
    )
}

/// The text of the element carrying `data-name="name"` inside the table row (or list)
/// that `row` names, from a dumped DOM.
fn cell<'a>(dom: &'a str, row: &str, name: &str) -> &'a str {
    let start = dom
        .find(&format!("data-name=\"{row}\""))
        .unwrap_or_else(|| panic!("no {row:?} in the page:\n{dom}"));
    let rest = &dom[start..];
    let rest = &rest[..rest.find("</tr>").unwrap_or(rest.len())];
    let at = rest
        .find(&format!("data-name=\"{name}\">"))
        .unwrap_or_else(|| panic!("no {name:?} in {row:?}'s row: {rest}"));
    let text = &rest[at + name.len() + 13..];
    &text[..text.find('<').unwrap()]
}

#[test]
fn the_status_page_renders_live_traffic_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let centre = Broker::start(&dir.path().join("centre"), &[]);
    let config = format!(
        r#"
[[mqtt.ingest]]
filter = "sensors/{{device}}/#"
topic = "readings"
key = "{{device}}"

[[plugins.pipeline]]
name = "clean"
plugin = "{plugin}"
inputs = ["readings"]
outputs = {{ kept = "readings-clean", alarms = "alarms" }}
params = {{ field = "temperature", min = "0", alarm_above = "40" }}

[replication]
gateway_id = "gw1"

[[replication.upstream]]
name = "centre"
bootstrap_servers = "{centre}"

[[replication.rule]]
name = "up"
upstream = "centre"
topics = ["readings"]
target = "{{gateway}}.{{topic}}"
linger_ms = 20
"#,
        plugin = plugin_wasm("json_filter").display(),
        centre = centre.kafka,
    );
    let edge = Broker::start_with_config(&dir.path().join("edge"), &config);
    // 20 devices at 2 readings/s for the whole test.
    let sim = Background::spawn(Command::new(workspace_bin("weir-sim")).args([
        "--broker",
        &edge.mqtt.to_string(),
        "--quiet",
        "--devices",
        "20",
        "--rate",
        "2",
        "--duration",
        "90",
    ]));
    let s = wait_status(&edge, "devices, pipeline output and replication", |s| {
        s["mqtt"]["connections"] == 20
            && s["pipelines"][0]["records_out"].as_u64().unwrap_or(0) > 0
            && s["replication"][0]["last_success_ms"].is_number()
            // Two samples of traffic: a line on the charts.
            && s["history"].as_array().is_some_and(|h| {
                h.iter()
                    .filter(|x| x["messages_in"].as_f64().unwrap_or(0.0) > 0.0)
                    .count()
                    >= 2
            })
    });
    assert_eq!(s["health"], "ok", "{s:#}");

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", edge.admin);
    let page = chromium(profile.path(), &["--dump-dom"], &url);
    assert!(page.status.success(), "chromium: {}", page.stderr);
    let dom = &page.stdout;
    let console: Vec<&str> = page
        .stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .collect();
    assert!(console.is_empty(), "the page logged: {console:#?}");
    assert!(
        dom.contains("id=\"fetch-error\" class=\"error\" hidden"),
        "{dom}"
    );
    assert!(dom.contains(">ok</span>"), "health: {dom}");
    assert!(
        dom.contains("data-name=\"connections\">20<"),
        "client count: {dom}"
    );
    let records: u64 = cell(dom, "readings", "records").parse().unwrap();
    assert!(records > 0, "{records}");
    let out: u64 = cell(dom, "clean", "records_out").parse().unwrap();
    assert!(out > 0, "{out}");
    assert!(
        dom.contains("class=\"state-running\">running<"),
        "pipeline state: {dom}"
    );
    let lag = cell(dom, "up", "lag");
    assert!(lag.contains(" records"), "{lag}");
    let records: u64 = lag.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(records > 0, lag.contains(" behind"), "{lag}");
    assert!(dom.contains("uplot"), "no chart drawn: {dom}");

    // Screenshots, kept as artefacts: a desktop, and a phone held up at the cabinet.
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (file, size) in [
        ("status-page.png", "1280,1700"),
        ("status-page-phone.png", "375,2400"),
    ] {
        let path = artefacts.join(file);
        let _ = std::fs::remove_file(&path);
        let shot = chromium(
            profile.path(),
            &[
                &format!("--window-size={size}"),
                &format!("--screenshot={}", path.display()),
            ],
            &url,
        );
        assert!(shot.status.success(), "chromium: {}", shot.stderr);
        let png = std::fs::read(&path).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{}",
            path.display()
        );
    }
    // At 375 px the page fits the width (the page marks whether it is wider than the
    // window): only the tables scroll sideways, inside their cards.
    let narrow = chromium(
        profile.path(),
        &["--window-size=375,2400", "--dump-dom"],
        &url,
    );
    assert!(narrow.status.success());
    assert!(narrow.stdout.contains("data-name=\"readings\""));
    assert!(
        narrow.stdout.contains("data-overflow=\"false\""),
        "{}",
        narrow.stdout
    );

    grafana_queries_only_exported_metrics(&edge);

    // `weir status` against the same broker.
    let out = edge.cli(&["status"]);
    assert!(out.status.success(), "{}", out.stderr);
    for expected in [
        "health ok",
        "20 clients connected",
        "readings",
        "clean",
        "running",
        "up",
        "replication:",
        "pipelines:",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected:?} missing from:\n{}",
            out.stdout
        );
    }
    drop(sim);
}

/// Every metric the Grafana dashboard queries is one the broker exports: its family has
/// a `# TYPE` line in `/metrics` (a family whose labels have no value yet, such as lost
/// records, still declares itself there).
fn grafana_queries_only_exported_metrics(broker: &Broker) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/weir-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v.as_str()) {
                        ("expr", Some(e)) => out.push(e.to_string()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "{queries:?}");
    let metrics = admin_get(broker.admin, "/metrics").unwrap();
    let mut checked = 0;
    for query in &queries {
        let mut rest = query.as_str();
        while let Some(at) = rest.find("weir_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                metrics.contains(&format!("# TYPE {family} ")),
                "the dashboard queries {name}, which /metrics does not export (in {query})"
            );
            checked += 1;
        }
    }
    assert!(checked >= queries.len());
}
