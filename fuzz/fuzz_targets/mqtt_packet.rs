//! Any bytes as an MQTT stream, in 3.1.1 or 5.0 (first byte chooses): reading the
//! CONNECT version and decoding packets returns packets or errors, never panics;
//! every decoded packet encodes again, and its topics and filters go through the
//! broker's checks.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttc::v5::mqttbytes::v5::Packet;
use weir_wire::mqtt_codec::{self as codec, Version};
use weir_wire::topics;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let _ = codec::connect_version(rest);
    let version = if first & 1 == 0 { Version::V311 } else { Version::V5 };
    let mut buf = BytesMut::from(rest);
    for _ in 0..64 {
        match codec::decode(version, &mut buf, 1 << 16) {
            Ok(Some(packet)) => {
                let mut out = BytesMut::new();
                let _ = codec::encode(version, &packet, &mut out);
                match &packet {
                    Packet::Publish(p) => {
                        if let Ok(t) = std::str::from_utf8(&p.topic) {
                            let _ = topics::valid_topic_name(t);
                            let _ = topics::matches("a/+/#", t);
                        }
                    }
                    Packet::Subscribe(s) => {
                        for f in &s.filters {
                            let _ = topics::SubscriptionFilter::parse(&f.path);
                        }
                    }
                    _ => {}
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
});
