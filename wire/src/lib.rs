//! Weir's codecs of untrusted bytes, apart from everything that does I/O: what a
//! device, a client or a plugin sends is decoded here, and nothing here can block, touch
//! the disk or the network, or start a task. Cargo enforces most of it: this crate
//! depends on no redb, wasmtime, librdkafka or OpenSSL, and `fuzz/` builds it alone.
//! tokio comes in only with `rumqttc`, an MQTT client whose `mqttbytes` packet codecs
//! are all this crate uses of it. `tests/tests/layering.rs` checks the dependency list.

#[cfg(feature = "codecs")]
pub mod kafka_codec;
#[cfg(feature = "codecs")]
pub mod mqtt_codec;
pub mod packed;
#[cfg(feature = "codecs")]
pub mod partition;
#[cfg(feature = "codecs")]
pub mod record_batch;
#[cfg(feature = "codecs")]
pub mod sasl;
#[cfg(feature = "codecs")]
pub mod topics;
