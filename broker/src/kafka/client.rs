//! A minimal Kafka protocol client for `weir produce` and `weir consume`: one
//! connection to one broker (a Weir), requests encoded with `kafka-protocol`.
//! It speaks only what the shell commands need; replication uses a full client.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use weir_wire::kafka_codec::MAX_FRAME_BYTES;

pub struct KafkaClient {
    stream: TcpStream,
    correlation_id: i32,
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// Turns a Kafka error code into an error naming it.
pub fn check(code: i16, what: &str) -> anyhow::Result<()> {
    match ResponseError::try_from_code(code) {
        None if code == 0 => Ok(()),
        Some(e) => anyhow::bail!("{what}: {e}"),
        None => anyhow::bail!("{what}: error code {code}"),
    }
}

impl KafkaClient {
    pub async fn connect(bootstrap: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(bootstrap)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the Kafka listener at {bootstrap}: {e}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            correlation_id: 0,
        })
    }

    pub async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        body: &Req,
    ) -> anyhow::Result<Resp> {
        self.correlation_id += 1;
        let mut header = RequestHeader::default();
        header.request_api_key = api as i16;
        header.request_api_version = version;
        header.correlation_id = self.correlation_id;
        header.client_id = Some(StrBytes::from_static_str("weir-cli"));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header.encode(&mut buf, api.request_header_version(version))?;
        body.encode(&mut buf, version)?;
        let len = i32::try_from(buf.len() - 4)?;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&buf).await?;
        let len = self.stream.read_i32().await?;
        if len < 0 || len as usize > MAX_FRAME_BYTES {
            anyhow::bail!("response frame of {len} bytes");
        }
        let mut frame = vec![0u8; len as usize];
        self.stream.read_exact(&mut frame).await?;
        let mut frame = Bytes::from(frame);
        let header = ResponseHeader::decode(&mut frame, api.response_header_version(version))?;
        if header.correlation_id != self.correlation_id {
            anyhow::bail!(
                "response to request {} while waiting for {}",
                header.correlation_id,
                self.correlation_id
            );
        }
        Resp::decode(&mut frame, version)
    }

    /// Partition count of `topic`, creating it if the broker auto-creates.
    pub async fn partitions(&mut self, topic: &str) -> anyhow::Result<u32> {
        let mut t = metadata_request::MetadataRequestTopic::default();
        t.name = Some(TopicName(s(topic)));
        let mut req = MetadataRequest::default();
        req.topics = Some(vec![t]);
        req.allow_auto_topic_creation = true;
        let resp: MetadataResponse = self.call(ApiKey::Metadata, 9, &req).await?;
        let t = resp
            .topics
            .first()
            .ok_or_else(|| anyhow::anyhow!("no metadata for {topic}"))?;
        check(t.error_code, &format!("topic {topic}"))?;
        Ok(t.partitions.len() as u32)
    }

    /// Produces one record set to a partition with `acks`; returns the base offset.
    pub async fn produce(
        &mut self,
        topic: &str,
        partition: u32,
        acks: i16,
        records: Bytes,
    ) -> anyhow::Result<i64> {
        let mut p = produce_request::PartitionProduceData::default();
        p.index = partition as i32;
        p.records = Some(records);
        let mut t = produce_request::TopicProduceData::default();
        t.name = TopicName(s(topic));
        t.partition_data = vec![p];
        let mut req = ProduceRequest::default();
        req.acks = acks;
        req.timeout_ms = 30_000;
        req.topic_data = vec![t];
        if acks == 0 {
            anyhow::bail!("acks=0 is not offered by the CLI: it could not report failures");
        }
        let resp: ProduceResponse = self.call(ApiKey::Produce, 9, &req).await?;
        let part = &resp.responses[0].partition_responses[0];
        check(part.error_code, &format!("produce to {topic}/{partition}"))?;
        Ok(part.base_offset)
    }

    /// (log start, high watermark) of a partition.
    pub async fn offsets(&mut self, topic: &str, partition: u32) -> anyhow::Result<(i64, i64)> {
        let mut bounds = [0i64; 2];
        for (i, ts) in [-2i64, -1].into_iter().enumerate() {
            let mut p = list_offsets_request::ListOffsetsPartition::default();
            p.partition_index = partition as i32;
            p.timestamp = ts;
            let mut t = list_offsets_request::ListOffsetsTopic::default();
            t.name = TopicName(s(topic));
            t.partitions = vec![p];
            let mut req = ListOffsetsRequest::default();
            req.replica_id = BrokerId(-1);
            req.topics = vec![t];
            let resp: ListOffsetsResponse = self.call(ApiKey::ListOffsets, 5, &req).await?;
            let part = &resp.topics[0].partitions[0];
            check(part.error_code, &format!("offsets of {topic}/{partition}"))?;
            bounds[i] = part.offset;
        }
        Ok((bounds[0], bounds[1]))
    }

    /// Record batches from `offset`, waiting up to `max_wait_ms` for data.
    pub async fn fetch(
        &mut self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_wait_ms: i32,
    ) -> anyhow::Result<Option<Bytes>> {
        let mut p = fetch_request::FetchPartition::default();
        p.partition = partition as i32;
        p.fetch_offset = offset;
        p.partition_max_bytes = 1 << 20;
        let mut t = fetch_request::FetchTopic::default();
        t.topic = TopicName(s(topic));
        t.partitions = vec![p];
        let mut req = FetchRequest::default();
        req.replica_id = BrokerId(-1);
        req.max_wait_ms = max_wait_ms;
        req.min_bytes = 1;
        req.max_bytes = 4 << 20;
        req.topics = vec![t];
        let resp: FetchResponse = self.call(ApiKey::Fetch, 11, &req).await?;
        let part = &resp.responses[0].partitions[0];
        check(
            part.error_code,
            &format!("fetch {topic}/{partition}@{offset}"),
        )?;
        Ok(part.records.clone())
    }

    /// The offset `group` committed for a partition, if any.
    pub async fn committed(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> anyhow::Result<Option<i64>> {
        let mut t = offset_fetch_request::OffsetFetchRequestTopic::default();
        t.name = TopicName(s(topic));
        t.partition_indexes = vec![partition as i32];
        let mut req = OffsetFetchRequest::default();
        req.group_id = GroupId(s(group));
        req.topics = Some(vec![t]);
        let resp: OffsetFetchResponse = self.call(ApiKey::OffsetFetch, 7, &req).await?;
        check(resp.error_code, &format!("offsets of group {group}"))?;
        let part = &resp.topics[0].partitions[0];
        check(part.error_code, &format!("offsets of group {group}"))?;
        Ok((part.committed_offset >= 0).then_some(part.committed_offset))
    }

    /// Commits `offset` (the next to read) for a partition, as a consumer outside any
    /// running group generation does.
    pub async fn commit(
        &mut self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> anyhow::Result<()> {
        let mut p = offset_commit_request::OffsetCommitRequestPartition::default();
        p.partition_index = partition as i32;
        p.committed_offset = offset;
        let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
        t.name = TopicName(s(topic));
        t.partitions = vec![p];
        let mut req = OffsetCommitRequest::default();
        req.group_id = GroupId(s(group));
        req.generation_id_or_member_epoch = -1;
        req.topics = vec![t];
        let resp: OffsetCommitResponse = self.call(ApiKey::OffsetCommit, 8, &req).await?;
        check(
            resp.topics[0].partitions[0].error_code,
            &format!("commit for group {group}"),
        )
    }
}
