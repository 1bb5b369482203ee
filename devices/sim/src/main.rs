//! `weir-sim`: simulated MQTT devices for load tests, demos and benchmarks.
//!
//! Each device is one `rumqttc` client with its own connection. It publishes at a
//! rate (or as fast as its in-flight window allows) one of three payload shapes, and
//! the simulator measures what the broker acknowledged and how fast. It works
//! against any MQTT broker, so the same run compares Weir with Mosquitto.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shape {
    /// `{"device":"dev-00001","seq":7,"ts":…,"temperature":21.4,"humidity":45.1}`
    Json,
    /// A `sensor-frame` (postcard, ~15 bytes).
    Frame,
    /// A syslog-like text line.
    Log,
}

#[derive(Parser, Debug)]
#[command(name = "weir-sim", version, about)]
struct Args {
    /// MQTT broker, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Number of devices (connections).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Messages per second per device; 0: as fast as the in-flight window allows.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Stop each device after this many messages (default: run for --duration).
    #[arg(long)]
    messages: Option<u64>,
    /// How long devices publish, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Connect only, publish nothing, stay connected for --duration (idle devices).
    #[arg(long)]
    idle: bool,
    #[arg(long, value_enum, default_value_t = Shape::Json)]
    payload: Shape,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Topic template; {device} and {shape} are filled in.
    #[arg(long, default_value = "sensors/{device}/{shape}")]
    topic: String,
    /// Client id and device name prefix.
    #[arg(long, default_value = "dev-")]
    prefix: String,
    /// Unacknowledged QoS 1/2 messages per device.
    #[arg(long, default_value_t = 10)]
    inflight: u16,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 1000)]
    connect_rate: u32,
    #[arg(long, default_value_t = 60)]
    keep_alive: u64,
    /// Persistent sessions (clean session off), so that what was in flight when the
    /// connection dropped is sent again after the reconnect.
    #[arg(long)]
    persistent: bool,
    /// Append "device seq" for every acknowledged message to this file. Implies
    /// --persistent: with a new session rumqttc drops what it had not sent, and
    /// the sequence numbers of what follows could not be told apart.
    #[arg(long)]
    acked_log: Option<PathBuf>,
    /// Log in with this user name (`{device}` becomes each device's name).
    #[arg(long)]
    username: Option<String>,
    /// and this password (`{device}` substituted too).
    #[arg(long, default_value = "")]
    password: String,
    /// Connect over TLS, trusting the CA certificates in this PEM file (the broker's
    /// `[mqtt] tls_listen`).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The client configuration --tls-ca makes.
    #[arg(skip)]
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// No progress bar (logs, CI).
    #[arg(long)]
    quiet: bool,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    /// Payload bytes of the acknowledged messages.
    payload_bytes: AtomicU64,
    errors: AtomicU64,
}

struct DeviceResult {
    latencies_us: Vec<u64>,
    acked: Vec<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(ca) = &args.tls_ca {
        args.tls = Some(tls_client(ca)?);
    }
    let args = Arc::new(args);
    anyhow::ensure!(args.qos <= 2, "--qos must be 0, 1 or 2");
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .context("--broker must be host:port")?;
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let total = args.messages.map_or(0, |m| m * args.devices as u64);
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} {bar:30} {pos}/{len} acked {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::with_capacity(args.devices);
    let ramp = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1)));
    for i in 0..args.devices {
        let device = format!("{}{:05}", args.prefix, i);
        tasks.push(tokio::spawn(run_device(
            args.clone(),
            device,
            host.clone(),
            port,
            stats.clone(),
            stop.clone(),
            deadline,
        )));
        tokio::time::sleep(ramp).await;
    }
    let ticker = {
        let stats = stats.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(stats.acked.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "· {} connected · {} sent · {} errors",
                    stats.connected.load(Ordering::Relaxed),
                    stats.sent.load(Ordering::Relaxed),
                    stats.errors.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut acked_log = match &args.acked_log {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let mut publish_end = started;
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await?;
        for l in result.latencies_us {
            histogram.record(l.max(1))?;
        }
        if let Some(out) = acked_log.as_mut() {
            for seq in result.acked {
                writeln!(out, "{}{:05} {seq}", args.prefix, i)?;
            }
        }
        publish_end = publish_end.max(Instant::now());
    }
    if let Some(mut out) = acked_log {
        out.flush()?;
    }
    ticker.abort();
    bar.finish_and_clear();
    let elapsed = (publish_end - started).as_secs_f64().max(0.001);
    let sent = stats.sent.load(Ordering::Relaxed);
    let acked = stats.acked.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let p = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "devices": args.devices, "connected": stats.connected.load(Ordering::Relaxed),
                "sent": sent, "acked": acked, "errors": errors, "seconds": elapsed,
                "msgs_per_sec": acked as f64 / elapsed,
                "payload_bytes": stats.payload_bytes.load(Ordering::Relaxed),
                "ack_ms_p50": p(0.5), "ack_ms_p99": p(0.99), "ack_ms_max": histogram.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "devices {}  sent {sent}  acknowledged {acked}  errors {errors}  in {elapsed:.1} s  → {:.0} msgs/s",
            args.devices,
            acked as f64 / elapsed
        );
        println!(
            "ack latency: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            p(0.5),
            p(0.99),
            histogram.max() as f64 / 1000.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

/// A TLS client configuration trusting the certificates in `ca` (ring, as the broker).
fn tls_client(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert.with_context(|| format!("{}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn run_device(
    args: Arc<Args>,
    device: String,
    host: String,
    port: u16,
    stats: Arc<Stats>,
    _stop: Arc<AtomicBool>,
    deadline: Instant,
) -> DeviceResult {
    let mut options = MqttOptions::new(device.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(args.keep_alive.max(5)));
    options.set_clean_session(!(args.persistent || args.acked_log.is_some()));
    options.set_inflight(args.inflight.max(1));
    if let Some(user) = &args.username {
        options.set_credentials(
            user.replace("{device}", &device),
            args.password.replace("{device}", &device),
        );
    }
    // A request channel of one: rumqttc 0.25 holds a single publish whose packet id
    // collides with one still in flight, and after a reconnect several queued
    // requests can collide at once and all but the last are lost.
    if let Some(tls) = &args.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, mut events) = AsyncClient::new(options, 1);
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let topic = args
        .topic
        .replace("{device}", &device)
        .replace("{shape}", shape_name(args.payload));
    // seq of each publish in the order rumqttc sends them; pkid → (seq, sent at).
    let queued = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let publisher = {
        let client = client.clone();
        let args = args.clone();
        let device = device.clone();
        let queued = queued.clone();
        tokio::spawn(async move {
            if args.idle {
                return;
            }
            let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
            let start = tokio::time::Instant::now();
            let mut seq = 0u64;
            while Instant::now() < deadline && args.messages.is_none_or(|m| seq < m) {
                if let Some(i) = interval {
                    tokio::time::sleep_until(start + i * seq as u32).await;
                }
                let body = payload(args.payload, &device, seq);
                queued.lock().await.push_back((seq, body.len() as u64));
                if client
                    .publish(topic.clone(), qos, false, body)
                    .await
                    .is_err()
                {
                    return;
                }
                seq += 1;
            }
        })
    };
    let mut inflight: HashMap<u16, Sent> = HashMap::new();
    let mut result = DeviceResult {
        latencies_us: Vec::new(),
        acked: Vec::new(),
    };
    let grace = deadline + Duration::from_secs(10);
    let mut was_connected = false;
    loop {
        let done_publishing = publisher.is_finished();
        if done_publishing && inflight.is_empty() && (!args.idle || Instant::now() >= deadline) {
            let queued_empty = queued.lock().await.is_empty();
            if queued_empty {
                break;
            }
        }
        if Instant::now() > grace {
            break;
        }
        let event = match tokio::time::timeout(Duration::from_millis(500), events.poll()).await {
            Err(_) => continue,
            Ok(e) => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if !was_connected {
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                } else if !ack.session_present {
                    // A new session: rumqttc dropped what was in flight and pending.
                    stats
                        .errors
                        .fetch_add(inflight.len() as u64, Ordering::Relaxed);
                    inflight.clear();
                    queued.lock().await.clear();
                }
                was_connected = true;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if qos != QoS::AtMostOnce && inflight.contains_key(&pkid) {
                    continue; // resent after a reconnect
                }
                let (seq, bytes) = queued.lock().await.pop_front().unwrap_or((u64::MAX, 0));
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if qos == QoS::AtMostOnce {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    stats.payload_bytes.fetch_add(bytes, Ordering::Relaxed);
                    result.acked.push(seq);
                } else {
                    let at = Instant::now();
                    inflight.insert(pkid, Sent { seq, at, bytes });
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                acked(&mut inflight, ack.pkid, &stats, &mut result)
            }
            Ok(Event::Incoming(Packet::PubComp(comp))) => {
                acked(&mut inflight, comp.pkid, &stats, &mut result)
            }
            Ok(_) => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                // rumqttc resends what was in flight after it reconnects, with the same
                // packet ids; keep waiting for their acknowledgements.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    publisher.abort();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
    result
}

/// A QoS 1/2 publish sent and not yet acknowledged.
struct Sent {
    seq: u64,
    at: Instant,
    /// Payload length.
    bytes: u64,
}

fn acked(inflight: &mut HashMap<u16, Sent>, pkid: u16, stats: &Stats, result: &mut DeviceResult) {
    if let Some(Sent { seq, at, bytes }) = inflight.remove(&pkid) {
        stats.acked.fetch_add(1, Ordering::Relaxed);
        stats.payload_bytes.fetch_add(bytes, Ordering::Relaxed);
        result.latencies_us.push(at.elapsed().as_micros() as u64);
        result.acked.push(seq);
    }
}

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Json => "json",
        Shape::Frame => "frame",
        Shape::Log => "log",
    }
}

fn payload(shape: Shape, device: &str, seq: u64) -> Bytes {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let wave = (seq % 100) as f64 / 10.0;
    match shape {
        Shape::Json => Bytes::from(format!(
            r#"{{"device":"{device}","seq":{seq},"ts":{now},"temperature":{:.1},"humidity":{:.1}}}"#,
            18.0 + wave,
            40.0 + wave
        )),
        Shape::Frame => {
            let frame = sensor_frame::SensorFrame {
                version: sensor_frame::VERSION,
                device_id: device
                    .bytes()
                    .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))),
                seq: seq as u32,
                timestamp_ms: now,
                temperature_dc: 180 + (seq % 100) as i16,
                humidity_dpct: 400 + (seq % 100) as u16,
                battery_mv: 3300 - (seq % 300) as u16,
            };
            let mut buf = [0u8; sensor_frame::MAX_FRAME];
            match sensor_frame::encode(&frame, &mut buf) {
                Ok(bytes) => Bytes::copy_from_slice(bytes),
                Err(_) => Bytes::new(),
            }
        }
        Shape::Log => Bytes::from(format!(
            "<14>1 {now} {device} app - - seq={seq} level=info msg=\"reading taken\" temperature={:.1}",
            18.0 + wave
        )),
    }
}
