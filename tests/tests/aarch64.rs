//! The aarch64 build (`scripts/build-aarch64`) run under qemu-aarch64, as on a
//! Raspberry Pi: devices publish frames at QoS 1, an ingest plugin decodes them (so
//! Cranelift compiles WebAssembly to aarch64 code), a pipeline enriches them, a Kafka
//! client on this machine reads the results, and a rule replicates them to a centre over
//! TLS (librdkafka on the system's arm64 libssl3, which this build links).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weir_tests::{
    Broker, EM_AARCH64, dump_records, dump_records_over, elf_machine, emulated_aarch64,
    plugin_wasm, run, weir_bin,
};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const DEVICES: u64 = 4;
const MESSAGES: u64 = 10;

/// `name` as `scripts/build-aarch64` builds it: target/aarch64-unknown-linux-gnu/
/// <profile>/, beside the host's target/<profile>/.
fn aarch64_bin(name: &str) -> PathBuf {
    let host_dir = weir_bin().parent().expect("profile dir").to_owned();
    let profile = host_dir.file_name().expect("profile name");
    let bin = host_dir
        .parent()
        .expect("target dir")
        .join(TRIPLE)
        .join(profile)
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with scripts/build-aarch64 --profile dev (the README's test \
         command does)",
        bin.display()
    );
    bin
}

/// The gateway's config: frames decoded at ingest, a pipeline, a rule up to `centre`
/// over TLS, trusting `ca`.
fn gateway_config(centre: &str, ca: &std::path::Path) -> String {
    format!(
        r#"
[topic_defaults]
partitions = 2

[[mqtt.ingest]]
filter = "sensors/{{device}}/#"
topic = "telemetry"
key = "{{device}}"
plugin = "{frame_decode}"

[[plugins.pipeline]]
name = "enrich"
plugin = "{json_filter}"
inputs = ["telemetry"]
outputs = {{ kept = "readings", alarms = "alarms" }}
params = {{ field = "temperature_c", "enrich.board" = "aarch64" }}

[replication]
gateway_id = "pi"

[[replication.upstream]]
name = "centre"
bootstrap_servers = "{centre}"
security_protocol = "ssl"
ssl_ca_location = "{ca}"

[[replication.rule]]
name = "up"
upstream = "centre"
topics = ["readings"]
target = "{{gateway}}.{{topic}}"
linger_ms = 20
"#,
        frame_decode = plugin_wasm("frame_decode").display(),
        json_filter = plugin_wasm("json_filter").display(),
        ca = ca.display(),
    )
}

/// Each device's sequence numbers in `records` (key = device, value = a reading that
/// went through the pipeline on the aarch64 broker).
fn sequences(records: &[(u32, String, String, String)]) -> BTreeMap<String, Vec<u64>> {
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, key, value, _) in records {
        let v: serde_json::Value = serde_json::from_str(value).expect("a JSON reading");
        assert_eq!(v["board"], "aarch64", "{value}");
        assert!(v["temperature_c"].is_f64(), "{value}");
        per_device
            .entry(key.clone())
            .or_default()
            .push(v["seq"].as_u64().expect("seq"));
    }
    per_device
}

#[test]
fn a_gateway_runs_on_aarch64_under_emulation() {
    let weir = aarch64_bin("weir");
    let sim = aarch64_bin("weir-sim");
    assert_eq!(elf_machine(&weir), EM_AARCH64, "{}", weir.display());
    assert_eq!(elf_machine(&sim), EM_AARCH64, "{}", sim.display());

    let dir = tempfile::tempdir().unwrap();
    // TLS ends at a proxy in front of the centre (on this machine, x86).
    let tls = weir_tests::TlsProxy::start(dir.path());
    let centre = Broker::start_with_config(
        &dir.path().join("centre"),
        &format!("[kafka]\nadvertised = \"{}\"\n", tls.addr),
    );
    tls.set_target(centre.kafka);
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, gateway_config(&tls.addr.to_string(), &tls.ca_pem)).unwrap();
    let gateway = Broker::start_with(
        &mut emulated_aarch64(&weir),
        &dir.path().join("gateway"),
        &["--config", config.to_str().unwrap()],
    );

    let devices = run(
        emulated_aarch64(&sim).args([
            "--broker",
            &gateway.mqtt.to_string(),
            "--quiet",
            "--devices",
            &DEVICES.to_string(),
            "--messages",
            &MESSAGES.to_string(),
            "--rate",
            "20",
            "--payload",
            "frame",
            "--qos",
            "1",
        ]),
        Duration::from_secs(120),
    );
    assert!(
        devices.status.success(),
        "{}{}",
        devices.stdout,
        devices.stderr
    );

    // Every acknowledged frame, decoded and enriched, read by a Kafka client here.
    let total = (DEVICES * MESSAGES) as f64;
    gateway.wait_metric_within(
        "weir_pipeline_records_in_total{pipeline=\"enrich\"}",
        total,
        Duration::from_secs(120),
    );
    let readings = dump_records(&gateway.bootstrap(), "readings");
    let expected: Vec<u64> = (0..MESSAGES).collect();
    let per_device = sequences(&readings);
    assert_eq!(per_device.len() as u64, DEVICES, "{per_device:?}");
    for (device, seqs) in &per_device {
        assert_eq!(seqs, &expected, "{device}");
    }

    // The same records at the centre, once each.
    let deadline = Instant::now() + Duration::from_secs(120);
    while gateway.metric("weir_replication_records_total{rule=\"up\"}") < total {
        assert!(
            Instant::now() < deadline,
            "replication stalled: {}",
            gateway.cli(&["replication", "status"]).stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let upstream = dump_records_over(
        &tls.addr.to_string(),
        "pi.readings",
        Some(&tls.ca_pem),
        None,
    );
    let mut stored: Vec<(&str, &str)> = readings
        .iter()
        .map(|(_, k, v, _)| (k.as_str(), v.as_str()))
        .collect();
    let mut copied: Vec<(&str, &str)> = upstream
        .iter()
        .map(|(_, k, v, _)| (k.as_str(), v.as_str()))
        .collect();
    stored.sort();
    copied.sort();
    assert_eq!(copied, stored);
}

/// The gateway build leaves `weir plugin componentize` out (its size budget) and says
/// so, pointing at a development machine's weir, rather than failing on the module.
#[test]
fn the_gateway_build_says_componentize_is_not_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let out = run(
        emulated_aarch64(&aarch64_bin("weir")).args([
            "plugin",
            "componentize",
            core.to_str().unwrap(),
            "-o",
            dir.path().join("plugin.wasm").to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("built without the `componentize` feature")
            && out.stderr.contains("development machine"),
        "{}",
        out.stderr
    );
    assert!(!dir.path().join("plugin.wasm").exists());
}
