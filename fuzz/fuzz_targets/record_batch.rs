//! Any bytes as a produce request's record set: validation refuses or accepts without
//! panicking, and an accepted uncompressed batch decodes without panicking.
//! (Compressed batches are not decompressed here: the produce path never does, and
//! bounding decompression is the pipelines' job, issue #5.)
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batches) = weir::record_batch::RecordBatch::parse_all(Bytes::copy_from_slice(data)) {
        for b in batches {
            if b.header().attributes() & 0x7 == 0 {
                let mut bytes = b.into_bytes();
                let _ = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes);
            }
        }
    }
});
