//! `weir plugin test`: runs a component on sample records without a broker and prints
//! what it does with each, so a plugin author can try a build in a second.
//!
//! Input: JSON lines, one record each: `{"key": "k", "value": "text", "headers":
//! {"h": "v"}, "timestamp_ms": 0}` (every field optional; `value_hex` for binary).
//! Output: JSON lines, one per output (`{"input": 0, "target": "kept", "key": …,
//! "value": …, "headers": {…}}`), per failure (`{"input": 1, "error": "…"}`) and per
//! dropped record (`{"input": 2, "dropped": true}`). Bytes that are not UTF-8 are
//! printed as `value_hex`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::host::{Header, InputRecord, Limits, PluginHost, Source};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleRecord {
    key: Option<String>,
    value: Option<String>,
    value_hex: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timestamp_ms: i64,
}

/// Runs `wasm` on the records of `jsonl` in one batch; returns the lines to print.
pub fn run(
    wasm: &[u8],
    jsonl: &str,
    params: &[(String, String)],
    limits: Limits,
) -> anyhow::Result<Vec<String>> {
    let host = PluginHost::new(std::env::temp_dir().join("weir-plugin-cache"))?;
    let module = host.load(wasm)?;
    let mut instance = host.instantiate(&module, limits, "test", params)?;
    let mut records = Vec::new();
    for (n, line) in jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: SampleRecord =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("input line {}: {e}", n + 1))?;
        let value = match (r.value, r.value_hex) {
            (Some(text), None) => Some(text.into_bytes()),
            (None, Some(hex)) => Some(
                from_hex(&hex)
                    .ok_or_else(|| anyhow::anyhow!("input line {}: bad value_hex", n + 1))?,
            ),
            (None, None) => None,
            (Some(_), Some(_)) => {
                anyhow::bail!("input line {}: value and value_hex both given", n + 1)
            }
        };
        records.push(InputRecord {
            key: r.key.map(String::into_bytes),
            value,
            headers: r
                .headers
                .into_iter()
                .map(|(key, value)| Header {
                    key,
                    value: value.into_bytes(),
                })
                .collect(),
            timestamp_ms: r.timestamp_ms,
            offset: records.len() as u64,
        });
    }
    let source = Source {
        topic: "test".into(),
        partition: 0,
    };
    let result = instance.process(&source, &records)?;
    let mut lines = Vec::new();
    let mut seen = vec![false; records.len()];
    for o in result.outputs {
        if let Some(s) = seen.get_mut(o.input as usize) {
            *s = true;
        }
        let mut line = json!({ "input": o.input, "target": o.target });
        put_bytes(&mut line, "key", o.key.as_deref());
        put_bytes(&mut line, "value", o.value.as_deref());
        if !o.headers.is_empty() {
            let headers: BTreeMap<String, String> = o
                .headers
                .into_iter()
                .map(|h| (h.key, String::from_utf8_lossy(&h.value).into_owned()))
                .collect();
            line["headers"] = json!(headers);
        }
        lines.push(line.to_string());
    }
    for f in result.failures {
        if let Some(s) = seen.get_mut(f.input as usize) {
            *s = true;
        }
        lines.push(json!({ "input": f.input, "error": f.reason }).to_string());
    }
    for (i, s) in seen.iter().enumerate() {
        if !s {
            lines.push(json!({ "input": i, "dropped": true }).to_string());
        }
    }
    Ok(lines)
}

/// Default limits for `weir plugin test`: those of a pipeline.
pub fn default_limits(memory_mb: usize, timeout_ms: u64) -> Limits {
    Limits {
        memory_bytes: memory_mb * 1024 * 1024,
        call_timeout: Duration::from_millis(timeout_ms),
    }
}

fn put_bytes(line: &mut Value, name: &str, bytes: Option<&[u8]>) {
    match bytes {
        None => {}
        Some(b) => match std::str::from_utf8(b) {
            Ok(text) => line[name] = json!(text),
            Err(_) => {
                line[format!("{name}_hex")] =
                    json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
            }
        },
    }
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}
