//! The log's contract, tested through its public API on a real redb file.

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::Compression;
use proptest::prelude::*;
use weir::storage::*;
use weir_wire::record_batch::build::{NewRecord, batch};
use weir_wire::record_batch::{BatchError, RecordBatch};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client-style batch of `count` records of `size` bytes, tagged by `tag`.
fn client_batch(tag: u64, count: usize, size: usize, timestamp_ms: i64) -> Bytes {
    let records: Vec<NewRecord> = (0..count)
        .map(|i| NewRecord {
            key: Some(Bytes::from(format!("{tag}-{i}"))),
            value: Some(Bytes::from(vec![(tag as u8).wrapping_add(i as u8); size])),
            timestamp_ms: timestamp_ms + i as i64,
            ..Default::default()
        })
        .collect();
    batch(&records, Compression::None).unwrap()
}

/// The stored form of a client batch: the same bytes with the broker's base offset.
fn stored_form(sent: &Bytes, base: u64) -> Bytes {
    RecordBatch::parse(sent.clone())
        .unwrap()
        .with_base_offset(base as i64, 0)
        .into_bytes()
}

fn read_all(log: &Log, topic: &str, partition: u32) -> Vec<RecordBatch> {
    let offsets = log.offsets(topic, partition).unwrap();
    let mut out = Vec::new();
    let mut next = offsets.log_start;
    while next < offsets.high_watermark {
        let result = log.read(topic, partition, next, 64 << 10).unwrap();
        assert!(!result.batches.is_empty());
        for b in result.batches {
            next = b.base_offset() as u64 + b.offset_count();
            out.push(b);
        }
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        partition: u32,
        count: usize,
        size: usize,
        age_ms: i64,
    },
    Read {
        partition: u32,
        offset_pick: u64,
        max_bytes: usize,
    },
    RetentionBytes {
        limit: u64,
    },
    RetentionAge {
        age_ms: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u32..3, 1usize..20, 0usize..300, 0i64..100_000)
            .prop_map(|(partition, count, size, age_ms)| Op::Append { partition, count, size, age_ms }),
        3 => (0u32..3, any::<u64>(), 1usize..20_000)
            .prop_map(|(partition, offset_pick, max_bytes)| Op::Read { partition, offset_pick, max_bytes }),
        1 => (0u64..20_000).prop_map(|limit| Op::RetentionBytes { limit }),
        1 => (0u64..100_000).prop_map(|age_ms| Op::RetentionAge { age_ms }),
        1 => Just(Op::Reopen),
    ]
}

/// What the model expects a partition to hold: (base offset, stored bytes, append time).
#[derive(Default, Clone)]
struct ModelPartition {
    batches: Vec<(u64, Bytes, i64)>,
    next: u64,
    log_start: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any sequence of appends, reads, retention runs and reopenings returns exactly
    /// the appended batches, in order, with contiguous offsets.
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        rt.block_on(async {
            let mut options = LogOptions::new(dir.path());
            options.fsync = false; // durability is the crash test's job; this one is about contents
            let mut log = Log::open(options.clone()).unwrap();
            log.create_topic("t", 3, TopicConfig { retention_ms: None, ..TopicConfig::default() }).await.unwrap();
            let mut model = vec![ModelPartition::default(); 3];
            let mut tag = 0u64;
            for op in ops {
                match op {
                    Op::Append { partition, count, size, age_ms } => {
                        tag += 1;
                        let sent = client_batch(tag, count, size, 1_600_000_000_000 - age_ms);
                        let before = storage_now();
                        let out = log.append("t", partition, sent.clone()).await.unwrap();
                        let m = &mut model[partition as usize];
                        prop_assert_eq!(out.base_offset, m.next);
                        prop_assert_eq!(out.last_offset, m.next + count as u64 - 1);
                        prop_assert!(out.append_time_ms >= before);
                        m.batches.push((m.next, stored_form(&sent, m.next), out.append_time_ms));
                        m.next += count as u64;
                    }
                    Op::Read { partition, offset_pick, max_bytes } => {
                        let m = &model[partition as usize];
                        let span = m.next - m.log_start + 2;
                        let offset = m.log_start + offset_pick % span; // may be past the end
                        let result = log.read("t", partition, offset, max_bytes);
                        if offset > m.next {
                            prop_assert!(matches!(result, Err(ReadError::OffsetOutOfRange { .. })), "{:?}", result);
                            continue;
                        }
                        let result = result.unwrap();
                        prop_assert_eq!(result.offsets, PartitionOffsets { log_start: m.log_start, high_watermark: m.next });
                        let first = m.batches.iter().position(|(base, b, _)| {
                            let count = RecordBatch::parse(b.clone()).unwrap().offset_count();
                            offset < base + count
                        });
                        let mut expected = Vec::new();
                        let mut total = 0;
                        if let Some(first) = first {
                            for (_, b, _) in &m.batches[first..] {
                                if !expected.is_empty() && total + b.len() > max_bytes { break; }
                                total += b.len();
                                expected.push(b.clone());
                                if total >= max_bytes { break; }
                            }
                        }
                        let got: Vec<Bytes> = result.batches.into_iter().map(RecordBatch::into_bytes).collect();
                        prop_assert_eq!(got, expected);
                    }
                    Op::RetentionBytes { limit } => {
                        set_retention(&mut log, None, Some(limit)).await;
                        log.enforce_retention(storage_now()).await.unwrap();
                        for m in &mut model {
                            let mut size: u64 = m.batches.iter().map(|(_, b, _)| b.len() as u64).sum();
                            while size > limit {
                                let (base, b, _) = m.batches.remove(0);
                                size -= b.len() as u64;
                                m.log_start = base + RecordBatch::parse(b).unwrap().offset_count();
                            }
                        }
                    }
                    Op::RetentionAge { age_ms } => {
                        set_retention(&mut log, Some(age_ms), None).await;
                        let now = storage_now();
                        log.enforce_retention(now).await.unwrap();
                        for m in &mut model {
                            while let Some((base, b, at)) = m.batches.first().cloned() {
                                if at >= now - age_ms as i64 { break; }
                                m.batches.remove(0);
                                m.log_start = base + RecordBatch::parse(b).unwrap().offset_count();
                            }
                        }
                    }
                    Op::Reopen => {
                        log.close().await.unwrap();
                        log = Log::open(options.clone()).unwrap();
                    }
                }
            }
            for (p, m) in model.iter().enumerate() {
                let got: Vec<Bytes> = read_all(&log, "t", p as u32).into_iter().map(RecordBatch::into_bytes).collect();
                let expected: Vec<Bytes> = m.batches.iter().map(|(_, b, _)| b.clone()).collect();
                prop_assert_eq!(got, expected);
                prop_assert_eq!(log.offsets("t", p as u32).unwrap(), PartitionOffsets { log_start: m.log_start, high_watermark: m.next });
            }
            log.close().await.unwrap();
            Ok(())
        })?;
    }
}

fn storage_now() -> i64 {
    weir::storage::now_ms()
}

async fn set_retention(log: &mut Log, ms: Option<u64>, bytes: Option<u64>) {
    let config = TopicConfig {
        retention_ms: ms,
        retention_bytes: bytes,
        ..TopicConfig::default()
    };
    log.set_topic_config("t", config).await.unwrap();
}

#[test]
fn refuses_bad_batches_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let good = client_batch(1, 3, 10, 0);

        let mut bad_crc = BytesMut::from(&good[..]);
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        let e = log.append("t", 0, bad_crc.freeze()).await.unwrap_err();
        assert!(
            matches!(e, WriteError::InvalidBatch(BatchError::CorruptCrc { .. })),
            "{e}"
        );

        let e = log
            .append("t", 0, good.slice(..good.len() - 5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::InvalidBatch(BatchError::LengthMismatch { .. })
            ),
            "{e}"
        );

        let mut bad_magic = BytesMut::from(&good[..]);
        bad_magic[16] = 0;
        let e = log.append("t", 0, bad_magic.freeze()).await.unwrap_err();
        assert!(
            matches!(e, WriteError::InvalidBatch(BatchError::UnsupportedMagic(0))),
            "{e}"
        );

        // One bad batch among good ones refuses the whole record set.
        let mut mixed = BytesMut::from(&good[..]);
        mixed.extend_from_slice(&good[..20]);
        assert!(log.append("t", 0, mixed.freeze()).await.is_err());

        let e = log.append("nope", 0, good.clone()).await.unwrap_err();
        assert!(matches!(e, WriteError::NotFound(NotFound::Topic(_))), "{e}");
        let e = log.append("t", 1, good.clone()).await.unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::NotFound(NotFound::Partition { partition: 1, .. })
            ),
            "{e}"
        );

        assert_eq!(log.offsets("t", 0).unwrap(), PartitionOffsets::default());
        let out = log.append("t", 0, good).await.unwrap();
        assert_eq!(out.base_offset, 0);
        log.close().await.unwrap();
    });
}

#[test]
fn topic_rules() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        for bad in ["", ".", "..", "a/b", "has space", &"x".repeat(250)] {
            let e = log
                .create_topic(bad, 1, TopicConfig::default())
                .await
                .unwrap_err();
            assert!(matches!(e, TopicError::InvalidName(_)), "{bad:?}: {e}");
        }
        assert!(matches!(
            log.create_topic("t", 0, TopicConfig::default()).await,
            Err(TopicError::InvalidPartitions(0))
        ));
        log.create_topic("a.b", 2, TopicConfig::default())
            .await
            .unwrap();
        assert!(matches!(
            log.create_topic("a.b", 2, TopicConfig::default()).await,
            Err(TopicError::AlreadyExists(_))
        ));
        assert!(matches!(
            log.create_topic("a_b", 2, TopicConfig::default()).await,
            Err(TopicError::Collides { .. })
        ));
        log.append("a.b", 1, client_batch(1, 2, 5, 0))
            .await
            .unwrap();
        log.commit_offsets("g", vec![("a.b".into(), 1, committed(2))])
            .await
            .unwrap();
        log.delete_topic("a.b").await.unwrap();
        assert!(log.topic("a.b").is_none());
        assert!(log.committed_offsets("g").unwrap().is_empty());
        assert!(matches!(
            log.delete_topic("a.b").await,
            Err(TopicError::NotFound(_))
        ));
        // A new topic of the same name starts empty.
        log.create_topic("a.b", 1, TopicConfig::default())
            .await
            .unwrap();
        assert_eq!(log.offsets("a.b", 0).unwrap(), PartitionOffsets::default());
        log.close().await.unwrap();
    });
}

fn committed(offset: i64) -> CommittedOffset {
    CommittedOffset {
        offset,
        leader_epoch: -1,
        metadata: "m".into(),
        commit_time_ms: 1,
    }
}

#[test]
fn offsets_state_and_timestamps_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let options = LogOptions::new(dir.path());
        let log = Log::open(options.clone()).unwrap();
        log.create_topic("t", 2, TopicConfig::default())
            .await
            .unwrap();
        for i in 0..5 {
            log.append("t", 0, client_batch(i, 4, 10, 1000 * i as i64))
                .await
                .unwrap();
        }
        log.commit_offsets(
            "g1",
            vec![("t".into(), 0, committed(7)), ("t".into(), 1, committed(0))],
        )
        .await
        .unwrap();
        log.commit_offsets("g2", vec![("t".into(), 0, committed(3))])
            .await
            .unwrap();
        log.put_state("cursor", "up/t/0", &(42u64, "x".to_string()))
            .await
            .unwrap();
        log.close().await.unwrap();

        let log = Log::open(options).unwrap();
        assert_eq!(log.offsets("t", 0).unwrap().high_watermark, 20);
        assert_eq!(log.committed_offsets("g1").unwrap().len(), 2);
        assert_eq!(log.committed_offsets("g2").unwrap()[0].2.offset, 3);
        assert_eq!(log.groups_with_offsets().unwrap(), vec!["g1", "g2"]);
        let state: Option<(u64, String)> = log.get_state("cursor", "up/t/0").unwrap();
        assert_eq!(state, Some((42, "x".into())));
        // Batch i holds timestamps 1000*i .. 1000*i+3 at offsets 4*i .. 4*i+3.
        assert_eq!(log.offset_for_timestamp("t", 0, 0).unwrap(), Some((0, 0)));
        assert_eq!(
            log.offset_for_timestamp("t", 0, 2002).unwrap(),
            Some((10, 2002))
        );
        assert_eq!(
            log.offset_for_timestamp("t", 0, 2500).unwrap(),
            Some((12, 3000))
        );
        assert_eq!(log.offset_for_timestamp("t", 0, 9999).unwrap(), None);
        // Reading from the middle of a batch starts at that batch.
        let r = log.read("t", 0, 6, 1).unwrap();
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.batches[0].base_offset(), 4);
        log.delete_state("cursor", "up/t/0").await.unwrap();
        assert_eq!(
            log.get_state::<(u64, String)>("cursor", "up/t/0").unwrap(),
            None
        );
        log.close().await.unwrap();
    });
}

#[test]
fn appends_wake_watchers() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let mut rx = log.watch("t", 0).unwrap();
        let waiter = tokio::spawn(async move {
            rx.changed().await.unwrap();
            rx.borrow().high_watermark
        });
        log.append("t", 0, client_batch(1, 3, 1, 0)).await.unwrap();
        let hw = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hw, 3);
        log.close().await.unwrap();
    });
}

#[test]
fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 4, TopicConfig::default())
            .await
            .unwrap();
        let before = log.metrics().commits.get();
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    for j in 0..10 {
                        log.append("t", (i % 4) as u32, client_batch(i * 100 + j, 2, 50, 0))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let commits = log.metrics().commits.get() - before;
        let total: u64 = (0..4)
            .map(|p| log.offsets("t", p).unwrap().high_watermark)
            .sum();
        assert_eq!(total, 32 * 10 * 2);
        assert!(
            commits < 320,
            "320 appends took {commits} commits: no grouping"
        );
        for p in 0..4 {
            let batches = read_all(&log, "t", p);
            let mut next = 0;
            for b in batches {
                assert_eq!(b.base_offset() as u64, next);
                next += b.offset_count();
            }
        }
        log.close().await.unwrap();
    });
}

#[test]
fn closed_log_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let other = log.clone();
        log.close().await.unwrap();
        let e = other
            .append("t", 0, client_batch(1, 1, 1, 0))
            .await
            .unwrap_err();
        assert!(
            matches!(e, WriteError::Storage(StorageError::Closed)),
            "{e}"
        );
    });
}

/// Timestamp look-ups across many time-index intervals, with timestamps that go
/// backwards now and then, agree with a brute-force scan, before and after retention.
#[test]
fn offset_for_timestamp_matches_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic(
            "t",
            1,
            TopicConfig {
                retention_ms: None,
                ..TopicConfig::default()
            },
        )
        .await
        .unwrap();
        let mut records = Vec::new(); // (offset, timestamp)
        let mut next = 0u64;
        for i in 0..400i64 {
            // Rising, but every other batch dips far back.
            let base_ts = if i % 2 == 1 { 10 * i - 1000 } else { 10 * i };
            let b = client_batch(i as u64, 5, 1800, base_ts);
            log.append("t", 0, b).await.unwrap();
            for r in 0..5 {
                records.push((next + r, base_ts + r as i64));
            }
            next += 5;
        }
        let brute = |records: &[(u64, i64)], target: i64| {
            records.iter().find(|(_, ts)| *ts >= target).copied()
        };
        for target in (-1100..4100).step_by(13) {
            assert_eq!(
                log.offset_for_timestamp("t", 0, target).unwrap(),
                brute(&records, target),
                "target {target}"
            );
        }
        // Drop about half by size; look-ups only see what is left.
        let mut config = log.topic("t").unwrap().config;
        config.retention_bytes = Some(log.describe("t").unwrap().1[0].bytes / 2);
        log.set_topic_config("t", config).await.unwrap();
        log.enforce_retention(weir::storage::now_ms())
            .await
            .unwrap();
        let start = log.offsets("t", 0).unwrap().log_start;
        assert!(start > 0);
        let left: Vec<(u64, i64)> = records
            .iter()
            .copied()
            .filter(|(o, _)| *o >= start)
            .collect();
        for target in (-1100..4100).step_by(11) {
            assert_eq!(
                log.offset_for_timestamp("t", 0, target).unwrap(),
                brute(&left, target),
                "target {target}"
            );
        }
        log.close().await.unwrap();
    });
}

/// Appending far more than `retention.bytes` while retention runs keeps the database
/// file bounded: redb reuses the pages retention frees.
#[test]
fn disk_use_stays_bounded_under_retention() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let mut options = LogOptions::new(dir.path());
        options.fsync = false;
        let log = Log::open(options).unwrap();
        let config = TopicConfig {
            retention_ms: None,
            retention_bytes: Some(1 << 20),
            ..TopicConfig::default()
        };
        log.create_topic("t", 2, config).await.unwrap();
        let mut sizes = Vec::new();
        for round in 0..40u64 {
            for i in 0..10u64 {
                // ~32 KiB batches: 40 rounds × 10 × 2 partitions ≈ 25 MiB appended.
                for p in 0..2 {
                    log.append("t", p, client_batch(round * 100 + i, 32, 1000, 0))
                        .await
                        .unwrap();
                }
            }
            log.enforce_retention(weir::storage::now_ms())
                .await
                .unwrap();
            log.flush().await.unwrap();
            sizes.push(std::fs::metadata(Log::db_path(dir.path())).unwrap().len());
        }
        let (_, parts) = log.describe("t").unwrap();
        for p in &parts {
            assert!(
                p.bytes <= 1 << 20,
                "partition {} holds {} bytes",
                p.partition,
                p.bytes
            );
            assert!(p.log_start > 0);
        }
        let last = *sizes.last().unwrap();
        let at_quarter = sizes[sizes.len() / 4];
        eprintln!(
            "database file: {} bytes after round 1, {at_quarter} at round 10, {last} at round 40",
            sizes[0]
        );
        assert!(
            last < 16 << 20,
            "file grew to {last} bytes for ~2 MiB of retained data"
        );
        assert!(last <= at_quarter * 2, "file keeps growing: {sizes:?}");
        log.close().await.unwrap();
    });
}

/// The durability window: appends that arrive one after another within it share one
/// durable commit, and each is answered only after that commit; an appender that
/// waits for each answer before the next is not held for the window.
#[test]
fn the_commit_window_groups_a_light_load_without_slowing_a_synchronous_writer() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let mut options = LogOptions::new(dir.path());
        options.commit_interval = std::time::Duration::from_millis(1000);
        let log = Log::open(options).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        // Ten independent writers, 2 ms apart: one window.
        let before = log.metrics().commits.get();
        let mut tasks = Vec::new();
        for i in 0..10u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append("t", 0, client_batch(i, 1, 10, 0)).await.unwrap();
                log.metrics().commits.get()
            }));
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        for t in tasks {
            // Answered after the commit that holds it.
            assert!(t.await.unwrap() > before);
        }
        let commits = log.metrics().commits.get() - before;
        assert!(
            commits <= 2,
            "10 appends within the window took {commits} commits"
        );
        assert_eq!(log.offsets("t", 0).unwrap().high_watermark, 10);

        // One writer waiting for each answer: twenty commits, none held for the
        // second-long window (that would take twenty seconds).
        let before = log.metrics().commits.get();
        let sequential = async {
            for i in 0..20u64 {
                log.append("t", 0, client_batch(i, 1, 10, 0)).await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), sequential)
            .await
            .expect("a synchronous writer was held for the window");
        assert_eq!(log.metrics().commits.get() - before, 20);
        log.close().await.unwrap();
    });
}

/// Format 1 was written by two layouts: the second (migrated to 4 on open, data intact,
/// as are formats 2 and 3: the same tables, topic configs as a fixed struct) and the
/// first, with a `batch_index` table (refused, naming both versions).
#[test]
fn an_older_format_is_migrated_or_refused() {
    use redb::{ReadableDatabase, TableDefinition};
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
    /// A topic row as formats 1 to 3 wrote it.
    #[derive(serde::Serialize)]
    struct OldTopic {
        id: u32,
        partitions: u32,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        max_message_bytes: u32,
        cleanup_policy_delete: u32,
        created_ms: i64,
    }
    // Only the table's name marks the first layout; its types do not matter here.
    const BATCH_INDEX: TableDefinition<u64, u64> = TableDefinition::new("batch_index");
    const OLD_PARTITIONS: TableDefinition<(u32, u32), (u64, u64, u64)> =
        TableDefinition::new("partitions");
    let set_version = |path: &std::path::Path, version: u64| {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format_version", version)
            .unwrap();
        let old = OldTopic {
            id: 0,
            partitions: 1,
            retention_ms: Some(12_345),
            retention_bytes: None,
            max_message_bytes: 2048,
            cleanup_policy_delete: 0,
            created_ms: 1,
        };
        let row = postcard::to_stdvec(&old).unwrap();
        txn.open_table(TOPICS)
            .unwrap()
            .insert("t", row.as_slice())
            .unwrap();
        txn.commit().unwrap();
    };
    let version = |path: &std::path::Path| {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get("format_version").unwrap().map(|v| v.value())
    };

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    rt().block_on(async {
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        log.append("t", 0, client_batch(1, 3, 10, 0)).await.unwrap();
        log.close().await.unwrap();
    });
    assert_eq!(version(&file), Some(4));
    for old_version in [1, 2, 3] {
        set_version(&file, old_version);
        rt().block_on(async {
            let log = Log::open(LogOptions::new(dir.path())).unwrap();
            assert_eq!(log.offsets("t", 0).unwrap().high_watermark, 3);
            assert_eq!(read_all(&log, "t", 0).len(), 1);
            let config = log.topic("t").unwrap().config;
            assert_eq!(config.retention_ms, Some(12_345));
            assert_eq!(config.max_message_bytes, 2048);
            assert_eq!(config.compression_type, CompressionType::Producer);
            log.close().await.unwrap();
        });
        assert_eq!(version(&file), Some(4));
    }

    let old = tempfile::tempdir().unwrap();
    let file = old.path().join(DB_FILE);
    {
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format_version", 1)
            .unwrap();
        txn.open_table(BATCH_INDEX).unwrap().insert(0, 61).unwrap();
        txn.open_table(OLD_PARTITIONS)
            .unwrap()
            .insert((0, 0), (0, 1, 61))
            .unwrap();
        txn.commit().unwrap();
    }
    let Err(e) = Log::open(LogOptions::new(old.path())) else {
        panic!("a database of the first layout opened");
    };
    assert!(
        matches!(
            e,
            StorageError::FormatVersion {
                found: 1,
                expected: 4
            }
        ),
        "{e}"
    );
    let message = e.to_string();
    assert!(
        message.contains("version 1") && message.contains("version 4"),
        "{message}"
    );
    // Refused without a change: still the old file.
    assert_eq!(version(&file), Some(1));
}

/// `(offset, value)` of every record stored in a partition, and how many batches hold them.
fn stored_records(log: &Log, topic: &str, partition: u32) -> (Vec<(i64, Bytes)>, usize) {
    let batches = read_all(log, topic, partition);
    let mut records = Vec::new();
    for b in &batches {
        let mut bytes = b.as_bytes().clone();
        let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes).unwrap();
        records.extend(
            set.records
                .into_iter()
                .map(|r| (r.offset, r.value.unwrap_or_default())),
        );
    }
    (records, batches.len())
}

fn records_op(topic: &str, partition: u32, values: &[Vec<u8>]) -> WriteOp {
    WriteOp::AppendRecords {
        topic: topic.into(),
        partition,
        records: values
            .iter()
            .map(|v| NewRecord {
                key: None,
                value: Some(Bytes::from(v.clone())),
                timestamp_ms: 1_700_000_000_000,
                headers: vec![("mqtt.topic".into(), Bytes::from_static(b"a/b"))],
            })
            .collect(),
    }
}

fn appended(outcome: Result<Vec<WriteOutcome>, WriteError>) -> AppendOutcome {
    match outcome.unwrap().remove(0) {
        WriteOutcome::Appended(a) => a,
        other => panic!("{other:?}"),
    }
}

/// Records the broker made (MQTT ingest, pipelines, downlinks) that one window gathers
/// for a partition are stored as one batch, each write answered with its own offsets; a
/// client's batch between them keeps its place; a large window is cut into batches the
/// topic's max.message.bytes allows; an empty or oversized write is refused alone.
#[test]
fn records_the_broker_made_in_one_window_share_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let mut options = LogOptions::new(dir.path());
        options.commit_interval = std::time::Duration::from_millis(1000);
        let log = Log::open(options).unwrap();
        log.create_topic("t", 2, TopicConfig::default())
            .await
            .unwrap();
        let mut pending = Vec::new();
        for i in 0..20u8 {
            pending.push(
                log.submit(vec![records_op("t", 0, &[vec![i]])])
                    .await
                    .unwrap(),
            );
        }
        let other = log
            .submit(vec![records_op("t", 1, &[vec![99]])])
            .await
            .unwrap();
        for (i, p) in pending.into_iter().enumerate() {
            let a = appended(p.await);
            assert_eq!((a.base_offset, a.last_offset), (i as u64, i as u64));
        }
        assert_eq!(appended(other.await).base_offset, 0);
        let (records, batches) = stored_records(&log, "t", 0);
        let expected: Vec<(i64, Bytes)> = (0..20u8)
            .map(|i| (i64::from(i), Bytes::from(vec![i])))
            .collect();
        assert_eq!(records, expected);
        assert!(
            batches <= 2,
            "20 one-record writes in one window: {batches} batches"
        );
        // Compressed with the topic's compression.type: zstd (4) for "producer".
        let codec = |topic: &str| {
            let batches = read_all(&log, topic, 0);
            batches
                .iter()
                .map(|b| b.header().attributes() & 7)
                .collect::<Vec<i16>>()
        };
        assert!(codec("t").iter().all(|c| *c == 4), "{:?}", codec("t"));
        for (name, expected) in [("uncompressed", 0), ("gzip", 1), ("lz4", 3)] {
            let config = TopicConfig::default()
                .with_overrides([("compression.type", name)])
                .unwrap();
            log.create_topic(name, 1, config).await.unwrap();
            log.write(vec![records_op(name, 0, &[vec![1], vec![2]])])
                .await
                .unwrap();
            assert_eq!(codec(name), vec![expected], "{name}");
            assert_eq!(stored_records(&log, name, 0).0.len(), 2);
        }

        // A client's batch between two of them: offsets in the order of arrival.
        let first = log
            .submit(vec![records_op("t", 0, &[vec![20]])])
            .await
            .unwrap();
        let client = client_batch(7, 3, 10, 0);
        let op = WriteOp::Append {
            topic: "t".into(),
            partition: 0,
            batches: vec![RecordBatch::parse(client.clone()).unwrap()],
        };
        let middle = log.submit(vec![op]).await.unwrap();
        let last = log
            .submit(vec![records_op("t", 0, &[vec![24], vec![25]])])
            .await
            .unwrap();
        assert_eq!(appended(first.await).base_offset, 20);
        assert_eq!(appended(middle.await).base_offset, 21);
        let a = appended(last.await);
        assert_eq!((a.base_offset, a.last_offset), (24, 25));
        let (records, _) = stored_records(&log, "t", 0);
        let offsets: Vec<i64> = records.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (0..26).collect::<Vec<i64>>());
        assert_eq!(records[20].1, Bytes::from(vec![20]));
        assert_eq!(records[24].1, Bytes::from(vec![24]));

        // 100 KB records: at most 256 KiB per batch, so two and one.
        let big: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100_000]).collect();
        log.write(vec![records_op("t", 1, &big)]).await.unwrap();
        let (records, batches) = stored_records(&log, "t", 1);
        assert_eq!(records.len(), 4);
        assert_eq!(
            batches, 3,
            "one batch of the first window, then two of 100 KB records"
        );
        assert_eq!(records[3].1.len(), 100_000);

        // Refusals answer their own write only.
        let small = TopicConfig {
            max_message_bytes: 1_000,
            ..Default::default()
        };
        log.create_topic("small", 1, small).await.unwrap();
        let empty = log.submit(vec![records_op("small", 0, &[])]).await.unwrap();
        let too_big = log
            .submit(vec![records_op("small", 0, &[vec![1; 2_000]])])
            .await
            .unwrap();
        let fine = log
            .submit(vec![records_op("small", 0, &[vec![1; 500]])])
            .await
            .unwrap();
        assert!(matches!(
            empty.await,
            Err(WriteError::InvalidBatch(BatchError::Empty))
        ));
        assert!(matches!(
            too_big.await,
            Err(WriteError::MessageTooLarge { max: 1_000, .. })
        ));
        assert_eq!(appended(fine.await).base_offset, 0);
        log.close().await.unwrap();
    });
}
