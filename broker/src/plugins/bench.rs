//! `weir bench plugins`: the per-record cost of a plugin, as WebAssembly and as the
//! same logic compiled natively, at batch sizes 1, 100 and 1,000, on one core.
//!
//! The native baseline of json-filter is the plugin's own logic
//! (`plugins/json-filter/src/filter.rs`), compiled into this binary; the WebAssembly
//! side is the component built from the same file, called through the host exactly as
//! a pipeline calls it (records copied in, outputs copied out).

use std::path::Path;
use std::time::{Duration, Instant};

use super::host::{Header, InputRecord, Limits, OutputRecord, PluginHost, Source};

#[allow(clippy::all, unreachable_pub, dead_code)]
#[path = "../../../plugins/json-filter/src/filter.rs"]
mod json_filter;

/// Turns each side takes per row.
const ROUNDS: usize = 5;

/// One measured row.
#[derive(Debug)]
pub struct Row {
    pub plugin: &'static str,
    pub batch: usize,
    pub wasm_per_sec: f64,
    pub native_per_sec: f64,
}

pub fn run(plugins_dir: &Path, seconds: f64) -> anyhow::Result<Vec<Row>> {
    let host = PluginHost::new(std::env::temp_dir().join("weir-plugin-cache"))?;
    let limits = Limits {
        memory_bytes: 64 << 20,
        call_timeout: Duration::from_secs(10),
    };
    let records = sample(10_000);
    let params: Vec<(String, String)> = [
        ("field", "temperature"),
        ("min", "0"),
        ("alarm_above", "40"),
        ("rename.temperature", "temp_f"),
        ("to_fahrenheit", "true"),
        ("enrich.site", "north"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = json_filter::Settings::from_params(&params).map_err(anyhow::Error::msg)?;
    let source = Source {
        topic: "bench".into(),
        partition: 0,
    };
    let mut rows = Vec::new();
    for (plugin, file, params) in [
        ("pass-through", "passthrough.wasm", Vec::new()),
        ("json-filter", "json_filter.wasm", params.clone()),
    ] {
        let path = plugins_dir.join(file);
        let wasm = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e} (build the plugins first)", path.display()))?;
        let module = host.load(&wasm)?;
        let mut instance = host.instantiate(&module, limits, "bench", &params)?;
        for batch in [1usize, 100, 1000] {
            // WASM and native take turns, ROUNDS times each, and each keeps its best
            // round: what a busy machine takes away is not counted against either.
            let (mut wasm_per_sec, mut native_per_sec) = (0f64, 0f64);
            let slice = seconds / ROUNDS as f64;
            for _ in 0..ROUNDS {
                wasm_per_sec = wasm_per_sec.max(rate(&records, batch, slice, |chunk| {
                    instance
                        .process(&source, chunk)
                        .map(|r| r.outputs.len())
                        .unwrap_or(0)
                }));
                native_per_sec =
                    native_per_sec.max(rate(&records, batch, slice, |chunk| match plugin {
                        "pass-through" => native_pass_through(chunk).len(),
                        _ => native_json_filter(&settings, chunk).len(),
                    }));
            }
            rows.push(Row {
                plugin,
                batch,
                wasm_per_sec,
                native_per_sec,
            });
        }
    }
    Ok(rows)
}

/// Records per second through `f`, called on chunks of `batch` records, for about
/// `seconds`.
fn rate(
    records: &[InputRecord],
    batch: usize,
    seconds: f64,
    mut f: impl FnMut(&[InputRecord]) -> usize,
) -> f64 {
    let started = Instant::now();
    let mut done = 0usize;
    let mut sink = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        for chunk in records.chunks(batch) {
            sink = sink.wrapping_add(f(chunk));
            done += chunk.len();
        }
    }
    std::hint::black_box(sink);
    done as f64 / started.elapsed().as_secs_f64()
}

fn native_pass_through(records: &[InputRecord]) -> Vec<OutputRecord> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| OutputRecord {
            input: i as u32,
            target: "out".into(),
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
        })
        .collect()
}

fn native_json_filter(
    settings: &json_filter::Settings,
    records: &[InputRecord],
) -> Vec<OutputRecord> {
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if let Ok(Some((target, value))) = json_filter::transform(settings, r.value.as_deref()) {
            out.push(OutputRecord {
                input: i as u32,
                target: target.into(),
                key: r.key.clone(),
                value: Some(value),
                headers: Vec::new(),
            });
        }
    }
    out
}

/// JSON readings like a device sends, about 100 bytes, with one header.
fn sample(n: usize) -> Vec<InputRecord> {
    (0..n)
        .map(|i| InputRecord {
            key: Some(format!("dev-{:05}", i % 1000).into_bytes()),
            value: Some(
                format!(
                    r#"{{"device":"dev-{:05}","seq":{i},"ts":1764000000000,"temperature":{:.1},"humidity":{:.1}}}"#,
                    i % 1000,
                    15.0 + (i % 300) as f64 / 10.0,
                    40.0 + (i % 100) as f64 / 10.0
                )
                .into_bytes(),
            ),
            headers: vec![Header {
                key: "mqtt.topic".into(),
                value: format!("sensors/dev-{:05}/json", i % 1000).into_bytes(),
            }],
            timestamp_ms: 1_764_000_000_000,
            offset: i as u64,
        })
        .collect()
}
