//! `weir produce` and `weir consume`: lines in and out of a topic, over the Kafka
//! protocol, like kcat or kafka-console-producer/consumer.

use std::io::Write;

use bytes::Bytes;
use kafka_protocol::records::{Compression, RecordBatchDecoder};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::kafka::client::KafkaClient;
use crate::storage::now_ms;
use weir_wire::partition::partition_for_key;
use weir_wire::record_batch::build::{NewRecord, batch};

pub struct ProduceArgs {
    pub bootstrap: String,
    pub topic: String,
    pub key_separator: Option<String>,
    pub partition: Option<u32>,
    pub acks: i16,
    pub batch_lines: usize,
}

/// Reads lines from stdin and produces one record per line.
pub async fn produce(args: ProduceArgs) -> anyhow::Result<u64> {
    let mut client = KafkaClient::connect(&args.bootstrap).await?;
    let partitions = client.partitions(&args.topic).await?;
    if let Some(p) = args.partition.filter(|p| *p >= partitions) {
        anyhow::bail!(
            "topic {} has {partitions} partitions; there is no partition {p}",
            args.topic
        );
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut pending: Vec<Vec<NewRecord>> = vec![Vec::new(); partitions as usize];
    let (mut sent, mut round_robin) = (0u64, 0u32);
    let mut done = false;
    while !done {
        let mut count = 0;
        while count < args.batch_lines.max(1) {
            let Some(line) = lines.next_line().await? else {
                done = true;
                break;
            };
            let (key, value) = match &args.key_separator {
                Some(sep) => match line.split_once(sep.as_str()) {
                    Some((k, v)) => (Some(Bytes::from(k.to_string())), v.to_string()),
                    None => (None, line),
                },
                None => (None, line),
            };
            let partition = args.partition.unwrap_or_else(|| match &key {
                Some(k) => partition_for_key(k.as_ref(), partitions),
                None => {
                    round_robin = (round_robin + 1) % partitions;
                    round_robin
                }
            });
            pending[partition as usize].push(NewRecord {
                key,
                value: Some(Bytes::from(value)),
                timestamp_ms: now_ms(),
                ..Default::default()
            });
            count += 1;
        }
        for (partition, records) in pending.iter_mut().enumerate() {
            if records.is_empty() {
                continue;
            }
            let records_set = batch(records, Compression::None)?;
            client
                .produce(&args.topic, partition as u32, args.acks, records_set)
                .await?;
            sent += records.len() as u64;
            records.clear();
        }
    }
    Ok(sent)
}

/// Where `weir consume` starts in each partition.
#[derive(Clone, Copy, Debug)]
pub enum StartAt {
    Earliest,
    Latest,
    Offset(i64),
}

pub struct ConsumeArgs {
    pub bootstrap: String,
    pub topic: String,
    pub partition: Option<u32>,
    pub start: StartAt,
    /// Resume from, and commit to, this group's offsets (a standalone consumer: no
    /// rebalancing with other members).
    pub group: Option<String>,
    pub key_separator: Option<String>,
    pub max_messages: Option<u64>,
    pub exit_at_end: bool,
}

/// Prints records as lines (`key<sep>value` with a separator, else the value).
pub async fn consume(args: ConsumeArgs, out: &mut impl Write) -> anyhow::Result<u64> {
    let mut client = KafkaClient::connect(&args.bootstrap).await?;
    let count = client.partitions(&args.topic).await?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) if p >= count => anyhow::bail!(
            "topic {} has {count} partitions; there is no partition {p}",
            args.topic
        ),
        Some(p) => vec![p],
        None => (0..count).collect(),
    };
    // (partition, next offset, end offset when we started)
    let mut cursors = Vec::new();
    for &p in &partitions {
        let (start, end) = client.offsets(&args.topic, p).await?;
        let committed = match &args.group {
            Some(g) => client.committed(g, &args.topic, p).await?,
            None => None,
        };
        let next = committed.unwrap_or(match args.start {
            StartAt::Earliest => start,
            StartAt::Latest => end,
            StartAt::Offset(o) => o.clamp(start, end),
        });
        cursors.push((p, next, end));
    }
    let mut printed = 0u64;
    loop {
        let all_at_end = cursors.iter().all(|(_, next, end)| next >= end);
        if args.exit_at_end && all_at_end {
            break;
        }
        let wait = if cursors.len() == 1 { 500 } else { 50 };
        for cursor in cursors.iter_mut() {
            let (p, next, _) = *cursor;
            let Some(mut records) = client.fetch(&args.topic, p, next, wait).await? else {
                continue;
            };
            let mut new_next = next;
            while !records.is_empty() {
                let set = RecordBatchDecoder::decode(&mut records)?;
                for r in set.records {
                    if r.offset < next {
                        continue; // a batch starts before the offset asked for
                    }
                    let value = r.value.as_deref().unwrap_or_default();
                    match (&args.key_separator, &r.key) {
                        (Some(sep), Some(k)) => {
                            out.write_all(&[k.as_ref(), sep.as_bytes(), value, b"\n"].concat())?
                        }
                        (Some(sep), None) => {
                            out.write_all(&[sep.as_bytes(), value, b"\n"].concat())?
                        }
                        (None, _) => out.write_all(&[value, b"\n"].concat())?,
                    }
                    new_next = r.offset + 1;
                    printed += 1;
                    if args.max_messages.is_some_and(|m| printed >= m) {
                        break;
                    }
                }
                if args.max_messages.is_some_and(|m| printed >= m) {
                    break;
                }
            }
            out.flush()?;
            if new_next > next {
                if let Some(g) = &args.group {
                    client.commit(g, &args.topic, p, new_next).await?;
                }
                cursor.1 = new_next;
            }
            if args.max_messages.is_some_and(|m| printed >= m) {
                return Ok(printed);
            }
        }
    }
    Ok(printed)
}
