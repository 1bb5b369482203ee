//! JSON records in, Protobuf records out: each value is read as the Protobuf JSON
//! mapping of one message type and encoded in Protobuf's binary format.
//!
//! Params:
//! - `descriptor` (required): a `FileDescriptorSet` (what `protoc --include_imports
//!   --descriptor_set_out=FILE` writes, or `buf build -o FILE`), base64-encoded;
//! - `message` (required): the message type's full name, e.g. `acme.Reading`;
//! - `output`: the output name (default `protobuf`).
//!
//! Field names may be the proto names or their lowerCamelCase JSON names. A value that
//! is not JSON, has a field the message does not, or a value of the wrong type fails
//! with the reason (dead-letter topic). Keys and headers pass unchanged.

use std::cell::RefCell;

use base64::Engine;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use weir_plugin::{Batch, BatchResult, Level, Plugin, Source, log};

struct Settings {
    message: MessageDescriptor,
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
    let encoded = param("descriptor")
        .ok_or("param `descriptor` (a FileDescriptorSet, base64) is required")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("param `descriptor` is not base64: {e}"))?;
    let pool = DescriptorPool::decode(bytes.as_slice())
        .map_err(|e| format!("param `descriptor` is not a FileDescriptorSet: {e}"))?;
    let name = param("message").ok_or("param `message` (a message's full name) is required")?;
    let message = pool.get_message_by_name(name).ok_or_else(|| {
        let known: Vec<String> = pool
            .all_messages()
            .map(|m| m.full_name().to_string())
            .collect();
        format!(
            "no message {name:?} in the descriptor (it has {})",
            known.join(", ")
        )
    })?;
    Ok(Settings {
        message,
        output: param("output").unwrap_or("protobuf").to_string(),
    })
}

/// One JSON value as an encoded message.
fn encode(s: &Settings, value: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let mut json = serde_json::Deserializer::from_slice(value.unwrap_or_default());
    let message = DynamicMessage::deserialize(s.message.clone(), &mut json)
        .map_err(|e| format!("not a {} in JSON: {e}", s.message.full_name()))?;
    json.end()
        .map_err(|e| format!("not a {} in JSON: {e}", s.message.full_name()))?;
    Ok(message.encode_to_vec())
}

struct JsonToProtobuf;

impl Plugin for JsonToProtobuf {
    fn init(params: Vec<(String, String)>) -> Result<(), String> {
        let s = settings(&params)?;
        log(
            Level::Info,
            &format!("json-to-protobuf: {}", s.message.full_name()),
        );
        SETTINGS.with(|cell| *cell.borrow_mut() = Some(s));
        Ok(())
    }

    fn process(_source: Source, records: Batch<'_>) -> BatchResult {
        SETTINGS.with(|cell| {
            let cell = cell.borrow();
            let s = cell.as_ref().expect("init ran");
            BatchResult::map_values(records, &s.output, |value| encode(s, value))
        })
    }
}

weir_plugin::plugin!(JsonToProtobuf);
