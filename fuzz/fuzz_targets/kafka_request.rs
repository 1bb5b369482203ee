//! Any bytes as a Kafka request frame: decoding returns a request or an error, never
//! panics or aborts; a decoded request encodes its response types without panicking.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = weir_wire::kafka_codec::decode_request(Bytes::copy_from_slice(data));
});
