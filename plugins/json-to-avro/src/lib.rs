//! JSON records in, Avro records out: each value is parsed as JSON, checked against
//! the Avro schema and encoded as an Avro datum, so the centre gets compact,
//! schema-checked records.
//!
//! Params:
//! - `schema` (required): the Avro schema, as JSON;
//! - `framing`: how the datum is framed, `raw` (default: the datum alone),
//!   `single-object` (Avro's single-object encoding: `C3 01`, the schema's 8-byte
//!   CRC-64-AVRO fingerprint, the datum) or `confluent` (`00`, the 4-byte big-endian
//!   `schema_id`, the datum: what Confluent's deserializers read);
//! - `schema_id`: the schema registry id, with `framing = confluent`;
//! - `output`: the output name (default `avro`).
//!
//! A value that is not JSON, or does not fit the schema, fails with the reason
//! (dead-letter topic). Keys and headers pass unchanged.

use std::cell::RefCell;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use weir_plugin::{Batch, BatchResult, Level, Plugin, Source, log};

enum Framing {
    Raw,
    SingleObject([u8; 10]),
    Confluent([u8; 5]),
}

struct Settings {
    schema: Schema,
    framing: Framing,
    output: String,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

fn settings(params: &[(String, String)]) -> Result<Settings, String> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let text = param("schema").ok_or("param `schema` (an Avro schema as JSON) is required")?;
    let schema = Schema::parse_str(text).map_err(|e| format!("param `schema`: {e}"))?;
    let framing = match param("framing").unwrap_or("raw") {
        "raw" => Framing::Raw,
        "single-object" => {
            let fingerprint = schema.fingerprint::<Rabin>().bytes;
            let mut header = [0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
            header[2..].copy_from_slice(&fingerprint);
            Framing::SingleObject(header)
        }
        "confluent" => {
            let id: u32 = param("schema_id")
                .ok_or("framing = confluent needs param `schema_id`")?
                .parse()
                .map_err(|_| "param `schema_id` must be a number")?;
            let mut header = [0; 5];
            header[1..].copy_from_slice(&id.to_be_bytes());
            Framing::Confluent(header)
        }
        other => {
            return Err(format!(
                "param `framing`: {other:?} is not raw, single-object or confluent"
            ));
        }
    };
    Ok(Settings {
        schema,
        framing,
        output: param("output").unwrap_or("avro").to_string(),
    })
}

/// One JSON value as a framed Avro datum.
fn encode(
    s: &Settings,
    writer: &GenericDatumWriter,
    value: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    let json: serde_json::Value =
        serde_json::from_slice(value.unwrap_or_default()).map_err(|e| format!("not JSON: {e}"))?;
    // Resolving against the schema checks the value and gives the reason when it
    // does not fit (JSON objects become records, integers ints or longs, ...).
    let datum = Value::try_from(json)
        .and_then(|v| v.resolve(&s.schema))
        .map_err(|e| format!("does not fit the schema: {e}"))?;
    let body = writer
        .write_value_to_vec(datum)
        .map_err(|e| format!("cannot encode: {e}"))?;
    let header: &[u8] = match &s.framing {
        Framing::Raw => &[],
        Framing::SingleObject(h) => h,
        Framing::Confluent(h) => h,
    };
    Ok([header, &body].concat())
}

struct JsonToAvro;

impl Plugin for JsonToAvro {
    fn init(params: Vec<(String, String)>) -> Result<(), String> {
        let s = settings(&params)?;
        log(
            Level::Info,
            &format!("json-to-avro: schema {}", s.schema.canonical_form()),
        );
        SETTINGS.with(|cell| *cell.borrow_mut() = Some(s));
        Ok(())
    }

    fn process(_source: Source, records: Batch<'_>) -> BatchResult {
        SETTINGS.with(|cell| {
            let cell = cell.borrow();
            let s = cell.as_ref().expect("init ran");
            match GenericDatumWriter::builder(&s.schema)
                .validate(false)
                .build()
            {
                Ok(writer) => {
                    BatchResult::map_values(records, &s.output, |value| encode(s, &writer, value))
                }
                Err(e) => {
                    BatchResult::map_values(records, &s.output, |_| Err(format!("schema: {e}")))
                }
            }
        })
    }
}

weir_plugin::plugin!(JsonToAvro);
