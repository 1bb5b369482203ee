//! Idempotent producers: producer ids, epochs, and per-partition sequence checks, so
//! that a client's retries never duplicate a batch, across broker restarts too.
//!
//! Each (producer id, topic, partition) has a state stored in the log's `state` table
//! and written in the same atomic write as the batch it accepts: after a crash the
//! state and the log agree.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::storage::{Log, StorageError, WriteOp, put_state_op};
use weir_wire::record_batch::RecordBatch;

const NAMESPACE: &str = "kafka.producer";
const ID_KEY: &str = "next_producer_id";
/// Batches remembered per partition for duplicate detection (Kafka's in-flight limit).
const RECENT: usize = 5;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SequenceState {
    epoch: i16,
    last_sequence: i32,
    /// (first sequence, last sequence, base offset) of the last batches accepted.
    recent: VecDeque<(i32, i32, u64)>,
}

/// What to do with a batch from an idempotent producer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Append it, then store this state with it.
    Append(SequenceState),
    /// Already stored at this base offset: answer success without appending.
    Duplicate(u64),
    OutOfOrder {
        expected: i32,
        got: i32,
    },
    FencedEpoch {
        current: i16,
        got: i16,
    },
}

impl SequenceState {
    /// Checks `batch` against this state (`None`: never seen).
    pub(super) fn check(state: Option<&SequenceState>, batch: &RecordBatch) -> Verdict {
        let (epoch, first) = (
            batch.header().producer_epoch(),
            batch.header().base_sequence(),
        );
        let last = first.wrapping_add(batch.record_count() - 1);
        let fresh = |recent| {
            Verdict::Append(SequenceState {
                epoch,
                last_sequence: last,
                recent,
            })
        };
        // A producer new to this partition, or on a new epoch, starts at sequence 0.
        let starting = |first: i32| {
            if first == 0 {
                fresh(VecDeque::new())
            } else {
                Verdict::OutOfOrder {
                    expected: 0,
                    got: first,
                }
            }
        };
        let Some(state) = state else {
            return starting(first);
        };
        if epoch < state.epoch {
            return Verdict::FencedEpoch {
                current: state.epoch,
                got: epoch,
            };
        }
        if epoch > state.epoch {
            return starting(first);
        }
        if let Some(&(_, _, base)) = state
            .recent
            .iter()
            .find(|(f, l, _)| *f == first && *l == last)
        {
            return Verdict::Duplicate(base);
        }
        let expected = if state.last_sequence == i32::MAX {
            0
        } else {
            state.last_sequence + 1
        };
        if first != expected {
            return Verdict::OutOfOrder {
                expected,
                got: first,
            };
        }
        fresh(state.recent.clone())
    }

    /// The same state with the last accepted batch's base offset replaced.
    pub(super) fn with_last_base(mut self, base_offset: u64) -> Self {
        if let Some(last) = self.recent.back_mut() {
            last.2 = base_offset;
        }
        self
    }

    /// This state after the batch it accepted was stored at `base_offset`.
    pub(super) fn accepted(mut self, batch: &RecordBatch, base_offset: u64) -> Self {
        let first = batch.header().base_sequence();
        self.recent
            .push_back((first, self.last_sequence, base_offset));
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        self
    }
}

fn key(producer_id: i64, topic: &str, partition: u32) -> String {
    format!("{producer_id}/{topic}/{partition}")
}

/// Sequence states, cached in memory over the log's `state` table.
pub(super) struct Producers {
    log: Log,
    states: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<SequenceState>>>>>,
    ids: tokio::sync::Mutex<()>,
}

/// An exclusive hold on one (producer, partition) state, for check-then-append.
pub(super) struct Slot {
    key: String,
    guard: tokio::sync::OwnedMutexGuard<Option<SequenceState>>,
}

impl Slot {
    pub(super) fn state(&self) -> Option<&SequenceState> {
        self.guard.as_ref()
    }

    /// The op that stores `state` with the batch; call `set` after it committed.
    pub(super) fn write_op(&self, state: &SequenceState) -> WriteOp {
        put_state_op(NAMESPACE, &self.key, state)
    }

    pub(super) fn set(&mut self, state: SequenceState) {
        *self.guard = Some(state);
    }
}

impl Producers {
    pub(super) fn new(log: Log) -> Self {
        Self {
            log,
            states: Mutex::new(HashMap::new()),
            ids: tokio::sync::Mutex::new(()),
        }
    }

    /// Locks the state of (producer, topic, partition), loading it from the log first.
    pub(super) async fn slot(
        &self,
        producer_id: i64,
        topic: &str,
        partition: u32,
    ) -> Result<Slot, StorageError> {
        let key = key(producer_id, topic, partition);
        let cell = self.states.lock().entry(key.clone()).or_default().clone();
        let mut guard = cell.lock_owned().await;
        if guard.is_none() {
            let stored = key.clone();
            *guard = self
                .log
                .blocking(move |log| log.get_state::<SequenceState>(NAMESPACE, &stored))
                .await?;
        }
        Ok(Slot { key, guard })
    }

    /// A new producer id, durable before it is handed out.
    pub(super) async fn new_id(&self) -> Result<i64, StorageError> {
        let _one_at_a_time = self.ids.lock().await;
        let stored = self.log.blocking(|log| log.get_state(NAMESPACE, ID_KEY));
        let next: i64 = stored.await?.unwrap_or(1000);
        self.log
            .put_state(NAMESPACE, ID_KEY, &(next + 1))
            .await
            .map_err(|e| match e {
                crate::storage::WriteError::Storage(s) => s,
                other => StorageError::Corrupt {
                    table: "state",
                    detail: other.to_string(),
                },
            })?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::records::Compression;

    fn batch(epoch: i16, first: i32, count: usize) -> RecordBatch {
        let records: Vec<_> = (0..count)
            .map(|_| weir_wire::record_batch::build::NewRecord {
                key: None,
                value: Some(Bytes::from_static(b"v")),
                timestamp_ms: 0,
                ..Default::default()
            })
            .collect();
        let bytes = weir_wire::record_batch::build::batch(&records, Compression::None).unwrap();
        // Stamp producer id, epoch and base sequence; they are covered by the CRC.
        let mut b = BytesMut::from(&bytes[..]);
        b[43..51].copy_from_slice(&7i64.to_be_bytes());
        b[51..53].copy_from_slice(&epoch.to_be_bytes());
        b[53..57].copy_from_slice(&first.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        RecordBatch::parse(b.freeze()).unwrap()
    }

    #[test]
    fn sequences_duplicates_and_epochs() {
        let b0 = batch(0, 0, 3);
        let Verdict::Append(s) = SequenceState::check(None, &b0) else {
            panic!()
        };
        let s = s.accepted(&b0, 100);
        assert_eq!(SequenceState::check(Some(&s), &b0), Verdict::Duplicate(100));
        assert_eq!(
            SequenceState::check(Some(&s), &batch(0, 4, 1)),
            Verdict::OutOfOrder {
                expected: 3,
                got: 4
            }
        );
        let b1 = batch(0, 3, 2);
        let Verdict::Append(s1) = SequenceState::check(Some(&s), &b1) else {
            panic!()
        };
        let s1 = s1.accepted(&b1, 103);
        assert_eq!(
            SequenceState::check(Some(&s1), &b0),
            Verdict::Duplicate(100)
        );
        assert_eq!(
            SequenceState::check(Some(&s1), &b1),
            Verdict::Duplicate(103)
        );
        // A new epoch starts again at 0; an old one is fenced.
        assert!(matches!(
            SequenceState::check(Some(&s1), &batch(1, 0, 1)),
            Verdict::Append(_)
        ));
        let Verdict::Append(s2) = SequenceState::check(Some(&s1), &batch(1, 0, 1)) else {
            panic!()
        };
        assert_eq!(
            SequenceState::check(Some(&s2), &batch(0, 5, 1)),
            Verdict::FencedEpoch { current: 1, got: 0 }
        );
        assert!(matches!(
            SequenceState::check(None, &batch(0, 9, 1)),
            Verdict::OutOfOrder { .. }
        ));
    }
}
