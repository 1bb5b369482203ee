//! Kafka RecordBatch (magic v2) framing: the unit Weir stores.
//!
//! Sans-I/O. This module reads and checks the fixed 61-byte batch header and its
//! CRC-32C without decoding the records, and stamps the broker-assigned base offset
//! and leader epoch, which the CRC does not cover. Decoding records (decompression,
//! varints) is left to `kafka-protocol` where a feature needs it.
//!
//! Layout (big-endian), from the Kafka protocol guide:
//! ```text
//! 0  baseOffset i64          | 27 baseTimestamp i64
//! 8  batchLength i32         | 35 maxTimestamp i64
//! 12 partitionLeaderEpoch i32| 43 producerId i64
//! 16 magic i8 (= 2)          | 51 producerEpoch i16
//! 17 crc u32 (CRC-32C of 21..end) | 53 baseSequence i32
//! 21 attributes i16          | 57 recordCount i32
//! 23 lastOffsetDelta i32     | 61 records...
//! ```

use bytes::{Bytes, BytesMut};

/// Size of the v2 batch header, up to and including the record count.
pub const HEADER_LEN: usize = 61;
/// Bytes before the `batchLength` field's coverage starts (baseOffset + batchLength).
const LOG_OVERHEAD: usize = 12;
const MAGIC_V2: i8 = 2;
const CRC_START: usize = 21;

/// Why a batch was refused. Every variant stores nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("record batch is truncated: {available} bytes, at least {needed} needed")]
    Truncated { available: usize, needed: usize },
    #[error("record batch length field says {declared} bytes but {available} follow it")]
    LengthMismatch { declared: i64, available: usize },
    #[error("record batch magic {0} is not supported (only v2)")]
    UnsupportedMagic(i8),
    #[error("record batch CRC-32C mismatch: header {stored:#010x}, computed {computed:#010x}")]
    CorruptCrc { stored: u32, computed: u32 },
    #[error("record batch declares {count} records and last offset delta {last_offset_delta}")]
    InvalidRecordCount { count: i32, last_offset_delta: i32 },
    #[error("empty record set")]
    Empty,
}

/// One validated v2 record batch, sharing the caller's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBatch {
    bytes: Bytes,
}

/// As its bytes; read back through `parse`, so a batch from the journal is checked again.
impl serde::Serialize for RecordBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.bytes)
    }
}

impl<'de> serde::Deserialize<'de> for RecordBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RecordBatch::parse(Bytes::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl RecordBatch {
    /// Checks length, magic, CRC-32C and record count of exactly one batch.
    pub fn parse(bytes: Bytes) -> Result<Self, BatchError> {
        if bytes.len() < HEADER_LEN {
            return Err(BatchError::Truncated {
                available: bytes.len(),
                needed: HEADER_LEN,
            });
        }
        let declared = i64::from(read_i32(&bytes, 8));
        let available = bytes.len() - LOG_OVERHEAD;
        if declared != available as i64 {
            return Err(BatchError::LengthMismatch {
                declared,
                available,
            });
        }
        let magic = bytes[16] as i8;
        if magic != MAGIC_V2 {
            return Err(BatchError::UnsupportedMagic(magic));
        }
        let stored = read_u32(&bytes, 17);
        let computed = crc32c::crc32c(&bytes[CRC_START..]);
        if stored != computed {
            return Err(BatchError::CorruptCrc { stored, computed });
        }
        let batch = Self { bytes };
        let (count, last_offset_delta) = (batch.record_count(), batch.last_offset_delta());
        if count <= 0 || last_offset_delta != count - 1 {
            return Err(BatchError::InvalidRecordCount {
                count,
                last_offset_delta,
            });
        }
        Ok(batch)
    }

    /// Splits a produce request's record set, which may hold several batches back to
    /// back, and validates each. All or nothing.
    pub fn parse_all(mut records: Bytes) -> Result<Vec<Self>, BatchError> {
        let mut batches = Vec::new();
        while !records.is_empty() {
            if records.len() < LOG_OVERHEAD {
                return Err(BatchError::Truncated {
                    available: records.len(),
                    needed: HEADER_LEN,
                });
            }
            let declared = read_i32(&records, 8);
            let total = usize::try_from(declared)
                .ok()
                .and_then(|len| len.checked_add(LOG_OVERHEAD))
                .filter(|total| *total <= records.len())
                .ok_or(BatchError::LengthMismatch {
                    declared: i64::from(declared),
                    available: records.len() - LOG_OVERHEAD,
                })?;
            batches.push(Self::parse(records.split_to(total))?);
        }
        if batches.is_empty() {
            return Err(BatchError::Empty);
        }
        Ok(batches)
    }

    /// Wraps bytes that were validated when they were stored (read path).
    pub fn from_stored(bytes: Bytes) -> Self {
        Self { bytes }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The header fields, read in place.
    pub fn header(&self) -> BatchHeader<'_> {
        BatchHeader(&self.bytes)
    }

    pub fn base_offset(&self) -> i64 {
        self.header().base_offset()
    }

    pub fn last_offset_delta(&self) -> i32 {
        self.header().last_offset_delta()
    }

    /// Number of offsets the batch occupies.
    pub fn offset_count(&self) -> u64 {
        self.header().offset_count()
    }

    pub fn max_timestamp(&self) -> i64 {
        self.header().max_timestamp()
    }

    pub fn record_count(&self) -> i32 {
        self.header().record_count()
    }

    pub fn crc(&self) -> u32 {
        read_u32(&self.bytes, 17)
    }

    /// The same batch with the broker's base offset and leader epoch written in.
    /// Neither field is covered by the CRC, so the checksum stays valid.
    pub fn with_base_offset(&self, base_offset: i64, leader_epoch: i32) -> Self {
        let mut bytes = BytesMut::from(&self.bytes[..]);
        stamp(&mut bytes, base_offset, leader_epoch);
        Self {
            bytes: bytes.freeze(),
        }
    }
}

/// Writes the broker's fields into a batch's bytes (at least `HEADER_LEN` long): its
/// base offset and partition leader epoch. Neither is covered by the CRC.
pub fn stamp(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
    batch[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// The fixed header of a batch that is known to be at least `HEADER_LEN` bytes.
#[derive(Clone, Copy, Debug)]
pub struct BatchHeader<'a>(&'a [u8]);

impl<'a> BatchHeader<'a> {
    /// `None` when `bytes` is shorter than a header.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() >= HEADER_LEN).then_some(Self(bytes))
    }

    pub fn base_offset(self) -> i64 {
        read_i64(self.0, 0)
    }

    pub fn attributes(self) -> i16 {
        i16::from_be_bytes([self.0[21], self.0[22]])
    }

    pub fn last_offset_delta(self) -> i32 {
        read_i32(self.0, 23)
    }

    /// Written by a transactional producer (attributes bit 4).
    pub fn is_transactional(self) -> bool {
        self.attributes() & 0x10 != 0
    }

    /// A control batch: a transaction's commit or abort marker (attributes bit 5),
    /// which consumers skip.
    pub fn is_control(self) -> bool {
        self.attributes() & 0x20 != 0
    }

    pub fn offset_count(self) -> u64 {
        self.last_offset_delta().max(0) as u64 + 1
    }

    /// Set by log compaction on a batch holding tombstones (attributes bit 6, KIP-534):
    /// the time after which they may be removed, carried in the base timestamp.
    pub fn delete_horizon_ms(self) -> Option<i64> {
        (self.attributes() & 0x40 != 0).then(|| self.base_timestamp())
    }

    pub fn crc(self) -> u32 {
        read_u32(self.0, 17)
    }

    pub fn base_timestamp(self) -> i64 {
        read_i64(self.0, 27)
    }

    pub fn max_timestamp(self) -> i64 {
        read_i64(self.0, 35)
    }

    pub fn producer_id(self) -> i64 {
        read_i64(self.0, 43)
    }

    pub fn producer_epoch(self) -> i16 {
        i16::from_be_bytes([self.0[51], self.0[52]])
    }

    pub fn base_sequence(self) -> i32 {
        read_i32(self.0, 53)
    }

    pub fn record_count(self) -> i32 {
        read_i32(self.0, 57)
    }
}

fn read_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Builds batches the way a Kafka client does, with `kafka-protocol`'s encoder.
/// Used by the broker's own writes (`WriteOp::AppendRecords`), the benchmark and the
/// tests.
pub mod build {
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    /// One record to encode: key, value, timestamp in ms, headers.
    #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
    pub struct NewRecord {
        pub key: Option<Bytes>,
        pub value: Option<Bytes>,
        pub timestamp_ms: i64,
        /// Kafka headers; a name given twice keeps its last value.
        pub headers: Vec<(String, Bytes)>,
    }

    /// The bytes of a v2 batch's header, before its records.
    pub const BATCH_OVERHEAD: usize = 61;

    /// At least the bytes `r` takes in a v2 batch (every varint counted at its widest).
    pub fn size_bound(r: &NewRecord) -> usize {
        const VARINT: usize = 5;
        const VARLONG: usize = 10;
        let field = |b: Option<&Bytes>| VARINT + b.map_or(0, Bytes::len);
        // Length, attributes, timestamp delta, offset delta, key, value, header count.
        let fixed = VARINT + 1 + VARLONG + VARINT + VARINT;
        let headers: usize = r
            .headers
            .iter()
            .map(|(k, v)| 2 * VARINT + k.len() + v.len())
            .sum();
        fixed + field(r.key.as_ref()) + field(r.value.as_ref()) + headers
    }

    /// A transaction's commit or abort marker for one partition, as a Kafka broker
    /// writes it: a control batch of one record whose key is (version 0, type 0 abort
    /// or 1 commit) and whose value is (version 0, coordinator epoch), base offset 0.
    pub fn control(
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
        coordinator_epoch: i32,
        timestamp_ms: i64,
    ) -> anyhow::Result<Bytes> {
        let mut key = BytesMut::with_capacity(4);
        key.extend_from_slice(&0i16.to_be_bytes());
        key.extend_from_slice(&i16::from(commit).to_be_bytes());
        let mut value = BytesMut::with_capacity(6);
        value.extend_from_slice(&0i16.to_be_bytes());
        value.extend_from_slice(&coordinator_epoch.to_be_bytes());
        let record = Record {
            transactional: true,
            control: true,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id,
            producer_epoch,
            timestamp_type: TimestampType::Creation,
            offset: 0,
            sequence: -1,
            timestamp: timestamp_ms,
            key: Some(key.freeze()),
            value: Some(value.freeze()),
            headers: Default::default(),
        };
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            [&record],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )?;
        Ok(buf.freeze())
    }

    /// The batch compaction writes in place of `original` with only `records` (a
    /// non-empty subset of its records, in offset order), as Kafka's log cleaner writes
    /// it: the original's base offset, last offset delta, producer fields, codec,
    /// timestamp type and leader epoch, so that no offset or sequence number moves.
    /// With `delete_horizon_ms`, attribute bit 6 is set and the base timestamp is the
    /// horizon (record timestamps stay right: their deltas are from it).
    pub fn retained(
        original: super::BatchHeader<'_>,
        records: &[Record],
        delete_horizon_ms: Option<i64>,
    ) -> anyhow::Result<Bytes> {
        use bytes::BufMut;
        use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};
        anyhow::ensure!(!records.is_empty(), "a retained batch has records");
        let base_offset = original.base_offset();
        let log_append = original.attributes() & 0x08 != 0;
        let min_timestamp = records.iter().map(|r| r.timestamp).min().unwrap_or(0);
        let base_timestamp = delete_horizon_ms.unwrap_or(min_timestamp);
        let max_timestamp = if log_append {
            original.max_timestamp()
        } else {
            records.iter().map(|r| r.timestamp).max().unwrap_or(0)
        };
        let mut raw = BytesMut::new();
        let mut body = BytesMut::new();
        for r in records {
            body.clear();
            body.put_i8(0);
            put_varlong(&mut body, r.timestamp.wrapping_sub(base_timestamp));
            let delta = r.offset - base_offset;
            anyhow::ensure!(
                (0..=i64::from(original.last_offset_delta())).contains(&delta),
                "record offset {} is outside its batch at {base_offset}",
                r.offset
            );
            put_varlong(&mut body, delta);
            put_bytes(&mut body, r.key.as_deref());
            put_bytes(&mut body, r.value.as_deref());
            put_varlong(&mut body, r.headers.len() as i64);
            for (name, value) in &r.headers {
                put_bytes(&mut body, Some(name.as_bytes()));
                put_bytes(&mut body, value.as_deref());
            }
            put_varlong(&mut raw, body.len() as i64);
            raw.extend_from_slice(&body);
        }
        let codec = original.attributes() & 0x07;
        let mut out = BytesMut::with_capacity(super::HEADER_LEN + raw.len());
        out.put_i64(base_offset);
        out.put_i32(0); // length, below
        out.put_i32(super::read_i32(original.0, 12));
        out.put_i8(super::MAGIC_V2);
        out.put_u32(0); // CRC, below
        let attributes =
            (original.attributes() & !0x40) | if delete_horizon_ms.is_some() { 0x40 } else { 0 };
        out.put_i16(attributes);
        out.put_i32(original.last_offset_delta());
        out.put_i64(base_timestamp);
        out.put_i64(max_timestamp);
        out.put_i64(original.producer_id());
        out.put_i16(original.producer_epoch());
        out.put_i32(original.base_sequence());
        out.put_i32(records.len() as i32);
        let copy = |buf: &mut BytesMut| -> anyhow::Result<()> {
            buf.extend_from_slice(&raw);
            Ok(())
        };
        match codec {
            0 => out.extend_from_slice(&raw),
            1 => Gzip::compress(&mut out, copy)?,
            2 => Snappy::compress(&mut out, copy)?,
            3 => Lz4::compress(&mut out, copy)?,
            4 => Zstd::compress(&mut out, copy)?,
            other => anyhow::bail!("unknown compression codec {other}"),
        }
        let length = (out.len() - super::LOG_OVERHEAD) as i32;
        out[8..12].copy_from_slice(&length.to_be_bytes());
        let crc = crc32c::crc32c(&out[super::CRC_START..]);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
        Ok(out.freeze())
    }

    /// Kafka's zigzag varint (a varlong; values that fit an i32 encode the same).
    fn put_varlong(buf: &mut BytesMut, value: i64) {
        let mut z = ((value << 1) ^ (value >> 63)) as u64;
        while z >= 0x80 {
            buf.extend_from_slice(&[(z as u8) | 0x80]);
            z >>= 7;
        }
        buf.extend_from_slice(&[z as u8]);
    }

    /// A length-prefixed field, -1 for null.
    fn put_bytes(buf: &mut BytesMut, value: Option<&[u8]>) {
        match value {
            Some(v) => {
                put_varlong(buf, v.len() as i64);
                buf.extend_from_slice(v);
            }
            None => put_varlong(buf, -1),
        }
    }

    /// Encodes `records` as one v2 batch with base offset 0.
    pub fn batch(records: &[NewRecord], compression: Compression) -> anyhow::Result<Bytes> {
        let records: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, r)| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // The encoder keeps records in one batch while offset - sequence is
                // constant; this makes the batch's base sequence -1, as a
                // non-idempotent client sends it.
                sequence: i as i32 - 1,
                timestamp: r.timestamp_ms,
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone().into(), Some(v.clone())))
                    .collect(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )?;
        Ok(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::build::{NewRecord, batch};
    use super::*;
    use kafka_protocol::records::Compression;

    fn sample() -> Bytes {
        let records: Vec<NewRecord> = (0..3)
            .map(|i| NewRecord {
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![i as u8; 40])),
                timestamp_ms: 1_700_000_000_000 + i,
                headers: vec![("h".into(), Bytes::from_static(b"v"))],
            })
            .collect();
        batch(&records, Compression::None).unwrap()
    }

    #[test]
    fn a_control_batch_is_a_marker_kafka_clients_recognise() {
        let bytes = super::build::control(7, 3, true, 0, 1_700_000_000_000).unwrap();
        let b = RecordBatch::parse(bytes.clone()).unwrap();
        let h = b.header();
        assert!(h.is_control() && h.is_transactional());
        assert_eq!(
            (h.producer_id(), h.producer_epoch(), h.base_sequence()),
            (7, 3, -1)
        );
        assert_eq!(b.record_count(), 1);
        let mut buf = bytes;
        let records = kafka_protocol::records::RecordBatchDecoder::decode(&mut buf).unwrap();
        let r = &records.records[0];
        assert!(r.control && r.transactional);
        assert_eq!(r.key.as_deref(), Some(&[0u8, 0, 0, 1][..]));
        assert_eq!(r.value.as_deref(), Some(&[0u8, 0, 0, 0, 0, 0][..]));
        let abort = super::build::control(7, 3, false, 0, 0).unwrap();
        let records = kafka_protocol::records::RecordBatchDecoder::decode(&mut abort.clone());
        assert_eq!(
            records.unwrap().records[0].key.as_deref(),
            Some(&[0u8, 0, 0, 0][..])
        );
        // A plain batch is neither.
        let plain = RecordBatch::parse(sample()).unwrap();
        assert!(!plain.header().is_control() && !plain.header().is_transactional());
    }

    #[test]
    fn a_retained_batch_keeps_offsets_timestamps_and_producer_fields() {
        use kafka_protocol::records::RecordBatchDecoder;
        for codec in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let records: Vec<NewRecord> = (0..3)
                .map(|i| NewRecord {
                    key: Some(Bytes::from(format!("k{i}"))),
                    value: (i != 2).then(|| Bytes::from(vec![i as u8; 40])),
                    timestamp_ms: 1_700_000_000_000 + i * 10,
                    headers: vec![("h".into(), Bytes::from_static(b"v"))],
                })
                .collect();
            let original = RecordBatch::parse(batch(&records, codec).unwrap())
                .unwrap()
                .with_base_offset(100, 0);
            let decoded = RecordBatchDecoder::decode(&mut original.as_bytes().clone())
                .unwrap()
                .records;
            let kept = [decoded[1].clone(), decoded[2].clone()];
            for horizon in [None, Some(1_800_000_000_000)] {
                let bytes = super::build::retained(original.header(), &kept, horizon).unwrap();
                // Not `parse`: a client's batch has a record per offset, this one not.
                assert_eq!(read_u32(&bytes, 17), crc32c::crc32c(&bytes[CRC_START..]));
                assert_eq!(read_i32(&bytes, 8) as usize, bytes.len() - LOG_OVERHEAD);
                let h = BatchHeader::new(&bytes).unwrap();
                assert_eq!((h.base_offset(), h.last_offset_delta()), (100, 2));
                assert_eq!(h.record_count(), 2);
                assert_eq!(h.attributes() & 7, original.header().attributes() & 7);
                assert_eq!(h.delete_horizon_ms(), horizon);
                assert_eq!(h.max_timestamp(), 1_700_000_000_020);
                let again = RecordBatchDecoder::decode(&mut bytes.clone())
                    .unwrap()
                    .records;
                let seen: Vec<_> = again
                    .iter()
                    .map(|r| (r.offset, r.timestamp, r.key.clone(), r.value.clone()))
                    .collect();
                let want: Vec<_> = kept
                    .iter()
                    .map(|r| (r.offset, r.timestamp, r.key.clone(), r.value.clone()))
                    .collect();
                assert_eq!(seen, want, "{codec:?} {horizon:?}");
                assert_eq!(again[0].headers, kept[0].headers);
            }
        }
    }

    #[test]
    fn size_bound_is_at_least_the_encoded_size() {
        for n in [1usize, 2, 50] {
            let records: Vec<NewRecord> = (0..n)
                .map(|i| NewRecord {
                    key: (i % 2 == 0).then(|| Bytes::from(vec![b'k'; i * 40])),
                    value: Some(Bytes::from(vec![7; i * 300])),
                    timestamp_ms: i64::MAX / 2 - i as i64 * 1_000_000_000,
                    headers: vec![("mqtt.topic".into(), Bytes::from(vec![b't'; i]))],
                })
                .collect();
            let encoded = batch(&records, Compression::None).unwrap().len();
            let bound = super::build::BATCH_OVERHEAD
                + records.iter().map(super::build::size_bound).sum::<usize>();
            assert!(encoded <= bound, "{n} records: {encoded} > {bound}");
        }
    }

    #[test]
    fn parses_client_batch() {
        let b = RecordBatch::parse(sample()).unwrap();
        assert_eq!(b.record_count(), 3);
        assert_eq!(b.offset_count(), 3);
        assert_eq!(b.max_timestamp(), 1_700_000_000_002);
    }

    #[test]
    fn base_offset_keeps_crc_valid() {
        let b = RecordBatch::parse(sample())
            .unwrap()
            .with_base_offset(42, 0);
        assert_eq!(b.base_offset(), 42);
        RecordBatch::parse(b.into_bytes()).unwrap();
    }

    #[test]
    fn refuses_bad_crc_length_magic() {
        let good = sample();
        let mut crc = BytesMut::from(&good[..]);
        let last = crc.len() - 1;
        crc[last] ^= 0xff;
        assert!(matches!(
            RecordBatch::parse(crc.freeze()),
            Err(BatchError::CorruptCrc { .. })
        ));
        let short = good.slice(..good.len() - 1);
        assert!(matches!(
            RecordBatch::parse(short),
            Err(BatchError::LengthMismatch { .. })
        ));
        let mut magic = BytesMut::from(&good[..]);
        magic[16] = 1;
        assert_eq!(
            RecordBatch::parse(magic.freeze()),
            Err(BatchError::UnsupportedMagic(1))
        );
        assert!(matches!(
            RecordBatch::parse(good.slice(..10)),
            Err(BatchError::Truncated { .. })
        ));
    }

    #[test]
    fn splits_concatenated_batches() {
        let mut two = BytesMut::from(&sample()[..]);
        two.extend_from_slice(&sample());
        assert_eq!(RecordBatch::parse_all(two.freeze()).unwrap().len(), 2);
        let mut trailing = BytesMut::from(&sample()[..]);
        trailing.extend_from_slice(&[0, 0, 0]);
        assert!(RecordBatch::parse_all(trailing.freeze()).is_err());
        assert_eq!(RecordBatch::parse_all(Bytes::new()), Err(BatchError::Empty));
    }
}
