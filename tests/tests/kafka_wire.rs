//! The Kafka listener at the byte level: retries of an idempotent producer across a
//! restart, long-poll wake-ups, and bad input that must close one connection and
//! disturb nothing else.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;
use weir_tests::{Broker, KafkaWire};
use weir_wire::record_batch::build::{NewRecord, batch};

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// A batch from idempotent producer `pid`, epoch 0, starting at `sequence`.
fn idempotent_batch(pid: i64, sequence: i32, values: &[&str]) -> Bytes {
    let records: Vec<NewRecord> = values
        .iter()
        .map(|v| NewRecord {
            key: None,
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
            timestamp_ms: 1,
            ..Default::default()
        })
        .collect();
    let plain = batch(&records, Compression::None).unwrap();
    let mut b = bytes::BytesMut::from(&plain[..]);
    b[43..51].copy_from_slice(&pid.to_be_bytes());
    b[51..53].copy_from_slice(&0i16.to_be_bytes());
    b[53..57].copy_from_slice(&sequence.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b.freeze()
}

/// A plain (non-idempotent) batch of one record.
fn one_record() -> Bytes {
    let record = NewRecord {
        key: None,
        value: Some(Bytes::from_static(b"x")),
        timestamp_ms: 1,
        ..Default::default()
    };
    batch(&[record], Compression::None).unwrap()
}

fn produce(wire: &mut KafkaWire, topic: &str, partition: i32, records: Bytes) -> (i16, i64) {
    let mut p = produce_request::PartitionProduceData::default();
    p.index = partition;
    p.records = Some(records);
    let mut t = produce_request::TopicProduceData::default();
    t.name = TopicName(s(topic));
    t.partition_data = vec![p];
    let mut r = ProduceRequest::default();
    r.acks = -1;
    r.timeout_ms = 10_000;
    r.topic_data = vec![t];
    let resp: ProduceResponse = wire.call(ApiKey::Produce, 9, &r);
    let part = &resp.responses[0].partition_responses[0];
    (part.error_code, part.base_offset)
}

fn fetch(
    wire: &mut KafkaWire,
    topic: &str,
    partition: i32,
    offset: i64,
    max_wait_ms: i32,
) -> (i16, Option<Bytes>) {
    let mut p = fetch_request::FetchPartition::default();
    p.partition = partition;
    p.fetch_offset = offset;
    p.partition_max_bytes = 1 << 20;
    let mut t = fetch_request::FetchTopic::default();
    t.topic = TopicName(s(topic));
    t.partitions = vec![p];
    let mut r = FetchRequest::default();
    r.max_wait_ms = max_wait_ms;
    r.min_bytes = 1;
    r.max_bytes = 1 << 20;
    r.topics = vec![t];
    let resp: FetchResponse = wire.call(ApiKey::Fetch, 11, &r);
    let part = &resp.responses[0].partitions[0];
    (part.error_code, part.records.clone())
}

fn record_count(records: &Option<Bytes>) -> usize {
    let Some(bytes) = records else { return 0 };
    weir_wire::record_batch::RecordBatch::parse_all(bytes.clone())
        .unwrap()
        .iter()
        .map(|b| b.record_count() as usize)
        .sum()
}

fn create(broker: &Broker, topic: &str, partitions: &str) {
    let out = weir_tests::run_weir(&[
        "topic",
        "--admin",
        &broker.admin.to_string(),
        "create",
        topic,
        "-p",
        partitions,
    ]);
    assert!(out.status.success(), "{}", out.stderr);
}

#[test]
fn idempotent_retry_after_restart_is_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    create(&broker, "idem", "1");
    let mut wire = KafkaWire::connect(broker.kafka);
    let init: InitProducerIdResponse =
        wire.call(ApiKey::InitProducerId, 4, &InitProducerIdRequest::default());
    assert_eq!(init.error_code, 0);
    let pid = init.producer_id.0;
    assert!(pid >= 0);

    let first = idempotent_batch(pid, 0, &["a", "b", "c"]);
    assert_eq!(produce(&mut wire, "idem", 0, first.clone()), (0, 0));

    // The broker restarts before the producer saw its answer; the producer retries.
    broker.restart(true, &[]);
    let mut wire = KafkaWire::connect(broker.kafka);
    assert_eq!(
        produce(&mut wire, "idem", 0, first),
        (0, 0),
        "a retry gets the original offset"
    );
    assert_eq!(
        produce(&mut wire, "idem", 0, idempotent_batch(pid, 3, &["d"])),
        (0, 3)
    );
    let (error, _) = produce(&mut wire, "idem", 0, idempotent_batch(pid, 9, &["z"]));
    assert_eq!(
        error,
        kafka_protocol::error::ResponseError::OutOfOrderSequenceNumber.code()
    );

    let (error, records) = fetch(&mut wire, "idem", 0, 0, 0);
    assert_eq!(error, 0);
    assert_eq!(record_count(&records), 4, "a, b, c, d, each once");

    // A fresh producer id is different, and survives the restart too.
    let again: InitProducerIdResponse =
        wire.call(ApiKey::InitProducerId, 4, &InitProducerIdRequest::default());
    assert_ne!(again.producer_id.0, pid);
}

#[test]
fn long_poll_fetch_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    create(&broker, "poll", "1");
    let addr = broker.kafka;
    let waiter = std::thread::spawn(move || {
        let mut wire = KafkaWire::connect(addr);
        let started = Instant::now();
        let (error, records) = fetch(&mut wire, "poll", 0, 0, 20_000);
        (error, record_count(&records), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut wire = KafkaWire::connect(broker.kafka);
    let plain = one_record();
    assert_eq!(produce(&mut wire, "poll", 0, plain).0, 0);
    let (error, count, waited) = waiter.join().unwrap();
    assert_eq!((error, count), (0, 1));
    assert!(
        waited < Duration::from_secs(10),
        "the fetch waited {waited:?}: not woken by the append"
    );
}

#[test]
fn bad_input_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    create(&broker, "good", "2");
    // A healthy client connected the whole time.
    let mut healthy = KafkaWire::connect(broker.kafka);
    let meta = |wire: &mut KafkaWire| -> MetadataResponse {
        let mut all = MetadataRequest::default();
        all.topics = None;
        wire.call(ApiKey::Metadata, 9, &all)
    };
    assert_eq!(meta(&mut healthy).topics.len(), 1);

    let closed = |bytes: &[u8]| {
        let mut wire = KafkaWire::connect(broker.kafka);
        let _ = wire.send_raw(bytes);
        assert!(
            wire.read_frame().is_none(),
            "the broker answered {bytes:?} instead of closing"
        );
    };
    let frame = |body: &[u8]| {
        let mut v = (body.len() as i32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    };
    // Unknown API key, a version below the served range, garbage after a valid header.
    closed(&frame(&[0x7f, 0x7f, 0, 0, 0, 0, 0, 1]));
    closed(&frame(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0]));
    closed(&frame(&[
        0, 3, 0, 9, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]));
    // A header too short, a negative and an oversized length.
    closed(&frame(&[0, 3]));
    closed(&(-5i32).to_be_bytes());
    closed(&(500_000_000i32).to_be_bytes());
    // Random frames.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200 {
        let len = (seed % 64) as usize + 8;
        let mut body = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            body.push(seed as u8);
        }
        let mut wire = KafkaWire::connect(broker.kafka);
        let _ = wire.send_raw(&frame(&body));
        let _ = wire.read_frame(); // an answer or a close; either is fine, a crash is not
    }
    // A truncated frame, then the client goes away.
    {
        let mut wire = KafkaWire::connect(broker.kafka);
        let _ = wire.send_raw(&[0, 0, 0, 100, 0, 3, 0, 9]);
    }
    // ApiVersions at a version too new gets UNSUPPORTED_VERSION with the ranges (KIP-511).
    let mut wire = KafkaWire::connect(broker.kafka);
    let mut req = frame(&[0, 18, 0, 9, 0, 0, 0, 42, 0, 0]);
    let _ = wire.send_raw(&req);
    let mut resp = wire.read_frame().expect("an ApiVersions answer");
    use kafka_protocol::protocol::Decodable;
    let header = ResponseHeader::decode(&mut resp, 0).unwrap();
    assert_eq!(header.correlation_id, 42);
    let versions = ApiVersionsResponse::decode(&mut resp, 0).unwrap();
    assert_eq!(
        versions.error_code,
        kafka_protocol::error::ResponseError::UnsupportedVersion.code()
    );
    assert!(
        versions
            .api_keys
            .iter()
            .any(|k| k.api_key == ApiKey::Produce as i16)
    );
    req.clear();

    // A partition that does not exist: an error code, and the connection stays.
    let plain = one_record();
    let unknown = kafka_protocol::error::ResponseError::UnknownTopicOrPartition.code();
    assert_eq!(produce(&mut healthy, "good", 7, plain.clone()).0, unknown);
    assert_eq!(fetch(&mut healthy, "good", 7, 0, 0).0, unknown);
    // A corrupt batch: CORRUPT_MESSAGE, nothing stored.
    let mut corrupt = bytes::BytesMut::from(&plain[..]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    assert_eq!(
        produce(&mut healthy, "good", 0, corrupt.freeze()).0,
        kafka_protocol::error::ResponseError::CorruptMessage.code()
    );
    // An offset past the end: OFFSET_OUT_OF_RANGE.
    assert_eq!(
        fetch(&mut healthy, "good", 0, 1000, 0).0,
        kafka_protocol::error::ResponseError::OffsetOutOfRange.code()
    );

    // Through it all the healthy connection and the broker kept working.
    assert_eq!(produce(&mut healthy, "good", 0, plain).0, 0);
    assert_eq!(meta(&mut healthy).topics.len(), 1);
    let mut fresh = KafkaWire::connect(broker.kafka);
    assert_eq!(meta(&mut fresh).brokers.len(), 1);
}
