//! The json-filter logic itself, without the plugin interface: the plugin (`lib.rs`)
//! calls it, and `weir bench plugins` compiles this same file natively as the
//! baseline the WebAssembly build is measured against.

use serde_json::{Map, Value};

#[derive(Debug, Default)]
pub struct Settings {
    pub field: String,
    pub min: Option<f64>,
    pub alarm_above: Option<f64>,
    pub renames: Vec<(String, String)>,
    pub to_fahrenheit: bool,
    pub enrich: Vec<(String, String)>,
}

impl Settings {
    pub fn from_params(params: &[(String, String)]) -> Result<Self, String> {
        let mut s = Settings::default();
        let number = |k: &str, v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{k} = {v:?} is not a number"))
        };
        for (k, v) in params {
            match k.as_str() {
                "field" => s.field = v.clone(),
                "min" => s.min = Some(number(k, v)?),
                "alarm_above" => s.alarm_above = Some(number(k, v)?),
                "to_fahrenheit" => s.to_fahrenheit = v == "true",
                _ if k.starts_with("rename.") => s
                    .renames
                    .push((k["rename.".len()..].to_string(), v.clone())),
                _ if k.starts_with("enrich.") => {
                    s.enrich.push((k["enrich.".len()..].to_string(), v.clone()))
                }
                _ => return Err(format!("unknown param {k}")),
            }
        }
        if s.field.is_empty() {
            return Err("param `field` is required".into());
        }
        Ok(s)
    }
}

/// The output name and new value for a record's value; `None`: dropped.
pub fn transform(
    s: &Settings,
    value: Option<&[u8]>,
) -> Result<Option<(&'static str, Vec<u8>)>, String> {
    let value = value.ok_or("no value")?;
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
