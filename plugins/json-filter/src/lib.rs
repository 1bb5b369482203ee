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

use serde_json::{Map, Value};
use weir_plugin::{BatchResult, InputRecord, Level, Output, Plugin, log};

#[derive(Default)]
struct Settings {
    field: String,
    min: Option<f64>,
    alarm_above: Option<f64>,
    renames: Vec<(String, String)>,
    to_fahrenheit: bool,
    enrich: Vec<(String, String)>,
}

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

struct JsonFilter;

impl Plugin for JsonFilter {
    fn init(params: Vec<(String, String)>) -> Result<(), String> {
        let mut s = Settings::default();
        let number = |k: &str, v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{k} = {v:?} is not a number"))
        };
        for (k, v) in params {
            match k.as_str() {
                "field" => s.field = v,
                "min" => s.min = Some(number(&k, &v)?),
                "alarm_above" => s.alarm_above = Some(number(&k, &v)?),
                "to_fahrenheit" => s.to_fahrenheit = v == "true",
                _ if k.starts_with("rename.") => {
                    s.renames.push((k["rename.".len()..].to_string(), v))
                }
                _ if k.starts_with("enrich.") => {
                    s.enrich.push((k["enrich.".len()..].to_string(), v))
                }
                _ => return Err(format!("unknown param {k}")),
            }
        }
        if s.field.is_empty() {
            return Err("param `field` is required".into());
        }
        log(Level::Info, &format!("json-filter on {:?}", s.field));
        SETTINGS.with(|cell| *cell.borrow_mut() = s);
        Ok(())
    }

    fn process(records: Vec<InputRecord>) -> BatchResult {
        SETTINGS.with(|cell| {
            let s = cell.borrow();
            let mut result = BatchResult::default();
            for (i, record) in records.iter().enumerate() {
                match transform(&s, record) {
                    Ok(None) => {}
                    Ok(Some((target, value))) => {
                        result.emit(Output::to(target, i).key(record.key.clone()).value(value));
                    }
                    Err(reason) => result.fail(i, reason),
                }
            }
            result
        })
    }
}

fn transform(
    s: &Settings,
    record: &InputRecord,
) -> Result<Option<(&'static str, Vec<u8>)>, String> {
    let value = record.value.as_deref().ok_or("no value")?;
    let mut object: Map<String, Value> = match serde_json::from_slice(value) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("not JSON: {e}")),
    };
    let reading = object
        .get(&s.field)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("no numeric {:?}", s.field))?;
    if s.min.is_some_and(|min| reading < min) {
        return Ok(None);
    }
    let target = if s.alarm_above.is_some_and(|a| reading > a) {
        "alarms"
    } else {
        "kept"
    };
    if s.to_fahrenheit {
        let f = reading * 9.0 / 5.0 + 32.0;
        object.insert(s.field.clone(), Value::from((f * 10.0).round() / 10.0));
    }
    for (from, to) in &s.renames {
        if let Some(v) = object.remove(from) {
            object.insert(to.clone(), v);
        }
    }
    for (k, v) in &s.enrich {
        object.insert(k.clone(), Value::from(v.clone()));
    }
    Ok(Some((
        target,
        serde_json::to_vec(&Value::Object(object)).map_err(|e| e.to_string())?,
    )))
}

weir_plugin::plugin!(JsonFilter);
