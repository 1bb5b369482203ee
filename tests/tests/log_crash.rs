//! SIGKILL while appending: every acknowledged batch survives, byte-identical, with no
//! gap in offsets. And the same check catches a broker that acknowledges early.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::Rng;
use weir::storage::{Log, LogOptions};
use weir_tests::wait_bounded;

const PARTITIONS: u32 = 4;

/// (partition, base offset) → (len, crc32c) of every batch acknowledged so far.
type Acked = HashMap<(u32, u64), (usize, u32)>;

/// Runs the child until a random moment, SIGKILLs it, and adds what it acknowledged.
fn round(dir: &Path, ack_before_commit: bool, acked: &mut Acked) -> usize {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_log_crash_child"));
    cmd.arg(dir)
        .arg("8")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if ack_before_commit {
        cmd.arg("--ack-before-commit");
    }
    let mut child = cmd.spawn().expect("start child");
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    // Opening repairs the file after the previous kill; the clock starts at "ready".
    let ready = ready_rx.recv_timeout(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(rand::rng().random_range(100..600)));
    let _ = child.kill(); // SIGKILL
    wait_bounded(&mut child, Duration::from_secs(10));
    let lines = reader.join().unwrap();
    assert!(ready.is_ok(), "child never became ready: {lines:?}");
    assert_eq!(
        lines.first().map(String::as_str),
        Some("ready"),
        "child output: {lines:?}"
    );
    let mut count = 0;
    for line in &lines[1..] {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A line cut by the kill is not an acknowledgement the producer saw.
        if f.len() != 5 || f[0] != "ack" {
            continue;
        }
        let (Ok(p), Ok(base), Ok(len), Ok(crc)) =
            (f[1].parse(), f[2].parse(), f[3].parse(), f[4].parse())
        else {
            continue;
        };
        acked.insert((p, base), (len, crc));
        count += 1;
    }
    count
}

/// What is wrong with the log on `dir` given what was acknowledged.
fn problems(dir: &Path, acked: &Acked) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = Log::open(LogOptions::new(dir)).expect("reopen after kill");
        let mut problems = Vec::new();
        let mut stored: Acked = HashMap::new();
        let partitions = if log.topic("crash").is_some() {
            PARTITIONS
        } else {
            0
        };
        for p in 0..partitions {
            let offsets = log.offsets("crash", p).unwrap();
            let mut next = offsets.log_start;
            while next < offsets.high_watermark {
                let batches = log.read("crash", p, next, 1 << 20).unwrap().batches;
                for b in batches {
                    if b.base_offset() as u64 != next {
                        problems.push(format!(
                            "partition {p}: gap, expected offset {next}, found {}",
                            b.base_offset()
                        ));
                    }
                    next = b.base_offset() as u64 + b.offset_count();
                    stored.insert(
                        (p, b.base_offset() as u64),
                        (b.len(), crc32c::crc32c(b.as_bytes())),
                    );
                }
            }
        }
        for (key, want) in acked {
            match stored.get(key) {
                None => problems.push(format!("acknowledged batch {key:?} is missing")),
                Some(got) if got != want => problems.push(format!(
                    "batch {key:?} differs: stored {got:?}, acknowledged {want:?}"
                )),
                Some(_) => {}
            }
        }
        log.close().await.unwrap();
        problems
    })
}

#[test]
fn acknowledged_batches_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::new();
    for round_no in 0..12 {
        let count = round(dir.path(), false, &mut acked);
        assert!(
            count > 0,
            "round {round_no}: nothing was acknowledged before the kill"
        );
        let problems = problems(dir.path(), &acked);
        assert!(problems.is_empty(), "round {round_no}: {problems:#?}");
        eprintln!(
            "round {round_no}: {count} acks, {} in all, all present",
            acked.len()
        );
    }
}

/// The crash test is only worth something if it fails against a broker that
/// acknowledges before committing. This runs the same rounds against such a broker
/// (a test-only switch) and expects the check to find lost acknowledged batches.
#[test]
fn crash_check_catches_ack_before_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::new();
    for round_no in 0..10 {
        round(dir.path(), true, &mut acked);
        let problems = problems(dir.path(), &acked);
        if !problems.is_empty() {
            eprintln!(
                "round {round_no}: caught {} problems, e.g. {}",
                problems.len(),
                problems[0]
            );
            return;
        }
    }
    panic!("10 rounds of SIGKILL did not expose a broker that acknowledges before commit");
}
