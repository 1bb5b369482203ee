//! The one helper every integration test uses to run the real `weir` binary on free
//! loopback ports and tear it down.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the `weir` binary built alongside the test executable.
pub fn weir_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/weir
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("weir{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p weir), as the README's test command does",
        bin.display()
    );
    bin
}

/// A loopback address with a port that was free a moment ago, for a broker to listen on.
///
/// Not from the kernel's ephemeral range, which `bind(:0)` and every outgoing connection
/// draw from: a port taken there could be given to a client's connection before the
/// broker binds it. Below the range, nothing else on the machine takes ports unasked;
/// and this process never hands out the same one twice.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, _) = ephemeral_range();
    // Ports 10000..low, from a point that differs between test processes.
    let span = low.saturating_sub(10_000).max(1);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (start + n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("bound address");
        }
    }
    panic!("no free port below the ephemeral range");
}

/// The kernel's ephemeral port range (Linux's default when it cannot be read).
fn ephemeral_range() -> (u32, u32) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut parts = text.split_whitespace().filter_map(|p| p.parse().ok());
    match (parts.next(), parts.next()) {
        (Some(low), Some(high)) if low > 10_001 => (low, high),
        _ => (32_768, 60_999),
    }
}

/// A running `weir serve`, killed on drop.
pub struct Broker {
    pub child: Child,
    pub data_dir: PathBuf,
    pub admin: SocketAddr,
    pub kafka: SocketAddr,
    pub mqtt: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The thread that collects `stderr`; joined when the broker exits before it is up.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Broker {
    /// Starts a broker on `data_dir` with free ports and `extra` arguments, and waits
    /// until its admin API answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Broker {
        Self::start_on(data_dir, (free_addr(), free_addr(), free_addr()), extra)
    }

    /// Starts a broker with `toml` as its config file (see `start_with_config`) under
    /// `ulimit -v address_space_kib`, as on a board with a small address space.
    pub fn start_limited(data_dir: &Path, toml: &str, address_space_kib: u64) -> Broker {
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, toml).expect("write config");
        let limit = format!("ulimit -v {address_space_kib} && exec \"$0\" \"$@\"");
        Self::start_with(
            Command::new("sh").args(["-c", &limit]).arg(weir_bin()),
            data_dir,
            &["--config", config.to_str().expect("utf-8 path")],
        )
    }

    /// Starts `weir serve` through `command` (`weir` itself with an environment, or a
    /// wrapper whose arguments end with it), on free ports.
    pub fn start_with(command: &mut Command, data_dir: &Path, extra: &[&str]) -> Broker {
        Self::launch(
            command,
            data_dir,
            (free_addr(), free_addr(), free_addr()),
            extra,
        )
    }

    /// Stops this broker (SIGTERM, or SIGKILL with `kill`) and starts it again on the
    /// same data directory and ports, as a restarted service comes back.
    pub fn restart(&mut self, kill: bool, extra: &[&str]) {
        if kill {
            self.kill();
        } else {
            let status = self.terminate();
            assert!(status.success(), "broker exited with {status:?}");
        }
        let next = Self::start_on(&self.data_dir, (self.admin, self.kafka, self.mqtt), extra);
        *self = next;
    }

    /// Starts the broker again on the same data directory and ports, after it was
    /// stopped with `terminate` or `kill`.
    pub fn relaunch(&mut self, extra: &[&str]) {
        let next = Self::start_on(&self.data_dir, (self.admin, self.kafka, self.mqtt), extra);
        *self = next;
    }

    fn start_on(
        data_dir: &Path,
        addresses: (SocketAddr, SocketAddr, SocketAddr),
        extra: &[&str],
    ) -> Broker {
        Self::launch(&mut Command::new(weir_bin()), data_dir, addresses, extra)
    }

    /// Runs `weir` (or what `command` wraps it in) `serve` with these addresses.
    fn launch(
        command: &mut Command,
        data_dir: &Path,
        (admin, kafka, mqtt): (SocketAddr, SocketAddr, SocketAddr),
        extra: &[&str],
    ) -> Broker {
        let mut child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--admin-listen", &admin.to_string()])
            .args(["--kafka-listen", &kafka.to_string()])
            .args(["--mqtt-listen", &mqtt.to_string()])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weir");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr");
        let lines = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut broker = Broker {
            child,
            data_dir: data_dir.to_owned(),
            admin,
            kafka,
            mqtt,
            stderr,
            reader: Some(reader),
        };
        broker.wait_ready(Duration::from_secs(30));
        broker
    }

    /// Waits until every listener is up: `/health` says "ok" only then. Fails at once,
    /// with the broker's log, if it exited instead.
    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                panic!(
                    "weir exited with {status} before it was ready; its log:\n{}",
                    self.log().join("\n")
                );
            }
            let health = admin_get(self.admin, "/health").unwrap_or_default();
            if health.starts_with("HTTP/1.1 200") && health.contains("\"status\":\"ok\"") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "weir did not start within {limit:?}; its log:\n{}",
            self.log().join("\n")
        );
    }

    /// Everything the broker wrote to stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Runs `weir <args>` against this broker's admin API.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut full = vec![args[0], "--admin"];
        let admin = self.admin.to_string();
        full.push(&admin);
        full.extend_from_slice(&args[1..]);
        run_weir(&full)
    }

    /// Sends SIGTERM and waits for the process to exit (bounded).
    pub fn terminate(&mut self) -> ExitStatus {
        signal(&self.child, "TERM");
        wait_bounded(&mut self.child, Duration::from_secs(30))
    }

    /// SIGKILL, as a power cut looks to the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Kafka bootstrap address clients use.
impl Broker {
    pub fn bootstrap(&self) -> String {
        self.kafka.to_string()
    }
}

/// A command for a third-party program (kcat, python3). Cargo puts its build
/// directories on `LD_LIBRARY_PATH` for tests, and one holds the librdkafka that the
/// `rdkafka` crate builds: kcat and confluent-kafka must load their own.
pub fn external(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

/// Runs `python3 tests/python/<script> <args>`, bounded in time. The README's test
/// command installs the Python clients the scripts import.
pub fn python(script: &str, args: &[&str]) -> CliOutput {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    run(
        Command::new("python3").arg(path).args(args),
        Duration::from_secs(300),
    )
}

/// Runs `cmd` with `input` on its stdin, bounded in time; true when it exited 0.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> bool {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let written = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes());
    let status = wait_bounded(&mut child, Duration::from_secs(60));
    written.is_ok() && status.success()
}

/// Runs any command, bounded in time, capturing its output.
pub fn run(cmd: &mut Command, limit: Duration) -> CliOutput {
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let out_pipe = child.stdout.take().expect("stdout");
    let err_pipe = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || std::io::read_to_string(out_pipe).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err_pipe).unwrap_or_default());
    let status = wait_bounded(&mut child, limit);
    CliOutput {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the weir binary with `args`, bounded in time.
pub fn run_weir(args: &[&str]) -> CliOutput {
    run(Command::new(weir_bin()).args(args), Duration::from_secs(60))
}

/// Sends a signal by name (TERM, INT, KILL) with the system's `kill`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}

/// Waits for `child`, killing it if it outlives `limit`.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A bare Kafka protocol connection, for tests that need exact control of requests
/// (retries, malformed frames). Requests are encoded with `kafka-protocol`.
pub struct KafkaWire {
    stream: std::net::TcpStream,
    correlation_id: i32,
}

impl KafkaWire {
    pub fn connect(addr: SocketAddr) -> KafkaWire {
        let stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        KafkaWire {
            stream,
            correlation_id: 0,
        }
    }

    /// Sends raw bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes)
    }

    /// Reads one response frame (without its length), or None when the broker closed.
    pub fn read_frame(&mut self) -> Option<bytes::Bytes> {
        use std::io::Read;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).ok()?;
        let mut frame = vec![0u8; i32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut frame).ok()?;
        Some(frame.into())
    }

    /// Sends `body` as `api` v`version` and decodes the response.
    pub fn call<Req, Resp>(
        &mut self,
        api: kafka_protocol::messages::ApiKey,
        version: i16,
        body: &Req,
    ) -> Resp
    where
        Req: kafka_protocol::protocol::Encodable,
        Resp: kafka_protocol::protocol::Decodable,
    {
        use bytes::{BufMut, BytesMut};
        use kafka_protocol::protocol::{Decodable, Encodable};
        self.correlation_id += 1;
        let mut header = kafka_protocol::messages::RequestHeader::default();
        header.request_api_key = api as i16;
        header.request_api_version = version;
        header.correlation_id = self.correlation_id;
        header.client_id = Some(kafka_protocol::protocol::StrBytes::from_static_str(
            "weir-tests",
        ));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header
            .encode(&mut buf, api.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        self.send_raw(&buf).expect("send request");
        let mut frame = self.read_frame().expect("a response");
        let header = kafka_protocol::messages::ResponseHeader::decode(
            &mut frame,
            api.response_header_version(version),
        )
        .unwrap();
        assert_eq!(header.correlation_id, self.correlation_id);
        Resp::decode(&mut frame, version).unwrap()
    }
}

/// A component built by `cargo build --release --target wasm32-wasip2` in `plugins/`
/// (the README's test command does it).
pub fn plugin_wasm(name: &str) -> PathBuf {
    let dir = match name.split('_').next() {
        Some("python") => "python",
        Some("js") => "js",
        Some("c") => "c",
        Some("zig") => "zig",
        _ => "wasm32-wasip2/release",
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target")
        .join(dir)
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first (./scripts/test does)",
        path.display()
    );
    path
}

/// The machine an ELF executable is for (its header's e_machine): 183 is aarch64.
pub fn elf_machine(bin: &Path) -> u16 {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(bin)
        .and_then(|mut f| f.read_exact(&mut header))
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    u16::from_le_bytes([header[18], header[19]])
}

pub const EM_AARCH64: u16 = 183;

/// A command running the aarch64 executable `bin` under qemu's user-mode emulation. Its
/// libraries (glibc, libssl3) are Debian's arm64 packages installed beside the host's
/// (dpkg multiarch, set up by scripts/build-aarch64), found where an arm64 system has
/// them, so no library root is given.
pub fn emulated_aarch64(bin: &Path) -> Command {
    let mut cmd = external("qemu-aarch64-static");
    cmd.arg(bin);
    cmd
}

/// Path of another binary of the workspace, built next to `weir` (`weir-sim`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let bin = weir_bin().with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first",
        bin.display()
    );
    bin
}

impl Broker {
    /// Writes `toml` as `weir.toml` beside the data directory and starts a broker
    /// with it.
    pub fn start_with_config(data_dir: &Path, toml: &str) -> Broker {
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, toml).expect("write config");
        Broker::start(
            data_dir,
            &["--config", config.to_str().expect("utf-8 path")],
        )
    }

    /// A Prometheus metric's value from `/metrics` (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        metric_at(self.admin, name)
    }

    /// Waits (bounded) until `metric` reaches `at_least`.
    pub fn wait_metric(&self, name: &str, at_least: f64) {
        self.wait_metric_within(name, at_least, Duration::from_secs(30));
    }

    /// `wait_metric` with its own bound (compiling a large component, say); on
    /// timeout the broker's last log lines are in the message.
    pub fn wait_metric_within(&self, name: &str, at_least: f64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.metric(name) < at_least {
            if Instant::now() >= deadline {
                let log = self.log();
                let tail = log[log.len().saturating_sub(20)..].join("\n");
                panic!(
                    "{name} stayed below {at_least}: {}; the broker's log ends with\n{tail}",
                    self.metric(name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the broker's log has a line containing `text`.
    pub fn wait_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().iter().any(|l| l.contains(text)) {
            assert!(
                Instant::now() < deadline,
                "no log line with {text:?}:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every record of `topic` as "key SEP value" lines, read with `weir consume -e`.
    pub fn consume_lines(&self, topic: &str, separator: &str) -> Vec<String> {
        let out = run(
            Command::new(weir_bin()).args([
                "consume",
                "-b",
                &self.bootstrap(),
                topic,
                "-e",
                "-K",
                separator,
            ]),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "weir consume {topic}: {}", out.stderr);
        out.stdout.lines().map(String::from).collect()
    }

    pub fn mqtt_port(&self) -> String {
        self.mqtt.port().to_string()
    }
}

/// A Prometheus metric's value from the `/metrics` of the admin API at `admin` (0 if
/// absent or unreachable).
pub fn metric_at(admin: SocketAddr, name: &str) -> f64 {
    let text = admin_get(admin, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The whole HTTP response (status line, headers, body) to `GET path` on the admin API,
/// or `None` if it cannot be reached.
pub fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// A background process whose stdout is collected, killed on drop.
pub struct Background {
    pub child: Child,
    out: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let pipe = child.stdout.take().expect("stdout");
        let out = std::thread::spawn(move || std::io::read_to_string(pipe).unwrap_or_default());
        Background {
            child,
            out: Some(out),
        }
    }

    /// Waits (bounded) for the process to exit and returns its stdout.
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, String) {
        let status = wait_bounded(&mut self.child, limit);
        let out = self.out.take().map(|o| o.join().unwrap_or_default());
        (status, out.unwrap_or_default())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto_pub (Debian) to the MQTT broker on `port`, bounded; panics if it fails.
pub fn mosquitto_pub(port: u16, args: &[&str]) {
    let out = run(
        external("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {}",
        out.stderr
    );
}

/// mosquitto_sub (Debian) on `port` in the background, printing "topic payload" lines
/// (-v) and giving up after `wait_secs` without a message (-W).
pub fn mosquitto_sub(port: u16, wait_secs: u32, args: &[&str]) -> Background {
    Background::spawn(
        external("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v"])
            .args(["-W", &wait_secs.to_string()])
            .args(args),
    )
}

/// A TCP proxy on a free loopback port to `target`, whose connections the test can
/// cut (a flapping link) or refuse (an outage).
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
}

struct ProxyShared {
    target: Mutex<SocketAddr>,
    open: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    connections: Mutex<Vec<std::net::TcpStream>>,
    cuts: std::sync::atomic::AtomicU64,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(ProxyShared {
            target: Mutex::new(target),
            open: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            cuts: AtomicU64::new(0),
        });
        let addr = listener.local_addr().expect("proxy address");
        let s = shared.clone();
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            while !s.stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if !s.open.load(Ordering::Relaxed) {
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let target = *s.target.lock().unwrap();
                let Ok(server) =
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
                else {
                    continue;
                };
                let mut connections = s.connections.lock().unwrap();
                for stream in [&client, &server] {
                    if let Ok(c) = stream.try_clone() {
                        connections.push(c);
                    }
                }
                drop(connections);
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, shared }
    }

    /// Sends new connections to `target` from now on.
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Drops every connection through the proxy, mid-request or not.
    pub fn cut(&self) {
        let mut connections = self.shared.connections.lock().unwrap();
        for c in connections.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.shared
            .cuts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Refuses new connections and cuts the ones there are (false), or lets them in.
    pub fn set_open(&self, open: bool) {
        self.shared
            .open
            .store(open, std::sync::atomic::Ordering::Relaxed);
        if !open {
            self.cut();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}

/// Tansu, a third-party Kafka-compatible broker, in memory, on a free port; the
/// binary from `$WEIR_TANSU` or `tansu` on the PATH (the README's test command
/// installs it once and caches it).
pub struct Tansu {
    child: Child,
    pub addr: SocketAddr,
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("WEIR_TANSU") {
        return PathBuf::from(path);
    }
    PathBuf::from("tansu")
}

impl Tansu {
    /// Starts Tansu on `addr`; clients are told to connect to `advertised` (a proxy
    /// in front of it, or `addr`).
    pub fn start(addr: SocketAddr, advertised: SocketAddr) -> Tansu {
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start tansu (set WEIR_TANSU or put tansu on the PATH; ./scripts/test installs it)",
            );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, addr }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every record of `topic` on the Kafka broker at `bootstrap` (partition by
/// partition, in offset order): (partition, key, value, headers as "k=v,k=v").
pub fn dump_records(bootstrap: &str, topic: &str) -> Vec<(u32, String, String, String)> {
    dump_records_over(bootstrap, topic, None, None)
}

/// `dump_records`, over TLS when given the CA to trust, and logged in with SASL when
/// given (mechanism, user, password).
pub fn dump_records_over(
    bootstrap: &str,
    topic: &str,
    ca: Option<&Path>,
    sasl: Option<(&str, &str, &str)>,
) -> Vec<(u32, String, String, String)> {
    let mut args = vec![bootstrap, topic];
    args.push(ca.map_or("-", |ca| ca.to_str().expect("utf-8 path")));
    if let Some((mechanism, user, password)) = sasl {
        args.extend([mechanism, user, password]);
    }
    let out = python("kafka_dump.py", &args);
    assert!(
        out.status.success(),
        "kafka_dump.py {topic}: {}",
        out.stderr
    );
    out.stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.splitn(4, '\t');
            let mut next = || f.next().unwrap_or_default().to_string();
            (next().parse().unwrap_or(u32::MAX), next(), next(), next())
        })
        .collect()
}

/// A TLS-terminating proxy: clients speak TLS to it (a self-signed certificate for
/// 127.0.0.1, written to `ca_pem` for them to trust); it speaks plain TCP to the
/// target. Lets a test check that a client's TLS settings work end to end.
pub struct TlsProxy {
    pub addr: SocketAddr,
    pub ca_pem: PathBuf,
    target: Arc<Mutex<SocketAddr>>,
    _runtime: tokio::runtime::Runtime,
}

impl TlsProxy {
    pub fn start(dir: &Path) -> TlsProxy {
        use openssl::ssl::{Ssl, SslAcceptor, SslMethod};
        let (cert, key) = self_signed_certificate();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.to_pem().unwrap()).unwrap();
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        builder.set_private_key(&key).unwrap();
        builder.set_certificate(&cert).unwrap();
        let acceptor = Arc::new(builder.build());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(addr));
        let to = target.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let target = *to.lock().unwrap();
                tokio::spawn(async move {
                    let Ok(ssl) = Ssl::new(acceptor.context()) else {
                        return;
                    };
                    let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, client) else {
                        return;
                    };
                    if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        TlsProxy {
            addr,
            ca_pem,
            target,
            _runtime: runtime,
        }
    }

    /// Sends new connections to `target` from now on.
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// A self-signed certificate (its own CA) for 127.0.0.1 and localhost, valid a day.
fn self_signed_certificate() -> (X509, PKey<Private>) {
    let key = new_key();
    let cert = certificate("localhost", &key, None, Role::Ca, (0, 1));
    (cert, key)
}

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

/// What a certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A CA that also serves as 127.0.0.1/localhost (the proxy's self-signed one).
    Ca,
    Server,
    Client,
}

fn new_key() -> PKey<Private> {
    PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
}

/// An X.509 v3 certificate for `cn`, signed by `issuer` (or itself), valid from
/// `days.0` to `days.1` days from now (negative: in the past).
fn certificate(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    role: Role,
    days: (i64, i64),
) -> X509 {
    use openssl::asn1::Asn1Time;
    use openssl::bn::{BigNum, MsbOption};
    use openssl::hash::MessageDigest;
    use openssl::x509::X509NameBuilder;
    use openssl::x509::extension::{
        BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    };
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |d: i64| Asn1Time::from_unix(now + d * 86_400).unwrap();
    b.set_not_before(&at(days.0)).unwrap();
    b.set_not_after(&at(days.1)).unwrap();
    let context = b.x509v3_context(issuer.map(|(c, _)| c.as_ref()), None);
    let san = match role {
        Role::Ca | Role::Server => Some(
            SubjectAlternativeName::new()
                .ip("127.0.0.1")
                .dns("localhost")
                .build(&context)
                .unwrap(),
        ),
        Role::Client => None,
    };
    if let Some(san) = san {
        b.append_extension(san).unwrap();
    }
    match role {
        Role::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
        }
        Role::Server => {
            b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
                .unwrap();
        }
        Role::Client => {
            b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap())
                .unwrap();
            b.append_extension(
                KeyUsage::new()
                    .digital_signature()
                    .key_encipherment()
                    .build()
                    .unwrap(),
            )
            .unwrap();
        }
    }
    b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256())
        .unwrap();
    b.build()
}

/// A small PKI in `dir` for a test: a CA (`ca.pem`), a server certificate for
/// 127.0.0.1 and localhost (`server.pem`, `server.key`), and client certificates on
/// demand.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub server_pem: PathBuf,
    pub server_key: PathBuf,
    ca: (X509, PKey<Private>),
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca_key = new_key();
        let ca = certificate("Weir test CA", &ca_key, None, Role::Ca, (-1, 2));
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca.to_pem().unwrap()).unwrap();
        let key = new_key();
        let server = certificate(
            "localhost",
            &key,
            Some((&ca, &ca_key)),
            Role::Server,
            (-1, 2),
        );
        let server_pem = dir.join("server.pem");
        let server_key = dir.join("server.key");
        std::fs::write(&server_pem, server.to_pem().unwrap()).unwrap();
        std::fs::write(&server_key, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca_pem,
            server_pem,
            server_key,
            ca: (ca, ca_key),
        }
    }

    /// A client certificate for `cn` signed by this CA, valid between these days from
    /// now: (`NAME.pem`, `NAME.key`) in the PKI's directory.
    pub fn client(&self, cn: &str, file: &str, days: (i64, i64)) -> (PathBuf, PathBuf) {
        let key = new_key();
        let cert = certificate(cn, &key, Some((&self.ca.0, &self.ca.1)), Role::Client, days);
        self.write(file, &cert, &key)
    }

    /// A client certificate for `cn` from a CA nobody trusts.
    pub fn untrusted_client(&self, cn: &str, file: &str) -> (PathBuf, PathBuf) {
        let other_key = new_key();
        let other = certificate("Someone else's CA", &other_key, None, Role::Ca, (-1, 2));
        let key = new_key();
        let cert = certificate(cn, &key, Some((&other, &other_key)), Role::Client, (-1, 2));
        self.write(file, &cert, &key)
    }

    fn write(&self, file: &str, cert: &X509, key: &PKey<Private>) -> (PathBuf, PathBuf) {
        let pem = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&pem, cert.to_pem().unwrap()).unwrap();
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (pem, key_path)
    }
}
