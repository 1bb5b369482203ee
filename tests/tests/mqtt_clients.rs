//! The MQTT broker with Debian's mosquitto_pub and mosquitto_sub (3.1.1 and 5), and
//! kcat for the Kafka side of ingest and downlink.

use std::time::Duration;

use weir_tests::{
    Background, Broker, Pki, external, free_addr, mosquitto_pub, mosquitto_sub, python, run,
};

const RULES: &str = r#"
[mqtt]
max_keep_alive_secs = 0
[[mqtt.ingest]]
filter = "sensors/{device}/#"
topic = "telemetry"
key = "{device}"
[[mqtt.downlink]]
topic = "commands"
mqtt_topic = "devices/{key}/commands"
qos = 1
"#;

fn publish(broker: &Broker, args: &[&str]) {
    mosquitto_pub(broker.mqtt.port(), args);
}

/// Starts mosquitto_sub with `args` and waits until the broker holds
/// `subscriptions` subscriptions in all.
fn subscribe(broker: &Broker, args: &[&str], subscriptions: f64) -> Background {
    let sub = mosquitto_sub(broker.mqtt.port(), 30, args);
    broker.wait_metric("weir_mqtt_subscriptions", subscriptions);
    sub
}

fn lines(out: &str) -> Vec<&str> {
    out.lines().collect()
}

#[test]
fn qos_levels_wildcards_and_dollar_topics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("d"), &[]);
    let all = subscribe(&broker, &["-t", "#", "-q", "2", "-C", "3"], 1.0);
    let plus = subscribe(&broker, &["-t", "a/+/c", "-q", "1", "-C", "2"], 2.0);
    // `$SYS/` is the broker's own (tests/status.rs); any `$` topic behaves the same.
    let sys = subscribe(&broker, &["-t", "$dev/#", "-C", "1"], 3.0);
    let v5 = subscribe(
        &broker,
        &["-V", "5", "-t", "b/#", "-q", "2", "-C", "1"],
        4.0,
    );
    publish(&broker, &["-t", "$dev/x", "-m", "dollar"]);
    publish(&broker, &["-t", "a/b/c", "-m", "zero", "-q", "0"]);
    publish(&broker, &["-t", "a/x/c", "-m", "one", "-q", "1"]);
    publish(&broker, &["-V", "5", "-t", "b/y", "-m", "two", "-q", "2"]);
    let (status, out) = all.finish(Duration::from_secs(30));
    assert!(status.success());
    // `#` does not match `$dev/x`; order per publisher holds.
    assert_eq!(lines(&out), ["a/b/c zero", "a/x/c one", "b/y two"]);
    let (_, out) = plus.finish(Duration::from_secs(30));
    assert_eq!(lines(&out), ["a/b/c zero", "a/x/c one"]);
    let (_, out) = sys.finish(Duration::from_secs(30));
    assert_eq!(lines(&out), ["$dev/x dollar"]);
    let (_, out) = v5.finish(Duration::from_secs(30));
    assert_eq!(lines(&out), ["b/y two"]);
}

#[test]
fn retained_messages_are_kept_cleared_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&dir.path().join("d"), &[]);
    publish(
        &broker,
        &["-t", "status/a", "-m", "online", "-r", "-q", "1"],
    );
    publish(
        &broker,
        &["-t", "status/b", "-m", "offline", "-r", "-q", "1"],
    );
    publish(&broker, &["-t", "status/b", "-n", "-r", "-q", "1"]); // clears it
    broker.wait_metric("weir_mqtt_retained", 1.0);
    broker.restart(false, &[]);
    let sub = subscribe(&broker, &["-t", "status/#", "-C", "2", "-W", "3"], 1.0);
    let (_, out) = sub.finish(Duration::from_secs(30));
    // Only status/a: the cleared one is gone, and retained messages survived the restart.
    assert_eq!(lines(&out), ["status/a online"]);
}

#[test]
fn persistent_session_queues_while_offline_and_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&dir.path().join("d"), &[]);
    let args = ["-i", "field-app", "-c", "-q", "1", "-t", "jobs/#"];
    // Subscribe with a persistent session (clean session off), then go away.
    let sub = subscribe(&broker, &[&args[..], &["-C", "1"]].concat(), 1.0);
    publish(&broker, &["-t", "jobs/0", "-m", "first", "-q", "1"]);
    let (_, out) = sub.finish(Duration::from_secs(30));
    assert_eq!(lines(&out), ["jobs/0 first"]);
    broker.wait_metric("weir_mqtt_connections", 0.0);
    for i in 1..=3 {
        publish(
            &broker,
            &[
                "-t",
                &format!("jobs/{i}"),
                "-m",
                &format!("m{i}"),
                "-q",
                "1",
            ],
        );
    }
    // QoS 0 is not queued for an offline session.
    publish(&broker, &["-t", "jobs/9", "-m", "lost", "-q", "0"]);
    broker.restart(true, &[]);
    let sub = mosquitto_sub(broker.mqtt.port(), 5, &[&args[..], &["-C", "4"]].concat());
    let (_, out) = sub.finish(Duration::from_secs(30));
    assert_eq!(lines(&out), ["jobs/1 m1", "jobs/2 m2", "jobs/3 m3"]);
}

#[test]
fn will_is_published_when_a_client_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("d"), &[]);
    let watcher = subscribe(&broker, &["-t", "wills/#", "-C", "1"], 1.0);
    let mut doomed = mosquitto_sub(
        broker.mqtt.port(),
        30,
        &[
            "-t",
            "x",
            "--will-topic",
            "wills/dev7",
            "--will-payload",
            "gone",
        ],
    );
    broker.wait_metric("weir_mqtt_subscriptions", 2.0);
    let _ = doomed.child.kill(); // the TCP connection drops without DISCONNECT
    let (_, out) = watcher.finish(Duration::from_secs(30));
    assert_eq!(lines(&out), ["wills/dev7 gone"]);

    // A clean DISCONNECT discards the will.
    let watcher = subscribe(&broker, &["-t", "wills/#", "-C", "1", "-W", "2"], 1.0);
    publish(
        &broker,
        &[
            "-t",
            "x",
            "-m",
            "m",
            "--will-topic",
            "wills/clean",
            "--will-payload",
            "no",
        ],
    );
    let (_, out) = watcher.finish(Duration::from_secs(30));
    assert!(out.is_empty(), "{out}");
}

fn kcat(broker: &Broker, args: &[&str]) -> String {
    let out = run(
        external("kcat")
            .args(["-b", &broker.bootstrap()])
            .args(args),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "kcat {args:?}: {}", out.stderr);
    out.stdout
}

#[test]
fn ingest_rule_appends_keyed_records_with_headers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), RULES);
    publish(
        &broker,
        &["-t", "sensors/dev1/temp", "-m", "21.5", "-q", "1"],
    );
    publish(
        &broker,
        &[
            "-V",
            "5",
            "-t",
            "sensors/dev2/hum",
            "-m",
            "{\"h\":40}",
            "-q",
            "2",
            "-D",
            "publish",
            "user-property",
            "site",
            "north",
            "-D",
            "publish",
            "content-type",
            "application/json",
        ],
    );
    // No rule matches: not stored, still acknowledged (and delivered, see other tests).
    publish(&broker, &["-t", "other/x", "-m", "not stored", "-q", "1"]);
    let out = kcat(
        &broker,
        &["-C", "-t", "telemetry", "-e", "-f", "%k|%s|%h\n"],
    );
    let records: Vec<&str> = out.lines().collect();
    assert_eq!(records.len(), 2, "{out}");
    assert!(records[0].starts_with("dev1|21.5|"), "{}", records[0]);
    assert!(
        records[0].contains("mqtt.topic=sensors/dev1/temp"),
        "{}",
        records[0]
    );
    assert!(records[0].contains("mqtt.client_id="), "{}", records[0]);
    assert!(records[0].contains("mqtt.qos=1"), "{}", records[0]);
    assert!(records[1].starts_with("dev2|{\"h\":40}|"), "{}", records[1]);
    assert!(records[1].contains("site=north"), "{}", records[1]);
    assert!(
        records[1].contains("mqtt.content_type=application/json"),
        "{}",
        records[1]
    );
    assert!(records[1].contains("mqtt.qos=2"), "{}", records[1]);
    assert_eq!(broker.metric("weir_mqtt_ingested_total"), 2.0);
}

#[test]
fn downlink_carries_kafka_records_to_devices() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), RULES);
    let device = subscribe(
        &broker,
        &["-t", "devices/+/commands", "-q", "1", "-C", "2"],
        1.0,
    );
    let ok = weir_tests::run_with_stdin(
        external("kcat").args(["-b", &broker.bootstrap(), "-P", "-t", "commands", "-K", ":"]),
        "dev42:reboot\ndev7:open-valve\n",
    );
    assert!(ok);
    let (_, out) = device.finish(Duration::from_secs(30));
    assert_eq!(
        lines(&out),
        [
            "devices/dev42/commands reboot",
            "devices/dev7/commands open-valve"
        ]
    );
}

/// Runs one phase of `mqtt5_properties.py` and checks it passed.
fn properties_phase(broker: &Broker, args: &[&str]) {
    let port = broker.mqtt_port();
    let out = weir_tests::python("mqtt5_properties.py", &[&[port.as_str()], args].concat());
    assert!(
        out.status.success() && out.stdout.contains("all checks passed"),
        "{args:?}\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn mqtt5_properties_survive_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut broker = Broker::start_with_config(&data, RULES);
    properties_phase(&broker, &["paths"]);
    properties_phase(&broker, &["downlink", &broker.bootstrap()]);
    properties_phase(&broker, &["before-restart"]);
    let config = data.with_extension("toml");
    broker.restart(true, &["--config", config.to_str().unwrap()]);
    properties_phase(&broker, &["after-restart"]);
}

#[test]
fn mqtt_3_1_and_unknown_levels_are_refused_with_a_return_code() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("d"), &[]);
    let out = run(
        external("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.mqtt_port(),
            "-V",
            "31",
            "-t",
            "a",
            "-m",
            "x",
        ]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.to_lowercase().contains("protocol"),
        "{}",
        out.stderr
    );
    // The broker goes on serving.
    publish(&broker, &["-t", "a", "-m", "x"]);
}

#[test]
fn mqtt5_features_with_paho() {
    let dir = tempfile::tempdir().unwrap();
    let broker =
        Broker::start_with_config(&dir.path().join("d"), "[mqtt]\nmax_keep_alive_secs = 30\n");
    let out = weir_tests::python("paho_mqtt5.py", &[&broker.mqtt_port()]);
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("all MQTT 5 checks passed"),
        "{}",
        out.stdout
    );
}

/// MQTT over WebSockets (`ws_listen`, `wss_listen`): paho-mqtt's websockets transport,
/// MQTT 5 and 3.1.1, over ws:// and wss://, exchanging messages with mosquitto_pub and
/// mosquitto_sub over TCP; hand-made frames (a packet split across frames, two packets
/// in one frame, a ping); a text frame or another path ends only that connection.
#[test]
fn websocket_clients_share_the_broker_with_tcp_clients() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (ws, wss) = (free_addr(), free_addr());
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n[mqtt]\nws_listen = \"{ws}\"\nwss_listen = \"{wss}\"\n",
        pki.server_pem, pki.server_key
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    let sub = subscribe(&broker, &["-t", "ws/out", "-C", "4", "-q", "1"], 1.0);
    let ca = pki.ca_pem.to_str().unwrap();
    for tls in [None, Some(ca)] {
        let port = match tls {
            None => ws.port().to_string(),
            Some(_) => wss.port().to_string(),
        };
        let mqtt = broker.mqtt_port();
        let mut args = vec!["paho", port.as_str(), mqtt.as_str()];
        args.extend(tls);
        let out = python("mqtt_websockets.py", &args);
        assert!(
            out.status.success() && out.stdout.contains("OK paho"),
            "{tls:?}: {}{}",
            out.stdout,
            out.stderr
        );
    }
    let (status, out) = sub.finish(Duration::from_secs(30));
    assert!(status.success(), "{out}");
    assert_eq!(
        lines(&out),
        [
            "ws/out from-ws-5",
            "ws/out from-ws-311",
            "ws/out from-wss-5",
            "ws/out from-wss-311"
        ]
    );
    let out = python("mqtt_websockets.py", &["frames", &ws.port().to_string()]);
    assert!(
        out.status.success() && out.stdout.contains("OK frames"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // The TCP side goes on serving.
    publish(&broker, &["-t", "a", "-m", "x"]);
}

/// MQTT.js (npm `mqtt`) in headless Chromium, from a page served for the test, over
/// `ws_listen`: it subscribes and publishes, and exchanges messages with
/// mosquitto_pub and mosquitto_sub over TCP.
#[test]
fn mqtt_js_in_chromium_talks_to_tcp_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ws = free_addr();
    let broker = Broker::start_with_config(
        &dir.path().join("d"),
        &format!("[mqtt]\nws_listen = \"{ws}\"\n"),
    );
    let page_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        page_dir.join("node_modules/mqtt/dist/mqtt.min.js").exists(),
        "MQTT.js is missing: the README's test command installs it (npm ci in tests/browser)"
    );
    let http = free_addr();
    let _server = Background::spawn(
        external("python3")
            .args(["-m", "http.server", &http.port().to_string()])
            .args(["--bind", "127.0.0.1", "--directory"])
            .arg(&page_dir),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(http).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sub = subscribe(&broker, &["-t", "browser/out", "-C", "2", "-q", "1"], 1.0);
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{http}/mqtt.html?ws=ws://{ws}/mqtt");
    let _chromium = Background::spawn(
        external("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url),
    );
    // The page's subscription, beside mosquitto_sub's.
    broker.wait_metric_within("weir_mqtt_subscriptions", 2.0, Duration::from_secs(60));
    publish(
        &broker,
        &["-t", "browser/in", "-m", "hello-from-tcp", "-q", "1"],
    );
    let (status, out) = sub.finish(Duration::from_secs(30));
    assert!(status.success(), "{out}");
    assert_eq!(
        lines(&out),
        ["browser/out ready", "browser/out echo hello-from-tcp"]
    );
}
