//! Why replication failed: one error type for the uplink, the downlink and their
//! client, so that a rule's status, a log line and the retry all read the same value.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::storage::{ReadError, StorageError, TopicError, WriteError};

/// A session of a rule ends with one of these; it starts again after a backoff, and
/// the rule's status shows it (`last_error`).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A librdkafka client could not be made (a setting it refuses).
    #[error("cannot create the {what}: {source}")]
    Client {
        what: &'static str,
        source: KafkaError,
    },
    /// A request to the centre failed.
    #[error("{what}: {source}")]
    Upstream { what: String, source: KafkaError },
    #[error("cannot create {topic} upstream: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {0} does not exist upstream")]
    NoUpstreamTopic(String),
    #[error("reading {topic} back: nothing for {stall:?}")]
    ReadBackStalled { topic: String, stall: Duration },
    /// The producer failed for good: a new one sends again from the cursors.
    #[error("the upstream producer failed: {0}")]
    Producer(String),
    #[error("topic {0} does not exist")]
    NoLocalTopic(String),
    /// The local topic a rule writes to could not be made.
    #[error(transparent)]
    LocalTopic(TopicError),
    /// More source partitions than a delivery token can tell apart.
    #[error("the rule's topics have {0} partitions; a rule may have at most 65,536")]
    TooManyPartitions(usize),
    /// A blocking librdkafka call on the blocking pool did not finish.
    #[error("a librdkafka call did not finish: {0}")]
    Thread(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ReplicationError {
    /// Wraps a failed request to the centre, saying what it was.
    pub fn upstream(what: impl Into<String>) -> impl FnOnce(KafkaError) -> Self {
        let what = what.into();
        move |source| Self::Upstream { what, source }
    }
}
