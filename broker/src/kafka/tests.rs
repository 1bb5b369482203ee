//! Every served API at every advertised version: a typical request is answered and
//! the answer encodes. (kafka-protocol refuses to encode a field set to a non-default
//! value in a version that lacks it; this catches such answers before a client does.)

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;

use super::{KafkaBroker, KafkaMetrics, KafkaSettings};
use crate::storage::{Log, LogOptions, TopicConfig};
use weir_wire::kafka_codec::{Request, SUPPORTED_APIS, encode_response};
use weir_wire::record_batch::build::{NewRecord, batch};

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn request(api: ApiKey, version: i16) -> RequestKind {
    let topic = || TopicName(s("t"));
    match api {
        ApiKey::ApiVersions => RequestKind::ApiVersions(ApiVersionsRequest::default()),
        ApiKey::Metadata => {
            let mut t = metadata_request::MetadataRequestTopic::default();
            t.name = Some(topic());
            let mut r = MetadataRequest::default();
            r.topics = Some(vec![t]);
            RequestKind::Metadata(r)
        }
        ApiKey::Produce => {
            let records = batch(
                &[NewRecord {
                    key: None,
                    value: Some(Bytes::from_static(b"v")),
                    timestamp_ms: 5,
                    ..Default::default()
                }],
                Compression::None,
            )
            .unwrap();
            let mut p = produce_request::PartitionProduceData::default();
            p.records = Some(records);
            let mut t = produce_request::TopicProduceData::default();
            t.name = topic();
            t.partition_data = vec![p];
            let mut r = ProduceRequest::default();
            r.acks = -1;
            r.topic_data = vec![t];
            RequestKind::Produce(r)
        }
        ApiKey::Fetch => {
            let mut p = fetch_request::FetchPartition::default();
            p.partition_max_bytes = 1 << 20;
            let mut t = fetch_request::FetchTopic::default();
            t.topic = topic();
            t.partitions = vec![p];
            let mut r = FetchRequest::default();
            r.max_bytes = 1 << 20;
            r.topics = vec![t];
            RequestKind::Fetch(r)
        }
        ApiKey::ListOffsets => {
            let mut t = list_offsets_request::ListOffsetsTopic::default();
            t.name = topic();
            t.partitions = [-1, -2, 0]
                .into_iter()
                .map(|ts| {
                    let mut p = list_offsets_request::ListOffsetsPartition::default();
                    p.timestamp = ts;
                    p
                })
                .collect();
            let mut r = ListOffsetsRequest::default();
            r.topics = vec![t];
            RequestKind::ListOffsets(r)
        }
        ApiKey::OffsetCommit => {
            let mut p = offset_commit_request::OffsetCommitRequestPartition::default();
            p.committed_offset = 1;
            let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
            t.name = topic();
            t.partitions = vec![p];
            let mut r = OffsetCommitRequest::default();
            r.group_id = GroupId(s("g"));
            r.generation_id_or_member_epoch = -1;
            r.topics = vec![t];
            RequestKind::OffsetCommit(r)
        }
        ApiKey::OffsetFetch => {
            let mut r = OffsetFetchRequest::default();
            r.group_id = GroupId(s("g"));
            r.topics = None;
            RequestKind::OffsetFetch(r)
        }
        ApiKey::FindCoordinator => {
            let mut r = FindCoordinatorRequest::default();
            r.key = s("g");
            RequestKind::FindCoordinator(r)
        }
        ApiKey::JoinGroup => {
            let mut p = join_group_request::JoinGroupRequestProtocol::default();
            p.name = s("range");
            let mut r = JoinGroupRequest::default();
            r.group_id = GroupId(s(&format!("join-{version}")));
            r.session_timeout_ms = 10_000;
            r.rebalance_timeout_ms = 10_000;
            r.protocol_type = s("consumer");
            r.protocols = vec![p];
            RequestKind::JoinGroup(r)
        }
        ApiKey::SyncGroup => {
            let mut r = SyncGroupRequest::default();
            r.group_id = GroupId(s("g"));
            r.member_id = s("nobody");
            RequestKind::SyncGroup(r)
        }
        ApiKey::Heartbeat => {
            let mut r = HeartbeatRequest::default();
            r.group_id = GroupId(s("g"));
            RequestKind::Heartbeat(r)
        }
        ApiKey::LeaveGroup => {
            let mut r = LeaveGroupRequest::default();
            r.group_id = GroupId(s("g"));
            if version >= 3 {
                let mut m = leave_group_request::MemberIdentity::default();
                m.member_id = s("nobody");
                r.members = vec![m];
            } else {
                r.member_id = s("nobody");
            }
            RequestKind::LeaveGroup(r)
        }
        ApiKey::DescribeGroups => {
            let mut r = DescribeGroupsRequest::default();
            r.groups = vec![GroupId(s("g")), GroupId(s("none"))];
            RequestKind::DescribeGroups(r)
        }
        ApiKey::ListGroups => RequestKind::ListGroups(ListGroupsRequest::default()),
        ApiKey::CreateTopics => {
            let mut t = create_topics_request::CreatableTopic::default();
            t.name = TopicName(s(&format!("new-{version}")));
            t.num_partitions = 2;
            t.replication_factor = 1;
            let mut r = CreateTopicsRequest::default();
            r.topics = vec![t];
            RequestKind::CreateTopics(r)
        }
        ApiKey::DeleteTopics => {
            let mut r = DeleteTopicsRequest::default();
            r.topic_names = vec![
                TopicName(s(&format!("new-{version}"))),
                TopicName(s("nope")),
            ];
            RequestKind::DeleteTopics(r)
        }
        ApiKey::InitProducerId => RequestKind::InitProducerId(InitProducerIdRequest::default()),
        ApiKey::OffsetForLeaderEpoch => {
            let mut p = offset_for_leader_epoch_request::OffsetForLeaderPartition::default();
            p.leader_epoch = 0;
            let mut t = offset_for_leader_epoch_request::OffsetForLeaderTopic::default();
            t.topic = topic();
            t.partitions = vec![p];
            let mut r = OffsetForLeaderEpochRequest::default();
            r.topics = vec![t];
            RequestKind::OffsetForLeaderEpoch(r)
        }
        ApiKey::DescribeConfigs => {
            let mut res = describe_configs_request::DescribeConfigsResource::default();
            res.resource_type = 2;
            res.resource_name = s("t");
            let mut r = DescribeConfigsRequest::default();
            r.resources = vec![res];
            RequestKind::DescribeConfigs(r)
        }
        ApiKey::SaslHandshake => {
            let mut r = kafka_protocol::messages::SaslHandshakeRequest::default();
            r.mechanism = s("PLAIN");
            RequestKind::SaslHandshake(r)
        }
        ApiKey::SaslAuthenticate => RequestKind::SaslAuthenticate(
            kafka_protocol::messages::SaslAuthenticateRequest::default(),
        ),
        // A transactional id nobody initialized: answered with an error, encoded.
        ApiKey::AddPartitionsToTxn => {
            let mut t = add_partitions_to_txn_request::AddPartitionsToTxnTopic::default();
            t.name = topic();
            t.partitions = vec![0];
            let mut r = AddPartitionsToTxnRequest::default();
            r.v3_and_below_transactional_id = TransactionalId(s("tx"));
            r.v3_and_below_producer_id = ProducerId(5);
            r.v3_and_below_topics = vec![t];
            RequestKind::AddPartitionsToTxn(r)
        }
        ApiKey::AddOffsetsToTxn => {
            let mut r = AddOffsetsToTxnRequest::default();
            r.transactional_id = TransactionalId(s("tx"));
            r.group_id = GroupId(s("g"));
            RequestKind::AddOffsetsToTxn(r)
        }
        ApiKey::TxnOffsetCommit => {
            let mut p = txn_offset_commit_request::TxnOffsetCommitRequestPartition::default();
            p.committed_offset = 1;
            let mut t = txn_offset_commit_request::TxnOffsetCommitRequestTopic::default();
            t.name = topic();
            t.partitions = vec![p];
            let mut r = TxnOffsetCommitRequest::default();
            r.transactional_id = TransactionalId(s("tx"));
            r.group_id = GroupId(s("g"));
            r.topics = vec![t];
            RequestKind::TxnOffsetCommit(r)
        }
        ApiKey::EndTxn => {
            let mut r = EndTxnRequest::default();
            r.transactional_id = TransactionalId(s("tx"));
            r.committed = true;
            RequestKind::EndTxn(r)
        }
        ApiKey::DescribeTransactions => {
            let mut r = DescribeTransactionsRequest::default();
            r.transactional_ids = vec![TransactionalId(s("tx"))];
            RequestKind::DescribeTransactions(r)
        }
        ApiKey::ListTransactions => {
            let mut r = ListTransactionsRequest::default();
            r.duration_filter = -1;
            RequestKind::ListTransactions(r)
        }
        other => panic!("no sample request for {other:?}"),
    }
}

/// A broker on a fresh log with topic `t`, and a client of it.
async fn broker_on(dir: &std::path::Path) -> (Log, std::sync::Arc<KafkaBroker>, super::Client) {
    let log = Log::open(LogOptions::new(dir)).unwrap();
    log.create_topic("t", 1, TopicConfig::default())
        .await
        .unwrap();
    let settings = KafkaSettings {
        advertised_host: "127.0.0.1".into(),
        advertised_port: 9092,
        advertised_tls_port: None,
        auto_create_topics: true,
        default_partitions: 1,
        topic_defaults: TopicConfig::default(),
    };
    let users = crate::auth::Users::load(log.clone(), Default::default()).unwrap();
    let gate = crate::auth::Gate::new(
        std::sync::Arc::new(users),
        crate::auth::Anonymous::All,
        Default::default(),
        Default::default(),
    );
    let broker = KafkaBroker::new(
        log.clone(),
        settings,
        KafkaMetrics::default(),
        std::sync::Arc::new(gate),
    )
    .unwrap();
    let client = super::Client {
        host: "127.0.0.1".into(),
        tls: false,
        principal: Default::default(),
    };
    (log, broker, client)
}

fn request_of(api: ApiKey, version: i16, body: RequestKind) -> Request {
    let mut header = RequestHeader::default();
    header.request_api_key = api as i16;
    header.request_api_version = version;
    header.correlation_id = 1;
    Request { api, header, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_and_list_transactions_show_ids_their_producers_and_states() {
    let dir = tempfile::tempdir().unwrap();
    let (log, broker, client) = broker_on(dir.path()).await;
    let mut init = InitProducerIdRequest::default();
    init.transactional_id = Some(TransactionalId(s("etl")));
    init.transaction_timeout_ms = 60_000;
    let Some(ResponseKind::InitProducerId(got)) = broker
        .handle(
            request_of(ApiKey::InitProducerId, 4, RequestKind::InitProducerId(init)),
            &client,
        )
        .await
    else {
        panic!("no InitProducerId response")
    };
    assert_eq!(got.error_code, 0);
    let mut describe = DescribeTransactionsRequest::default();
    describe.transactional_ids = vec![TransactionalId(s("etl")), TransactionalId(s("nobody"))];
    let body = RequestKind::DescribeTransactions(describe);
    let Some(ResponseKind::DescribeTransactions(d)) = broker
        .handle(request_of(ApiKey::DescribeTransactions, 0, body), &client)
        .await
    else {
        panic!("no DescribeTransactions response")
    };
    let (etl, nobody) = (&d.transaction_states[0], &d.transaction_states[1]);
    assert_eq!(
        (etl.error_code, etl.transaction_state.as_str()),
        (0, "Empty")
    );
    assert_eq!(
        (etl.producer_id, etl.producer_epoch),
        (got.producer_id, got.producer_epoch)
    );
    assert_eq!(etl.transaction_timeout_ms, 60_000);
    assert_eq!(
        nobody.error_code,
        kafka_protocol::error::ResponseError::TransactionalIdNotFound.code()
    );
    let mut list = ListTransactionsRequest::default();
    list.state_filters = vec![s("Empty"), s("Bogus")];
    list.duration_filter = -1;
    let body = RequestKind::ListTransactions(list);
    let Some(ResponseKind::ListTransactions(l)) = broker
        .handle(request_of(ApiKey::ListTransactions, 1, body), &client)
        .await
    else {
        panic!("no ListTransactions response")
    };
    assert_eq!(l.unknown_state_filters, vec![s("Bogus")]);
    assert_eq!(l.transaction_states.len(), 1);
    assert_eq!(l.transaction_states[0].transactional_id.0.as_str(), "etl");
    let mut ongoing = ListTransactionsRequest::default();
    ongoing.state_filters = vec![s("Ongoing")];
    let body = RequestKind::ListTransactions(ongoing);
    let Some(ResponseKind::ListTransactions(l)) = broker
        .handle(request_of(ApiKey::ListTransactions, 0, body), &client)
        .await
    else {
        panic!("no ListTransactions response")
    };
    assert!(l.transaction_states.is_empty());
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_and_version_answers_and_encodes() {
    let dir = tempfile::tempdir().unwrap();
    let (log, broker, client) = broker_on(dir.path()).await;
    for &(api, min, max) in SUPPORTED_APIS {
        for version in min..=max {
            let req = request_of(api, version, request(api, version));
            let response = broker.handle(req, &client).await.expect("a response");
            if let Err(e) = encode_response(api, version, 1, &response) {
                panic!("{api:?} v{version}: {e}\n{response:?}");
            }
        }
    }
    log.close().await.unwrap();
}
