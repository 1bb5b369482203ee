//! The durable, partitioned, offset-addressed log, in one redb file.
//!
//! Every write (appends, topic changes, committed offsets, state, retention) goes
//! through one writer thread that gathers whatever is queued into a single write
//! transaction (group commit) and answers each caller only after that transaction
//! committed. Reads open their own read transactions and never wait for the writer.
//! This is the only module that opens redb transactions.

mod compaction;
mod journal;
mod tables;
pub mod topic;
pub mod txn;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::StorageMetrics;
pub use compaction::{Applied as CompactionApplied, Compaction, NextLook};
use tables::{
    BATCHES, GROUP_OFFSETS, PARTITIONS, PartitionRow, STATE, TIME_INDEX, TopicId, split_stored,
};
pub use topic::{
    CleanupPolicy, CompressionType, InvalidTopicConfig, InvalidTopicName, MAX_PARTITIONS,
    TopicConfig, TopicName,
};
use weir_wire::record_batch::BatchHeader;
use weir_wire::record_batch::build::{NewRecord, size_bound};
use weir_wire::record_batch::{BatchError, RecordBatch};
use writer::{Caller, Command, DbSlot};

/// The database file inside the data directory.
pub const DB_FILE: &str = "weir.redb";
/// The write-ahead journal beside it (`journal.rs`).
pub const JOURNAL_FILE: &str = "weir.journal";

/// How the log is opened.
#[derive(Clone, Debug)]
pub struct LogOptions {
    pub data_dir: PathBuf,
    /// fsync every commit (redb `Durability::Immediate`). When false, commits use
    /// `Durability::None`, a durable commit runs every `flush_interval`, and a crash of
    /// the process or the machine loses what was acknowledged since the last one
    /// (redb keeps non-durable commits in memory, unlike a page-cache write).
    pub fsync: bool,
    pub flush_interval: Duration,
    /// The durability window: with `fsync`, a group commit gathers for up to this long
    /// after its first command before it commits (and answers). Zero: commit at once.
    pub commit_interval: Duration,
    /// A group commit stops gathering once it holds this many bytes of batches.
    pub max_group_bytes: usize,
    /// With `fsync`: small groups become durable in the journal, and a durable redb
    /// commit (a checkpoint) runs at most this long after the first of them. Zero: no
    /// journal, every group commits durably.
    pub checkpoint_interval: Duration,
    /// redb page cache size.
    pub cache_bytes: usize,
    /// Test-only: answer appends before their transaction commits, and commit without
    /// durability, as a broker that acknowledges from memory does. Exists so that the
    /// crash test can show it catches such a broker. Never set it otherwise.
    #[doc(hidden)]
    pub unsafe_ack_before_commit: bool,
    /// Test-only: opens the database on a backend of the caller's choosing instead of
    /// `data_dir/weir.redb` (the power-cut test's simulated disk). Never set it otherwise.
    #[doc(hidden)]
    pub open_backend: Option<OpenBackend>,
}

/// Makes the [`redb::StorageBackend`] the database opens on (test-only).
#[doc(hidden)]
#[derive(Clone)]
pub struct OpenBackend(pub Arc<BackendFn>);

#[doc(hidden)]
/// Called with the file's name: `DB_FILE` or `JOURNAL_FILE`.
pub type BackendFn = dyn Fn(&str) -> Box<dyn redb::StorageBackend> + Send + Sync;

impl std::fmt::Debug for OpenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenBackend(..)")
    }
}

impl LogOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            fsync: true,
            flush_interval: Duration::from_secs(1),
            commit_interval: Duration::ZERO,
            max_group_bytes: 8 << 20,
            checkpoint_interval: Duration::ZERO,
            cache_bytes: 64 << 20,
            unsafe_ack_before_commit: false,
            open_backend: None,
        }
    }

    /// Whether acknowledgements wait for durable commits: with fsync, unless the
    /// test-only early acknowledgement is set.
    pub(crate) fn acks_wait_for_durability(&self) -> bool {
        self.fsync && !self.unsafe_ack_before_commit
    }
}

/// A partition's bounds as of the latest commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffsets {
    /// First offset still stored (Kafka's log start offset).
    pub log_start: u64,
    /// Offset the next appended record gets (Kafka's high watermark / log end offset;
    /// with one replica they are the same).
    pub high_watermark: u64,
}

/// What an append got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Offset of the first record appended.
    pub base_offset: u64,
    /// Offset of the last record appended.
    pub last_offset: u64,
    pub log_start: u64,
    pub append_time_ms: i64,
}

/// Whole stored batches, starting with the one that holds the requested offset.
#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Slices of `records`, one per batch.
    pub batches: Vec<RecordBatch>,
    /// The batches back to back, as a Fetch returns them: one copy out of the database.
    pub records: Bytes,
    pub offsets: PartitionOffsets,
}

impl ReadResult {
    pub fn bytes(&self) -> usize {
        self.records.len()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    pub config: TopicConfig,
    pub created_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub log_start: u64,
    pub high_watermark: u64,
    pub bytes: u64,
    pub batches: u64,
}

/// A consumer group's committed position in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_time_ms: i64,
}

/// Batches removed from one partition by one retention run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionDeletion {
    pub topic: String,
    pub partition: u32,
    /// Offsets `from..to` are gone; `to` is the new log start offset.
    pub from: u64,
    pub to: u64,
    pub bytes: u64,
}

/// One change in an atomic write. All ops of one `Log::write` commit together or not at all.
/// Serialized only into the journal (`journal.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WriteOp {
    Append {
        topic: String,
        partition: u32,
        batches: Vec<RecordBatch>,
    },
    /// Records Weir made itself (MQTT ingest, pipelines, downlinks). The writer encodes
    /// the records a commit window gathered for one partition as one batch, so that a
    /// window's thousand one-record messages cost one batch header and one B-tree entry.
    AppendRecords {
        topic: String,
        partition: u32,
        records: Vec<NewRecord>,
    },
    CommitOffset {
        group: String,
        topic: String,
        partition: u32,
        offset: CommittedOffset,
    },
    DeleteGroupOffsets {
        group: String,
    },
    /// `None` deletes the key.
    PutState {
        namespace: String,
        key: String,
        value: Option<Vec<u8>>,
    },
}

/// Records for one write, gathered per partition: each partition's become one
/// [`WriteOp::AppendRecords`], in the order they were added.
#[derive(Debug, Default)]
pub struct Appends(Vec<(String, u32, Vec<NewRecord>)>);

impl Appends {
    pub fn add(&mut self, topic: &str, partition: u32, record: NewRecord) {
        // A write touches a few partitions: a scan beats a map.
        match self
            .0
            .iter_mut()
            .find(|(t, p, _)| t == topic && *p == partition)
        {
            Some((_, _, records)) => records.push(record),
            None => self.0.push((topic.to_string(), partition, vec![record])),
        }
    }

    pub fn into_ops(self) -> impl Iterator<Item = WriteOp> {
        self.0
            .into_iter()
            .map(|(topic, partition, records)| WriteOp::AppendRecords {
                topic,
                partition,
                records,
            })
    }
}

impl WriteOp {
    fn payload_bytes(&self) -> usize {
        match self {
            WriteOp::Append { batches, .. } => batches.iter().map(RecordBatch::len).sum(),
            WriteOp::AppendRecords { records, .. } => records.iter().map(size_bound).sum(),
            WriteOp::PutState { value, .. } => value.as_ref().map_or(0, Vec::len),
            _ => 0,
        }
    }
}

/// A submitted write: resolves once its transaction committed (or failed).
#[must_use = "a write is only known to be durable once this resolves"]
pub struct PendingWrite(oneshot::Receiver<Result<Vec<WriteOutcome>, WriteError>>);

impl std::future::Future for PendingWrite {
    type Output = Result<Vec<WriteOutcome>, WriteError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(WriteError::Storage(StorageError::Closed))))
    }
}

/// The result of each op, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Appended(AppendOutcome),
    Done,
}

/// Failures of the database itself. Cloneable because one failed group commit
/// answers every request in the group.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Database(Arc<redb::Error>),
    #[error("data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    #[error(
        "the database is format version {found}, and this build reads version {expected} \
         only: run the Weir release that wrote it to read its data out (weir consume), then \
         start this one on an empty data_dir"
    )]
    FormatVersion { found: u64, expected: u64 },
    #[error("corrupt {table} entry: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("journal {path}: {error}")]
    Journal {
        path: PathBuf,
        error: Arc<std::io::Error>,
    },
    #[error(
        "disk full: {available} bytes free in the data directory, {needed} needed to resume writing"
    )]
    DiskFull { available: u64, needed: u64 },
    #[error("the log is closed")]
    Closed,
}

impl StorageError {
    /// True when the write failed because the disk (or its quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Database(e) => match e.as_ref() {
                redb::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
                redb::Error::Backend(b) => io_error_in(b.as_ref())
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull),
                _ => false,
            },
            StorageError::DiskFull { .. } => true,
            StorageError::Journal { error, .. } => error.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    /// True when the database must be reopened before the next write.
    fn is_io(&self) -> bool {
        matches!(self, StorageError::Journal { .. })
            || matches!(self, StorageError::Database(e)
            if matches!(e.as_ref(), redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::Backend(_)))
    }
}

/// The I/O error `error` is or was caused by, if any.
fn io_error_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        next = e.source();
    }
    None
}

impl<E: Into<redb::Error>> From<E> for StorageError {
    fn from(e: E) -> Self {
        StorageError::Database(Arc::new(e.into()))
    }
}

/// A topic or partition that does not exist, for a write or a read alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotFound {
    #[error("unknown topic {0:?}")]
    Topic(String),
    #[error("topic {topic:?} has {partitions} partitions; partition {partition} does not exist")]
    Partition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
}

impl NotFound {
    /// `partition` of `topic`, which has `partitions`, or the error naming all three.
    pub fn check(topic: &str, partition: u32, partitions: u32) -> Result<(), NotFound> {
        if partition < partitions {
            Ok(())
        } else {
            Err(NotFound::Partition {
                topic: topic.to_string(),
                partition,
                partitions,
            })
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    NotFound(#[from] NotFound),
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("record batch of {size} bytes exceeds max.message.bytes={max}")]
    MessageTooLarge { size: usize, max: u32 },
    #[error("topic {0:?} is compacted (cleanup.policy): every record needs a key")]
    KeylessRecord(String),
    #[error("record batch cannot be decoded: {0}")]
    Undecodable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl WriteError {
    /// True when the write failed because the disk (or its quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, WriteError::Storage(e) if e.is_disk_full())
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    NotFound(#[from] NotFound),
    #[error("offset {offset} is outside {}..={}", offsets.log_start, offsets.high_watermark)]
    OffsetOutOfRange {
        offset: u64,
        offsets: PartitionOffsets,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum TopicError {
    #[error(transparent)]
    InvalidName(#[from] InvalidTopicName),
    #[error(transparent)]
    InvalidConfig(#[from] InvalidTopicConfig),
    #[error("partition count {0} is invalid: it must be between 1 and {MAX_PARTITIONS}")]
    InvalidPartitions(u32),
    #[error("topic {0:?} already exists")]
    AlreadyExists(String),
    #[error(
        "topic {name:?} collides with existing topic {existing:?} ('.' and '_' are treated alike)"
    )]
    Collides { name: String, existing: String },
    #[error("unknown topic {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Handle to the log. Cheap to clone; every clone talks to the same writer thread.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

/// What readers and the writer share.
struct Shared {
    db: DbSlot,
    catalog: RwLock<Catalog>,
    metrics: StorageMetrics,
    /// Signalled by the writer thread after the database is closed.
    closed: parking_lot::Mutex<Option<oneshot::Receiver<()>>>,
    /// When the writer began the commit it is in (ms since the epoch), 0 between
    /// commits: a commit that never ends is a stuck disk (the service watchdog).
    committing_since_ms: std::sync::atomic::AtomicI64,
    /// Kafka transactions' last stable offsets and aborted transactions.
    txns: txn::TxnIndex,
}

/// Published view of the topics, updated by the writer only after a commit.
#[derive(Default)]
struct Catalog {
    topics: HashMap<String, Arc<TopicHandle>>,
}

struct TopicHandle {
    id: TopicId,
    info: TopicInfo,
    /// One per partition; carries the committed offsets and wakes waiting readers.
    offsets: Vec<watch::Sender<PartitionOffsets>>,
}

impl Log {
    /// Opens (or creates) the database under `options.data_dir` and starts the writer.
    /// Blocking: an unclean previous shutdown makes redb repair the file first.
    pub fn open(options: LogOptions) -> Result<Log, StorageError> {
        Self::open_with_metrics(options, StorageMetrics::default())
    }

    pub fn open_with_metrics(
        options: LogOptions,
        metrics: StorageMetrics,
    ) -> Result<Log, StorageError> {
        std::fs::create_dir_all(&options.data_dir).map_err(|e| StorageError::DataDir {
            path: options.data_dir.clone(),
            message: e.to_string(),
        })?;
        let (commands, rx) = mpsc::channel(4096);
        let (closed_tx, closed_rx) = oneshot::channel();
        let (db, state) = writer::open_database(&options)?;
        let shared = Arc::new(Shared {
            db: DbSlot::new(db),
            catalog: RwLock::new(Catalog::default()),
            metrics,
            closed: parking_lot::Mutex::new(Some(closed_rx)),
            committing_since_ms: std::sync::atomic::AtomicI64::new(0),
            txns: txn::TxnIndex::default(),
        });
        writer::Writer::start(shared.clone(), options, state, rx, closed_tx)?;
        Ok(Log { shared, commands })
    }

    /// Whether the writer thread is running and no commit has taken longer than `stall`
    /// so far: what the service watchdog is fed from.
    pub fn writer_healthy(&self, stall: Duration) -> bool {
        let since = self
            .shared
            .committing_since_ms
            .load(std::sync::atomic::Ordering::Acquire);
        !self.commands.is_closed()
            && (since == 0 || now_ms().saturating_sub(since) < stall.as_millis() as i64)
    }

    pub fn metrics(&self) -> &StorageMetrics {
        &self.shared.metrics
    }

    /// Path of the database file for a data directory.
    pub fn db_path(data_dir: &Path) -> PathBuf {
        data_dir.join(DB_FILE)
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)
    }

    /// Appends a produce request's record set (one or more v2 batches) to a partition.
    /// Returns once the batches are durable (with `fsync`), with the offsets assigned.
    pub async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
    ) -> Result<AppendOutcome, WriteError> {
        let batches = RecordBatch::parse_all(records).inspect_err(|_| {
            self.shared.metrics.invalid_batches.inc();
        })?;
        self.check_keys(topic, partition, &batches)?;
        let op = WriteOp::Append {
            topic: topic.to_string(),
            partition,
            batches,
        };
        match self.write(vec![op]).await?.pop() {
            Some(WriteOutcome::Appended(outcome)) => Ok(outcome),
            _ => unreachable!("an append op yields an Appended outcome"),
        }
    }

    /// A compacted topic refuses records without a key, as Kafka does: compaction
    /// could keep none of them. Decodes the batches, so only for such topics.
    pub fn check_keys(
        &self,
        topic: &str,
        partition: u32,
        batches: &[RecordBatch],
    ) -> Result<(), WriteError> {
        let compacted = self
            .shared
            .catalog
            .read()
            .topics
            .get(topic)
            .is_some_and(|t| t.info.config.cleanup_policy.compacts());
        if !compacted {
            return Ok(());
        }
        for batch in batches.iter().filter(|b| !b.header().is_control()) {
            let records = decode_stored(batch.clone(), topic, partition)
                .map_err(|e| WriteError::Undecodable(e.to_string()))?;
            if records.iter().any(|r| r.key.is_none()) {
                self.shared.metrics.refused_writes.inc();
                return Err(WriteError::KeylessRecord(topic.to_string()));
            }
        }
        Ok(())
    }

    /// Commits `ops` atomically in the next group commit.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, WriteError> {
        self.submit(ops).await?.await
    }

    /// Queues `ops` for the next group commit and returns a future of their outcome.
    /// Writes are applied in the order `submit` returned, so a caller that submits
    /// several writes before awaiting any keeps their order (pipelined produce).
    pub async fn submit(&self, ops: Vec<WriteOp>) -> Result<PendingWrite, WriteError> {
        let bytes = ops.iter().map(WriteOp::payload_bytes).sum();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Write {
                ops,
                bytes,
                caller: Caller::current(),
                reply,
            })
            .await
            .map_err(|_| StorageError::Closed)?;
        Ok(PendingWrite(rx))
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<TopicInfo, TopicError> {
        let name = TopicName::new(name)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(TopicError::InvalidPartitions(partitions));
        }
        self.send(|reply| Command::CreateTopic {
            name,
            partitions,
            config,
            reply,
        })
        .await?
    }

    /// Creates the topic that a rule, a pipeline or a replica writes to, unless it
    /// exists already (whatever its partitions and config then).
    pub async fn ensure_topic(
        &self,
        name: &str,
        partitions: u32,
        config: &TopicConfig,
    ) -> Result<(), TopicError> {
        if self.topic(name).is_some() {
            return Ok(());
        }
        match self.create_topic(name, partitions, config.clone()).await {
            Ok(_) => {
                tracing::info!(topic = name, partitions, "created a topic a rule writes to");
                Ok(())
            }
            Err(TopicError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Replaces a topic's config; retention applies it at its next run.
    pub async fn set_topic_config(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<TopicInfo, TopicError> {
        let name = name.to_string();
        self.send(|reply| Command::SetTopicConfig {
            name,
            config,
            reply,
        })
        .await?
    }

    /// Deletes a topic, its batches and the offsets groups committed for it.
    pub async fn delete_topic(&self, name: &str) -> Result<(), TopicError> {
        let name = name.to_string();
        self.send(|reply| Command::DeleteTopic { name, reply })
            .await?
    }

    /// Runs retention for every topic as of `now_ms`.
    pub async fn enforce_retention(
        &self,
        now_ms: i64,
    ) -> Result<Vec<RetentionDeletion>, StorageError> {
        self.send(|reply| Command::Retention { now_ms, reply })
            .await?
    }

    /// Makes everything committed so far durable (only matters with `fsync = false`).
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.send(|reply| Command::Flush { reply }).await?
    }

    /// Lets queued writes finish, then closes the database cleanly. Later calls on any
    /// clone fail with `StorageError::Closed`.
    pub async fn close(&self) -> Result<(), StorageError> {
        let _ = self.commands.send(Command::Shutdown).await;
        let closed = self.shared.closed.lock().take();
        if let Some(closed) = closed {
            let _ = closed.await;
        }
        Ok(())
    }

    pub fn topics(&self) -> Vec<TopicInfo> {
        let mut topics: Vec<TopicInfo> = self
            .shared
            .catalog
            .read()
            .topics
            .values()
            .map(|t| t.info.clone())
            .collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        topics
    }

    pub fn topic(&self, name: &str) -> Option<TopicInfo> {
        self.shared
            .catalog
            .read()
            .topics
            .get(name)
            .map(|t| t.info.clone())
    }

    fn handle(&self, topic: &str, partition: u32) -> Result<Arc<TopicHandle>, ReadError> {
        let handle = self
            .shared
            .catalog
            .read()
            .topics
            .get(topic)
            .cloned()
            .ok_or_else(|| NotFound::Topic(topic.to_string()))?;
        NotFound::check(topic, partition, handle.offsets.len() as u32)?;
        Ok(handle)
    }

    /// Committed offsets of a partition.
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets, ReadError> {
        Ok(*self.handle(topic, partition)?.offsets[partition as usize].borrow())
    }

    /// A receiver that changes after every commit that moves the partition's offsets
    /// (long-poll fetch, MQTT delivery). It closes when the topic is deleted.
    pub fn watch(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<watch::Receiver<PartitionOffsets>, ReadError> {
        Ok(self.handle(topic, partition)?.offsets[partition as usize].subscribe())
    }

    /// Runs `f` with this log on tokio's blocking pool and waits for it: how async code
    /// reads the log (ARCHITECTURE.md, "Where blocking work runs"). A panic in `f`
    /// goes on in the caller, as if `f` had been called there.
    pub async fn blocking<T, F>(&self, f: F) -> T
    where
        F: FnOnce(&Log) -> T + Send + 'static,
        T: Send + 'static,
    {
        let log = self.clone();
        match tokio::task::spawn_blocking(move || f(&log)).await {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime shuts down, which drops the caller too.
            Err(e) => panic!("the blocking pool dropped a read of the log: {e}"),
        }
    }

    /// Kafka fetch semantics: whole batches from the one holding `offset`, while their
    /// total stays within `max_bytes`, but always at least one batch so that a consumer
    /// makes progress past a batch larger than its limit.
    /// Blocking (redb's pages may come from the disk): async code calls it through
    /// [`Log::blocking`].
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReadResult, ReadError> {
        let id = self.handle(topic, partition)?.id;
        let db = self.shared.db.get()?;
        let txn = db.begin_read().map_err(StorageError::from)?;
        let row = read_partition_row(&txn, id, partition, topic)?;
        let offsets = PartitionOffsets {
            log_start: row.log_start,
            high_watermark: row.next_offset,
        };
        if offset < offsets.log_start || offset > offsets.high_watermark {
            return Err(ReadError::OffsetOutOfRange { offset, offsets });
        }
        if offset == offsets.high_watermark {
            return Ok(ReadResult {
                batches: Vec::new(),
                records: Bytes::new(),
                offsets,
            });
        }
        let table = txn.open_table(BATCHES).map_err(StorageError::from)?;
        let start = batch_containing(&table, id, partition, offset)?
            .ok_or(ReadError::OffsetOutOfRange { offset, offsets })?;
        // The entries first, then one buffer of their total size: no growing copies.
        let mut entries = Vec::new();
        let mut total = 0usize;
        for entry in table
            .range((id, partition, start)..=(id, partition, u64::MAX))
            .map_err(StorageError::from)?
        {
            let (key, value) = entry.map_err(StorageError::from)?;
            let len = stored(key.value(), value.value())?.1.len();
            if !entries.is_empty() && total + len > max_bytes {
                break;
            }
            total += len;
            entries.push((key.value(), value));
            if total >= max_bytes {
                break;
            }
        }
        let mut records = BytesMut::with_capacity(total);
        let mut ends = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            records.extend_from_slice(stored(*key, value.value())?.1);
            ends.push(records.len());
        }
        let records = records.freeze();
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let batches = starts
            .zip(ends.iter().copied())
            .map(|(from, to)| RecordBatch::from_stored(records.slice(from..to)))
            .collect();
        Ok(ReadResult {
            batches,
            records,
            offsets,
        })
    }

    /// `read` as a Kafka consumer with `isolation.level=read_committed` reads: only
    /// below the last stable offset, with the aborted transactions it must skip.
    /// Blocking, as `read`.
    pub fn read_committed(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<txn::CommittedRead, ReadError> {
        let read = self.read(topic, partition, offset, max_bytes)?;
        Ok(self.shared.txns.committed(topic, partition, offset, read))
    }

    /// Kafka transactions' view per partition, which `kafka::transactions` keeps.
    pub fn txn_index(&self) -> &txn::TxnIndex {
        &self.shared.txns
    }

    /// Kafka ListOffsets by timestamp: the first offset whose record timestamp is at
    /// or after `timestamp_ms`, with that record's timestamp; `None` when no record is.
    pub fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<(u64, i64)>, ReadError> {
        let id = self.handle(topic, partition)?.id;
        let db = self.shared.db.get()?;
        let txn = db.begin_read().map_err(StorageError::from)?;
        let row = read_partition_row(&txn, id, partition, topic)?;
        // Skip what the time index proves is older than the target.
        let mut from = row.log_start;
        let index = txn.open_table(TIME_INDEX).map_err(StorageError::from)?;
        for entry in index
            .range((id, partition, 0)..=(id, partition, u64::MAX))
            .map_err(StorageError::from)?
        {
            let (key, max_timestamp) = entry.map_err(StorageError::from)?;
            if max_timestamp.value() >= timestamp_ms {
                break;
            }
            from = from.max(key.value().2 + 1);
        }
        if from >= row.next_offset {
            return Ok(None);
        }
        let table = txn.open_table(BATCHES).map_err(StorageError::from)?;
        let start = batch_containing(&table, id, partition, from)?.unwrap_or(row.log_start);
        for entry in table
            .range((id, partition, start)..=(id, partition, u64::MAX))
            .map_err(StorageError::from)?
        {
            let (key, value) = entry.map_err(StorageError::from)?;
            let (header, bytes) = stored(key.value(), value.value())?;
            if header.max_timestamp() < timestamp_ms {
                continue;
            }
            let batch = RecordBatch::from_stored(Bytes::copy_from_slice(bytes));
            let records = decode_stored(batch, topic, partition)?;
            if let Some(r) = records.iter().find(|r| r.timestamp >= timestamp_ms) {
                return Ok(Some((r.offset as u64, r.timestamp)));
            }
        }
        Ok(None)
    }

    /// Per-partition sizes for `describe`.
    pub fn describe(&self, topic: &str) -> Result<(TopicInfo, Vec<PartitionInfo>), ReadError> {
        let handle = self.handle(topic, 0)?;
        let db = self.shared.db.get()?;
        let txn = db.begin_read().map_err(StorageError::from)?;
        let mut out = Vec::new();
        for partition in 0..handle.info.partitions {
            let row = read_partition_row(&txn, handle.id, partition, topic)?;
            out.push(PartitionInfo {
                partition,
                log_start: row.log_start,
                high_watermark: row.next_offset,
                bytes: row.bytes,
                batches: row.batches,
            });
        }
        Ok((handle.info.clone(), out))
    }

    pub async fn commit_offsets(
        &self,
        group: &str,
        offsets: Vec<(String, u32, CommittedOffset)>,
    ) -> Result<(), WriteError> {
        let ops = offsets
            .into_iter()
            .map(|(topic, partition, offset)| WriteOp::CommitOffset {
                group: group.to_string(),
                topic,
                partition,
                offset,
            })
            .collect();
        self.write(ops).await.map(drop)
    }

    /// Every offset `group` committed, by topic and partition.
    pub fn committed_offsets(
        &self,
        group: &str,
    ) -> Result<Vec<(String, u32, CommittedOffset)>, StorageError> {
        let db = self.shared.db.get()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(GROUP_OFFSETS)?;
        let mut out = Vec::new();
        for entry in table.range((group, "", 0)..)? {
            let (key, value) = entry?;
            let (g, topic, partition) = key.value();
            if g != group {
                break;
            }
            out.push((
                topic.to_string(),
                partition,
                decode(GROUP_OFFSETS_NAME, value.value())?,
            ));
        }
        Ok(out)
    }

    /// Groups that have committed offsets.
    pub fn groups_with_offsets(&self) -> Result<Vec<String>, StorageError> {
        let db = self.shared.db.get()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(GROUP_OFFSETS)?;
        let mut groups: Vec<String> = Vec::new();
        for entry in table.iter()? {
            let (key, _) = entry?;
            let group = key.value().0;
            if groups.last().map(String::as_str) != Some(group) {
                groups.push(group.to_string());
            }
        }
        Ok(groups)
    }

    /// Stores `value` under (namespace, key), encoded with postcard.
    pub async fn put_state<T: Serialize>(
        &self,
        namespace: &str,
        key: &str,
        value: &T,
    ) -> Result<(), WriteError> {
        self.write(vec![put_state_op(namespace, key, value)])
            .await
            .map(drop)
    }

    pub async fn delete_state(&self, namespace: &str, key: &str) -> Result<(), WriteError> {
        self.write(vec![state_op(namespace, key, None)])
            .await
            .map(drop)
    }

    pub fn get_state<T: DeserializeOwned>(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let db = self.shared.db.get()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(STATE)?;
        let value = table.get((namespace, key))?;
        value.map(|v| decode("state", v.value())).transpose()
    }

    /// All (key, value) pairs of a namespace, in key order.
    pub fn list_state<T: DeserializeOwned>(
        &self,
        namespace: &str,
    ) -> Result<Vec<(String, T)>, StorageError> {
        let db = self.shared.db.get()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(STATE)?;
        let mut out = Vec::new();
        for entry in table.range((namespace, "")..)? {
            let (key, value) = entry?;
            let (ns, k) = key.value();
            if ns != namespace {
                break;
            }
            out.push((k.to_string(), decode("state", value.value())?));
        }
        Ok(out)
    }
}

/// Builds the op that `put_state`/`delete_state` send, for callers that combine it
/// with appends in one atomic write (pipeline and replication cursors).
/// How Weir encodes what it stores in its own tables (state values, topic records,
/// committed offsets): postcard. They are Weir's own plain structs and enums, which
/// postcard always encodes into a `Vec`; a type it could not encode would be a bug
/// that the first test storing it finds, so this panics instead of handing every
/// caller an error it could not act on. (Decoding is another matter: what is read
/// back may be damaged, and `get_state` returns an error for it.)
pub fn encode_stored<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes Weir's stored types into a Vec")
}

/// The write that stores `value` under `namespace`/`key` in the state table.
pub fn put_state_op<T: Serialize + ?Sized>(namespace: &str, key: &str, value: &T) -> WriteOp {
    state_op(namespace, key, Some(encode_stored(value)))
}

pub fn state_op(namespace: &str, key: &str, value: Option<Vec<u8>>) -> WriteOp {
    WriteOp::PutState {
        namespace: namespace.to_string(),
        key: key.to_string(),
        value,
    }
}

const GROUP_OFFSETS_NAME: &str = "group_offsets";

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

/// The partition's row; a missing one means the topic was deleted since the lookup.
fn read_partition_row(
    txn: &redb::ReadTransaction,
    id: TopicId,
    partition: u32,
    topic: &str,
) -> Result<PartitionRow, ReadError> {
    let parts = txn.open_table(PARTITIONS).map_err(StorageError::from)?;
    let row = parts.get((id, partition)).map_err(StorageError::from)?;
    row.map(|v| PartitionRow::from_tuple(v.value()))
        .ok_or_else(|| NotFound::Topic(topic.to_string()).into())
}

/// The records of a batch read from the log. Its bytes were checked when stored, so
/// a failure is corruption (or a bug), reported as such with where it lies.
pub fn decode_stored(
    batch: RecordBatch,
    topic: &str,
    partition: u32,
) -> Result<Vec<kafka_protocol::records::Record>, StorageError> {
    let base = batch.base_offset();
    let mut bytes = batch.into_bytes();
    kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes)
        .map(|set| set.records)
        .map_err(|e| StorageError::Corrupt {
            table: "batches",
            detail: format!("{topic}/{partition} at {base}: {e}"),
        })
}

/// Base offset of the stored batch that holds `offset`, or else of the first one after
/// it: compaction leaves gaps between batches, which readers step over.
fn batch_containing(
    table: &impl ReadableTable<(TopicId, u32, u64), &'static [u8]>,
    id: TopicId,
    partition: u32,
    offset: u64,
) -> Result<Option<u64>, StorageError> {
    if let Some((key, value)) = table
        .range((id, partition, 0)..=(id, partition, offset))?
        .next_back()
        .transpose()?
    {
        let key = key.value();
        if key.2 + stored(key, value.value())?.0.offset_count() > offset {
            return Ok(Some(key.2));
        }
    }
    let next = table
        .range((id, partition, offset)..=(id, partition, u64::MAX))?
        .next()
        .transpose()?;
    Ok(next.map(|(k, _)| k.value().2))
}

/// A `BATCHES` entry's header and batch bytes, or a corruption error naming it.
pub(super) fn stored<'v>(
    key: (TopicId, u32, u64),
    value: &'v [u8],
) -> Result<(BatchHeader<'v>, &'v [u8]), StorageError> {
    split_stored(value)
        .and_then(|(_, batch)| Some((BatchHeader::new(batch)?, batch)))
        .ok_or_else(|| StorageError::Corrupt {
            table: "batches",
            detail: format!(
                "entry {key:?} is {} bytes, too short for a batch",
                value.len()
            ),
        })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &'static str) -> NewRecord {
        NewRecord {
            key: None,
            value: Some(Bytes::from_static(value.as_bytes())),
            timestamp_ms: 0,
            headers: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_is_one_buffer_of_whole_batches_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        // Three writes: three stored batches of one record each.
        for value in ["first", "second", "third"] {
            let mut appends = Appends::default();
            appends.add("t", 0, record(value));
            log.write(appends.into_ops().collect()).await.unwrap();
        }
        let all = log.read("t", 0, 1, usize::MAX).unwrap();
        assert_eq!(all.batches.len(), 2, "from the batch holding offset 1");
        let joined: Vec<u8> = all
            .batches
            .iter()
            .flat_map(|b| b.as_bytes().to_vec())
            .collect();
        assert_eq!(all.records, joined);
        assert_eq!(all.bytes(), joined.len());
        let bases: Vec<i64> = all
            .batches
            .iter()
            .map(|b| b.header().base_offset())
            .collect();
        assert_eq!(bases, [1, 2]);
        // A limit below the first batch still returns it whole; the next is left out.
        let one = log.read("t", 0, 0, 1).unwrap();
        assert_eq!(one.batches.len(), 1);
        assert_eq!(one.records, one.batches[0].as_bytes());
        // At the high watermark: nothing, and no error.
        let none = log.read("t", 0, 3, usize::MAX).unwrap();
        assert!(none.batches.is_empty() && none.records.is_empty());
    }

    /// A transactional producer's batch: producer id and the transactional bit set
    /// (both under the CRC).
    fn transactional(producer_id: i64, value: &'static str) -> RecordBatch {
        let plain = weir_wire::record_batch::build::batch(
            &[record(value)],
            kafka_protocol::records::Compression::None,
        )
        .unwrap();
        let mut b = BytesMut::from(&plain[..]);
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b[22] |= 0x10;
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        RecordBatch::parse(b.freeze()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_read_stops_at_the_last_stable_offset_and_skips_aborted_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let append = |batch: RecordBatch| {
            log.write(vec![WriteOp::Append {
                topic: "t".into(),
                partition: 0,
                batches: vec![batch],
            }])
        };
        let plain = |value: &'static str| {
            let bytes = weir_wire::record_batch::build::batch(
                &[record(value)],
                kafka_protocol::records::Compression::None,
            );
            RecordBatch::parse(bytes.unwrap()).unwrap()
        };
        append(plain("a")).await.unwrap();
        // Producer 7's transaction joins the partition at offset 1.
        log.txn_index().begin("t", 0, 7, 1);
        append(transactional(7, "x")).await.unwrap();
        append(plain("b")).await.unwrap();
        let open = log.read_committed("t", 0, 0, usize::MAX).unwrap();
        assert_eq!(open.last_stable, 1);
        assert_eq!(open.read.batches.len(), 1, "only what is below the LSO");
        assert_eq!(open.read.records, open.read.batches[0].as_bytes());
        // Aborted: its marker at 3; every batch is below the LSO again.
        let marker = weir_wire::record_batch::build::control(7, 0, false, 0, 0).unwrap();
        append(RecordBatch::parse(marker).unwrap()).await.unwrap();
        let aborted = txn::Aborted {
            producer_id: 7,
            first: 1,
            last: Some(3),
        };
        log.txn_index().end("t", 0, 7, Some(aborted));
        let read = log.read_committed("t", 0, 0, usize::MAX).unwrap();
        assert_eq!(read.last_stable, 4);
        assert_eq!(read.aborted, vec![aborted]);
        let data: Vec<bool> = read.read.batches.iter().map(|b| read.is_data(b)).collect();
        assert_eq!(data, [true, false, true, false]);
        // A read after the abort lists nothing.
        let after = log.read_committed("t", 0, 4, usize::MAX).unwrap();
        assert!(after.aborted.is_empty() && after.read.batches.is_empty());
    }

    #[test]
    fn appends_make_one_op_per_partition_in_the_order_records_came() {
        let mut appends = Appends::default();
        appends.add("a", 0, record("1"));
        appends.add("b", 0, record("2"));
        appends.add("a", 1, record("3"));
        appends.add("a", 0, record("4"));
        let ops: Vec<_> = appends
            .into_ops()
            .map(|op| match op {
                WriteOp::AppendRecords {
                    topic,
                    partition,
                    records,
                } => {
                    let values: Vec<_> = records.iter().map(|r| r.value.clone().unwrap()).collect();
                    (topic, partition, values)
                }
                other => panic!("not an append: {other:?}"),
            })
            .collect();
        assert_eq!(
            ops,
            [
                ("a".to_string(), 0, vec![Bytes::from("1"), Bytes::from("4")]),
                ("b".to_string(), 0, vec![Bytes::from("2")]),
                ("a".to_string(), 1, vec![Bytes::from("3")]),
            ]
        );
    }
}
