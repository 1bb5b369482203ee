//! Metadata and topic administration: Metadata (with auto-creation), CreateTopics,
//! DeleteTopics, DescribeConfigs.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::*;

use crate::acl::{Operation, Resource, Subject};
use crate::kafka::Client;
use crate::kafka::KafkaBroker;
use crate::kafka::errors;
use crate::storage::TopicError;

use super::{code, s, topic_name};

impl KafkaBroker {
    pub(super) async fn metadata(
        &self,
        r: MetadataRequest,
        version: i16,
        client: &Client,
        who: Subject<'_>,
    ) -> MetadataResponse {
        let mut out = MetadataResponse::default();
        let mut broker = MetadataResponseBroker::default();
        broker.node_id = BrokerId(0);
        broker.host = s(&self.settings.advertised_host);
        broker.port = self.settings.advertised_port(client.tls);
        out.brokers = vec![broker];
        out.cluster_id = Some(s(&self.cluster_id));
        out.controller_id = BrokerId(0);
        // All topics: those `who` may describe.
        let all = || -> Vec<String> {
            self.log
                .topics()
                .into_iter()
                .map(|t| t.name)
                .filter(|name| self.visible(who, Resource::Topic(name)))
                .collect()
        };
        let names: Vec<String> = match r.topics {
            // v0 used an empty list for "all topics"; later versions use null.
            None => all(),
            Some(t) if t.is_empty() && version == 0 => all(),
            Some(t) => t
                .into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        };
        let allow_create =
            self.settings.auto_create_topics && (version < 4 || r.allow_auto_topic_creation);
        for name in names {
            let mut topic = MetadataResponseTopic::default();
            topic.name = Some(topic_name(&name));
            let info = match self.log.topic(&name) {
                _ if !self.may(who, Operation::Describe, &name) => {
                    Err(ResponseError::TopicAuthorizationFailed)
                }
                Some(info) => Ok(info),
                None if allow_create && self.may(who, Operation::Create, &name) => {
                    self.auto_create(&name).await
                }
                None => Err(ResponseError::UnknownTopicOrPartition),
            };
            match info {
                Ok(info) => {
                    topic.partitions = (0..info.partitions as i32)
                        .map(|p| {
                            let mut part = MetadataResponsePartition::default();
                            part.partition_index = p;
                            part.leader_id = BrokerId(0);
                            part.leader_epoch = 0;
                            part.replica_nodes = vec![BrokerId(0)];
                            part.isr_nodes = vec![BrokerId(0)];
                            part
                        })
                        .collect();
                }
                Err(e) => topic.error_code = code(e),
            }
            out.topics.push(topic);
        }
        out
    }

    /// Creates a topic with the defaults, as Kafka's auto.create.topics.enable does.
    async fn auto_create(&self, name: &str) -> Result<crate::storage::TopicInfo, ResponseError> {
        let defaults = self.settings.topic_defaults.clone();
        match self
            .log
            .create_topic(name, self.settings.default_partitions, defaults)
            .await
        {
            Ok(info) => {
                tracing::info!(topic = %name, partitions = info.partitions, "topic auto-created");
                Ok(info)
            }
            Err(TopicError::AlreadyExists(_)) => self
                .log
                .topic(name)
                .ok_or(ResponseError::UnknownTopicOrPartition),
            Err(e) => Err(errors::topic(&e)),
        }
    }

    pub(super) async fn create_topics(
        &self,
        r: CreateTopicsRequest,
        who: Subject<'_>,
    ) -> CreateTopicsResponse {
        let mut out = CreateTopicsResponse::default();
        for t in r.topics {
            let name = t.name.0.to_string();
            let mut result = CreatableTopicResult::default();
            result.name = t.name.clone();
            let created = if self.may(who, Operation::Create, &name) {
                self.create_topic(&name, &t, r.validate_only).await
            } else {
                Err((
                    ResponseError::TopicAuthorizationFailed,
                    format!("not authorized to create {name}"),
                ))
            };
            match created {
                Ok(info) => {
                    result.num_partitions = info.partitions as i32;
                    result.replication_factor = 1;
                    result.configs = Some(
                        info.config
                            .entries()
                            .into_iter()
                            .map(|(k, v)| {
                                let mut c =
                                    create_topics_response::CreatableTopicConfigs::default();
                                c.name = s(&k);
                                c.value = Some(s(&v));
                                c.config_source = 5; // DEFAULT_CONFIG
                                c
                            })
                            .collect(),
                    );
                }
                Err((e, message)) => {
                    result.error_code = code(e);
                    result.error_message = Some(s(&message));
                    result.num_partitions = -1;
                    result.replication_factor = -1;
                }
            }
            out.topics.push(result);
        }
        out
    }

    pub(super) async fn create_topic(
        &self,
        name: &str,
        t: &CreatableTopic,
        validate_only: bool,
    ) -> Result<crate::storage::TopicInfo, (ResponseError, String)> {
        if t.replication_factor > 1 {
            return Err((
                ResponseError::InvalidReplicationFactor,
                format!(
                    "replication factor {} is more than the 1 broker here",
                    t.replication_factor
                ),
            ));
        }
        if !t.assignments.is_empty() {
            return Err((
                ResponseError::InvalidRequest,
                "manual replica assignment is not supported".into(),
            ));
        }
        let partitions = if t.num_partitions == -1 {
            self.settings.default_partitions as i32
        } else {
            t.num_partitions
        };
        let config = self
            .settings
            .topic_defaults
            .clone()
            .with_overrides(
                t.configs
                    .iter()
                    .filter_map(|c| Some((c.name.as_str(), c.value.as_ref()?.as_str()))),
            )
            .map_err(|e| (ResponseError::InvalidConfig, e.to_string()))?;
        if partitions < 1 {
            return Err((
                ResponseError::InvalidPartitions,
                format!("partition count {partitions} is below 1"),
            ));
        }
        if validate_only {
            crate::storage::TopicName::new(name)
                .map_err(|e| (ResponseError::InvalidTopicException, e.to_string()))?;
            if self.log.topic(name).is_some() {
                return Err((
                    ResponseError::TopicAlreadyExists,
                    format!("topic {name:?} already exists"),
                ));
            }
            return Ok(crate::storage::TopicInfo {
                name: name.to_string(),
                partitions: partitions as u32,
                config,
                created_ms: 0,
            });
        }
        self.log
            .create_topic(name, partitions as u32, config)
            .await
            .map_err(|e| (errors::topic(&e), e.to_string()))
    }

    pub(super) async fn delete_topics(
        &self,
        r: DeleteTopicsRequest,
        who: Subject<'_>,
    ) -> DeleteTopicsResponse {
        let mut out = DeleteTopicsResponse::default();
        for name in r.topic_names {
            let mut result = DeletableTopicResult::default();
            if !self.may(who, Operation::Delete, name.0.as_str()) {
                result.error_code = code(ResponseError::TopicAuthorizationFailed);
                result.error_message = Some(s("not authorized to delete this topic"));
            } else if let Err(e) = self.log.delete_topic(name.0.as_str()).await {
                result.error_code = code(errors::topic(&e));
                result.error_message = Some(s(&e.to_string()));
            }
            result.name = Some(name);
            out.responses.push(result);
        }
        out
    }

    pub(super) fn describe_configs(
        &self,
        r: DescribeConfigsRequest,
        who: Subject<'_>,
    ) -> DescribeConfigsResponse {
        const TOPIC: i8 = 2;
        let defaults = &self.settings.topic_defaults;
        let mut out = DescribeConfigsResponse::default();
        for res in r.resources {
            let mut result = DescribeConfigsResult::default();
            result.resource_type = res.resource_type;
            result.resource_name = res.resource_name.clone();
            // Null or empty: every key.
            let wanted = |k: &str| {
                res.configuration_keys
                    .as_ref()
                    .is_none_or(|keys| keys.is_empty() || keys.iter().any(|w| w.as_str() == k))
            };
            if res.resource_type == TOPIC {
                match self.log.topic(res.resource_name.as_str()) {
                    _ if !self.may(who, Operation::Describe, res.resource_name.as_str()) => {
                        result.error_code = code(ResponseError::TopicAuthorizationFailed);
                        result.error_message = Some(s("not authorized to describe this topic"));
                    }
                    Some(info) => {
                        result.configs = info
                            .config
                            .entries()
                            .into_iter()
                            .filter(|(k, _)| wanted(k))
                            .map(|(k, v)| {
                                let mut c = describe_configs_response::DescribeConfigsResourceResult::default();
                                // DYNAMIC_TOPIC_CONFIG when set on the topic, DEFAULT_CONFIG otherwise.
                                c.config_source = if defaults.get(&k).as_deref() == Some(v.as_str()) { 5 } else { 1 };
                                c.name = s(&k);
                                c.value = Some(s(&v));
                                c
                            })
                            .collect();
                    }
                    None => {
                        result.error_code = code(ResponseError::UnknownTopicOrPartition);
                        result.error_message = Some(s("unknown topic"));
                    }
                }
            }
            // Broker and other resources: no configs to show yet, and no error.
            out.results.push(result);
        }
        out
    }
}
