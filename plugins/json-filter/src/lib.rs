//! JSON readings in, clean readings out.
//!
//! Params (all optional but `field`):
//! - `field`: the reading to look at, e.g. `temperature`;
//! - `min`: readings below it are dropped;
//! - `alarm_above`: readings above it go to the `alarms` output, the rest to `kept`;
//! - `rename.<from>`: renames field `<from>` to the param's value;
//! - `to_fahrenheit`: `true` converts `field` from °C to °F;
//! - `enrich.<name>`: adds field `<name>` with the param's value (e.g. the site).
//!
//! A value that is not a JSON object with a numeric `field` fails (dead-letter topic).

use std::cell::RefCell;

use weir_plugin::{Batch, BatchResult, Level, Output, Plugin, Source, log};

mod filter;

use filter::{Settings, transform};

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

struct JsonFilter;

impl Plugin for JsonFilter {
    fn init(params: Vec<(String, String)>) -> Result<(), String> {
        let s = Settings::from_params(&params)?;
        log(Level::Info, &format!("json-filter on {:?}", s.field));
        SETTINGS.with(|cell| *cell.borrow_mut() = s);
        Ok(())
    }

    fn process(_source: Source, records: Batch<'_>) -> BatchResult {
        SETTINGS.with(|cell| {
            let s = cell.borrow();
            let mut result = BatchResult::default();
            for (i, record) in records.iter().enumerate() {
                match transform(&s, record.value) {
                    Ok(None) => {}
                    Ok(Some((target, value))) => {
                        result.emit(Output::to(target, i).key(record.key).value(&value));
                    }
                    Err(reason) => result.fail(i, reason),
                }
            }
            result
        })
    }
}

weir_plugin::plugin!(JsonFilter);
