//! The uplink against a fake centre whose acknowledgements the test hands out one by
//! one: the order, the partial acknowledgements, the fatal errors and the read-back
//! are chosen here, not left to a real broker's timing (replication.rs runs the same
//! against Tansu).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::replication::client::{
    BoxFuture, Deliveries, Landed, UpstreamProducer, UpstreamReader, Visit,
};
use crate::replication::{ReplicationMetrics, RuleStatus};
use crate::storage::{LogOptions, TopicConfig, WriteOp, now_ms};
use weir_wire::record_batch::build::NewRecord;

const GATEWAY: &str = "edge";

/// A record a producer sent.
#[derive(Clone, Copy, Debug)]
struct Sent {
    producer: usize,
    token: u64,
    offset: u64,
}

#[derive(Default)]
struct CentreState {
    sent: Vec<Sent>,
    producers: usize,
    /// The current producer's deliveries.
    deliveries: Option<mpsc::UnboundedSender<Delivered>>,
    /// The target topic's one partition: the source offset of each record, in order.
    stored: Vec<u64>,
}

/// The upstream: producers that only note what they were given, and a reader of
/// what the test acknowledged.
#[derive(Clone, Default)]
struct FakeCentre(Arc<Mutex<CentreState>>);

struct FakeProducer {
    centre: FakeCentre,
    id: usize,
    link: watch::Sender<LinkErrors>,
}

impl Connector for FakeCentre {
    fn producer(
        &self,
        _: &ProducerSettings,
    ) -> Result<(Arc<dyn UpstreamProducer>, Deliveries), ReplicationError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.0.lock();
        state.producers += 1;
        state.deliveries = Some(tx);
        let producer = FakeProducer {
            centre: self.clone(),
            id: state.producers,
            link: watch::channel(LinkErrors::default()).0,
        };
        Ok((Arc::new(producer), rx))
    }

    fn reader(&self) -> Result<Arc<dyn UpstreamReader>, ReplicationError> {
        Ok(Arc::new(self.clone()))
    }
}

impl UpstreamProducer for FakeProducer {
    fn send(&self, record: &OutRecord<'_>, token: u64) -> Result<(), SendError> {
        let offset = record
            .headers
            .iter()
            .find(|(k, _)| *k == "weir.source.offset")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .expect("every record carries its source offset");
        self.centre.0.lock().sent.push(Sent {
            producer: self.id,
            token,
            offset,
        });
        Ok(())
    }

    fn ensure_topic<'a>(
        &'a self,
        _: &'a str,
        _: u32,
    ) -> BoxFuture<'a, Result<(), ReplicationError>> {
        Box::pin(async { Ok(()) })
    }

    fn link(&self) -> watch::Receiver<LinkErrors> {
        self.link.subscribe()
    }
}

impl UpstreamReader for FakeCentre {
    fn ends<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<(u64, u64)>, ReplicationError>> {
        let end = self.0.lock().stored.len() as u64;
        Box::pin(async move { Ok(vec![(0, end)]) })
    }

    fn scan<'a>(
        &'a self,
        _: &'a str,
        from: &'a [(u32, u64)],
        visit: &'a mut Visit<'_>,
    ) -> BoxFuture<'a, Result<BTreeMap<u32, u64>, ReplicationError>> {
        let stored = self.0.lock().stored.clone();
        Box::pin(async move {
            for &(partition, from) in from {
                for (at, source) in stored.iter().enumerate().skip(from as usize) {
                    let offset = source.to_string();
                    let headers: [(&str, &[u8]); 4] = [
                        ("weir.gateway", GATEWAY.as_bytes()),
                        ("weir.source.topic", b"t"),
                        ("weir.source.partition", b"0"),
                        ("weir.source.offset", offset.as_bytes()),
                    ];
                    visit(
                        Position {
                            partition,
                            offset: at as u64,
                        },
                        &headers,
                    );
                }
            }
            Ok(BTreeMap::from([(0, stored.len() as u64)]))
        })
    }
}

impl FakeCentre {
    /// The current producer's record `offset`, as last sent.
    fn last_sent(&self, offset: u64) -> Sent {
        let state = self.0.lock();
        *state
            .sent
            .iter()
            .rev()
            .find(|s| s.offset == offset && s.producer == state.producers)
            .unwrap_or_else(|| panic!("offset {offset} was not sent by the current producer"))
    }

    fn deliver(&self, token: u64, result: Result<Landed, DeliveryError>) {
        let state = self.0.lock();
        let tx = state.deliveries.as_ref().expect("a producer exists");
        tx.send(Delivered { token, result })
            .expect("the session takes deliveries");
    }

    /// The centre stores `offset` and acknowledges it.
    fn ack(&self, offset: u64) {
        let sent = self.last_sent(offset);
        let at = {
            let mut state = self.0.lock();
            state.stored.push(offset);
            state.stored.len() as u64 - 1
        };
        let landed = Landed {
            partition: 0,
            offset: Some(at),
        };
        self.deliver(sent.token, Ok(landed));
    }

    /// The producer is fenced while sending `offset`.
    fn fail_fatally(&self, offset: u64) {
        let sent = self.last_sent(offset);
        self.deliver(sent.token, Err(DeliveryError::Fatal("fenced".into())));
    }

    fn sent_by(&self, producer: usize) -> Vec<u64> {
        let state = self.0.lock();
        state
            .sent
            .iter()
            .filter(|s| s.producer == producer)
            .map(|s| s.offset)
            .collect()
    }
}

/// A log with `records` records in topic `t`, and an uplink of it to the fake centre.
struct Harness {
    log: Log,
    centre: FakeCentre,
    metrics: ReplicationMetrics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(records: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(LogOptions::new(dir.path())).unwrap();
        log.create_topic("t", 1, TopicConfig::default())
            .await
            .unwrap();
        let records = (0..records)
            .map(|i| NewRecord {
                key: None,
                value: Some(Bytes::from(format!("r{i}"))),
                timestamp_ms: now_ms(),
                headers: Vec::new(),
            })
            .collect();
        log.write(vec![WriteOp::AppendRecords {
            topic: "t".into(),
            partition: 0,
            records,
        }])
        .await
        .unwrap();
        Self::run(log, FakeCentre::default(), dir)
    }

    /// An uplink of `log` to `centre`, started.
    fn run(log: Log, centre: FakeCentre, dir: tempfile::TempDir) -> Self {
        let rule: RuleConfig =
            toml::from_str("name = \"up\"\nupstream = \"centre\"\ntopics = [\"t\"]").unwrap();
        let metrics = ReplicationMetrics::default();
        let (stop, stopped) = watch::channel(false);
        let uplink = Uplink {
            rule,
            connector: Arc::new(centre.clone()),
            gateway: GATEWAY.into(),
            log: log.clone(),
            metrics: metrics.clone(),
            status: Arc::new(Mutex::new(RuleStatus::default())),
            gate: PriorityGate::default(),
            registered: Arc::new(tokio::sync::Barrier::new(1)),
            stop: stopped,
            hold_cursors: false,
        };
        Self {
            task: tokio::spawn(uplink.run()),
            log,
            centre,
            metrics,
            stop,
            _dir: dir,
        }
    }

    fn cursor(&self) -> Option<u64> {
        self.log
            .get_state::<u64>(NS_CURSOR, &cursor_key("up", "t", 0))
            .unwrap()
    }

    /// Waits (10 s at most) until `done` holds.
    async fn until(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        for _ in 0..1000 {
            if done(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not within 10 s (cursor {:?})", self.cursor());
    }

    /// Waits until the first producer sent `records`, acknowledges `acks`, and waits
    /// for the cursor to be at `cursor`.
    async fn sent_then_acked(&self, records: u64, acks: &[u64], cursor: u64) {
        self.until("every record sent", |h| {
            h.centre.sent_by(1).len() as u64 == records
        })
        .await;
        self.acked(acks, cursor).await;
    }

    /// Acknowledges `acks`, and waits for the cursor to be at `cursor`.
    async fn acked(&self, acks: &[u64], cursor: u64) {
        for &offset in acks {
            self.centre.ack(offset);
        }
        self.until(&format!("cursor at {cursor}"), |h| {
            h.cursor() == Some(cursor)
        })
        .await;
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn the_cursor_moves_over_the_acknowledged_prefix_only() {
    let h = Harness::start(10).await;
    // Acknowledged out of order, and not all: the cursor stops before the first gap.
    h.sent_then_acked(10, &[2, 3, 0], 1).await;
    assert_eq!(h.centre.sent_by(1), (0..10).collect::<Vec<_>>());
    h.acked(&[1], 4).await;
    h.acked(&[9, 8, 7, 6, 5, 4], 10).await;
    assert_eq!(h.centre.0.lock().producers, 1);
    h.stop().await;
}

#[tokio::test]
async fn after_a_fatal_error_a_new_producer_sends_from_the_cursor_what_the_centre_lacks() {
    let h = Harness::start(10).await;
    h.sent_then_acked(10, &[0, 1, 2], 3).await;
    // Past the cursor, the centre has 5 and 6 when the producer is fenced.
    h.centre.ack(5);
    h.centre.ack(6);
    h.centre.fail_fatally(3);
    // The next producer reads the centre back from the floor and sends only what
    // it lacks, from the cursor.
    h.until("a second producer sent five records", |h| {
        h.centre.sent_by(2).len() >= 5
    })
    .await;
    assert_eq!(h.centre.sent_by(2), [3, 4, 7, 8, 9]);
    h.acked(&[3, 4, 7, 8, 9], 10).await;
    let mut stored = h.centre.0.lock().stored.clone();
    stored.sort_unstable();
    assert_eq!(stored, (0..10).collect::<Vec<_>>(), "each record once");
    let already = h
        .metrics
        .already_upstream
        .get_or_create(&rule_labels("up"))
        .get();
    assert_eq!(already, 2);
    h.stop().await;
}

#[tokio::test]
async fn a_restart_sends_nothing_the_centre_took_past_the_durable_cursor() {
    // The cursor is durable at 3 while the centre has 3 and 4 too (the edge died
    // before writing it): a new uplink on the same log reads them back.
    let h = Harness::start(6).await;
    h.sent_then_acked(6, &[0, 1, 2], 3).await;
    let Harness {
        log,
        centre,
        task,
        _dir,
        ..
    } = h;
    // Killed: nothing more is committed.
    task.abort();
    let _ = task.await;
    centre.0.lock().stored.extend([3, 4]);
    let h = Harness::run(log, centre, _dir);
    h.until("the second producer sent offset 5", |h| {
        h.centre.sent_by(2).contains(&5)
    })
    .await;
    assert_eq!(h.centre.sent_by(2), [5]);
    h.acked(&[5], 6).await;
    h.stop().await;
}

#[test]
fn a_token_keeps_the_partition_and_the_offset_whatever_the_word_size() {
    for (index, offset) in [(0, 0), (1, 41), (65_535, (1 << 48) - 1), (7, 1 << 40)] {
        assert_eq!(untoken(token(index, offset)), (index, offset));
    }
}
