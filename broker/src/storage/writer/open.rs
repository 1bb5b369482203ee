//! Opening the database file: its format version and layout migrations, a file left
//! half-created by a crash set aside, and the write-ahead journal's file.

use std::sync::Arc;

use redb::{Database, ReadableTable, Table, TableHandle, WriteTransaction};
use tracing::{info, warn};

use super::super::journal::Journal;
use super::super::tables::*;
use super::super::{LogOptions, StorageError, encode_stored};
use super::State;

/// Opens or creates the database and loads the writer state.
pub(in crate::storage) fn open_database(
    options: &LogOptions,
) -> Result<(Database, State), StorageError> {
    let path = options.data_dir.join(super::super::DB_FILE);
    let db = open_file(&path, options)?;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get("format_version")?.map(|v| v.value());
        match found {
            None => {
                meta.insert("format_version", FORMAT_VERSION)?;
            }
            Some(FORMAT_VERSION) => {}
            // Format 1 was written by two layouts. The second is today's tables (time
            // index, six-field partition rows, batches with their append time) under the
            // old number, as are formats 2 (no journal yet) and 3 (topic configs as a
            // fixed struct): their topic rows are rewritten. The first (a `batch_index`
            // table) is refused.
            Some(old @ 2..=3) => {
                migrate_topic_rows(&txn, &path, old)?;
                meta.insert("format_version", FORMAT_VERSION)?;
            }
            Some(1) if !has_table(&txn, FIRST_LAYOUT_TABLE)? => {
                migrate_topic_rows(&txn, &path, 1)?;
                meta.insert("format_version", FORMAT_VERSION)?;
            }
            Some(found) => {
                return Err(StorageError::FormatVersion {
                    found,
                    expected: FORMAT_VERSION,
                });
            }
        }
        // Create every table so that readers never meet a missing one.
        txn.open_table(TOPICS)?;
        txn.open_table(PARTITIONS)?;
        txn.open_table(BATCHES)?;
        txn.open_table(TIME_INDEX)?;
        txn.open_table(GROUP_OFFSETS)?;
        txn.open_table(STATE)?;
    }
    txn.commit()?;
    let state = State::load(&db)?;
    Ok((db, state))
}

/// Rewrites each topic row in today's form, in the caller's transaction (which sets
/// today's format number): all or nothing.
fn migrate_topic_rows(
    txn: &WriteTransaction,
    path: &std::path::Path,
    from: u64,
) -> Result<(), StorageError> {
    let mut topics = txn.open_table(TOPICS)?;
    let mut rows = Vec::new();
    for entry in topics.iter()? {
        let (name, value) = entry?;
        let old: TopicRecordV3 = super::super::decode("topics", value.value())?;
        rows.push((name.value().to_string(), TopicRecord::from(old)));
    }
    for (name, record) in &rows {
        topics.insert(name.as_str(), encode_stored(record).as_slice())?;
    }
    info!(path = %path.display(), topics = rows.len(), "database format {from} migrated to {FORMAT_VERSION}");
    Ok(())
}

/// A table only the first layout of format 1 has.
const FIRST_LAYOUT_TABLE: &str = "batch_index";

fn has_table(txn: &WriteTransaction, name: &str) -> Result<bool, StorageError> {
    Ok(txn.list_tables()?.any(|t| t.name() == name))
}

pub(super) fn open_file(
    path: &std::path::Path,
    options: &LogOptions,
) -> Result<Database, StorageError> {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(options.cache_bytes);
    let io = |e: std::io::Error| StorageError::DataDir {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let Some(open) = &options.open_backend else {
        set_aside_unfinished_creation(path)?;
        return Ok(builder.create(path)?);
    };
    let backend = (open.0)(super::super::DB_FILE);
    let len = backend.len().map_err(io)?;
    let mut head = vec![0; REDB_MAGIC.len().min(len as usize)];
    backend.read(0, &mut head).map_err(io)?;
    if unfinished_creation(len, &head)? {
        warn!(
            len,
            "the database's creation never finished (power cut?): creating it again"
        );
        backend.set_len(0).map_err(io)?;
    }
    Ok(builder.create_with_backend(Boxed(backend))?)
}

/// The first bytes of every redb file, which redb writes last when it creates one.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// A file redb has just laid out is this small (72 KiB with its defaults); one that
/// ever held data is larger.
const MAX_UNFINISHED_BYTES: u64 = 1 << 20;

/// redb writes its magic number only once a new file is laid out and synced, so that a
/// crash during creation is recognisable, but then refuses to open such a file. A file
/// without the magic number held no commit, so nothing is lost by creating it again.
/// A larger one is not an interrupted creation: refused, with the reason.
fn unfinished_creation(len: u64, head: &[u8]) -> Result<bool, StorageError> {
    if len == 0 || head == REDB_MAGIC {
        return Ok(false);
    }
    if len > MAX_UNFINISHED_BYTES {
        return Err(StorageError::Corrupt {
            table: "header",
            detail: format!(
                "the {len}-byte database file does not start with redb's magic number: \
                 it is not a redb database, or its first page was destroyed"
            ),
        });
    }
    Ok(true)
}

/// Moves a file whose creation never finished aside (`weir.redb.unfinished`), so that
/// redb creates it again.
fn set_aside_unfinished_creation(path: &std::path::Path) -> Result<(), StorageError> {
    use std::io::Read;
    let io = |e: std::io::Error| StorageError::DataDir {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    let len = match std::fs::File::open(path) {
        Ok(file) => {
            let len = file.metadata().map_err(io)?.len();
            file.take(REDB_MAGIC.len() as u64)
                .read_to_end(&mut head)
                .map_err(io)?;
            len
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if unfinished_creation(len, &head)? {
        let aside = path.with_extension("redb.unfinished");
        warn!(path = %path.display(), aside = %aside.display(), len,
            "the database's creation never finished (power cut?): moved aside, creating it again");
        std::fs::rename(path, &aside).map_err(io)?;
    }
    Ok(())
}

/// Marks a durable commit as a checkpoint: the journal's entries up to now are in the
/// database, and its next generation starts empty.
pub(super) fn start_generation(
    meta: &mut Table<&'static str, u64>,
    generation: u64,
) -> Result<(), StorageError> {
    meta.insert(JOURNAL_GENERATION, generation)?;
    meta.insert(JOURNAL_SEQ, 0)?;
    Ok(())
}

/// Whether small groups go to the journal: not without a checkpoint interval, nor
/// without fsync (nothing waits for durability), nor with the test-only early
/// acknowledgement.
pub(super) fn journal_on(options: &LogOptions) -> bool {
    !options.checkpoint_interval.is_zero() && options.acks_wait_for_durability()
}

/// The journal of `options.data_dir`: when it is on, or when a journal is there to be
/// replayed (it was on before the restart); `None` otherwise.
pub(super) fn open_journal(options: &LogOptions) -> Result<Option<Journal>, StorageError> {
    let on = journal_on(options);
    let path = options.data_dir.join(super::super::JOURNAL_FILE);
    let file: Box<dyn redb::StorageBackend> = match &options.open_backend {
        Some(open) => (open.0)(super::super::JOURNAL_FILE),
        None => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(on)
                .truncate(false)
                .open(&path);
            match file {
                Ok(file) => Box::new(JournalFile {
                    file,
                    large_write: false.into(),
                }),
                Err(e) if !on && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(StorageError::Journal {
                        path,
                        error: Arc::new(e),
                    });
                }
            }
        }
    };
    Journal::open(file, path, on).map(Some)
}

/// The journal's file, through the interface the power-cut test's disk simulates.
///
/// Its pages leave the page cache after the fill and after the replay reads them: Linux
/// caches a file in folios of up to megabytes where it can (large writes, readahead),
/// and a sync then writes a whole folio for one dirty byte (measured here: 1 MiB
/// written per sync of an 830-byte entry into the freshly filled file, 4.8 KiB once
/// its pages had left the cache).
#[derive(Debug)]
struct JournalFile {
    file: std::fs::File,
    /// A write of more than a page since the last sync.
    large_write: std::sync::atomic::AtomicBool,
}

impl JournalFile {
    /// Advice only: a failure costs wear, not data.
    fn drop_cache(&self, offset: u64, len: u64) {
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
    }
}

impl redb::StorageBackend for JournalFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, out, offset)?;
        self.drop_cache(offset, out.len() as u64);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        if self
            .large_write
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.drop_cache(0, 0);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if data.len() > 4096 {
            self.large_write
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
    }
    fn close(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A boxed backend, as redb takes one by value.
#[derive(Debug)]
struct Boxed(Box<dyn redb::StorageBackend>);

impl redb::StorageBackend for Boxed {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
}
