//! The one mapping from Weir's errors to Kafka error codes.

use kafka_protocol::error::ResponseError;

use crate::storage::{ReadError, StorageError, TopicError, WriteError};

pub(super) fn storage(e: &StorageError) -> ResponseError {
    match e {
        // Retriable: the client backs off and tries again.
        StorageError::Closed => ResponseError::NotLeaderOrFollower,
        _ => ResponseError::KafkaStorageError,
    }
}

pub(super) fn write(e: &WriteError) -> ResponseError {
    match e {
        WriteError::NotFound(_) => ResponseError::UnknownTopicOrPartition,
        WriteError::InvalidBatch(_) => ResponseError::CorruptMessage,
        WriteError::MessageTooLarge { .. } => ResponseError::MessageTooLarge,
        WriteError::KeylessRecord(_) => ResponseError::InvalidRecord,
        WriteError::Undecodable(_) => ResponseError::CorruptMessage,
        WriteError::Storage(s) => storage(s),
    }
}

pub(super) fn read(e: &ReadError) -> ResponseError {
    match e {
        ReadError::NotFound(_) => ResponseError::UnknownTopicOrPartition,
        ReadError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        ReadError::Storage(s) => storage(s),
    }
}

pub(super) fn topic(e: &TopicError) -> ResponseError {
    match e {
        TopicError::InvalidName(_) | TopicError::Collides { .. } => {
            ResponseError::InvalidTopicException
        }
        TopicError::InvalidConfig(_) => ResponseError::InvalidConfig,
        TopicError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        TopicError::AlreadyExists(_) => ResponseError::TopicAlreadyExists,
        TopicError::NotFound(_) => ResponseError::UnknownTopicOrPartition,
        TopicError::Storage(s) => storage(s),
    }
}
