//! Any bytes as a produce request's record set: validation refuses or accepts without
//! panicking, and an accepted uncompressed batch decodes without panicking.
//!
//! Half the inputs get a correct length field and CRC-32C written in first, so that the
//! fuzzer reaches record decoding instead of stopping at the checksum.
//! (Compressed batches are not decompressed here: the produce path never does, and
//! bounding decompression is the pipelines' job, issue #5.)
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = BytesMut::from(data);
    if data.first().is_some_and(|b| b & 1 == 1) && input.len() >= weir_wire::record_batch::HEADER_LEN {
        let len = (input.len() - 12) as i32;
        input[8..12].copy_from_slice(&len.to_be_bytes());
        input[16] = 2;
        let crc = crc32c::crc32c(&input[21..]);
        input[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    if let Ok(batches) = weir_wire::record_batch::RecordBatch::parse_all(Bytes::from(input)) {
        for b in batches {
            if b.header().attributes() & 0x7 == 0 {
                let mut bytes = b.into_bytes();
                let _ = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes);
            }
        }
    }
});
