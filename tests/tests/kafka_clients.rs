//! Real Kafka clients against a real broker: kafka-python, confluent-kafka
//! (librdkafka), and Debian's kcat (librdkafka 2.0.2). The README's test command
//! installs them.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use weir_tests::{Broker, external, python, run, run_with_stdin, wait_bounded};

fn assert_ok(what: &str, out: &weir_tests::CliOutput) {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

#[test]
fn kafka_python_tutorial_snippet() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let out = python(
        "kafka_python_tutorial.py",
        &[&broker.kafka.port().to_string()],
    );
    assert_ok("kafka-python tutorial", &out);
    assert!(out.stdout.contains("OK: 10 records"), "{}", out.stdout);
}

#[test]
fn confluent_idempotent_producer_group_and_offsets_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    let out = python(
        "confluent_group.py",
        &["produce-consume", &broker.bootstrap(), "orders", "100000"],
    );
    assert_ok("confluent produce and group consume", &out);
    assert!(
        out.stdout
            .contains("consumed 100000 records exactly once across the group"),
        "{}",
        out.stdout
    );
    broker.restart(false, &[]);
    let out = python(
        "confluent_group.py",
        &["check-committed", &broker.bootstrap(), "orders"],
    );
    assert_ok("committed offsets after restart", &out);
}

#[test]
fn every_compression_codec_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let out = python("confluent_compression.py", &[&broker.bootstrap()]);
    assert_ok("confluent compression", &out);
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        assert!(
            out.stdout.contains(&format!("OK {codec}")),
            "{}",
            out.stdout
        );
    }
    // And with Debian's older librdkafka, through kcat.
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("kcat-{codec}");
        let lines: String = (0..200).map(|i| format!("key{i}:value-{i}\n")).collect();
        kcat_produce(&broker, &topic, &["-K:", "-z", codec], &lines);
        let out = kcat(&broker, &["-C", "-t", &topic, "-e", "-q", "-f", "%k=%s\\n"]);
        let expected: String = (0..200).map(|i| format!("key{i}=value-{i}\n")).collect();
        assert_eq!(out, expected, "kcat {codec}");
    }
}

fn kcat(broker: &Broker, args: &[&str]) -> String {
    let out = run(
        external("kcat")
            .arg("-b")
            .arg(broker.bootstrap())
            .args(args),
        Duration::from_secs(60),
    );
    assert_ok(&format!("kcat {args:?}"), &out);
    out.stdout
}

fn kcat_produce(broker: &Broker, topic: &str, args: &[&str], input: &str) {
    let mut cmd = external("kcat");
    cmd.arg("-b")
        .arg(broker.bootstrap())
        .args(["-P", "-t", topic])
        .args(args);
    assert!(run_with_stdin(&mut cmd, input), "kcat produce {args:?}");
}

#[test]
fn kcat_lists_produces_with_keys_and_consumes() {
    // The point is an old client: make sure it is the one from Debian.
    let version = run(external("kcat").arg("-V"), Duration::from_secs(10));
    assert!(
        version.stdout.contains("librdkafka 2.0.2"),
        "{}",
        version.stdout
    );
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    weir_tests::run_weir(&[
        "topic",
        "--admin",
        &broker.admin.to_string(),
        "create",
        "readings",
        "-p",
        "3",
    ]);
    let listing = kcat(&broker, &["-L"]);
    assert!(
        listing.contains(&format!("broker 0 at {}", broker.bootstrap())),
        "{listing}"
    );
    assert!(
        listing.contains("topic \"readings\" with 3 partitions"),
        "{listing}"
    );
    let lines: String = (0..300)
        .map(|i| format!("dev{}:reading-{i}\n", i % 7))
        .collect();
    kcat_produce(&broker, "readings", &["-K:"], &lines);
    let out = kcat(
        &broker,
        &["-C", "-t", "readings", "-e", "-q", "-f", "%p %k %s\\n"],
    );
    let mut got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), 300, "{out}");
    // Same key, same partition, and per-key order kept.
    for dev in 0..7 {
        let key = format!("dev{dev}");
        let mine: Vec<&&str> = got
            .iter()
            .filter(|l| l.split(' ').nth(1) == Some(key.as_str()))
            .collect();
        let partitions: std::collections::BTreeSet<&str> =
            mine.iter().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(partitions.len(), 1, "{key} spread over {partitions:?}");
        let seq: Vec<usize> = mine
            .iter()
            .map(|l| l.rsplit('-').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seq:?}"
        );
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 300);
}

/// SIGKILL the broker under librdkafka load with acks=all and idempotence; restart it;
/// every record with a successful delivery report is there, once, in order.
#[test]
fn acknowledged_records_survive_sigkill_under_librdkafka_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    weir_tests::run_weir(&[
        "topic",
        "--admin",
        &broker.admin.to_string(),
        "create",
        "crash",
        "-p",
        "4",
    ]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/confluent_crash_producer.py");
    let mut producer = external("python3")
        .arg(script)
        .args([&broker.bootstrap(), "crash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let stdout = producer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |n: usize, lines: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while lines.len() < n && Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                lines.push(l);
            }
        }
    };
    let mut lines = Vec::new();
    for round in 0..3 {
        wait_for(lines.len() + 2000, &mut lines);
        assert!(
            lines.len() >= 2000 * (round + 1),
            "producer stalled: {} lines",
            lines.len()
        );
        broker.restart(true, &[]);
    }
    wait_for(lines.len() + 2000, &mut lines);
    // The producer may have stopped by itself on a fatal error; the "done" check says so.
    let _ = producer.stdin.take().unwrap().write_all(b"stop\n");
    wait_bounded(&mut producer, Duration::from_secs(90));
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    assert!(
        lines.last().is_some_and(|l| l.starts_with("done")),
        "producer did not finish: {:?}",
        lines.last()
    );

    // What the log holds, per partition, in order.
    let out = kcat(
        &broker,
        &["-C", "-t", "crash", "-e", "-q", "-f", "%p %o %s\\n"],
    );
    let mut stored: std::collections::HashMap<String, (u32, i64)> =
        std::collections::HashMap::new();
    let mut last: std::collections::HashMap<u32, i64> = std::collections::HashMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (p, o): (u32, i64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        assert!(
            last.get(&p).is_none_or(|prev| *prev < o),
            "partition {p} out of order at {o}"
        );
        last.insert(p, o);
        assert!(
            stored.insert(f[2].to_string(), (p, o)).is_none(),
            "{} stored twice",
            f[2]
        );
    }
    let mut delivered = 0;
    for line in lines.iter().filter(|l| l.starts_with("delivered ")) {
        let f: Vec<&str> = line.split(' ').collect();
        let (p, o): (u32, i64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(
            stored.get(f[3]),
            Some(&(p, o)),
            "delivered {} at {p}/{o} is not there",
            f[3]
        );
        delivered += 1;
    }
    assert!(delivered >= 8000, "only {delivered} deliveries");
    eprintln!(
        "{delivered} delivered records all present once, {} stored",
        stored.len()
    );
}

/// Transactions with confluent-kafka: a commit and an abort read back by
/// read_committed and read_uncommitted consumers, an open transaction hidden by the
/// last stable offset, fencing by a second producer with the same transactional id,
/// and a transaction the broker aborts when it times out.
#[test]
fn confluent_transactions_commit_abort_fence_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let out = python(
        "confluent_transactions.py",
        &["basics", &broker.bootstrap()],
    );
    assert_ok("confluent transactions", &out);
    assert!(out.stdout.contains("OK basics"), "{}", out.stdout);
    let out = python(
        "confluent_transactions.py",
        &["kafka-python", &broker.bootstrap()],
    );
    assert_ok("kafka-python transactions", &out);
}

/// Kafka's exactly-once read-process-write loop (consume, produce, commit the input's
/// offsets in the transaction) across two SIGKILLs of the broker: every input is in
/// the output once, as a read_committed consumer sees it.
#[test]
fn consume_transform_produce_is_exactly_once_across_sigkills() {
    const N: usize = 6000;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    let n = N.to_string();
    let out = python(
        "confluent_transactions.py",
        &["seed", &broker.bootstrap(), &n],
    );
    assert_ok("seed", &out);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/confluent_transactions.py");
    let mut eos = external("python3")
        .arg(script)
        .args(["eos", &broker.bootstrap(), &n])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("eos.err")).unwrap())
        .spawn()
        .expect("python3");
    let stdout = eos.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines: Vec<String> = Vec::new();
    // Kill the broker once the loop has committed a third, then two thirds.
    for share in [N / 3, 2 * N / 3] {
        let deadline = Instant::now() + Duration::from_secs(120);
        let progressed = |lines: &[String]| {
            lines.iter().rev().find_map(|l| {
                l.strip_prefix("progress ")
                    .and_then(|n| n.parse::<usize>().ok())
            })
        };
        while progressed(&lines).is_none_or(|done| done < share) && Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                lines.push(l);
            }
        }
        assert!(
            progressed(&lines).is_some_and(|done| done >= share),
            "the loop stalled: {lines:?}\nstderr:\n{}\nbroker:\n{}",
            std::fs::read_to_string(dir.path().join("eos.err")).unwrap_or_default(),
            broker.log().join("\n")
        );
        broker.restart(true, &[]);
    }
    let status = wait_bounded(&mut eos, Duration::from_secs(300));
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    assert!(
        status.success() && lines.iter().any(|l| l.starts_with("OK eos")),
        "the loop failed ({status:?}): {lines:?}\nstderr:\n{}",
        std::fs::read_to_string(dir.path().join("eos.err")).unwrap_or_default()
    );
    let out = python(
        "confluent_transactions.py",
        &["check-eos", &broker.bootstrap(), &n],
    );
    assert_ok("exactly once", &out);
}

/// The latest (offset, value) of each key in "OFFSET KEY VALUE" lines, checking that
/// offsets only grow.
fn latest_per_key(lines: &str) -> std::collections::BTreeMap<String, (i64, String)> {
    let mut latest = std::collections::BTreeMap::new();
    let mut previous = -1;
    for line in lines.lines() {
        let f: Vec<&str> = line.splitn(3, ' ').collect();
        let offset: i64 = f[0].parse().unwrap_or_else(|_| panic!("bad line {line:?}"));
        assert!(offset > previous, "offset {offset} after {previous}");
        previous = offset;
        latest.insert(f[1].to_string(), (offset, f[2].to_string()));
    }
    latest
}

/// Compaction as Kafka clients see it: records with repeated keys and tombstones, read
/// back with kcat and confluent-kafka after the compactor ran (the latest value per
/// key at its offset, tombstones until `delete.retention.ms`, then gone), a record
/// without a key refused, and SIGKILLs while the compactor works through 20,000
/// records losing nothing.
#[test]
fn a_compacted_topic_keeps_the_latest_value_per_key_through_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_with_config(
        dir.path(),
        "[storage]\ncompaction_check_interval_ms = 100\n",
    );
    let b = broker.bootstrap();
    let out = python("confluent_compaction.py", &["create", &b, "lkv", "8000"]);
    assert_ok("create", &out);
    let latest_of = |stdout: &str| {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix("latest "))
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (
                    f[0].to_string(),
                    (f[1].parse::<i64>().unwrap(), f[2].to_string()),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let out = python(
        "confluent_compaction.py",
        &["produce", &b, "lkv", "2000", "50", "0", "0"],
    );
    assert_ok("produce", &out);
    let mut expected = latest_of(&out.stdout);
    assert_eq!(expected.len(), 50);
    let out = python("confluent_compaction.py", &["keyless", &b, "lkv"]);
    assert_ok("keyless", &out);
    // Tombstones for k3 and k4 (kcat -Z sends an empty value as null), then one more
    // record so that their batch is not the partition's last.
    kcat_produce(&broker, "lkv", &["-K:", "-Z"], "k3:\nk4:\n");
    kcat_produce(&broker, "lkv", &["-K:"], "kend:end\n");
    for (key, offset) in [("k3", 2000), ("k4", 2001)] {
        expected.insert(key.into(), (offset, "NULL".into()));
    }
    expected.insert("kend".into(), (2002, "end".into()));
    let as_lines = |m: &std::collections::BTreeMap<String, (i64, String)>| {
        let mut lines: Vec<(i64, String)> = m
            .iter()
            .map(|(k, (o, v))| (*o, format!("{o} {k} {v}")))
            .collect();
        lines.sort();
        lines.into_iter().map(|(_, l)| l).collect::<Vec<_>>()
    };
    let read_kcat = |broker: &Broker| {
        let out = kcat(
            broker,
            &["-C", "-t", "lkv", "-e", "-q", "-Z", "-f", "%o %k %s\\n"],
        );
        out.lines().map(String::from).collect::<Vec<_>>()
    };
    let read_confluent = |broker: &Broker| {
        let out = python(
            "confluent_compaction.py",
            &["read", &broker.bootstrap(), "lkv"],
        );
        assert_ok("read", &out);
        out.stdout.lines().map(String::from).collect::<Vec<_>>()
    };
    // Every superseded record goes: 2,000 of round one but the 48 latest.
    broker.wait_metric("weir_storage_compaction_removed_records_total", 1952.0);
    let compacted = as_lines(&expected);
    assert_eq!(read_kcat(&broker), compacted);
    assert_eq!(read_confluent(&broker), compacted);
    // The tombstones, after delete.retention.ms (8 s) from the pass that kept them.
    broker.wait_metric_within(
        "weir_storage_compaction_removed_records_total",
        1954.0,
        Duration::from_secs(30),
    );
    expected.remove("k3");
    expected.remove("k4");
    let compacted = as_lines(&expected);
    assert_eq!(read_kcat(&broker), compacted);
    assert_eq!(read_confluent(&broker), compacted);

    // 20,000 more over about 14 s, the compactor looking every 100 ms, and the broker
    // SIGKILLed up to three times meanwhile: every key's latest delivered value is
    // there, at its offset.
    let passes = |broker: &Broker| {
        let log = broker.log();
        log.iter()
            .filter(|l| l.contains("compacted offsets"))
            .count()
    };
    let seen = passes(&broker);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/confluent_compaction.py");
    let producer = weir_tests::Background::spawn(
        external("python3")
            .arg(script)
            .args(["produce", &b, "lkv", "20000", "50", "2003", "15"]),
    );
    // Each time once this broker compacted some of the new records (so they flow),
    // just as the compactor is about to look again.
    let mut seen = seen;
    let mut kills = 0;
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while passes(&broker) <= seen && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if passes(&broker) <= seen {
            break; // The producer is done: nothing more to compact.
        }
        std::thread::sleep(Duration::from_millis(95 + 10 * i));
        eprintln!("SIGKILL after {} passes", passes(&broker) - seen);
        broker.restart(true, &[]);
        kills += 1;
        seen = 0;
    }
    assert!(kills >= 1, "the compactor never ran while the producer did");
    let (status, stdout) = producer.finish(Duration::from_secs(180));
    assert!(status.success(), "producer: {status:?}\n{stdout}");
    let later = latest_of(&stdout);
    assert_eq!(later.len(), 50, "{stdout}");
    for (key, at) in later {
        expected.insert(key, at);
    }
    let seen = latest_per_key(&read_confluent(&broker).join("\n"));
    assert_eq!(seen, expected, "after three SIGKILLs");
    // And it converges to one record per key. The last batch is never compacted (as
    // Kafka's active segment), so a record for a new key goes last.
    kcat_produce(&broker, "lkv", &["-K:"], "kend:end2\n");
    kcat_produce(&broker, "lkv", &["-K:"], "kz:z\n");
    expected.insert("kend".into(), (22003, "end2".into()));
    expected.insert("kz".into(), (22004, "z".into()));
    let want = as_lines(&expected);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = read_kcat(&broker);
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = read_kcat(&broker);
    }
    let tail: Vec<_> = got.iter().rev().take(5).collect();
    assert_eq!(got.len(), want.len(), "not compacted: ends with {tail:?}");
    assert_eq!(got, want);
    eprintln!("{} passes since the last restart", passes(&broker));
}
