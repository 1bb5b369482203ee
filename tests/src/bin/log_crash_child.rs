//! Child process of the log crash test: appends from several tasks and prints one
//! line per acknowledged batch, `ack <partition> <base offset> <len> <crc32c>`, where
//! len and crc32c describe the batch exactly as it must be stored. The test kills
//! this process with SIGKILL at random moments. Half its runs use the write-ahead
//! journal.
//!
//! Usage: log_crash_child DATA_DIR TASKS [--ack-before-commit]

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kafka_protocol::records::Compression;
use rand::Rng;
use weir::storage::{Log, LogOptions, TopicConfig, TopicError};
use weir_wire::record_batch::RecordBatch;
use weir_wire::record_batch::build::{NewRecord, batch};

pub const PARTITIONS: u32 = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).expect("DATA_DIR");
    let tasks: usize = args.get(2).expect("TASKS").parse()?;
    let mut options = LogOptions::new(dir);
    options.unsafe_ack_before_commit = args.iter().any(|a| a == "--ack-before-commit");
    // The journal, as `weir serve` has it by default, in half the rounds: with a
    // checkpoint interval this long, what a kill loses from redb is in the journal.
    if rand::rng().random_bool(0.5) {
        options.checkpoint_interval = std::time::Duration::from_secs(60);
    }
    let log = Log::open(options)?;
    let config = TopicConfig {
        retention_ms: None,
        ..TopicConfig::default()
    };
    match log.create_topic("crash", PARTITIONS, config).await {
        Ok(_) | Err(TopicError::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let out = Arc::new(Mutex::new(std::io::stdout()));
    writeln!(out.lock().unwrap(), "ready")?;
    out.lock().unwrap().flush()?;
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (log, out) = (log.clone(), out.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                loop {
                    let sent = random_batch(task, seq);
                    seq += 1;
                    let partition = (task as u32 + seq as u32) % PARTITIONS;
                    let outcome = log.append("crash", partition, sent.clone()).await?;
                    let stored =
                        RecordBatch::parse(sent)?.with_base_offset(outcome.base_offset as i64, 0);
                    let line = format!(
                        "ack {partition} {} {} {}\n",
                        outcome.base_offset,
                        stored.len(),
                        crc32c::crc32c(stored.as_bytes())
                    );
                    let mut out = out.lock().unwrap();
                    out.write_all(line.as_bytes())?;
                    out.flush()?;
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(())
}

fn random_batch(task: usize, seq: u64) -> Bytes {
    let mut rng = rand::rng();
    let count = rng.random_range(1..30);
    let records: Vec<NewRecord> = (0..count)
        .map(|i| {
            let size = rng.random_range(0..600);
            let mut value = format!("{task}/{seq}/{i}/").into_bytes();
            value.extend((0..size).map(|_| rng.random::<u8>()));
            NewRecord {
                key: Some(Bytes::from(format!("task-{task}"))),
                value: Some(value.into()),
                timestamp_ms: weir::storage::now_ms(),
                ..Default::default()
            }
        })
        .collect();
    batch(&records, Compression::None).expect("encode")
}
