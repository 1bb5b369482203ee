//! `weir serve` and `weir topic ...` as a user runs them.

use weir_tests::{Broker, run_weir};

#[test]
fn topic_commands_against_a_running_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);

    let out = broker.cli(&[
        "topic",
        "create",
        "sensors",
        "--partitions",
        "3",
        "--config",
        "retention.ms=3600000",
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("created topic sensors with 3 partitions"),
        "{}",
        out.stdout
    );

    let out = broker.cli(&["topic", "create", "logs"]);
    assert!(out.status.success(), "{}", out.stderr);

    let out = broker.cli(&["topic", "list"]);
    assert_eq!(out.stdout, "logs\t1 partitions\nsensors\t3 partitions\n");

    let out = broker.cli(&["topic", "describe", "sensors"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("config: retention.ms=3600000"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("config: cleanup.policy=delete"),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.starts_with(char::is_numeric))
            .count(),
        3
    );

    // Errors are clear and non-zero.
    for (args, expect) in [
        (vec!["topic", "create", "sensors"], "already exists"),
        (vec!["topic", "create", "bad/name"], "only ASCII letters"),
        (
            vec![
                "topic",
                "create",
                "sensors_x",
                "--config",
                "segment.jitter.ms=1",
            ],
            "unknown topic config",
        ),
        (
            vec!["topic", "create", "t2", "--config", "cleanup.policy=shred"],
            "expected delete, compact or compact,delete",
        ),
        (
            vec!["topic", "create", "t3", "--partitions", "0"],
            "partition count 0",
        ),
        (vec!["topic", "describe", "nope"], "unknown topic"),
        (vec!["topic", "delete", "nope"], "unknown topic"),
    ] {
        let out = broker.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }

    let out = broker.cli(&["topic", "delete", "logs"]);
    assert!(out.status.success(), "{}", out.stderr);

    // Graceful stop: exit 0, database closed cleanly.
    let status = broker.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        broker.log().join("\n")
    );
    assert!(
        broker
            .log()
            .iter()
            .any(|l| l.contains("database closed cleanly")),
        "{:#?}",
        broker.log()
    );

    // Topics survive the restart.
    let broker = Broker::start(dir.path(), &[]);
    let out = broker.cli(&["topic", "list"]);
    assert_eq!(out.stdout, "sensors\t3 partitions\n");
}

/// As systemd runs it (`Type=notify`, `WatchdogSec`): READY=1 once the listeners are
/// bound, WATCHDOG=1 at half the interval while the writer is healthy, STOPPING=1.
#[test]
fn tells_systemd_it_is_ready_and_feeds_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut broker = Broker::start_with(
        std::process::Command::new(weir_tests::weir_bin())
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000"),
        &dir.path().join("d"),
        &[],
    );
    let next = || {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    };
    assert_eq!(next(), "READY=1");
    // Start-up is over by then: every listener answers.
    for addr in [broker.kafka, broker.mqtt] {
        std::net::TcpStream::connect(addr).expect("listener bound before READY=1");
    }
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    // Three at 0.2 s intervals, whatever the machine's load (bounded above only by
    // the receive timeout).
    assert!(started.elapsed() >= Duration::from_millis(300));
    weir_tests::signal(&broker.child, "TERM");
    let rest: Vec<String> = std::iter::repeat_with(next)
        .take_while(|m| m != "STOPPING=1")
        .take(100)
        .collect();
    assert!(rest.iter().all(|m| m == "WATCHDOG=1"), "{rest:?}");
    assert!(weir_tests::wait_bounded(&mut broker.child, Duration::from_secs(30)).success());
}

/// A log that is not a terminal (the journal, a file) has no colour escapes, with or
/// without NO_COLOR.
#[test]
fn logs_to_a_pipe_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    // A Kafka address already taken: the broker logs its start, then fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = listener.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(weir_tests::weir_bin())
        .args(["serve", "--data-dir", dir.path().to_str().unwrap()])
        .args(["--kafka-listen", &taken, "--admin-listen", "127.0.0.1:0"])
        .args(["--mqtt-listen", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(pipe).unwrap_or_default());
    let status = weir_tests::wait_bounded(&mut child, std::time::Duration::from_secs(60));
    assert!(!status.success(), "started on a taken address");
    let log = reader.join().unwrap();
    assert!(log.contains("log opened"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour escapes in a piped log: {log:?}"
    );
}

#[test]
fn sigint_also_stops_cleanly_and_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--log-format", "json"]);
    weir_tests::signal(&broker.child, "INT");
    let status = weir_tests::wait_bounded(&mut broker.child, std::time::Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let log = broker.log();
    assert!(!log.is_empty());
    for line in &log {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(log.iter().any(|l| l.contains("database closed cleanly")));
}

#[test]
fn config_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weir.toml");
    std::fs::write(
        &file,
        "data_dir = '/from/file'\n[storage]\nfsync = false\n[topic_defaults]\npartitions = 4\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    // The file sets, the flag overrides.
    let out = run_weir(&["config", "--config", file, "--data-dir", "/from/flag"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("data_dir = \"/from/flag\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("fsync = false"), "{}", out.stdout);
    assert!(out.stdout.contains("partitions = 4"), "{}", out.stdout);

    // Zero config: the documented defaults.
    let out = run_weir(&["config"]);
    assert!(
        out.stdout.contains("data_dir = \"weir-data\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("listen = \"127.0.0.1:9644\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("listen = \"0.0.0.0:9092\""),
        "{}",
        out.stdout
    );

    // A broker started with the file uses its topic defaults.
    let data = dir.path().join("data");
    let broker = Broker::start(&data, &["--config", file]);
    let out = broker.cli(&["topic", "create", "t"]);
    assert!(out.stdout.contains("4 partitions"), "{}", out.stdout);

    // Unknown keys and bad values stop the broker with a clear error.
    std::fs::write(dir.path().join("bad.toml"), "[storage]\nfsynk = true\n").unwrap();
    let bad = dir.path().join("bad.toml");
    let out = run_weir(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("unknown field `fsynk`"),
        "{}",
        out.stderr
    );
    let out = run_weir(&["serve", "--config", "/does/not/exist.toml"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cannot read /does/not/exist.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn admin_api_serves_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    broker.cli(&["topic", "create", "m"]);
    let get = |path: &str| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(broker.admin).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(get("/health").contains("\"status\":\"ok\""));
    let metrics = get("/metrics");
    assert!(metrics.contains("weir_storage_commits_total"), "{metrics}");
    assert!(
        metrics.contains("weir_storage_commit_seconds_bucket"),
        "{metrics}"
    );
}

/// The retention task of a running broker deletes expired batches by itself and says
/// so in its log.
#[test]
fn retention_runs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weir.toml");
    std::fs::write(&file, "[storage]\nretention_check_interval_ms = 200\n").unwrap();
    let data = dir.path().join("data");
    let broker = Broker::start(&data, &["--config", file.to_str().unwrap()]);
    let out = broker.cli(&["topic", "create", "short", "--config", "retention.ms=300"]);
    assert!(out.status.success(), "{}", out.stderr);
    let mut produce = std::process::Command::new(weir_tests::weir_bin());
    produce.args(["produce", "short", "--bootstrap", &broker.bootstrap()]);
    assert!(weir_tests::run_with_stdin(
        &mut produce,
        "one\ntwo\nthree\n"
    ));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = broker.cli(&["topic", "describe", "short"]);
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with("0\t"))
            .unwrap_or_default()
            .to_string();
        // partition, log_start, high_watermark, batches, bytes
        let f: Vec<&str> = row.split('\t').collect();
        if f.len() == 5 && f[2] == "3" && f[1] == "3" && f[3] == "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not run: {row:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        broker
            .log()
            .iter()
            .any(|l| l.contains("retention deleted offsets 0..3")),
        "{:#?}",
        broker.log()
    );
}
