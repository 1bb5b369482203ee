//! Kafka framing and message (de)coding on `kafka-protocol`. Sans-I/O: bytes in,
//! requests out; responses in, bytes out.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};

/// Largest request frame accepted (Kafka's `socket.request.max.bytes`).
pub const MAX_FRAME_BYTES: usize = 100 << 20;

/// The APIs and version ranges this broker serves, as ApiVersions advertises them.
/// Ranges look like a Kafka 3.x broker's, cut where a newer version needs something
/// Weir does not have yet (topic ids in Fetch 13+, Metadata 13+).
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    // Transactions, up to the versions before KIP-890's (v4+ of these are for brokers
    // verifying each other, or change the error codes clients must handle).
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 3),
    (ApiKey::TxnOffsetCommit, 0, 3),
    (ApiKey::EndTxn, 0, 3),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    // v0 is advertised because librdkafka looks for it before it uses SASL at all; a
    // v0 handshake (tokens unframed after it, pre-Kafka 1.0 clients) is refused.
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// The version range served for `api`, if it is served.
pub fn supported(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(a, _, _)| *a == api)
        .map(|(_, min, max)| (*min, *max))
}

/// A decoded request.
#[derive(Debug)]
pub struct Request {
    pub api: ApiKey,
    pub header: RequestHeader,
    pub body: RequestKind,
}

impl Request {
    pub fn version(&self) -> i16 {
        self.header.request_api_version
    }
}

/// Why a request frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request of {0} bytes is too short for a header")]
    Truncated(usize),
    #[error("API key {api_key} is not served")]
    UnknownApi { api_key: i16, correlation_id: i32 },
    #[error("{api:?} version {version} is not served (range {min}..={max})")]
    UnsupportedVersion {
        api: ApiKey,
        version: i16,
        min: i16,
        max: i16,
        correlation_id: i32,
    },
    #[error("malformed {api:?} v{version} request: {message}")]
    Malformed {
        api: ApiKey,
        version: i16,
        message: String,
    },
}

/// Decodes one request frame (without its 4-byte length prefix).
pub fn decode_request(mut frame: Bytes) -> Result<Request, DecodeError> {
    if frame.len() < 8 {
        return Err(DecodeError::Truncated(frame.len()));
    }
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = ApiKey::try_from(api_key)
        .ok()
        .filter(|api| supported(*api).is_some())
        .ok_or(DecodeError::UnknownApi {
            api_key,
            correlation_id,
        })?;
    let (min, max) = supported(api).expect("filtered above");
    if version < min || version > max {
        return Err(DecodeError::UnsupportedVersion {
            api,
            version,
            min,
            max,
            correlation_id,
        });
    }
    let malformed = |e: anyhow::Error| DecodeError::Malformed {
        api,
        version,
        message: e.to_string(),
    };
    let header = RequestHeader::decode(&mut frame, api.request_header_version(version))
        .map_err(malformed)?;
    let body = RequestKind::decode(api, &mut frame, version).map_err(malformed)?;
    Ok(Request { api, header, body })
}

/// Encodes a response with its header and 4-byte length prefix.
pub fn encode_response(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &ResponseKind,
) -> anyhow::Result<Bytes> {
    // A Fetch response is mostly its records: sized up front, it is copied in once.
    let body_size = match body {
        ResponseKind::Fetch(fetch) => fetch.compute_size(version).unwrap_or(0),
        _ => 0,
    };
    let mut buf = BytesMut::with_capacity(64 + body_size);
    buf.put_i32(0);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    header.encode(&mut buf, api.response_header_version(version))?;
    body.encode(&mut buf, version)?;
    let len = i32::try_from(buf.len() - 4)?;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};

    fn frame(api: ApiKey, version: i16, body: &impl Encodable) -> Bytes {
        let mut buf = BytesMut::new();
        let mut header = RequestHeader::default();
        header.request_api_key = api as i16;
        header.request_api_version = version;
        header.correlation_id = 7;
        header
            .encode(&mut buf, api.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    #[test]
    fn served_ranges_are_within_what_the_codec_knows() {
        for &(api, min, max) in SUPPORTED_APIS {
            let known = api.valid_versions();
            assert!(
                known.min <= min && max <= known.max,
                "{api:?} {min}..={max} outside {known:?}"
            );
        }
    }

    #[test]
    fn decodes_what_a_client_encodes() {
        let req = decode_request(frame(ApiKey::Metadata, 9, &MetadataRequest::default())).unwrap();
        assert_eq!(req.api, ApiKey::Metadata);
        assert_eq!(req.header.correlation_id, 7);
        assert!(matches!(req.body, RequestKind::Metadata(_)));
    }

    /// A few bytes that declare a huge array must be an error, not an allocation that
    /// aborts the process (fixed in vendor/kafka-protocol; see WEIR-PATCH.md there).
    #[test]
    fn huge_declared_counts_are_errors() {
        // Metadata v0, correlation 1, null client id, then 2^31-1 topics.
        let frame = [
            0, 3, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0, 1, b'x',
        ];
        assert!(matches!(
            decode_request(Bytes::copy_from_slice(&frame)),
            Err(DecodeError::Malformed { .. })
        ));
        // CreateTopics v2, a topic name claiming 32 KiB.
        let frame = [
            0, 19, 0, 2, 0, 0, 0, 1, 0xff, 0xff, 0, 0, 0, 1, 0x7f, 0xff, b'x',
        ];
        assert!(matches!(
            decode_request(Bytes::copy_from_slice(&frame)),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn refuses_unknown_apis_versions_and_garbage() {
        assert!(matches!(
            decode_request(Bytes::from_static(&[0, 1])),
            Err(DecodeError::Truncated(2))
        ));
        let mut v9 =
            BytesMut::from(&frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())[..]);
        v9[2..4].copy_from_slice(&9i16.to_be_bytes());
        let err = decode_request(v9.freeze()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::UnsupportedVersion {
                    correlation_id: 7,
                    max: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = decode_request(Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 1])).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::UnknownApi {
                api_key: 0x7f00,
                ..
            }
        ));
        let mut bad = BytesMut::from(&frame(ApiKey::Metadata, 9, &MetadataRequest::default())[..]);
        bad.truncate(bad.len() - 1);
        assert!(matches!(
            decode_request(bad.freeze()),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
