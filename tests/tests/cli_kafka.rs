//! `weir produce` and `weir consume` against a running broker.

use std::process::{Command, Stdio};

use weir_tests::{Broker, run_weir, run_with_stdin, weir_bin};

fn produce(broker: &Broker, args: &[&str], input: &str) {
    let mut cmd = Command::new(weir_bin());
    cmd.args(["produce", "--bootstrap", &broker.bootstrap()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    assert!(run_with_stdin(&mut cmd, input), "weir produce {args:?}");
}

fn consume(broker: &Broker, args: &[&str]) -> Vec<String> {
    let bootstrap = broker.bootstrap();
    let mut full = vec!["consume", "--bootstrap", &bootstrap];
    full.extend_from_slice(args);
    let out = run_weir(&full);
    assert!(out.status.success(), "weir {full:?}: {}", out.stderr);
    out.stdout.lines().map(str::to_string).collect()
}

#[test]
fn produce_and_consume_lines() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let out = broker.cli(&["topic", "create", "lines", "--partitions", "3"]);
    assert!(out.status.success(), "{}", out.stderr);
    let input: String = (0..300)
        .map(|i| format!("dev{}:reading-{i}\n", i % 7))
        .collect();
    produce(&broker, &["lines", "-K", ":"], &input);

    let mut all = consume(&broker, &["lines", "-e", "-K", ":"]);
    all.sort();
    let mut expected: Vec<String> = input.lines().map(str::to_string).collect();
    expected.sort();
    assert_eq!(all, expected);

    // A group resumes where it committed.
    assert_eq!(
        consume(&broker, &["lines", "-e", "-g", "g", "-n", "100"]).len(),
        100
    );
    assert_eq!(consume(&broker, &["lines", "-e", "-g", "g"]).len(), 200);
    assert_eq!(consume(&broker, &["lines", "-e", "-g", "g"]).len(), 0);

    // One partition from an offset; keys keep to one partition, in order.
    let p1 = consume(&broker, &["lines", "-e", "-p", "1", "-K", ":"]);
    let from2 = consume(&broker, &["lines", "-e", "-p", "1", "-o", "2", "-K", ":"]);
    assert_eq!(&p1[2..], &from2[..]);
    // Same key, same partition: no key appears in two partitions.
    for p in ["0", "2"] {
        for line in consume(&broker, &["lines", "-e", "-p", p, "-K", ":"]) {
            let key = line.split(':').next().unwrap().to_string();
            assert!(
                !p1.iter().any(|l| l.starts_with(&format!("{key}:"))),
                "{key} in partitions 1 and {p}"
            );
        }
    }

    // Errors are clear.
    let out = run_weir(&[
        "consume",
        "--bootstrap",
        &broker.bootstrap(),
        "lines",
        "-p",
        "9",
        "-e",
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("no partition 9"), "{}", out.stderr);
}
