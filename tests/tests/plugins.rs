//! WebAssembly pipelines in a real broker: the json-filter example's outputs, hostile
//! plugins contained, and exactly-once outputs across a SIGKILL.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use weir_tests::{Broker, plugin_wasm, run, run_with_stdin, weir_bin};

fn clean_pipeline() -> String {
    format!(
        r#"
[[plugins.pipeline]]
name = "clean"
plugin = "{}"
inputs = ["readings"]
outputs = {{ kept = "readings-clean", alarms = "alarms" }}
batch_size = 100
params = {{ field = "temperature", min = "0", alarm_above = "40", "rename.temperature" = "temp_f", to_fahrenheit = "true", "enrich.site" = "north" }}
"#,
        plugin_wasm("json_filter").display()
    )
}

fn produce(broker: &Broker, topic: &str, lines: &str) {
    assert!(run_with_stdin(
        Command::new(weir_bin()).args(["produce", "-b", &broker.bootstrap(), topic, "-K", ":"]),
        lines
    ));
}

fn consume(broker: &Broker, topic: &str) -> Vec<String> {
    broker.consume_lines(topic, ":")
}

/// `devices` simulated devices each publish `messages` sensor frames at QoS 1.
fn send_frames(broker: &Broker, devices: u32, messages: u32) {
    let sim = run(
        Command::new(weir_tests::workspace_bin("weir-sim")).args([
            "--broker",
            &broker.mqtt.to_string(),
            "--quiet",
            "--devices",
            &devices.to_string(),
            "--messages",
            &messages.to_string(),
            "--rate",
            "50",
            "--payload",
            "frame",
            "--qos",
            "1",
        ]),
        Duration::from_secs(60),
    );
    assert!(sim.status.success(), "{}{}", sim.stdout, sim.stderr);
}

fn metric(pipeline: &str, name: &str) -> String {
    format!("weir_pipeline_{name}{{pipeline=\"{pipeline}\"}}")
}

/// On a board with a small address space (`ulimit -v` 1 GiB): wasmtime's default
/// reservation of 4 GiB per linear memory would fail every instance.
#[test]
fn plugins_run_in_one_gib_of_address_space() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_limited(&dir.path().join("d"), &clean_pipeline(), 1 << 20);
    produce(
        &broker,
        "readings",
        "s1:{\"temperature\": 20}\ns2:{\"temperature\": 50}\n",
    );
    broker.wait_metric(&metric("clean", "records_in_total"), 2.0);
    assert_eq!(consume(&broker, "readings-clean").len(), 1);
    assert_eq!(consume(&broker, "alarms").len(), 1);
}

#[test]
fn json_filter_keeps_converts_enriches_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), &clean_pipeline());
    produce(
        &broker,
        "readings",
        "a:{\"temperature\":20,\"x\":1}\nb:{\"temperature\":-5}\nc:{\"temperature\":45}\nd:not json\ne:{\"humidity\":3}\n",
    );
    broker.wait_metric(&metric("clean", "records_in_total"), 5.0);
    broker.wait_metric(&metric("clean", "failed_total"), 2.0);
    assert_eq!(
        consume(&broker, "readings-clean"),
        ["a:{\"site\":\"north\",\"temp_f\":68.0,\"x\":1}"]
    );
    assert_eq!(
        consume(&broker, "alarms"),
        ["c:{\"site\":\"north\",\"temp_f\":113.0}"]
    );
    assert_eq!(
        consume(&broker, "clean-dlq"),
        ["d:not json", "e:{\"humidity\":3}"]
    );
    assert_eq!(broker.metric(&metric("clean", "dropped_total")), 1.0);
}

/// A pipeline reads its input as a read_committed consumer: an aborted transaction's
/// record is not processed, committed ones are.
#[test]
fn a_pipeline_skips_aborted_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), &clean_pipeline());
    let out = weir_tests::python(
        "confluent_transactions.py",
        &["pipeline-input", &broker.bootstrap(), "readings"],
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    broker.wait_metric(&metric("clean", "records_in_total"), 2.0);
    assert_eq!(
        consume(&broker, "readings-clean"),
        [
            "c1:{\"site\":\"north\",\"temp_f\":68.0}",
            "c2:{\"site\":\"north\",\"temp_f\":77.0}"
        ]
    );
    assert_eq!(broker.metric(&metric("clean", "records_in_total")), 2.0);
}

#[test]
fn hostile_plugins_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{}
[[plugins.pipeline]]
name = "hostile"
plugin = "{}"
inputs = ["hostile-in"]
outputs = {{ out = "hostile-out" }}
memory_mb = 64
call_timeout_ms = 300
"#,
        clean_pipeline(),
        plugin_wasm("hostile").display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    produce(
        &broker,
        "hostile-in",
        "a\nloop\nb\ngrow\nc\ntrap\nd\nhuge\ne\nnowhere\nf\n",
    );
    // The other pipeline keeps running meanwhile.
    produce(&broker, "readings", "k:{\"temperature\":21}\n");
    broker.wait_metric(&metric("hostile", "failed_total"), 5.0);
    broker.wait_metric(&metric("hostile", "records_out_total"), 6.0);
    broker.wait_metric(&metric("clean", "records_out_total"), 1.0);
    let out: Vec<String> = consume(&broker, "hostile-out");
    assert_eq!(out, [":a", ":b", ":c", ":d", ":e", ":f"]);
    let dlq = run(
        weir_tests::external("kcat").args([
            "-b",
            &broker.bootstrap(),
            "-C",
            "-t",
            "hostile-dlq",
            "-e",
            "-f",
            "%s|%h\n",
        ]),
        Duration::from_secs(60),
    );
    let lines: Vec<&str> = dlq.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", dlq.stdout);
    let reason = |value: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{value}|")))
            .unwrap_or_else(|| panic!("{value} not in the dead-letter topic: {lines:?}"))
            .to_string()
    };
    assert!(
        reason("loop").contains("longer than its limit of 300 ms"),
        "{}",
        reason("loop")
    );
    assert!(
        reason("grow").contains("memory limit of 64 MiB"),
        "{}",
        reason("grow")
    );
    assert!(
        reason("trap").contains("trap: wasm `unreachable`"),
        "{}",
        reason("trap")
    );
    assert!(
        reason("nowhere").contains("does not have"),
        "{}",
        reason("nowhere")
    );
    let huge = reason("huge");
    assert!(huge.contains("exceed") || huge.contains("limit"), "{huge}");
    for value in ["loop", "grow", "trap", "huge", "nowhere"] {
        assert!(
            reason(value).contains("weir.source=hostile-in/0/"),
            "{}",
            reason(value)
        );
    }
    assert!(broker.metric(&metric("hostile", "traps_total")) >= 4.0);
    assert_eq!(consume(&broker, "readings-clean").len(), 1);
}

#[test]
fn outputs_hold_each_result_exactly_once_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("d.toml");
    let mut broker = Broker::start_with_config(&dir.path().join("d"), &clean_pipeline());
    let total = 20_000;
    let input: String = (0..total)
        .map(|i| format!("k{i}:{{\"temperature\":{}}}\n", i % 50))
        .collect();
    produce(&broker, "readings", &input);
    broker.wait_metric(&metric("clean", "records_in_total"), 2_000.0);
    broker.restart(true, &["--config", config_path.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (kept, alarms) = loop {
        let kept = consume(&broker, "readings-clean");
        let alarms = consume(&broker, "alarms");
        if kept.len() + alarms.len() >= total || std::time::Instant::now() > deadline {
            break (kept, alarms);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let keys: Vec<&str> = kept
        .iter()
        .chain(&alarms)
        .map(|l| l.split(':').next().unwrap())
        .collect();
    let distinct: HashSet<&&str> = keys.iter().collect();
    assert_eq!(
        keys.len(),
        total,
        "every input's result, once (no duplicates after the kill)"
    );
    assert_eq!(distinct.len(), total);
    assert_eq!(
        alarms.len(),
        total / 50 * 9,
        "temperatures 41..=49 are alarms"
    );
    // The kill came mid-run: the restarted broker had work left.
    assert!(broker.metric(&metric("clean", "records_in_total")) > 0.0);
}

#[test]
fn plugin_test_runs_a_component_on_sample_records_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("records.jsonl");
    std::fs::write(
        &input,
        "{\"key\":\"a\",\"value\":\"{\\\"temperature\\\":50}\"}\n{\"value\":\"oops\"}\n{\"value\":\"{\\\"temperature\\\":-1}\"}\n",
    )
    .unwrap();
    let wasm = plugin_wasm("json_filter");
    let out = weir_tests::run_weir(&[
        "plugin",
        "test",
        wasm.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "-p",
        "field=temperature",
        "-p",
        "min=0",
        "-p",
        "alarm_above=40",
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["target"], "alarms");
    assert_eq!(lines[0]["key"], "a");
    assert_eq!(lines[0]["value"], "{\"temperature\":50}");
    assert_eq!(lines[1]["input"], 1);
    assert!(lines[1]["error"].as_str().unwrap().starts_with("not JSON"));
    assert_eq!(lines[2], serde_json::json!({"input": 2, "dropped": true}));
    // A param the plugin refuses is an error, with the plugin's message.
    let out = weir_tests::run_weir(&[
        "plugin",
        "test",
        wasm.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("param `field` is required"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_python_plugin_runs_in_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[plugins.pipeline]]
name = "redact"
plugin = "{}"
inputs = ["people"]
outputs = {{ out = "people-clean" }}
memory_mb = 64
params = {{ fields = "name,email" }}
"#,
        plugin_wasm("python_redact").display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    produce(
        &broker,
        "people",
        "p1:{\"name\":\"Ann\",\"email\":\"a@x\",\"t\":21.5}\np2:[1,2]\np3:{\"t\":3}\n",
    );
    // The first call waits for the component to compile: tens of seconds for an
    // interpreter under a debug build on a busy machine.
    broker.wait_metric_within(
        &metric("redact", "records_in_total"),
        3.0,
        Duration::from_secs(180),
    );
    broker.wait_metric(&metric("redact", "records_out_total"), 2.0);
    assert_eq!(
        consume(&broker, "people-clean"),
        ["p1:{\"t\":21.5}", "p3:{\"t\":3}"]
    );
    assert_eq!(consume(&broker, "redact-dlq"), ["p2:[1,2]"]);
}

#[test]
fn a_javascript_plugin_runs_in_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[plugins.pipeline]]
name = "route"
plugin = "{}"
inputs = ["events"]
outputs = {{ alarms = "alarms", events = "events-clean" }}
params = {{ threshold = "3" }}
"#,
        plugin_wasm("js_route").display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    produce(
        &broker,
        "events",
        "e1:{\"severity\":5,\"msg\":\"fire\"}\ne2:{\"severity\":1}\ne3:nope\n",
    );
    // The first call waits for the component to compile: tens of seconds for an
    // interpreter under a debug build on a busy machine.
    broker.wait_metric_within(
        &metric("route", "records_in_total"),
        3.0,
        Duration::from_secs(180),
    );
    broker.wait_metric(&metric("route", "failed_total"), 1.0);
    assert_eq!(
        consume(&broker, "alarms"),
        ["e1:{\"severity\":5,\"msg\":\"fire\",\"source\":\"events/0/0\"}"]
    );
    assert_eq!(
        consume(&broker, "events-clean"),
        ["e2:{\"severity\":1,\"source\":\"events/0/1\"}"]
    );
    assert_eq!(consume(&broker, "route-dlq"), ["e3:nope"]);
}

/// The C example, made a component by `weir plugin componentize` (plugins/c-scale/
/// build.sh): as built, and the variant that writes to stderr (so it imports WASI
/// preview1, which componentize adapts) and carries no WIT (which it embeds).
#[test]
fn a_c_plugin_runs_in_a_pipeline() {
    for name in ["c_scale", "c_scale_wasi"] {
        c_plugin_in_a_pipeline(name);
    }
}

fn c_plugin_in_a_pipeline(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[plugins.pipeline]]
name = "scale"
plugin = "{}"
inputs = ["adc"]
outputs = {{ scaled = "adc-scaled" }}
params = {{ scale = "0.1", offset = "-5", unit = "C" }}
"#,
        plugin_wasm(name).display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    // Raw int16 little-endian readings: 1000, -1000, then a 3-byte value.
    let file = dir.path().join("raw");
    for (key, value) in [
        ("s1", &[0xe8u8, 0x03][..]),
        ("s2", &[0x18, 0xfc]),
        ("s3", b"abc"),
    ] {
        std::fs::write(&file, value).unwrap();
        let out = run(
            weir_tests::external("kcat").args([
                "-b",
                &broker.bootstrap(),
                "-P",
                "-t",
                "adc",
                "-k",
                key,
                file.to_str().unwrap(),
            ]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{}", out.stderr);
    }
    broker.wait_metric(&metric("scale", "records_in_total"), 3.0);
    assert_eq!(
        consume(&broker, "adc-scaled"),
        [
            "s1:{\"raw\":1000,\"value\":95,\"unit\":\"C\"}",
            "s2:{\"raw\":-1000,\"value\":-105,\"unit\":\"C\"}"
        ]
    );
    assert_eq!(consume(&broker, "scale-dlq"), ["s3:abc"], "{name}");
}

/// The Zig example (plugins/zig-upper), built with PyPI's ziglang and made a
/// component by `weir plugin componentize` with the WASI adapter its panic handler
/// needs, in a pipeline: upper-cased, and the bad records in the dead letters.
#[test]
fn a_zig_plugin_runs_in_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[plugins.pipeline]]
name = "upper"
plugin = "{}"
inputs = ["words"]
outputs = {{ upper = "words-upper" }}
params = {{ prefix = "Z:" }}
"#,
        plugin_wasm("zig_upper").display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    let mut cmd = weir_tests::external("kcat");
    cmd.args(["-b", &broker.bootstrap(), "-P", "-t", "words", "-K:"]);
    assert!(weir_tests::run_with_stdin(
        &mut cmd,
        "w1:hello\nw2:h\u{e9}\nw3:gateway\n"
    ));
    broker.wait_metric(&metric("upper", "records_in_total"), 3.0);
    assert_eq!(
        consume(&broker, "words-upper"),
        ["w1:Z:HELLO", "w3:Z:GATEWAY"]
    );
    assert_eq!(consume(&broker, "upper-dlq"), ["w2:h\u{e9}"]);
    assert!(
        broker
            .log()
            .iter()
            .any(|l| l.contains("plugin: zig-upper: ready")),
        "the plugin's log line"
    );
}

/// `weir plugin componentize` refuses what is not a core module, and `weir plugin
/// test` shows the plugin's own log lines (on stderr, its results on stdout).
#[test]
fn componentize_refuses_non_modules_and_plugin_test_shows_plugin_logs() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.wasm");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm at all").unwrap();
    let component = plugin_wasm("c_scale");
    for (input, expect) in [
        (garbage.as_path(), "not a WebAssembly module"),
        (component.as_path(), "a component already"),
    ] {
        let out = weir_tests::run_weir(&[
            "plugin",
            "componentize",
            input.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{input:?}");
        assert!(out.stderr.contains(expect), "{input:?}: {}", out.stderr);
        assert!(!out_path.exists());
    }
    let input = dir.path().join("records.jsonl");
    std::fs::write(&input, "{\"key\":\"s1\",\"value\":\"ab\"}\n").unwrap();
    let out = weir_tests::run_weir(&[
        "plugin",
        "test",
        plugin_wasm("c_scale_wasi").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "-p",
        "scale=0.1",
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("plugin: c-scale: value = raw * 0.1 + 0"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("\"target\":\"scaled\""),
        "{}",
        out.stdout
    );
}

#[test]
fn device_frames_over_mqtt_become_json_readings() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[mqtt.ingest]]
filter = "sensors/{{device}}/#"
topic = "frames"
key = "{{device}}"

[[plugins.pipeline]]
name = "decode"
plugin = "{}"
inputs = ["frames"]
outputs = {{ json = "readings-json" }}
"#,
        plugin_wasm("frame_decode").display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    send_frames(&broker, 5, 10);
    produce(&broker, "frames", "dev-x:not a frame\n");
    broker.wait_metric(&metric("decode", "records_in_total"), 51.0);
    let lines = consume(&broker, "readings-json");
    assert_eq!(lines.len(), 50);
    let mut per_device: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for line in &lines {
        let (key, value) = line.split_once(':').unwrap();
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        assert!(v["temperature_c"].as_f64().unwrap() >= 18.0, "{v}");
        assert!(v["battery_v"].as_f64().unwrap() > 3.0, "{v}");
        per_device
            .entry(key.to_string())
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    assert_eq!(per_device.len(), 5);
    for seqs in per_device.values() {
        assert_eq!(seqs, &(0..10).collect::<Vec<u64>>());
    }
    assert_eq!(consume(&broker, "decode-dlq"), ["dev-x:not a frame"]);
}

#[test]
fn an_ingest_plugin_decodes_frames_before_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[mqtt.ingest]]
filter = "sensors/{{device}}/#"
topic = "telemetry"
key = "{{device}}"
plugin = "{}"
"#,
        plugin_wasm("frame_decode").display()
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    send_frames(&broker, 3, 5);
    weir_tests::mosquitto_pub(
        broker.mqtt.port(),
        &["-t", "sensors/dev-y/raw", "-m", "garbage", "-q", "1"],
    );
    // Stored already decoded: JSON in the topic, in each device's order.
    let lines = consume(&broker, "telemetry");
    assert_eq!(lines.len(), 15, "{lines:?}");
    for device in ["dev-00000", "dev-00001", "dev-00002"] {
        let seqs: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{device}:")))
            .map(|v| {
                serde_json::from_str::<serde_json::Value>(v).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4], "{device}");
    }
    let dlq = run(
        weir_tests::external("kcat").args([
            "-b",
            &broker.bootstrap(),
            "-C",
            "-t",
            "telemetry-dlq",
            "-e",
            "-f",
            "%k|%s|%h\n",
        ]),
        Duration::from_secs(60),
    );
    assert!(dlq.stdout.starts_with("dev-y|garbage|"), "{}", dlq.stdout);
    assert!(
        dlq.stdout
            .contains("weir.error=sensor frame version 103 is unknown"),
        "{}",
        dlq.stdout
    );
    assert_eq!(broker.metric("weir_mqtt_ingest_plugin_failures_total"), 1.0);
}

/// Runs `weir <args>` against the broker's admin API and returns its stdout; fails
/// the test when the command fails.
fn admin(broker: &Broker, args: &[&str]) -> String {
    let out = broker.cli(args);
    assert!(out.status.success(), "weir {args:?}: {}", out.stderr);
    out.stdout
}

fn describe(broker: &Broker, pipeline: &str) -> serde_json::Value {
    serde_json::from_str(&admin(
        broker,
        &["pipeline", "describe", pipeline, "--json"],
    ))
    .unwrap()
}

fn wait_state(broker: &Broker, pipeline: &str, state: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while describe(broker, pipeline)["status"]["state"] != state {
        assert!(
            std::time::Instant::now() < deadline,
            "{pipeline} never {state}: {}",
            describe(broker, pipeline)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pipelines_are_created_paused_resumed_replaced_and_deleted_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_with_config(&dir.path().join("d"), &clean_pipeline());
    let config_path = dir.path().join("d.toml");
    let passthrough = plugin_wasm("passthrough");
    let json_filter = plugin_wasm("json_filter");
    let deployed = admin(
        &broker,
        &["plugin", "deploy", "stage", passthrough.to_str().unwrap()],
    );
    assert!(deployed.contains("version 1"), "{deployed}");
    admin(&broker, &["topic", "create", "raw", "-p", "1"]);
    admin(&broker, &["topic", "create", "staged", "-p", "1"]);
    produce(&broker, "raw", "old:{\"n\":-1}\n");

    // Created at the end of `raw`: the record already there is not taken.
    admin(
        &broker,
        &[
            "pipeline",
            "create",
            "live",
            "--plugin",
            "stage",
            "-i",
            "raw",
            "-o",
            "out=staged",
            "-o",
            "kept=staged",
            "-p",
            "field=n",
            "-p",
            "rename.n=m",
            "--start",
            "latest",
            "--batch-size",
            "10",
        ],
    );
    let total = 20_000;
    let input: String = (0..total)
        .map(|i| format!("k{i}:{{\"n\":{i}}}\n"))
        .collect();
    produce(&broker, "raw", &input);
    broker.wait_metric(&metric("live", "records_out_total"), 500.0);
    // A new version while the pipeline runs: json-filter renames n to m.
    let deployed = admin(
        &broker,
        &["plugin", "deploy", "stage", json_filter.to_str().unwrap()],
    );
    assert!(deployed.contains("version 2"), "{deployed}");
    broker.wait_metric(&metric("live", "records_in_total"), total as f64);
    let lines = consume(&broker, "staged");
    assert_eq!(lines.len(), total, "each input's result once");
    let mut switched_at = None;
    for (i, line) in lines.iter().enumerate() {
        let old = format!("k{i}:{{\"n\":{i}}}");
        let new = format!("k{i}:{{\"m\":{i}}}");
        match switched_at {
            None if *line == old => {}
            None if *line == new => switched_at = Some(i),
            Some(_) if *line == new => {}
            _ => panic!("record {i} is {line:?}: neither {old:?} nor {new:?} in order"),
        }
    }
    let switched_at = switched_at.expect("the new version took over");
    assert!(switched_at >= 500 && switched_at < total, "{switched_at}");
    let view = describe(&broker, "live");
    assert_eq!(view["status"]["plugin_version"], 2);
    assert_eq!(view["status"]["positions"][0]["next_offset"], total + 1);
    assert!(admin(&broker, &["plugin", "list"]).contains("stage\t2\t"));

    // Paused, it takes nothing, across a restart too; resumed, it goes on.
    admin(&broker, &["pipeline", "pause", "live"]);
    wait_state(&broker, "live", "paused");
    produce(&broker, "raw", "p1:{\"n\":1}\np2:{\"n\":2}\n");
    std::thread::sleep(Duration::from_millis(500));
    broker.restart(false, &["--config", config_path.to_str().unwrap()]);
    wait_state(&broker, "live", "paused");
    assert_eq!(describe(&broker, "live")["origin"], "api");
    assert_eq!(consume(&broker, "staged").len(), total);
    admin(&broker, &["pipeline", "resume", "live"]);
    broker.wait_metric(&metric("live", "records_out_total"), 2.0);
    let lines = consume(&broker, "staged");
    assert_eq!(&lines[total..], ["p1:{\"m\":1}", "p2:{\"m\":2}"]);

    // From a point in time, with a component file instead of a deployed plugin.
    produce(&broker, "raw", "before:{\"n\":0}\n");
    std::thread::sleep(Duration::from_millis(50));
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::thread::sleep(Duration::from_millis(50));
    produce(&broker, "raw", "after:{\"n\":0}\n");
    admin(
        &broker,
        &[
            "pipeline",
            "create",
            "since",
            "--plugin",
            passthrough.to_str().unwrap(),
            "-i",
            "raw",
            "-o",
            "out=since-out",
            "--start",
            &format!("timestamp:{since}"),
        ],
    );
    broker.wait_metric(&metric("since", "records_out_total"), 1.0);
    assert_eq!(consume(&broker, "since-out"), ["after:{\"n\":0}"]);

    // What is refused, with the reason.
    let refused = |args: &[&str], reason: &str| {
        let out = broker.cli(args);
        assert!(!out.status.success(), "weir {args:?} succeeded");
        assert!(out.stderr.contains(reason), "weir {args:?}: {}", out.stderr);
    };
    refused(&["pipeline", "delete", "clean"], "config file");
    refused(&["plugin", "remove", "stage"], "used by pipeline(s) live");
    refused(
        &[
            "pipeline", "create", "live", "--plugin", "stage", "-i", "raw", "-o", "out=x",
        ],
        "already exists",
    );
    refused(
        &[
            "pipeline", "create", "x", "--plugin", "nothing", "-i", "raw", "-o", "out=x",
        ],
        "no plugin named nothing",
    );
    refused(
        &[
            "pipeline", "create", "x", "--plugin", "stage", "-i", "raw", "-o", "kept=x",
        ],
        "param `field` is required",
    );
    refused(
        &[
            "pipeline",
            "create",
            "x",
            "--plugin",
            "stage",
            "-i",
            "raw",
            "-o",
            "kept=x",
            "-p",
            "field=n",
            "--start",
            "yesterday",
        ],
        "is not earliest, latest",
    );
    refused(
        &["plugin", "deploy", "junk", config_path.to_str().unwrap()],
        "cannot compile",
    );
    // A version the running pipeline's params do not suit is not deployed.
    refused(
        &[
            "plugin",
            "deploy",
            "stage",
            plugin_wasm("python_redact").to_str().unwrap(),
        ],
        "param `fields` is required",
    );

    admin(&broker, &["pipeline", "delete", "live"]);
    refused(&["pipeline", "describe", "live"], "no pipeline named live");
    admin(&broker, &["plugin", "remove", "stage"]);
    assert!(!admin(&broker, &["pipeline", "list"]).contains("live"));
    // The outputs stay (with `before` and `after`, which `live` took too).
    assert_eq!(consume(&broker, "staged").len(), total + 4);
}

#[test]
fn json_is_reserialized_as_avro_and_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let script = |args: &[&str]| {
        let out = weir_tests::python("serde_check.py", args);
        assert!(
            out.status.success(),
            "serde_check.py {args:?}: {}",
            out.stderr
        );
        out.stdout.trim().to_string()
    };
    let config = format!(
        r#"
[[plugins.pipeline]]
name = "to-avro"
plugin = "{avro}"
inputs = ["readings"]
outputs = {{ avro = "readings-avro" }}
params = {{ schema = '{schema}', framing = "confluent", schema_id = "7" }}

[[plugins.pipeline]]
name = "to-pb"
plugin = "{pb}"
inputs = ["readings"]
outputs = {{ protobuf = "readings-pb" }}
params = {{ descriptor = "{descriptor}", message = "weir.example.Reading" }}
"#,
        avro = plugin_wasm("json_to_avro").display(),
        pb = plugin_wasm("json_to_protobuf").display(),
        schema = script(&["avro-schema"]),
        descriptor = script(&["descriptor"]),
    );
    let broker = Broker::start_with_config(&dir.path().join("d"), &config);
    produce(
        &broker,
        "readings",
        concat!(
            "d1:{\"device\":\"d1\",\"temperature\":21.5,\"ts_ms\":1700000000000}\n",
            "d2:{\"device\":\"d2\",\"temperature\":-3,\"ts_ms\":5,\"note\":\"cold\"}\n",
            "d3:{\"device\":\"d3\",\"temperature\":\"hot\",\"ts_ms\":1}\n",
            "d4:not json\n",
            "d5:{\"device\":\"d5\",\"temperature\":1.0,\"tsMs\":2,\"tags\":[\"x\",\"y\"]}\n",
        ),
    );
    broker.wait_metric(&metric("to-avro", "records_in_total"), 5.0);
    broker.wait_metric(&metric("to-pb", "records_in_total"), 5.0);
    let decoded = script(&["decode", &broker.bootstrap()]);
    let lines: Vec<&str> = decoded.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"key": "d1", "topic": "avro", "value": {"device": "d1", "note": null, "temperature": 21.5, "ts_ms": 1700000000000}}"#,
            r#"{"key": "d2", "topic": "avro", "value": {"device": "d2", "note": "cold", "temperature": -3.0, "ts_ms": 5}}"#,
            r#"{"key": "d1", "topic": "pb", "value": {"device": "d1", "temperature": 21.5, "ts_ms": "1700000000000"}}"#,
            r#"{"key": "d5", "topic": "pb", "value": {"device": "d5", "tags": ["x", "y"], "temperature": 1.0, "ts_ms": "2"}}"#,
        ]
    );
    let reasons = |topic: &str| {
        let out = run(
            weir_tests::external("kcat").args([
                "-b",
                &broker.bootstrap(),
                "-C",
                "-t",
                topic,
                "-e",
                "-f",
                "%k|%h\n",
            ]),
            Duration::from_secs(60),
        );
        out.stdout.lines().map(String::from).collect::<Vec<_>>()
    };
    let avro_dlq = reasons("to-avro-dlq");
    let pb_dlq = reasons("to-pb-dlq");
    assert_eq!(avro_dlq.len(), 3, "{avro_dlq:?}");
    assert!(
        avro_dlq[0].starts_with("d3|") && avro_dlq[0].contains("does not fit the schema"),
        "{avro_dlq:?}"
    );
    assert!(
        avro_dlq[1].starts_with("d4|") && avro_dlq[1].contains("not JSON"),
        "{avro_dlq:?}"
    );
    assert!(avro_dlq[2].starts_with("d5|"), "{avro_dlq:?}");
    assert_eq!(pb_dlq.len(), 3, "{pb_dlq:?}");
    assert!(
        pb_dlq[0].starts_with("d2|") && pb_dlq[0].contains("note"),
        "{pb_dlq:?}"
    );
    assert!(
        pb_dlq[1].starts_with("d3|") && pb_dlq[1].contains("not a weir.example.Reading"),
        "{pb_dlq:?}"
    );
    assert!(pb_dlq[2].starts_with("d4|"), "{pb_dlq:?}");
}
