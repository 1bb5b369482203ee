//! Binary sensor frames in, JSON readings out: a device sends 15 bytes of postcard
//! (`devices/sensor-frame`, the same crate its firmware uses) and the gateway turns
//! them into JSON that any consumer reads, with units in the field names.
//!
//! Output `json`: `{"device_id":…,"seq":…,"timestamp_ms":…,"temperature_c":21.4,
//! "humidity_pct":45.5,"battery_v":3.012}`, same key as the input. A value that is not
//! a frame (or a frame of an unknown version) fails to the dead-letter topic.

use serde_json::json;
use weir_plugin::{Batch, BatchResult, Output, Plugin, Source};

struct FrameDecode;

impl Plugin for FrameDecode {
    fn init(_params: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_source: Source, records: Batch<'_>) -> BatchResult {
        let mut result = BatchResult::default();
        for (i, r) in records.iter().enumerate() {
            match sensor_frame::decode(r.value.unwrap_or_default()) {
                Ok(f) => {
                    let value = json!({
                        "device_id": f.device_id,
                        "seq": f.seq,
                        "timestamp_ms": f.timestamp_ms,
                        "temperature_c": f64::from(f.temperature_dc) / 10.0,
                        "humidity_pct": f64::from(f.humidity_dpct) / 10.0,
                        "battery_v": f64::from(f.battery_mv) / 1000.0,
                    });
                    let value = value.to_string();
                    result.emit(Output::to("json", i).key(r.key).value(value.as_bytes()));
                }
                Err(sensor_frame::FrameError::UnknownVersion(v)) => {
                    result.fail(i, format!("sensor frame version {v} is unknown"))
                }
                Err(_) => result.fail(i, "not a sensor frame"),
            }
        }
        result
    }
}

weir_plugin::plugin!(FrameDecode);
