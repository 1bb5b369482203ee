//! A measurement, not a check (BENCHMARKS.md, "MQTT"): the heap one idle MQTT
//! connection holds, counted by dhat, and where it goes.
//! `cargo test -p weir --test mqtt_memory -- --ignored --nocapture` (writes
//! `dhat-heap.json` beside the crate for dhat's viewer).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use weir::auth::{Anonymous, Gate, Users};
use weir::config::MqttConfig;
use weir::mqtt::MqttBroker;
use weir::storage::{Log, LogOptions};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const CONNECTIONS: usize = 1000;

/// MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

#[test]
#[ignore]
fn heap_per_idle_connection() {
    let _profiler = dhat::Profiler::new_heap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogOptions::new(dir.path())).unwrap();
    let users = Users::load(log.clone(), Default::default()).unwrap();
    let gate = Gate::new(
        Arc::new(users),
        Anonymous::Loopback,
        Default::default(),
        Default::default(),
    );
    let broker = MqttBroker::open(log, Vec::new(), 1000, Default::default()).unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let server = rt.spawn(weir::mqtt::serve(
        broker,
        MqttConfig::default(),
        Arc::new(gate),
        vec![weir::tls::Listener {
            tcp: listener,
            tls: None,
            websocket: None,
        }],
        stop,
    ));
    let mut connect = |i: usize| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&connect_packet(&format!("idle-{i}"))).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);
        s
    };
    // The first connections warm up what every later one shares.
    let mut held: Vec<TcpStream> = (0..10).map(&mut connect).collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = dhat::HeapStats::get();
    held.extend((10..10 + CONNECTIONS).map(&mut connect));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = dhat::HeapStats::get();
    println!(
        "{CONNECTIONS} idle connections: {} bytes and {} blocks each",
        (after.curr_bytes - before.curr_bytes) / CONNECTIONS,
        (after.curr_blocks - before.curr_blocks) as f64 / CONNECTIONS as f64
    );
    let _ = stop_tx.send(true);
    drop(held);
    rt.block_on(server).unwrap().unwrap();
}
