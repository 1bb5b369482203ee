//! Any bytes as a Kafka request frame: decoding returns a request or an error, never
//! panics or aborts. (Responses are built by the broker, not from untrusted bytes:
//! `kafka/tests.rs` encodes one for every served API and version.)
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = weir_wire::kafka_codec::decode_request(Bytes::copy_from_slice(data));
});
