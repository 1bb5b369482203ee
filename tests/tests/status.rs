//! The operator's view against a broker with traffic: `/v1/status`, `weir status`, and
//! the `$SYS` topics as `mosquitto_sub` receives them.

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

    // A client's connection shows in the count while it is connected.
    let sub = mosquitto_sub(port, 60, &["-t", "$SYS/#", "-C", "70"]);
    let s = wait_status(&broker, "the subscriber", |s| s["mqtt"]["connections"] == 1);
    assert_eq!(s["mqtt"]["subscriptions"], 1);

    let out = broker.cli(&["status"]);
    assert!(out.status.success(), "{}", out.stderr);
    for expected in [
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
