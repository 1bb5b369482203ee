//! Every record to the `out` output, key, value and headers unchanged: the smallest
//! plugin, and the measure of what the plugin boundary itself costs.

use weir_plugin::{BatchResult, InputRecord, OutputRecord, Plugin, Source};

struct PassThrough;

impl Plugin for PassThrough {
    fn init(_params: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_source: Source, records: Vec<InputRecord>) -> BatchResult {
        let mut result = BatchResult::default();
        result.outputs.reserve(records.len());
        for (i, r) in records.into_iter().enumerate() {
            result.emit(OutputRecord {
                input: i as u32,
                target: "out".into(),
                key: r.key,
                value: r.value,
                headers: r.headers,
            });
        }
        result
    }
}

weir_plugin::plugin!(PassThrough);
