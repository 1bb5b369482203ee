//! `weir bench log`: append and read throughput of the log, side by side with the
//! machine's raw limit (a plain file appended with fsync after each write of the
//! same size as the log's commits) and with bare redb (the same batches inserted,
//! as many per durable commit, into one table and nothing else: the straightforward
//! log on redb, for reference), measured in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use kafka_protocol::records::Compression;

use crate::storage::{Log, LogOptions, TopicConfig};
use weir_wire::record_batch::build::{NewRecord, batch};

#[derive(Clone, Debug)]
pub struct LogBench {
    pub dir: PathBuf,
    pub seconds: f64,
    pub producers: Vec<usize>,
    pub record_sizes: Vec<usize>,
    /// Target size of one batch, as a Kafka client's `batch.size` (16 KiB by default).
    pub batch_bytes: usize,
    pub fsync: bool,
    /// Each configuration runs this many times, log then raw file, to even out a
    /// disk whose speed drifts; the round with the median ratio is reported.
    pub rounds: usize,
    /// The durability window the log runs with.
    pub commit_interval: Duration,
}

#[derive(Clone, Debug)]
pub struct AppendResult {
    pub record_size: usize,
    pub producers: usize,
    pub records_per_s: f64,
    pub mb_per_s: f64,
    pub commits_per_s: f64,
    pub bytes_per_commit: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub raw_mb_per_s: f64,
    /// Bare redb: the same batches, as many per commit, into one table.
    pub redb_mb_per_s: f64,
    pub read_mb_per_s: f64,
    pub read_records_per_s: f64,
    /// Size of the database file over the bytes appended (space amplification).
    pub file_ratio: f64,
    /// Bytes the process wrote to the disk over the bytes appended (Linux only, else 0).
    pub write_ratio: f64,
    /// Lowest and highest log/raw ratio over the rounds.
    pub ratio_range: (f64, f64),
}

/// Bytes this process has caused to be written to storage (`/proc/self/io`).
fn disk_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl AppendResult {
    pub fn ratio(&self) -> f64 {
        self.mb_per_s / self.raw_mb_per_s
    }
}

/// A batch of records of `record_size` value bytes, about `batch_bytes` in all.
fn bench_batch(record_size: usize, batch_bytes: usize) -> (Bytes, usize) {
    let count = (batch_bytes / (record_size + 20)).max(1);
    let records: Vec<NewRecord> = (0..count)
        .map(|i| NewRecord {
            key: Some(Bytes::from(format!("device-{:04}", i % 1000))),
            value: Some(Bytes::from(vec![b'x'; record_size])),
            timestamp_ms: crate::storage::now_ms(),
            ..Default::default()
        })
        .collect();
    (
        batch(&records, Compression::None).expect("encoding a batch in memory"),
        count,
    )
}

pub async fn run(bench: &LogBench) -> anyhow::Result<Vec<AppendResult>> {
    std::fs::create_dir_all(&bench.dir)?;
    let mut results = Vec::new();
    for &record_size in &bench.record_sizes {
        for &producers in &bench.producers {
            let dir = bench.dir.join(format!("log-{record_size}-{producers}"));
            let mut rounds = Vec::new();
            for round in 0..bench.rounds.max(1) {
                let _ = std::fs::remove_dir_all(&dir);
                eprintln!(
                    "append: {record_size} B records, {producers} producers, {:.0} s, round {}",
                    bench.seconds,
                    round + 1
                );
                let mut result = append_run(bench, &dir, record_size, producers).await?;
                result.raw_mb_per_s =
                    raw_file_run(&dir, result.bytes_per_commit as usize, bench.seconds)?;
                let (batch, _) = bench_batch(record_size, bench.batch_bytes);
                let per_commit = (result.bytes_per_commit / batch.len() as f64).round() as usize;
                result.redb_mb_per_s = bare_redb_run(
                    &dir,
                    &batch,
                    producers,
                    per_commit.max(1),
                    bench.fsync,
                    bench.seconds,
                )?;
                std::fs::remove_dir_all(&dir)?;
                rounds.push(result);
            }
            rounds.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
            let range = (rounds[0].ratio(), rounds[rounds.len() - 1].ratio());
            let mut result = rounds.swap_remove(rounds.len() / 2);
            result.ratio_range = range;
            results.push(result);
        }
    }
    Ok(results)
}

async fn append_run(
    bench: &LogBench,
    dir: &Path,
    record_size: usize,
    producers: usize,
) -> anyhow::Result<AppendResult> {
    let mut options = LogOptions::new(dir);
    options.fsync = bench.fsync;
    options.commit_interval = bench.commit_interval;
    let log = Log::open(options)?;
    let config = TopicConfig {
        retention_ms: None,
        ..TopicConfig::default()
    };
    log.create_topic("bench", producers as u32, config).await?;
    let (batch, per_batch) = bench_batch(record_size, bench.batch_bytes);
    let commits_before = log.metrics().commits.get();
    let written_before = disk_write_bytes();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(bench.seconds);
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let (log, batch) = (log.clone(), batch.clone());
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let mut batches = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    log.append("bench", p as u32, batch.clone()).await?;
                    latency.record(t.elapsed().as_micros().max(1) as u64)?;
                    batches += 1;
                }
                anyhow::Ok((batches, latency))
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut batches = 0u64;
    for task in tasks {
        let (n, h) = task.await??;
        batches += n;
        latency.add(h)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let commits = (log.metrics().commits.get() - commits_before) as f64;
    let written = (disk_write_bytes() - written_before) as f64;
    let bytes = batches as f64 * batch.len() as f64;

    // Read everything back from the start, as a catching-up consumer does.
    let read_started = Instant::now();
    let (mut read_bytes, mut read_records) = (0usize, 0u64);
    for p in 0..producers as u32 {
        let mut next = log.offsets("bench", p)?.log_start;
        loop {
            let result = log.read("bench", p, next, 1 << 20)?;
            let Some(last) = result.batches.last() else {
                break;
            };
            next = last.base_offset() as u64 + last.offset_count();
            read_bytes += result.bytes();
            read_records += result
                .batches
                .iter()
                .map(|b| b.record_count() as u64)
                .sum::<u64>();
        }
    }
    let read_elapsed = read_started.elapsed().as_secs_f64();
    log.close().await?;
    let file_bytes = std::fs::metadata(Log::db_path(dir))?.len() as f64;
    Ok(AppendResult {
        file_ratio: file_bytes / bytes,
        write_ratio: written / bytes,
        ratio_range: (0.0, 0.0),
        record_size,
        producers,
        records_per_s: batches as f64 * per_batch as f64 / elapsed,
        mb_per_s: bytes / elapsed / 1e6,
        commits_per_s: commits / elapsed,
        bytes_per_commit: bytes / commits.max(1.0),
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        raw_mb_per_s: 0.0,
        redb_mb_per_s: 0.0,
        read_mb_per_s: read_bytes as f64 / read_elapsed / 1e6,
        read_records_per_s: read_records as f64 / read_elapsed,
    })
}

/// Appends `write_size`-byte writes to a plain file with `fdatasync` after each one.
fn raw_file_run(dir: &Path, write_size: usize, seconds: f64) -> anyhow::Result<f64> {
    let path = dir.join("raw-append.bin");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let chunk = vec![b'r'; write_size.max(1)];
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut written = 0usize;
    while Instant::now() < deadline {
        file.write_all(&chunk)?;
        file.sync_data()?;
        written += chunk.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(written as f64 / elapsed / 1e6)
}

/// Inserts `batch` into a bare redb table keyed (partition, offset), `per_commit`
/// batches a transaction spread over `partitions`, each commit durable (with
/// `fsync`); MB/s of batches.
fn bare_redb_run(
    dir: &Path,
    batch: &[u8],
    partitions: usize,
    per_commit: usize,
    fsync: bool,
    seconds: f64,
) -> anyhow::Result<f64> {
    const TABLE: redb::TableDefinition<(u32, u64), &[u8]> = redb::TableDefinition::new("batches");
    let path = dir.join("bare.redb");
    let db = redb::Database::create(&path)?;
    let mut next = vec![0u64; partitions.max(1)];
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut written = 0usize;
    let mut p = 0;
    while Instant::now() < deadline {
        let mut txn = db.begin_write()?;
        txn.set_durability(if fsync {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        {
            let mut table = txn.open_table(TABLE)?;
            for _ in 0..per_commit {
                table.insert((p as u32, next[p]), batch)?;
                next[p] += 1_000;
                p = (p + 1) % next.len();
                written += batch.len();
            }
        }
        txn.commit()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(db);
    std::fs::remove_file(&path)?;
    Ok(written as f64 / elapsed / 1e6)
}

/// The results as a Markdown table.
pub fn table(results: &[AppendResult]) -> String {
    let mut out = String::from(
        "| record | producers | records/s | MB/s | commits/s | KB/commit | ack p50 ms | ack p99 ms | raw file MB/s | log/raw (range) | bare redb MB/s | bare redb/raw | log/bare redb | read MB/s | read records/s | file/data | written/data |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} B | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} ({:.2}–{:.2}) | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} |\n",
            r.record_size,
            r.producers,
            r.records_per_s,
            r.mb_per_s,
            r.commits_per_s,
            r.bytes_per_commit / 1000.0,
            r.p50_ms,
            r.p99_ms,
            r.raw_mb_per_s,
            r.ratio(),
            r.ratio_range.0,
            r.ratio_range.1,
            r.redb_mb_per_s,
            r.redb_mb_per_s / r.raw_mb_per_s,
            r.mb_per_s / r.redb_mb_per_s,
            r.read_mb_per_s,
            r.read_records_per_s,
            r.file_ratio,
            r.write_ratio,
        ));
    }
    out
}
