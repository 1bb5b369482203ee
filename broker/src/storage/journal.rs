//! The write-ahead journal: what makes a small group commit durable without a durable
//! redb commit (flash wear, BENCHMARKS.md).
//!
//! A durable redb commit rewrites about seven 4 KiB pages whatever it holds (header,
//! table tree, allocator state, the B-trees' paths). With the journal, a small group
//! commits to redb without durability and its writes are appended here, compressed, in
//! one entry and synced: one or two pages. Every `checkpoint_interval` a durable redb
//! commit (a checkpoint) makes everything since durable in the database and starts a
//! new generation of the journal, written again from its start.
//!
//! Invariants:
//! - An entry is synced before any write in it is acknowledged.
//! - The entries of the database's journal generation (`meta` `journal_generation`)
//!   whose sequence number is above `meta` `journal_seq` are exactly the groups
//!   committed since the database's last durable commit, in order. Replaying them on
//!   that state (`Writer::recover`) repeats what the writer did, offsets included: the
//!   writer is deterministic given its state, the ops and the entry's clock.
//! - The file is written to its full size once, zero-filled, so that syncing an entry
//!   never changes the file's size or extents (which would also write the filesystem's
//!   journal).
//!
//! An entry: magic, generation, sequence number, clock (ms), compressed length,
//! uncompressed length, CRC-32C of all of these and the payload; then the payload:
//! postcard of the group's writes (one `Vec<WriteOp>` per request), zstd-compressed.
//! Reading stops at the first entry that is torn, of another generation, or out of
//! sequence: it was never acknowledged.

use std::path::PathBuf;

use redb::StorageBackend;

use super::{StorageError, WriteOp};

const MAGIC: [u8; 4] = *b"WJ01";
const HEADER: usize = 4 + 8 + 8 + 8 + 4 + 4 + 4;
/// The journal file's size. Entries are small (a group above `MAX_ENTRY_BYTES` commits
/// durably to redb instead), so this holds many checkpoint intervals of a gateway's load;
/// a full journal checkpoints early.
pub(super) const CAPACITY: u64 = 8 << 20;
/// A group whose writes exceed this commits durably to redb: at that size a commit
/// already writes little more than its data, and journaling it would write it twice.
pub(super) const MAX_ENTRY_BYTES: usize = 128 << 10;
/// Most bytes one entry's payload may decompress to (a bound for corrupt input).
const MAX_UNCOMPRESSED: usize = 16 << 20;
/// zstd's fastest level: a gateway's JSON compresses 3-5x at it, for little CPU.
const ZSTD_LEVEL: i32 = 1;

/// One group's writes, as the writer applied them.
pub(super) struct Entry {
    pub(super) seq: u64,
    pub(super) now_ms: i64,
    pub(super) writes: Vec<Vec<WriteOp>>,
}

pub(super) struct Journal {
    file: Box<dyn StorageBackend>,
    path: PathBuf,
    generation: u64,
    /// The sequence number of the last entry appended in this generation (0: none).
    seq: u64,
    /// Where the next entry goes.
    end: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("generation", &self.generation)
            .field("seq", &self.seq)
            .field("end", &self.end)
            .finish()
    }
}

impl Journal {
    /// Opens the journal on `file`, zero-filling it to its full size first if it is
    /// shorter (a new file, or one whose filling a crash interrupted) and `fill` (it is
    /// to be written; otherwise only replayed).
    pub(super) fn open(
        file: Box<dyn StorageBackend>,
        path: PathBuf,
        fill: bool,
    ) -> Result<Journal, StorageError> {
        let journal = Journal {
            file,
            path,
            generation: 0,
            seq: 0,
            end: 0,
        };
        let len = journal.file.len().map_err(|e| journal.error(e))?;
        if fill && len < CAPACITY {
            journal
                .file
                .set_len(CAPACITY)
                .map_err(|e| journal.error(e))?;
            let zeros = vec![0u8; 1 << 20];
            let mut at = len - len % zeros.len() as u64;
            while at < CAPACITY {
                let n = zeros.len().min((CAPACITY - at) as usize);
                journal
                    .file
                    .write(at, &zeros[..n])
                    .map_err(|e| journal.error(e))?;
                at += n as u64;
            }
            journal.file.sync_data().map_err(|e| journal.error(e))?;
        }
        Ok(journal)
    }

    fn error(&self, e: std::io::Error) -> StorageError {
        StorageError::Journal {
            path: self.path.clone(),
            error: std::sync::Arc::new(e),
        }
    }

    fn corrupt(&self, at: u64, detail: impl std::fmt::Display) -> StorageError {
        StorageError::Corrupt {
            table: "journal",
            detail: format!("{} at byte {at}: {detail}", self.path.display()),
        }
    }

    /// The entries of `generation` after `applied`, in order: what the database lacks.
    /// An entry whose checksum holds but whose payload does not decode is corruption
    /// (refused: skipping it would lose acknowledged writes). A database ahead of its
    /// journal (closed cleanly after a failed checkpoint, which redb's close makes
    /// durable) lacks nothing.
    pub(super) fn entries_after(
        &self,
        generation: u64,
        applied: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut entries = Vec::new();
        let mut at = 0u64;
        let mut expected = 1u64;
        let mut header = [0u8; HEADER];
        let len = self.file.len().map_err(|e| self.error(e))?.min(CAPACITY);
        while at + HEADER as u64 <= len {
            self.file.read(at, &mut header).map_err(|e| self.error(e))?;
            let Some(h) = Header::parse(&header) else {
                break;
            };
            if h.generation != generation || h.seq != expected {
                break;
            }
            let end = at + HEADER as u64 + u64::from(h.compressed);
            if end > len {
                break;
            }
            let mut payload = vec![0u8; h.compressed as usize];
            self.file
                .read(at + HEADER as u64, &mut payload)
                .map_err(|e| self.error(e))?;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..HEADER - 4]), &payload);
            if crc != h.crc {
                // Torn: the write of this entry never finished, so it was never
                // acknowledged, and nothing after it was written.
                break;
            }
            if h.seq > applied {
                if h.uncompressed as usize > MAX_UNCOMPRESSED {
                    return Err(self.corrupt(at, "entry too large"));
                }
                let raw = zstd::bulk::decompress(&payload, h.uncompressed as usize)
                    .map_err(|e| self.corrupt(at, e))?;
                let writes = postcard::from_bytes(&raw).map_err(|e| self.corrupt(at, e))?;
                entries.push(Entry {
                    seq: h.seq,
                    now_ms: h.now_ms,
                    writes,
                });
            }
            expected += 1;
            at = end;
        }
        Ok(entries)
    }

    /// Starts `generation`, written from the file's start: the database's last durable
    /// commit holds everything of earlier ones.
    pub(super) fn start_generation(&mut self, generation: u64) {
        self.generation = generation;
        self.seq = 0;
        self.end = 0;
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The sequence number the next entry will have.
    pub(super) fn next_seq(&self) -> u64 {
        self.seq + 1
    }

    /// Encodes a group's writes as an entry's payload, or `None` when the group is too
    /// large to journal or no longer fits in this generation (checkpoint instead).
    pub(super) fn encode(&self, writes: &[&[WriteOp]]) -> Option<Vec<u8>> {
        // Sized first: a large group (most of a busy producer's) is never encoded.
        let size = postcard::experimental::serialized_size(writes).ok()?;
        if size > MAX_ENTRY_BYTES {
            return None;
        }
        let mut raw = vec![0; size];
        postcard::to_slice(writes, &mut raw).ok()?;
        let compressed = zstd::bulk::compress(&raw, ZSTD_LEVEL).ok()?;
        let fits = self.end + (HEADER + compressed.len()) as u64 <= CAPACITY;
        fits.then(|| {
            let mut entry = Vec::with_capacity(HEADER + compressed.len());
            entry.extend_from_slice(&MAGIC);
            entry.extend_from_slice(&self.generation.to_le_bytes());
            entry.extend_from_slice(&(self.seq + 1).to_le_bytes());
            entry.extend_from_slice(&[0; 8]); // the clock, set by `append`
            entry.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            entry.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            entry.extend_from_slice(&[0; 4]); // the checksum, set by `append`
            entry.extend_from_slice(&compressed);
            entry
        })
    }

    /// Appends an entry `encode` made, stamped with the group's clock, and syncs it.
    pub(super) fn append(&mut self, mut entry: Vec<u8>, now_ms: i64) -> Result<(), StorageError> {
        entry[20..28].copy_from_slice(&now_ms.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&entry[..HEADER - 4]), &entry[HEADER..]);
        entry[HEADER - 4..HEADER].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write(self.end, &entry)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.error(e))?;
        self.seq += 1;
        self.end += entry.len() as u64;
        Ok(())
    }
}

struct Header {
    generation: u64,
    seq: u64,
    now_ms: i64,
    compressed: u32,
    uncompressed: u32,
    crc: u32,
}

impl Header {
    fn parse(b: &[u8; HEADER]) -> Option<Header> {
        if b[..4] != MAGIC {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Some(Header {
            generation: u64_at(4),
            seq: u64_at(12),
            now_ms: u64_at(20) as i64,
            compressed: u32_at(28),
            uncompressed: u32_at(32),
            crc: u32_at(36),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::backends::InMemoryBackend;

    fn put(key: &str) -> Vec<WriteOp> {
        vec![WriteOp::PutState {
            namespace: "n".into(),
            key: key.into(),
            value: Some(key.as_bytes().to_vec()),
        }]
    }

    fn keys(entries: &[Entry]) -> Vec<(u64, String)> {
        entries
            .iter()
            .flat_map(|e| {
                e.writes.iter().flatten().map(move |op| match op {
                    WriteOp::PutState { key, .. } => (e.seq, key.clone()),
                    other => panic!("{other:?}"),
                })
            })
            .collect()
    }

    #[test]
    fn entries_of_the_generation_after_the_applied_one_come_back_in_order() {
        let mut j = Journal::open(Box::new(InMemoryBackend::new()), "j".into(), true).unwrap();
        assert_eq!(j.file.len().unwrap(), CAPACITY);
        j.start_generation(7);
        for key in ["a", "b", "c"] {
            let entry = j.encode(&[&put(key)]).unwrap();
            j.append(entry, 42).unwrap();
        }
        assert_eq!(keys(&j.entries_after(7, 0).unwrap()).len(), 3);
        assert_eq!(
            keys(&j.entries_after(7, 1).unwrap()),
            [(2, "b".to_string()), (3, "c".to_string())]
        );
        assert!(j.entries_after(7, 3).unwrap().is_empty());
        assert_eq!(j.entries_after(7, 0).unwrap()[0].now_ms, 42);
        // Another generation's entries are not this database's.
        assert!(j.entries_after(8, 0).unwrap().is_empty());

        // A new generation overwrites from the start; the old one's tail stops the scan.
        j.start_generation(8);
        let entry = j.encode(&[&put("d"), &put("e")]).unwrap();
        j.append(entry, 43).unwrap();
        assert_eq!(
            keys(&j.entries_after(8, 0).unwrap()),
            [(1, "d".to_string()), (1, "e".to_string())]
        );
    }

    #[test]
    fn a_torn_entry_ends_the_journal() {
        let mut j = Journal::open(Box::new(InMemoryBackend::new()), "j".into(), true).unwrap();
        j.start_generation(1);
        for key in ["a", "b"] {
            let entry = j.encode(&[&put(key)]).unwrap();
            j.append(entry, 1).unwrap();
        }
        let second = j.end - 1;
        j.file.write(second, &[0xff]).unwrap();
        assert_eq!(
            keys(&j.entries_after(1, 0).unwrap()),
            [(1, "a".to_string())]
        );
        assert!(j.entries_after(1, 2).unwrap().is_empty());
    }

    #[test]
    fn large_groups_and_a_full_journal_are_not_journaled() {
        let mut j = Journal::open(Box::new(InMemoryBackend::new()), "j".into(), true).unwrap();
        let big = vec![WriteOp::PutState {
            namespace: "n".into(),
            key: "k".into(),
            value: Some(vec![1; MAX_ENTRY_BYTES + 1]),
        }];
        assert!(j.encode(&[&big]).is_none());
        j.end = CAPACITY - HEADER as u64;
        assert!(j.encode(&[&put("a")]).is_none());
    }
}
