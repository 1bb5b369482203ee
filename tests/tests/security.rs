//! Authentication as devices see it: mosquitto_pub/sub (MQTT 3.1.1 and 5) with and
//! without user names and passwords, users added and removed with the `weir user` CLI,
//! kept across a restart, and never stored as the password.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weir_tests::*;

/// `weir user add NAME` with the password on stdin; the CLI's stdout.
fn add_user(broker: &Broker, name: &str, password: &str) -> String {
    let admin = broker.admin.to_string();
    let mut cmd = Command::new(weir_bin());
    cmd.args(["user", "--admin", &admin, "add", name])
        .stdout(std::process::Stdio::piped());
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run weir user add");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    }
    let status = wait_bounded(&mut child, Duration::from_secs(60));
    let stdout = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
    assert!(status.success(), "weir user add {name}: {stdout}");
    stdout
}

#[test]
fn mqtt_clients_log_in_with_users_the_cli_manages() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker =
        Broker::start_with_config(&dir.path().join("d"), "[auth]\nanonymous = \"none\"\n");
    let port = broker.mqtt_port();

    // No credentials, anonymous = "none": not authorized, in both versions.
    for version in ["mqttv311", "mqttv5"] {
        let refused = publish_on(&port, version, None).expect("refused");
        assert!(
            refused.to_lowercase().contains("not authori"),
            "{version}: {refused}"
        );
    }
    broker.wait_metric("weir_auth_anonymous_refused_total", 2.0);

    assert!(add_user(&broker, "dev1", "s3cret-pw").contains("added user dev1"));
    assert!(add_user(&broker, "dev2", "other-pw").contains("added user dev2"));
    let list = broker.cli(&["user", "list"]);
    assert!(
        list.stdout
            .contains("dev1\tPLAIN,SCRAM-SHA-256,SCRAM-SHA-512"),
        "{}",
        list.stdout
    );

    // The right password: in, and a subscriber with its own login gets the message.
    let sub = Background::spawn(
        external("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
            .args([
                "-u",
                "dev2",
                "-P",
                "other-pw",
                "-t",
                "auth/test",
                "-C",
                "1",
                "-W",
                "30",
            ]),
    );
    broker.wait_metric("weir_mqtt_subscriptions", 1.0);
    for version in ["mqttv311", "mqttv5"] {
        assert_eq!(
            publish_on(&port, version, Some(("dev1", "s3cret-pw"))),
            None
        );
    }
    let (status, out) = sub.finish(Duration::from_secs(30));
    assert!(status.success() && out.contains("hello"), "{out}");
    broker.wait_metric("weir_auth_logins_total", 3.0);

    // Wrong password and unknown user: bad user name or password (3.1.1 code 4, 5.0 0x86).
    for (version, login) in [
        ("mqttv311", ("dev1", "wrong")),
        ("mqttv5", ("dev1", "wrong")),
        ("mqttv5", ("nobody", "s3cret-pw")),
    ] {
        let refused = publish_on(&port, version, Some(login)).expect("refused");
        assert!(
            refused.to_lowercase().contains("bad user name or password"),
            "{version} {login:?}: {refused}"
        );
    }
    broker.wait_metric("weir_auth_failed_logins_total", 3.0);

    // Kept across a restart; the password itself is nowhere in the data directory.
    broker.restart(
        false,
        &["--config", dir.path().join("d.toml").to_str().unwrap()],
    );
    assert_eq!(
        publish_on(&port, "mqttv5", Some(("dev1", "s3cret-pw"))),
        None
    );
    broker.terminate();
    for entry in std::fs::read_dir(dir.path().join("d")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(9).any(|w| w == b"s3cret-pw"),
                "{} holds the password",
                path.display()
            );
        }
    }
    broker.relaunch(&["--config", dir.path().join("d.toml").to_str().unwrap()]);

    // A new password takes effect for the next login; a removed user is refused.
    assert!(add_user(&broker, "dev1", "new-pw").contains("new password for user dev1"));
    assert!(publish_on(&port, "mqttv5", Some(("dev1", "s3cret-pw"))).is_some());
    assert_eq!(publish_on(&port, "mqttv5", Some(("dev1", "new-pw"))), None);
    let removed = broker.cli(&["user", "remove", "dev1"]);
    assert!(removed.status.success(), "{}", removed.stderr);
    assert!(publish_on(&port, "mqttv5", Some(("dev1", "new-pw"))).is_some());
    let missing = broker.cli(&["user", "remove", "dev1"]);
    assert!(!missing.status.success() && missing.stderr.contains("no user named"));
    let bad = broker.cli(&["user", "remove", "a b"]);
    assert!(!bad.status.success());
}

/// mosquitto_pub of one QoS 1 message to `port`; its output if it failed.
fn publish_on(port: &str, version: &str, login: Option<(&str, &str)>) -> Option<String> {
    let mut cmd = external("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", port, "-V", version, "-q", "1"])
        .args(["-t", "auth/test", "-m", "hello"]);
    if let Some((user, password)) = login {
        cmd.args(["-u", user, "-P", password]);
    }
    let out = run(&mut cmd, Duration::from_secs(30));
    (!out.status.success()).then(|| format!("{}{}", out.stdout, out.stderr))
}

/// kcat with the SASL settings for `mechanism` (None: no SASL), bounded.
fn kcat_sasl(broker: &Broker, login: Option<(&str, &str, &str)>, args: &[&str]) -> CliOutput {
    let mut cmd = external("kcat");
    cmd.args(["-b", &broker.bootstrap(), "-m", "10"]);
    if let Some((mechanism, user, password)) = login {
        cmd.args(["-X", "security.protocol=SASL_PLAINTEXT"])
            .args(["-X", &format!("sasl.mechanisms={mechanism}")])
            .args(["-X", &format!("sasl.username={user}")])
            .args(["-X", &format!("sasl.password={password}")]);
    }
    cmd.args(args);
    run(&mut cmd, Duration::from_secs(60))
}

#[test]
fn kafka_clients_log_in_with_sasl_plain_and_scram() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), "[auth]\nanonymous = \"none\"\n");
    add_user(&broker, "app1", "app-pw");
    broker
        .cli(&["topic", "create", "sasl-t", "--partitions", "1"])
        .status
        .success()
        .then_some(())
        .expect("create topic");

    // Debian's kcat (librdkafka 2.0.2): SCRAM-SHA-512 and PLAIN, produce then consume.
    for (i, mechanism) in ["SCRAM-SHA-512", "PLAIN", "SCRAM-SHA-256"]
        .iter()
        .enumerate()
    {
        let login = Some((*mechanism, "app1", "app-pw"));
        let mut cmd = external("kcat");
        cmd.args(["-b", &broker.bootstrap(), "-P", "-t", "sasl-t"])
            .args(["-X", "security.protocol=SASL_PLAINTEXT"])
            .args(["-X", &format!("sasl.mechanisms={mechanism}")])
            .args(["-X", "sasl.username=app1", "-X", "sasl.password=app-pw"]);
        assert!(
            run_with_stdin(&mut cmd, &format!("kcat-{i}\n")),
            "kcat produce {mechanism}"
        );
        let out = kcat_sasl(&broker, login, &["-C", "-t", "sasl-t", "-e", "-q"]);
        assert!(
            out.status.success(),
            "kcat consume {mechanism}: {}",
            out.stderr
        );
        assert!(
            out.stdout.contains(&format!("kcat-{i}")),
            "{mechanism}: {}",
            out.stdout
        );
    }
    // confluent-kafka (librdkafka 2.16) and kafka-python, both mechanisms families.
    for (client, mechanism) in [
        ("confluent", "SCRAM-SHA-256"),
        ("confluent", "PLAIN"),
        ("kafka-python", "SCRAM-SHA-512"),
        ("kafka-python", "PLAIN"),
    ] {
        let out = python(
            "kafka_sasl.py",
            &[
                &broker.bootstrap(),
                client,
                mechanism,
                "app1",
                "app-pw",
                "sasl-t",
            ],
        );
        assert!(
            out.status.success() && out.stdout.trim() == "ok",
            "{client} {mechanism}: {}{}",
            out.stdout,
            out.stderr
        );
    }
    assert!(broker.metric("weir_auth_logins_total") >= 7.0);

    // Refusals: a wrong password, an unknown user, and no SASL at all.
    for (mechanism, user, password) in [
        ("SCRAM-SHA-512", "app1", "wrong"),
        ("PLAIN", "nobody", "app-pw"),
    ] {
        let out = kcat_sasl(&broker, Some((mechanism, user, password)), &["-L"]);
        assert!(!out.status.success(), "{mechanism} {user}: {}", out.stdout);
        assert!(
            out.stderr.contains("Authentication failed"),
            "{mechanism} {user}: {}",
            out.stderr
        );
    }
    let out = python(
        "kafka_sasl.py",
        &[
            &broker.bootstrap(),
            "confluent",
            "SCRAM-SHA-256",
            "app1",
            "wrong",
            "sasl-t",
        ],
    );
    assert!(
        out.stdout.starts_with("refused:"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(broker.metric("weir_auth_failed_logins_total") >= 3.0);
    let out = kcat_sasl(&broker, None, &["-L"]);
    assert!(
        !out.status.success(),
        "a client without SASL listed: {}",
        out.stdout
    );
    broker.wait_metric("weir_auth_anonymous_refused_total", 1.0);
}

/// The `[[auth.acl]]` rules of `acl_rules_refuse_what_they_do_not_allow`.
const ACL_RULES: &str = r#"
[[mqtt.ingest]]
filter = "devices/{device}/#"
topic = "readings"
key = "{device}"

[[auth.acl]]
principal = "dev1"
action = "allow"
operations = ["publish"]
topics = ["devices/{username}/#"]

[[auth.acl]]
principal = "*"
action = "allow"
operations = ["subscribe"]
topics = ["devices/#"]

[[auth.acl]]
principal = "*"
action = "deny"
operations = ["subscribe"]
topics = ["devices/+/secret"]

[[auth.acl]]
principal = "app"
action = "allow"
operations = ["read"]
topics = ["readings*"]
groups = ["app-*"]
"#;

/// Kafka's TransactionalId resource: a producer runs transactions only as an id a
/// rule gives it `write` on.
#[test]
fn transactions_need_write_on_their_transactional_id() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
[[auth.acl]]
principal = "app"
action = "allow"
operations = ["write"]
topics = ["out"]
transactional_ids = ["app-*"]
"#;
    let broker = Broker::start_with_config(&dir.path().join("d"), rules);
    add_user(&broker, "app", "app-pw");
    let created = broker.cli(&["topic", "create", "out", "--partitions", "1"]);
    assert!(created.status.success(), "{}", created.stderr);
    let out = python(
        "confluent_transactions.py",
        &["acl", &broker.bootstrap(), "app", "app-pw"],
    );
    assert!(
        out.status.success() && out.stdout.contains("OK acl"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(broker.metric("weir_auth_denied_total") >= 1.0);
}

#[test]
fn acl_rules_refuse_what_they_do_not_allow() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_with_config(&dir.path().join("d"), ACL_RULES);
    add_user(&broker, "dev1", "dev-pw");
    add_user(&broker, "app", "app-pw");
    broker
        .cli(&["topic", "create", "private", "--partitions", "1"])
        .status
        .success()
        .then_some(())
        .expect("create topic");
    let port = broker.mqtt_port();
    let publish = |version: &str, login: Option<(&str, &str)>, topic: &str, message: &str| {
        let mut cmd = external("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"])
            .args(["-t", topic, "-m", message]);
        if let Some((user, password)) = login {
            cmd.args(["-u", user, "-P", password]);
        }
        let out = run(&mut cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{}", out.stderr);
        out.stderr
    };
    let dev1 = Some(("dev1", "dev-pw"));

    // MQTT publish: a device under its own name is stored (through the ingest rule,
    // which acts as the broker); elsewhere, MQTT 5 hears PUBACK 0x87 and 3.1.1 an
    // acknowledgement, and nothing is stored.
    for version in ["mqttv5", "mqttv311"] {
        let own = publish(version, dev1, "devices/dev1/t", &format!("own-{version}"));
        assert!(own.is_empty(), "{version}: {own}");
    }
    let denied = publish("mqttv5", dev1, "devices/dev2/t", "other-mqttv5");
    assert!(denied.contains("Not authorized"), "{denied}");
    let denied = publish("mqttv311", dev1, "devices/dev2/t", "other-mqttv311");
    assert!(denied.is_empty(), "3.1.1 is acknowledged: {denied}");
    let denied = publish("mqttv5", None, "devices/anon/t", "anonymous");
    assert!(denied.contains("Not authorized"), "{denied}");
    broker.wait_metric("weir_auth_denied_total", 3.0);

    // MQTT subscribe: a denied filter gets 0x87 (5.0) or 0x80 (3.1.1); a filter wider
    // than the deny rule is denied too; an allowed one works.
    for (version, filter) in [
        ("mqttv5", "devices/x/secret"),
        ("mqttv311", "devices/x/secret"),
        ("mqttv5", "devices/#"),
        ("mqttv5", "other/#"),
    ] {
        let out = run(
            external("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version])
                .args(["-t", filter, "-C", "1", "-W", "5"]),
            Duration::from_secs(30),
        );
        assert!(
            out.stderr.contains("All subscription requests were denied"),
            "{version} {filter}: {}{}",
            out.stdout,
            out.stderr
        );
    }
    broker.wait_metric("weir_auth_denied_total", 7.0);
    let sub = Background::spawn(
        external("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
            .args(["-t", "devices/+/t", "-C", "1", "-W", "30"]),
    );
    broker.wait_metric("weir_mqtt_subscriptions", 1.0);
    publish("mqttv5", dev1, "devices/dev1/t", "seen");
    let (status, out) = sub.finish(Duration::from_secs(30));
    assert!(status.success() && out.contains("seen"), "{out}");

    // Kafka: app reads what the devices stored, and only that: the denied publishes
    // are not there.
    let app = Some(("PLAIN", "app", "app-pw"));
    let out = kcat_sasl(
        &broker,
        app,
        &["-C", "-t", "readings", "-e", "-q", "-f", "%k=%s\n"],
    );
    assert!(out.status.success(), "{}", out.stderr);
    let records: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        records,
        ["dev1=own-mqttv5", "dev1=own-mqttv311", "dev1=seen"],
        "{}",
        out.stderr
    );
    // Metadata lists only the topics app may describe.
    let out = kcat_sasl(&broker, app, &["-L"]);
    assert!(out.stdout.contains("\"readings\""), "{}", out.stdout);
    assert!(!out.stdout.contains("\"private\""), "{}", out.stdout);
    // Produce without write, a topic it may not read, and a group it may not use.
    let mut cmd = external("kcat");
    cmd.args(["-b", &broker.bootstrap(), "-P", "-t", "readings"])
        .args([
            "-X",
            "security.protocol=SASL_PLAINTEXT",
            "-X",
            "sasl.mechanisms=PLAIN",
        ])
        .args(["-X", "sasl.username=app", "-X", "sasl.password=app-pw"]);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kcat");
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"forged\n").unwrap();
    }
    wait_bounded(&mut child, Duration::from_secs(60));
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(stderr.contains("Topic authorization failed"), "{stderr}");
    let out = kcat_sasl(&broker, app, &["-C", "-t", "private", "-e", "-q"]);
    assert!(
        out.stderr.contains("Topic authorization failed"),
        "{}",
        out.stderr
    );
    let out = python(
        "kafka_acl.py",
        &[
            &broker.bootstrap(),
            "app",
            "app-pw",
            "readings",
            "other-group",
        ],
    );
    assert_eq!(
        out.stdout.trim(),
        "GROUP_AUTHORIZATION_FAILED",
        "{}",
        out.stderr
    );
    let out = python(
        "kafka_acl.py",
        &[&broker.bootstrap(), "app", "app-pw", "readings", "app-1"],
    );
    assert_eq!(out.stdout.trim(), "3", "{}", out.stderr);

    // SIGHUP reloads the rules: dev1's own topic is denied once its rule is gone.
    let config = dir.path().join("d.toml");
    let without_dev1 = ACL_RULES.replace("principal = \"dev1\"", "principal = \"dev9\"");
    std::fs::write(&config, without_dev1).unwrap();
    signal(&broker.child, "HUP");
    broker.wait_metric("weir_auth_acl_reloads_total", 1.0);
    let denied = publish("mqttv5", dev1, "devices/dev1/t", "after-reload");
    assert!(denied.contains("Not authorized"), "{denied}");
    // A broken file on reload keeps the rules in force.
    std::fs::write(
        &config,
        format!("{ACL_RULES}\n[[auth.acl]]\nprincipal = \"x\"\n"),
    )
    .unwrap();
    signal(&broker.child, "HUP");
    broker.wait_log("[[auth.acl]] rules not reloaded");
    let denied = publish("mqttv5", dev1, "devices/dev1/t", "still-denied");
    assert!(denied.contains("Not authorized"), "{denied}");
    broker.terminate();
}

/// `[tls]` and the TLS listeners, for a broker whose certificate `pki` signed.
fn tls_config(pki: &Pki, mqtt_tls: SocketAddr, kafka_tls: SocketAddr, client_ca: bool) -> String {
    let mut toml = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        pki.server_pem, pki.server_key
    );
    if client_ca {
        toml += &format!("client_ca = {:?}\n", pki.ca_pem);
    }
    toml += &format!(
        "[mqtt]\ntls_listen = \"{mqtt_tls}\"\n[kafka]\ntls_listen = \"{kafka_tls}\"\n[auth]\nanonymous = \"none\"\n"
    );
    toml
}

/// mosquitto_pub of one QoS 1 message over TLS; its output if it failed.
fn publish_tls(port: u16, tls: &[&str], login: Option<(&str, &str)>) -> Option<String> {
    let mut cmd = external("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "tls/test", "-m", "hello"])
        .args(tls);
    if let Some((user, password)) = login {
        cmd.args(["-u", user, "-P", password]);
    }
    let out = run(&mut cmd, Duration::from_secs(30));
    (!out.status.success()).then(|| format!("{}{}", out.stdout, out.stderr))
}

#[test]
fn tls_listeners_with_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (mqtt_tls, kafka_tls) = (free_addr(), free_addr());
    let broker = Broker::start_with_config(
        &dir.path().join("d"),
        &tls_config(&pki, mqtt_tls, kafka_tls, false),
    );
    add_user(&broker, "dev1", "dev-pw");
    let ca = pki.ca_pem.to_str().unwrap();
    let cafile = ["--cafile", ca];

    // mosquitto_sub and _pub over TLS with a password; the subscriber stays connected
    // across a SIGHUP that reloads the certificates.
    let sub = Background::spawn(
        external("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt_tls.port().to_string()])
            .args(cafile)
            .args(["-u", "dev1", "-P", "dev-pw", "-q", "1", "-V", "mqttv5"])
            .args(["-t", "tls/test", "-C", "1", "-W", "60"]),
    );
    broker.wait_metric("weir_mqtt_subscriptions", 1.0);
    signal(&broker.child, "HUP");
    broker.wait_metric("weir_tls_reloads_total", 1.0);
    assert_eq!(
        publish_tls(mqtt_tls.port(), &cafile, Some(("dev1", "dev-pw"))),
        None
    );
    let (status, out) = sub.finish(Duration::from_secs(30));
    assert!(status.success() && out.contains("hello"), "{out}");

    // paho-mqtt over TLS.
    let out = python(
        "paho_tls.py",
        &[&mqtt_tls.port().to_string(), ca, "dev1", "dev-pw"],
    );
    assert_eq!(out.stdout.trim(), "ok", "{}", out.stderr);

    // Refused: a wrong password over TLS, a client that does not speak TLS, and one
    // that does not trust the certificate.
    let refused = publish_tls(mqtt_tls.port(), &cafile, Some(("dev1", "wrong"))).expect("refused");
    assert!(refused.contains("bad user name or password"), "{refused}");
    assert!(publish_tls(mqtt_tls.port(), &[], Some(("dev1", "dev-pw"))).is_some());
    let system_roots = ["--capath", "/etc/ssl/certs"];
    assert!(publish_tls(mqtt_tls.port(), &system_roots, Some(("dev1", "dev-pw"))).is_some());
    broker.wait_metric("weir_tls_handshake_failures_total", 2.0);

    // Kafka over TLS: kcat with SASL_SSL and SCRAM-SHA-512 (librdkafka 2.0.2), told
    // the TLS port in Metadata, so that it can produce and consume through it.
    broker
        .cli(&["topic", "create", "tls-t", "--partitions", "1"])
        .status
        .success()
        .then_some(())
        .expect("create topic");
    let kafka_bootstrap = kafka_tls.to_string();
    let kcat_tls = |args: &[&str]| {
        let mut cmd = external("kcat");
        cmd.args(["-b", &kafka_bootstrap])
            .args(["-X", "security.protocol=SASL_SSL"])
            .args(["-X", &format!("ssl.ca.location={ca}")])
            .args(["-X", "sasl.mechanisms=SCRAM-SHA-512"])
            .args(["-X", "sasl.username=dev1", "-X", "sasl.password=dev-pw"])
            .args(args);
        cmd
    };
    assert!(run_with_stdin(
        &mut kcat_tls(&["-P", "-t", "tls-t"]),
        "over-tls\n"
    ));
    let out = run(
        &mut kcat_tls(&["-C", "-t", "tls-t", "-e", "-q"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.stdout.trim(), "over-tls", "{}", out.stderr);
    let out = run(&mut kcat_tls(&["-L"]), Duration::from_secs(60));
    assert!(
        out.stdout
            .contains(&format!("127.0.0.1:{}", kafka_tls.port())),
        "{}",
        out.stdout
    );
    // confluent-kafka with PLAIN and SCRAM, kafka-python with SCRAM, over TLS.
    for (client, mechanism) in [
        ("confluent", "PLAIN"),
        ("confluent", "SCRAM-SHA-256"),
        ("kafka-python", "SCRAM-SHA-512"),
    ] {
        let out = python(
            "kafka_sasl.py",
            &[
                &kafka_bootstrap,
                client,
                mechanism,
                "dev1",
                "dev-pw",
                "tls-t",
                ca,
            ],
        );
        assert_eq!(
            out.stdout.trim(),
            "ok",
            "{client} {mechanism}: {}",
            out.stderr
        );
    }
}

#[test]
fn tls_client_certificates_are_logins() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (mqtt_tls, kafka_tls) = (free_addr(), free_addr());
    let broker = Broker::start_with_config(
        &dir.path().join("d"),
        &tls_config(&pki, mqtt_tls, kafka_tls, true),
    );
    let ca = pki.ca_pem.to_str().unwrap();
    let (cert, key) = pki.client("device-7", "device", (-1, 2));
    let (expired_cert, expired_key) = pki.client("device-8", "expired", (-3, -1));
    let (stranger_cert, stranger_key) = pki.untrusted_client("device-9", "stranger");
    let with = |cert: &Path, key: &Path| {
        [
            "--cafile".to_string(),
            ca.to_string(),
            "--cert".to_string(),
            cert.to_str().unwrap().to_string(),
            "--key".to_string(),
            key.to_str().unwrap().to_string(),
        ]
    };

    // A certificate the CA signed is a login, without a password.
    let args = with(&cert, &key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(publish_tls(mqtt_tls.port(), &args, None), None);
    broker.wait_metric("weir_auth_logins_total", 1.0);

    // Refused at the handshake: no certificate, an expired one, an untrusted one.
    assert!(publish_tls(mqtt_tls.port(), &["--cafile", ca], None).is_some());
    for (cert, key) in [
        (&expired_cert, &expired_key),
        (&stranger_cert, &stranger_key),
    ] {
        let args = with(cert, key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(
            publish_tls(mqtt_tls.port(), &args, None).is_some(),
            "{}",
            cert.display()
        );
    }
    broker.wait_metric("weir_tls_handshake_failures_total", 3.0);
    assert!(broker.metric("weir_auth_logins_total") < 2.0);

    // kafka-python with security_protocol="SSL" and its certificate: produce, consume.
    broker
        .cli(&["topic", "create", "mtls-t", "--partitions", "1"])
        .status
        .success()
        .then_some(())
        .expect("create topic");
    let out = python(
        "kafka_sasl.py",
        &[
            &kafka_tls.to_string(),
            "kafka-python",
            "none",
            "",
            "",
            "mtls-t",
            ca,
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(out.stdout.trim(), "ok", "{}", out.stderr);
}

#[test]
fn the_admin_api_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let out = run_weir(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("token"), "{}", out.stderr);

    let broker = Broker::start_with_config(&data, "[admin]\ntoken = \"s3cret-token\"\n");
    let admin = broker.admin.to_string();
    let list = |token: Option<&str>| {
        let mut cmd = Command::new(weir_bin());
        cmd.args(["topic", "--admin", &admin, "list"]);
        if let Some(token) = token {
            cmd.env("WEIR_ADMIN_TOKEN", token);
        }
        run(&mut cmd, Duration::from_secs(30))
    };
    let out = list(None);
    assert!(
        !out.status.success() && out.stderr.contains("401"),
        "{}",
        out.stderr
    );
    let out = list(Some("wrong"));
    assert!(
        !out.status.success() && out.stderr.contains("401"),
        "{}",
        out.stderr
    );
    let out = list(Some("s3cret-token"));
    assert!(out.status.success(), "{}", out.stderr);
    // The status page's files hold no data and load without the token; the page then
    // asks for it, as its data (`/v1/status`) needs it.
    let get = |path: &str| weir_tests::admin_get(broker.admin, path).unwrap();
    assert!(get("/").starts_with("HTTP/1.1 200"), "{}", get("/"));
    assert!(get("/assets/status.js").starts_with("HTTP/1.1 200"));
    assert!(
        get("/v1/status").starts_with("HTTP/1.1 401"),
        "{}",
        get("/v1/status")
    );
}
