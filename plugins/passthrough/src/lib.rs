//! Every record to the `out` output, key, value and headers unchanged: the smallest
//! plugin, and the measure of what the plugin boundary itself costs.

use weir_plugin::{Batch, BatchResult, Output, Plugin, Source};

struct PassThrough;

impl Plugin for PassThrough {
    fn init(_params: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_source: Source, records: Batch<'_>) -> BatchResult {
        let mut result = BatchResult::default();
        for (i, r) in records.iter().enumerate() {
            let mut output = Output::to("out", i).key(r.key).headers(r.headers);
            if let Some(value) = r.value {
                output = output.value(value);
            }
            result.emit(output);
        }
        result
    }
}

weir_plugin::plugin!(PassThrough);
