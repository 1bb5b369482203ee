//! The writer thread: group commit, offset assignment, retention, topic changes.
//! This file runs the thread and commits groups; `apply.rs` is what each command does
//! inside the transaction, `open.rs` opens the database and the journal's file.
//!
//! Invariants:
//! - It is the only code that opens write transactions, so offsets are assigned
//!   by one owner and never race.
//! - A caller is answered only after the transaction holding its change committed
//!   (except under the test-only `unsafe_ack_before_commit`).
//! - `State` mirrors the committed database; after any failed transaction it is
//!   reloaded from the database rather than patched.
//! - With the journal (`journal.rs`), a small group is durable once its journal entry
//!   is synced, and its redb commit is not durable; every durable commit is a
//!   checkpoint that starts a new journal generation. Opening (and reopening after an
//!   I/O error) replays the journal onto the database's last durable commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::compaction::{Applied, Edit};
use super::journal::Journal;
use super::tables::*;
use super::{
    Catalog, LogOptions, PartitionOffsets, RetentionDeletion, Shared, StorageError, TopicConfig,
    TopicError, TopicHandle, TopicInfo, TopicName, WriteError, WriteOp, WriteOutcome, now_ms,
};

mod apply;
mod open;

pub(super) use open::open_database;
use open::open_file;
use open::{journal_on, open_journal, start_generation};

/// Most commands one group commit takes, whatever their size.
const MAX_GROUP_COMMANDS: usize = 4096;
/// Longest a group waits for the callers of the previous commit to come back.
const MAX_LINGER: Duration = Duration::from_millis(2);
/// A durability window ends early once its group holds this many bytes: a commit
/// this large already writes little more than its data, so waiting saves nothing.
const WINDOW_FULL_BYTES: usize = 64 << 10;

type Reply<T> = oneshot::Sender<T>;

/// Who sent a write: its tokio task, or else its thread. A caller that waits for each
/// answer before writing again comes back as the same `Caller`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Caller {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

impl Caller {
    pub(super) fn current() -> Self {
        match tokio::task::try_id() {
            Some(id) => Caller::Task(id),
            None => Caller::Thread(std::thread::current().id()),
        }
    }
}

pub(super) enum Command {
    Write {
        ops: Vec<WriteOp>,
        bytes: usize,
        caller: Caller,
        reply: Reply<Result<Vec<WriteOutcome>, WriteError>>,
    },
    CreateTopic {
        name: TopicName,
        partitions: u32,
        config: TopicConfig,
        reply: Reply<Result<TopicInfo, TopicError>>,
    },
    SetTopicConfig {
        name: String,
        config: TopicConfig,
        reply: Reply<Result<TopicInfo, TopicError>>,
    },
    DeleteTopic {
        name: String,
        reply: Reply<Result<(), TopicError>>,
    },
    Retention {
        now_ms: i64,
        reply: Reply<Result<Vec<RetentionDeletion>, StorageError>>,
    },
    /// A compaction pass's edits of one partition (`compaction.rs`), with its new
    /// clean state (`state` key, value).
    Compact {
        topic: String,
        partition: u32,
        id: TopicId,
        edits: Vec<Edit>,
        state: (String, Vec<u8>),
        reply: Reply<Result<Applied, StorageError>>,
    },
    Flush {
        reply: Reply<Result<(), StorageError>>,
    },
    Shutdown,
}

/// The open database, shared by readers and the writer. The writer swaps it when it
/// must reopen after an I/O error (redb refuses writes after one until reopened).
pub(super) struct DbSlot {
    slot: RwLock<Option<Arc<Database>>>,
}

impl DbSlot {
    pub(super) fn new(db: Database) -> Self {
        Self {
            slot: RwLock::new(Some(Arc::new(db))),
        }
    }

    pub(super) fn get(&self) -> Result<Arc<Database>, StorageError> {
        self.slot.read().clone().ok_or(StorageError::Closed)
    }

    /// Takes the database out, waiting for in-flight reads to drop their handles.
    fn take(&self) -> Option<Database> {
        let mut slot = self.slot.write();
        let mut db = slot.take()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => return Some(db),
                Err(shared) if Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(shared) => {
                    error!("database still in use by readers after 30 s; leaking the handle");
                    drop(shared);
                    return None;
                }
            }
        }
    }

    fn put(&self, db: Database) {
        *self.slot.write() = Some(Arc::new(db));
    }
}

/// The writer's view of every topic, equal to the committed database.
#[derive(Default)]
pub(super) struct State {
    topics: HashMap<String, TopicState>,
    next_topic_id: TopicId,
}

struct TopicState {
    record: TopicRecord,
    partitions: Vec<PartitionRow>,
}

impl PartitionRow {
    fn offsets(self) -> PartitionOffsets {
        PartitionOffsets {
            log_start: self.log_start,
            high_watermark: self.next_offset,
        }
    }
}

impl State {
    fn load(db: &Database) -> Result<Self, StorageError> {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let next_topic_id = meta.get("next_topic_id")?.map_or(0, |v| v.value()) as TopicId;
        let topics_table = txn.open_table(TOPICS)?;
        let parts_table = txn.open_table(PARTITIONS)?;
        let mut topics = HashMap::new();
        for entry in topics_table.iter()? {
            let (name, value) = entry?;
            let record: TopicRecord = super::decode("topics", value.value())?;
            let mut partitions = Vec::with_capacity(record.partitions as usize);
            for p in 0..record.partitions {
                let row = parts_table
                    .get((record.id, p))?
                    .map(|v| PartitionRow::from_tuple(v.value()))
                    .ok_or_else(|| StorageError::Corrupt {
                        table: "partitions",
                        detail: format!("topic {} partition {p} has no row", name.value()),
                    })?;
                partitions.push(row);
            }
            topics.insert(name.value().to_string(), TopicState { record, partitions });
        }
        Ok(State {
            topics,
            next_topic_id,
        })
    }

    fn info(&self, name: &str) -> TopicInfo {
        let record = &self.topics[name].record;
        TopicInfo {
            name: name.to_string(),
            partitions: record.partitions,
            config: record.config.clone(),
            created_ms: record.created_ms,
        }
    }

    fn handle(&self, name: &str) -> Arc<TopicHandle> {
        let topic = &self.topics[name];
        Arc::new(TopicHandle {
            id: topic.record.id,
            info: self.info(name),
            offsets: topic
                .partitions
                .iter()
                .map(|p| watch::Sender::new(p.offsets()))
                .collect(),
        })
    }

    fn catalog(&self) -> Catalog {
        Catalog {
            topics: self
                .topics
                .keys()
                .map(|name| (name.clone(), self.handle(name)))
                .collect(),
        }
    }
}

/// The tables a group commit writes, opened once per transaction.
struct Tables<'t> {
    meta: Table<'t, &'static str, u64>,
    topics: Table<'t, &'static str, &'static [u8]>,
    partitions: Table<'t, (TopicId, u32), PartitionTuple>,
    batches: Table<'t, (TopicId, u32, u64), &'static [u8]>,
    time_index: Table<'t, (TopicId, u32, u64), i64>,
    group_offsets: Table<'t, (&'static str, &'static str, u32), &'static [u8]>,
    state: Table<'t, (&'static str, &'static str), &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StorageError> {
        Ok(Self {
            meta: txn.open_table(META)?,
            topics: txn.open_table(TOPICS)?,
            partitions: txn.open_table(PARTITIONS)?,
            batches: txn.open_table(BATCHES)?,
            time_index: txn.open_table(TIME_INDEX)?,
            group_offsets: txn.open_table(GROUP_OFFSETS)?,
            state: txn.open_table(STATE)?,
        })
    }
}

/// A command's answer, computed inside the transaction and sent once it commits.
enum Outcome {
    Write(Result<Vec<WriteOutcome>, WriteError>),
    Topic(Result<TopicInfo, TopicError>),
    Deleted(Result<(), TopicError>),
    Retention(Vec<RetentionDeletion>),
    Compacted(Applied),
    Done,
}

impl Command {
    fn bytes(&self) -> usize {
        match self {
            Command::Write { bytes, .. } => *bytes,
            _ => 0,
        }
    }

    /// Sends `outcome` to the caller. A caller that gave up waiting is not an error.
    fn answer(self, outcome: Outcome) {
        let _ = match (self, outcome) {
            (Command::Write { reply, .. }, Outcome::Write(r)) => reply.send(r).map_err(drop),
            (
                Command::CreateTopic { reply, .. } | Command::SetTopicConfig { reply, .. },
                Outcome::Topic(r),
            ) => reply.send(r).map_err(drop),
            (Command::DeleteTopic { reply, .. }, Outcome::Deleted(r)) => {
                reply.send(r).map_err(drop)
            }
            (Command::Retention { reply, .. }, Outcome::Retention(r)) => {
                reply.send(Ok(r)).map_err(drop)
            }
            (Command::Compact { reply, .. }, Outcome::Compacted(r)) => {
                reply.send(Ok(r)).map_err(drop)
            }
            (Command::Flush { reply }, Outcome::Done) => reply.send(Ok(())).map_err(drop),
            (Command::Shutdown, Outcome::Done) => Ok(()),
            (command, _) => {
                error!("internal: outcome does not match its command; failing it");
                command.fail(&StorageError::Corrupt {
                    table: "-",
                    detail: "mismatched outcome".into(),
                });
                Ok(())
            }
        };
    }

    /// Answers with a storage error: the transaction holding this command failed.
    fn fail(self, e: &StorageError) {
        let _ = match self {
            Command::Write { reply, .. } => reply.send(Err(e.clone().into())).map_err(drop),
            Command::CreateTopic { reply, .. } | Command::SetTopicConfig { reply, .. } => {
                reply.send(Err(e.clone().into())).map_err(drop)
            }
            Command::DeleteTopic { reply, .. } => reply.send(Err(e.clone().into())).map_err(drop),
            Command::Retention { reply, .. } => reply.send(Err(e.clone())).map_err(drop),
            Command::Compact { reply, .. } => reply.send(Err(e.clone())).map_err(drop),
            Command::Flush { reply } => reply.send(Err(e.clone())).map_err(drop),
            Command::Shutdown => Ok(()),
        };
    }
}

/// Catalog changes to publish once the transaction commits.
#[derive(Default)]
struct Changes {
    advanced: BTreeSet<(String, u32)>,
    created: Vec<String>,
    reconfigured: Vec<String>,
    deleted: Vec<String>,
    appended_bytes: u64,
    appended_batches: u64,
    retention_batches: u64,
    retention_bytes: u64,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
    path: PathBuf,
    state: State,
    rx: mpsc::Receiver<Command>,
    /// Set after an I/O error: the database must be reopened before the next write.
    needs_reopen: bool,
    /// With `fsync = false`: commits since the last durable one.
    unflushed: bool,
    /// Where small groups become durable, when `checkpoint_interval` is not zero.
    journal: Option<Journal>,
    /// With the journal: when the oldest group not in a durable commit was committed.
    journaled_since: Option<Instant>,
    /// Commands the last commit answered, and how long it took: the group gathering
    /// waits at most that long for that many callers.
    last_answered: usize,
    last_commit: Duration,
    /// The writers the last commit answered.
    last_callers: HashSet<Caller>,
}

impl Writer {
    pub(super) fn start(
        shared: Arc<Shared>,
        options: LogOptions,
        state: State,
        rx: mpsc::Receiver<Command>,
        closed: oneshot::Sender<()>,
    ) -> Result<(), StorageError> {
        *shared.catalog.write() = state.catalog();
        let path = options.data_dir.join(super::DB_FILE);
        let journal = open_journal(&options)?;
        let mut writer = Writer {
            shared,
            options,
            path,
            state,
            rx,
            needs_reopen: false,
            unflushed: false,
            journal,
            journaled_since: None,
            last_answered: 0,
            last_commit: Duration::ZERO,
            last_callers: HashSet::new(),
        };
        writer.recover()?;
        if !journal_on(&writer.options) {
            // Replayed: what it held is in the database now.
            writer.journal = None;
        }
        std::thread::Builder::new()
            .name("weir-log-writer".into())
            .spawn(move || {
                // A bug that panics here would leave a broker that accepts requests and
                // can never answer them; better to stop and be restarted by the service
                // manager, with redb's committed state intact.
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(closed)));
                if outcome.is_err() {
                    error!("the log writer panicked; aborting so that the service restarts");
                    std::process::abort();
                }
            })
            .map_err(|e| StorageError::DataDir {
                path: PathBuf::new(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(())
    }

    fn run(mut self, closed: oneshot::Sender<()>) {
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build();
        let mut shutting_down = false;
        loop {
            let durable = self.options.acks_wait_for_durability();
            let idle_until_flush = self.idle_until_flush();
            let first = if shutting_down || idle_until_flush.is_none() {
                self.rx.blocking_recv()
            } else {
                let interval = idle_until_flush.unwrap_or_default();
                let rx = &mut self.rx;
                match timer.as_ref().map(|rt| {
                    rt.block_on(async { tokio::time::timeout(interval, rx.recv()).await })
                }) {
                    Ok(Ok(command)) => command,
                    Ok(Err(_elapsed)) => {
                        self.flush_if_needed();
                        continue;
                    }
                    Err(_) => self.rx.blocking_recv(),
                }
            };
            let Some(first) = first else { break };
            let mut group = vec![first];
            let mut bytes = group[0].bytes();
            if durable && !shutting_down {
                bytes = self.gather_window(&timer, &mut group, bytes);
            }
            let gather_until = Instant::now() + self.last_commit.min(MAX_LINGER);
            while bytes < self.options.max_group_bytes && group.len() < MAX_GROUP_COMMANDS {
                match self.rx.try_recv() {
                    Ok(command) => {
                        bytes += command.bytes();
                        group.push(command);
                    }
                    // The callers answered by the last commit usually come straight back
                    // with their next write: wait briefly for them, so that the commits
                    // of many writers do not split into alternating half groups.
                    Err(_) if durable && group.len() < self.last_answered && !shutting_down => {
                        let left = gather_until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        let rx = &mut self.rx;
                        let next = timer.as_ref().ok().and_then(|rt| {
                            rt.block_on(async { tokio::time::timeout(left, rx.recv()).await })
                                .ok()
                                .flatten()
                        });
                        match next {
                            Some(command) => {
                                bytes += command.bytes();
                                group.push(command);
                            }
                            None => break,
                        }
                    }
                    Err(_) => break,
                }
            }
            self.last_answered = group.len();
            if group.iter().any(|c| matches!(c, Command::Shutdown)) && !shutting_down {
                // Refuse new commands, but finish everything already queued.
                shutting_down = true;
                self.rx.close();
            }
            self.shared
                .committing_since_ms
                .store(super::now_ms().max(1), std::sync::atomic::Ordering::Release);
            self.commit_group(group);
            if self.idle_until_flush() == Some(Duration::ZERO) {
                // Under a steady load the writer is never idle for the interval.
                self.flush_if_needed();
            }
            self.shared
                .committing_since_ms
                .store(0, std::sync::atomic::Ordering::Release);
        }
        self.flush_if_needed();
        if let Some(db) = self.shared.db.take() {
            match db.close() {
                Ok(()) => info!(path = %self.path.display(), "database closed cleanly"),
                Err(e) => {
                    error!(path = %self.path.display(), error = %e, "closing the database failed")
                }
            }
        }
        let _ = closed.send(());
    }

    /// The durability window (`commit_interval`): after the first command of a group,
    /// gathers more for up to the interval, so that a light load makes one durable
    /// commit where it would make many small ones (flash wear). It ends early when the
    /// group is full (`WINDOW_FULL_BYTES`, `max_group_bytes`, `MAX_GROUP_COMMANDS`), holds
    /// a flush or shutdown, or when every writer the last commit answered has written
    /// again: writers that wait for each answer before writing again (a synchronous
    /// producer, a benchmark) would otherwise be slowed to one commit per window, and
    /// their group is as full as it will get. Independent writers (devices) do not come
    /// back within a window, so they share it. Only a group that starts with a write
    /// waits. Returns the group's bytes.
    fn gather_window(
        &mut self,
        timer: &std::io::Result<tokio::runtime::Runtime>,
        group: &mut Vec<Command>,
        mut bytes: usize,
    ) -> usize {
        let interval = self.options.commit_interval;
        let Ok(rt) = timer else { return bytes };
        // Only appends wait: a topic created at start-up (an MQTT rule's, before its
        // listener opens) or by an admin is committed at once.
        if interval.is_zero() || !matches!(group.first(), Some(Command::Write { .. })) {
            return bytes;
        }
        let window_ends = Instant::now() + interval;
        let mut back = HashSet::new();
        let mut urgent = false;
        let mut seen = 0;
        loop {
            for command in &group[seen..] {
                match command {
                    Command::Write { caller, .. } if self.last_callers.contains(caller) => {
                        back.insert(*caller);
                    }
                    Command::Flush { .. } | Command::Shutdown => urgent = true,
                    _ => {}
                }
            }
            seen = group.len();
            let full = bytes >= WINDOW_FULL_BYTES.min(self.options.max_group_bytes)
                || group.len() >= MAX_GROUP_COMMANDS;
            let all_back = !self.last_callers.is_empty() && back.len() == self.last_callers.len();
            let now = Instant::now();
            if full || urgent || all_back || now >= window_ends {
                return bytes;
            }
            let rx = &mut self.rx;
            let wait = window_ends.saturating_duration_since(now);
            match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                Ok(Some(command)) => {
                    bytes += command.bytes();
                    group.push(command);
                }
                // Closed: the caller below sees it at its next receive.
                Ok(None) => return bytes,
                Err(_elapsed) => {}
            }
        }
    }

    /// How long the writer may wait for a command before the commits since the last
    /// durable one must be made durable (`flush_interval` without fsync, the journal's
    /// `checkpoint_interval` with it); `None` when nothing waits for that.
    fn idle_until_flush(&self) -> Option<Duration> {
        if !self.options.acks_wait_for_durability() {
            return Some(self.options.flush_interval);
        }
        let since = self.journaled_since?;
        Some(
            self.options
                .checkpoint_interval
                .saturating_sub(since.elapsed()),
        )
    }

    fn flush_if_needed(&mut self) {
        if !(self.unflushed || self.journaled_since.is_some()) || self.needs_reopen {
            return;
        }
        if let Err(e) = self.checkpoint() {
            warn!(error = %e, "periodic flush failed");
        }
    }

    /// A durable commit of everything committed so far; with the journal, it starts the
    /// journal's next generation.
    fn checkpoint(&mut self) -> Result<(), StorageError> {
        let db = self.shared.db.get()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let next = self.journal.as_ref().map(|j| j.generation() + 1);
        if let Some(generation) = next {
            start_generation(&mut txn.open_table(META)?, generation)?;
        }
        txn.commit()?;
        self.checkpointed(next);
        Ok(())
    }

    /// After a durable commit that set the journal's generation to `next`.
    fn checkpointed(&mut self, next: Option<u64>) {
        if let (Some(journal), Some(generation)) = (&mut self.journal, next) {
            journal.start_generation(generation);
            self.shared.metrics.checkpoints.inc();
        }
        self.unflushed = false;
        self.journaled_since = None;
    }

    /// Replays the journal's entries that the database's last durable commit lacks,
    /// then checkpoints: the state is then what was acknowledged before the process
    /// stopped (crash, power cut, or an I/O error that made the writer reopen).
    fn recover(&mut self) -> Result<(), StorageError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let (generation, applied) = {
            let db = self.shared.db.get()?;
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let get = |key| meta.get(key).map(|v| v.map_or(0, |v| v.value()));
            (get(JOURNAL_GENERATION)?, get(JOURNAL_SEQ)?)
        };
        let entries = journal.entries_after(generation, applied)?;
        if !entries.is_empty() {
            info!(
                entries = entries.len(),
                generation, "replaying the journal onto the last durable commit"
            );
        }
        for entry in entries {
            let group: Vec<Command> = entry
                .writes
                .into_iter()
                .map(|ops| Command::Write {
                    ops,
                    bytes: 0,
                    caller: Caller::current(),
                    reply: oneshot::channel().0,
                })
                .collect();
            let mut changes = Changes::default();
            // Outcomes are as they were the first time, refusals included.
            let (txn, _outcomes, _) =
                self.prepare_group(&group, &mut changes, entry.now_ms, Some(entry.seq))?;
            txn.commit()?;
            self.publish(&changes);
        }
        // The journal's generation restarts from the database's, whatever the file
        // held, so that `checkpoint` moves it past both.
        if let Some(journal) = &mut self.journal {
            journal.start_generation(generation);
        }
        self.checkpoint()
    }

    /// Refuses to reopen while the disk is still nearly full: reopening closes the
    /// handle readers use, and a reopen that fails for want of space would leave them
    /// with none.
    fn check_free_space(&self) -> Result<(), StorageError> {
        let needed = (2 * self.options.max_group_bytes as u64).clamp(1 << 20, 64 << 20);
        let dir = &self.options.data_dir;
        match rustix::fs::statvfs(dir) {
            Ok(s) => {
                let available = s.f_bavail.saturating_mul(s.f_frsize);
                if available < needed {
                    return Err(StorageError::DiskFull { available, needed });
                }
                Ok(())
            }
            // Cannot tell: try the reopen anyway.
            Err(_) => Ok(()),
        }
    }

    fn reopen(&mut self) -> Result<(), StorageError> {
        warn!(path = %self.path.display(), "reopening the database after an I/O error");
        drop(self.shared.db.take());
        let db = open_file(&self.path, &self.options)?;
        self.state = State::load(&db)?;
        self.shared.db.put(db);
        self.recover()?;
        self.needs_reopen = false;
        *self.shared.catalog.write() = self.state.catalog();
        info!("database reopened");
        Ok(())
    }

    fn commit_group(&mut self, group: Vec<Command>) {
        let started = Instant::now();
        if self.needs_reopen
            && let Err(e) = self.check_free_space().and_then(|()| self.reopen())
        {
            return self.group_failed(group, e);
        }
        let mut changes = Changes::default();
        let now = now_ms();
        let entry = self.journal_entry(&group);
        let seq = entry
            .as_ref()
            .and(self.journal.as_ref())
            .map(Journal::next_seq);
        let (txn, outcomes, durable) = match self.prepare_group(&group, &mut changes, now, seq) {
            Ok(prepared) => prepared,
            Err(e) => return self.group_failed(group, e),
        };
        let group = if self.options.unsafe_ack_before_commit {
            group
                .into_iter()
                .zip(outcomes)
                .for_each(|(c, o)| c.answer(o));
            None
        } else {
            Some((group, outcomes))
        };
        if let Err(e) = txn.commit() {
            let e = StorageError::from(e);
            return match group {
                Some((group, _)) => self.group_failed(group, e),
                None => self.group_failed(Vec::new(), e),
            };
        }
        if let Some(entry) = entry {
            let appended = match &mut self.journal {
                Some(journal) => journal.append(entry, now),
                None => Ok(()),
            };
            if let Err(e) = appended {
                // The group is committed, not yet durable: a checkpoint makes it so.
                // Failing that, its callers hear of the error and the reopen before
                // the next write replays the journal, which does not hold it.
                warn!(error = %e, "journal append failed; checkpointing instead");
                if let Err(e) = self.checkpoint() {
                    return self.group_failed(group.map(|(g, _)| g).unwrap_or_default(), e);
                }
            } else {
                self.journaled_since.get_or_insert(started);
            }
        } else if durable {
            self.checkpointed(self.journal.as_ref().map(|j| j.generation() + 1));
        }
        self.unflushed = !durable && self.journal.is_none();
        self.last_commit = started.elapsed();
        self.last_callers.clear();
        if let Some((group, _)) = &group {
            for command in group {
                if let Command::Write { caller, .. } = command {
                    self.last_callers.insert(*caller);
                }
            }
        }
        self.publish(&changes);
        let metrics = &self.shared.metrics;
        metrics.commits.inc();
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.appended_bytes.inc_by(changes.appended_bytes);
        metrics.appended_batches.inc_by(changes.appended_batches);
        metrics
            .retention_deleted_batches
            .inc_by(changes.retention_batches);
        metrics
            .retention_deleted_bytes
            .inc_by(changes.retention_bytes);
        if let Some((group, outcomes)) = group {
            group
                .into_iter()
                .zip(outcomes)
                .for_each(|(c, o)| c.answer(o));
        }
    }

    /// The journal entry of a group of writes only, encoded; `None` when it commits
    /// durably instead (no journal, other commands, too large, the journal full).
    fn journal_entry(&self, group: &[Command]) -> Option<Vec<u8>> {
        let journal = self.journal.as_ref()?;
        let writes: Option<Vec<&[WriteOp]>> = group
            .iter()
            .map(|c| match c {
                Command::Write { ops, .. } => Some(ops.as_slice()),
                _ => None,
            })
            .collect();
        journal.encode(&writes?)
    }

    /// Answers every command of a group whose transaction failed, and returns the
    /// in-memory state to what the database holds.
    fn group_failed(&mut self, group: Vec<Command>, e: StorageError) {
        let metrics = &self.shared.metrics;
        metrics.commit_errors.inc();
        if e.is_disk_full() {
            metrics.disk_full_errors.inc();
        }
        error!(error = %e, requests = group.len(), "group commit failed");
        group.into_iter().for_each(|c| c.fail(&e));
        if e.is_io() {
            // redb refuses writes after an I/O error until reopened. Reopening waits
            // for the next write, so that reads go on meanwhile from the handle that
            // is still open.
            self.needs_reopen = true;
        }
        match self.shared.db.get().and_then(|db| State::load(&db)) {
            Ok(state) => self.state = state,
            Err(e) => {
                error!(error = %e, "reloading the log state failed; reopening before the next write");
                self.needs_reopen = true;
            }
        }
    }

    /// Makes committed changes visible to readers and wakes the waiting ones.
    fn publish(&self, changes: &Changes) {
        if changes.created.is_empty()
            && changes.reconfigured.is_empty()
            && changes.deleted.is_empty()
            && changes.advanced.is_empty()
        {
            return;
        }
        let mut catalog = self.shared.catalog.write();
        for name in &changes.deleted {
            catalog.topics.remove(name);
        }
        for name in &changes.created {
            if self.state.topics.contains_key(name) {
                catalog.topics.insert(name.clone(), self.state.handle(name));
            }
        }
        for name in &changes.reconfigured {
            // Keep the watch senders: readers waiting on them must not be cut off.
            if let Some(old) = catalog.topics.get(name) {
                let handle = TopicHandle {
                    id: old.id,
                    info: self.state.info(name),
                    offsets: old.offsets.clone(),
                };
                catalog.topics.insert(name.clone(), Arc::new(handle));
            }
        }
        for (name, p) in &changes.advanced {
            if let (Some(handle), Some(state)) =
                (catalog.topics.get(name), self.state.topics.get(name))
            {
                handle.offsets[*p as usize].send_replace(state.partitions[*p as usize].offsets());
            }
        }
    }
}
