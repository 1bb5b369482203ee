//! `weir serve`: the one place that starts the broker's tasks and shuts them down.
//!
//! Start: open the log, bind the admin listener, start retention. Stop (SIGINT or
//! SIGTERM): stop accepting, let in-flight requests and queued appends finish, close
//! the database cleanly, exit 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::auth::{Anonymous, AuthMetrics, Gate, Users};
use crate::config::Config;
use crate::kafka::{self, KafkaBroker, KafkaMetrics, KafkaSettings};
use crate::metrics::{self, StorageMetrics};
use crate::mqtt::rules::{CompiledIngest, compile_downlink};
use crate::mqtt::{self, MqttBroker, MqttMetrics};
use crate::plugins::{
    IngestPlugin, Limits, PipelineContext, PipelineDefaults, PipelineMetrics, Pipelines,
    PluginHost, PluginRegistry,
};
use crate::replication::{self, ReplicationMetrics};
use crate::status::{self, ListenerView, StatusSources};
use crate::storage::{Log, NextLook, now_ms};
use crate::tls::{AdminListener, Listener, Tls, TlsMetrics};

pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let storage_metrics = StorageMetrics::default();
    let options = config.log_options();
    let data_dir = config.data_dir.clone();
    let log = {
        let metrics = storage_metrics.clone();
        tokio::task::spawn_blocking(move || Log::open_with_metrics(options, metrics)).await??
    };
    info!(data_dir = %data_dir.display(), topics = log.topics().len(), fsync = config.storage.fsync, "log opened");

    let (stop_tx, stop_rx) = watch::channel(false);
    let served = serve_on(&config, &log, storage_metrics, &stop_tx, stop_rx).await;
    // Every way out closes the log: a failure to start (tasks already started are told
    // to stop first), a task that panicked, or the end of a clean shutdown.
    let _ = stop_tx.send(true);
    let closed = log.close().await;
    served?;
    closed?;
    info!("stopped");
    Ok(())
}

/// Everything after the log is open: start, serve until a signal, stop.
async fn serve_on(
    config: &Config,
    log: &Log,
    storage_metrics: StorageMetrics,
    stop_tx: &watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let kafka_metrics = KafkaMetrics::default();
    let mqtt_metrics = MqttMetrics::default();
    let pipeline_metrics = PipelineMetrics::new();
    let replication_metrics = ReplicationMetrics::default();
    let auth_metrics = AuthMetrics::default();
    let tls_metrics = TlsMetrics::default();
    let tls = Tls::load(&config.tls, tls_metrics.clone())?;
    let admin_token = config.admin_token()?;
    let data_dir = config.data_dir.clone();

    let users = Arc::new(Users::load(log.clone(), auth_metrics.clone())?);
    let gate = Arc::new(Gate::new(
        users.clone(),
        config.auth.anonymous,
        config.acl()?,
        auth_metrics.clone(),
    ));
    info!(users = users.list().len(), anonymous = ?config.auth.anonymous, acl_rules = config.auth.acl.len(), "authentication");

    let host = PluginHost::new(config.data_dir.join("plugin-cache"))?;
    let pipelines = start_pipelines(config, log, &host, &pipeline_metrics, &stop_rx).await?;
    let replication = Arc::new(
        replication::start(
            &config.replication,
            log,
            &config.topic_config()?,
            config.topic_defaults.partitions,
            &replication_metrics,
            &stop_rx,
        )
        .await?,
    );

    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (admin): {e}", config.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_tls = match (&tls, config.admin.tls) {
        (Some(tls), true) => Some(tls.clone()),
        _ => None,
    };
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let status = Arc::new(StatusSources::new(
        data_dir.clone(),
        log.clone(),
        storage_metrics.clone(),
        kafka_metrics.clone(),
        mqtt_metrics.clone(),
        pipelines.clone(),
        replication.clone(),
    ));
    let state = Arc::new(AdminState {
        status: status.clone(),
        serving: serving.clone(),
        log: log.clone(),
        registry: {
            let mut registry = metrics::registry(&storage_metrics);
            kafka_metrics.register(&mut registry);
            mqtt_metrics.register(&mut registry);
            pipeline_metrics.register(&mut registry);
            replication_metrics.register(&mut registry);
            auth_metrics.register(&mut registry);
            tls_metrics.register(&mut registry);
            registry
        },
        topic_defaults: config.topic_config()?,
        default_partitions: config.topic_defaults.partitions,
        pipelines: pipelines.clone(),
        replication: replication.clone(),
        users,
        token: admin_token,
    });
    let admin = tokio::spawn({
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let router = admin::router(state);
        async move {
            match admin_tls {
                None => {
                    axum::serve(admin_listener, router)
                        .with_graceful_shutdown(stopped)
                        .await
                }
                Some(tls) => {
                    axum::serve(AdminListener::new(admin_listener, tls), router)
                        .with_graceful_shutdown(stopped)
                        .await
                }
            }
        }
    });

    let retention = tokio::spawn(run_retention(
        log.clone(),
        Duration::from_millis(config.storage.retention_check_interval_ms),
        stop_rx.clone(),
    ));

    let compaction = tokio::spawn(run_compaction(
        log.clone(),
        Duration::from_millis(config.storage.compaction_check_interval_ms),
        stop_rx.clone(),
    ));

    let mut kafka_listeners = vec![Listener::bind(config.kafka.listen, None, "kafka").await?];
    if let Some(addr) = config.kafka.tls_listen {
        kafka_listeners.push(Listener::bind(addr, tls.clone(), "kafka TLS").await?);
    }
    let (advertised_host, advertised_port) = config.kafka_advertised()?;
    let advertised_tls_port = match kafka_listeners.get(1) {
        Some(l) => Some(i32::from(l.local_addr()?.port())),
        None => None,
    };
    let settings = KafkaSettings {
        advertised_host,
        advertised_port: i32::from(advertised_port),
        advertised_tls_port,
        auto_create_topics: config.kafka.auto_create_topics,
        default_partitions: config.topic_defaults.partitions,
        topic_defaults: config.topic_config()?,
    };
    for listener in &kafka_listeners {
        kafka::log_listening(listener.local_addr()?, listener.tls.is_some(), &settings);
    }
    let mut listener_views = vec![ListenerView {
        name: "admin".into(),
        address: admin_addr.to_string(),
        tls: config.admin.tls && tls.is_some(),
        auth: if config.admin_token()?.is_some() {
            "bearer token".into()
        } else {
            "open".into()
        },
    }];
    for listener in &kafka_listeners {
        listener_views.push(ListenerView {
            name: "kafka".into(),
            address: listener.local_addr()?.to_string(),
            tls: listener.tls.is_some(),
            auth: client_auth(config),
        });
    }
    let kafka_broker = KafkaBroker::new(log.clone(), settings, kafka_metrics, gate.clone())?;
    let kafka = tokio::spawn(kafka_broker.serve(kafka_listeners, stop_rx.clone()));

    let MqttStarted {
        tasks: mut mqtt,
        addrs: mqtt_addrs,
        broker: mqtt_broker,
    } = start_mqtt(
        config,
        log,
        &host,
        &mqtt_metrics,
        gate.clone(),
        tls.as_ref(),
        &stop_rx,
    )
    .await?;
    mqtt.push(tokio::spawn(status::sys::run_sys(
        mqtt_broker,
        status.clone(),
        stop_rx.clone(),
    )));
    for (name, addr, tls) in mqtt_addrs {
        listener_views.push(ListenerView {
            name: name.into(),
            address: addr.to_string(),
            tls,
            auth: client_auth(config),
        });
    }
    let _ = status.listeners.set(listener_views);
    let sampler = tokio::spawn(status::run_sampler(status.clone(), stop_rx.clone()));
    // Listening for SIGHUP before anything can send it: its default action ends the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|e| warn!(error = %e, "cannot listen for SIGHUP: certificates reload only with a restart"))
        .ok();
    serving.store(true, std::sync::atomic::Ordering::Release);
    info!(admin = %admin_addr, admin_tls = config.admin.tls, "weir is serving");
    // systemd (Type=notify): ready once every listener is bound.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "cannot tell systemd the service is ready");
    }
    let watchdog = tokio::spawn(feed_watchdog(log.clone(), stop_rx.clone()));

    let reload_acl = config.source.clone().map(|path| (path, gate.clone()));
    let reloads = tokio::spawn(reload_on_hangup(
        hangups,
        tls.clone(),
        reload_acl,
        stop_rx.clone(),
    ));
    shutdown_signal().await;
    info!("shutting down: finishing in-flight requests");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    watchdog.abort();
    reloads.abort();
    // Every task is waited for, even after one of them panicked.
    let mut failed = 0;
    if let Some(Err(e)) = joined("admin", admin, &mut failed).await {
        error!(error = %e, "admin listener failed");
    }
    joined("retention", retention, &mut failed).await;
    joined("compaction", compaction, &mut failed).await;
    joined("status sampler", sampler, &mut failed).await;
    if let Some(Err(e)) = joined("kafka", kafka, &mut failed).await {
        error!(error = %e, "kafka listener failed");
    }
    for task in mqtt {
        joined("mqtt", task, &mut failed).await;
    }
    pipelines.join().await;
    for task in replication.take_tasks() {
        joined("replication", task, &mut failed).await;
    }
    anyhow::ensure!(failed == 0, "{failed} task(s) panicked; see the log above");
    Ok(())
}

/// A task's result at shutdown; one that panicked is logged and counted in `failed`.
async fn joined<T>(what: &str, task: JoinHandle<T>, failed: &mut usize) -> Option<T> {
    match task.await {
        Ok(value) => Some(value),
        Err(e) => {
            error!(task = what, error = %e, "a task failed while the broker ran");
            *failed += 1;
            None
        }
    }
}

/// Who may connect to the Kafka and MQTT listeners, for the status page.
fn client_auth(config: &Config) -> String {
    match config.auth.anonymous {
        Anonymous::Loopback => "anonymous from loopback, users elsewhere".into(),
        Anonymous::All => "anyone (anonymous = \"all\")".into(),
        Anonymous::None => "users only".into(),
    }
}

/// What `start_mqtt` started: its tasks, the listeners' addresses (with whether they
/// are TLS), and the broker.
struct MqttStarted {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Listener name for the status page, address, TLS.
    addrs: Vec<(&'static str, std::net::SocketAddr, bool)>,
    broker: MqttBroker,
}

/// Binds the MQTT listener, creates the rules' topics, starts downlinks and bridges.
async fn start_mqtt(
    config: &Config,
    log: &Log,
    host: &PluginHost,
    metrics: &MqttMetrics,
    gate: Arc<Gate>,
    tls: Option<&Arc<Tls>>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<MqttStarted> {
    let m = &config.mqtt;
    let defaults = config.topic_config()?;
    let partitions = config.topic_defaults.partitions;
    let mut rules = Vec::new();
    for rule in &m.ingest {
        log.ensure_topic(&rule.topic, partitions, &defaults).await?;
        let mut compiled = CompiledIngest::compile(rule)?;
        if let Some(path) = &rule.plugin {
            log.ensure_topic(&format!("{}-dlq", rule.topic), partitions, &defaults)
                .await?;
            let wasm = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("[[mqtt.ingest]] plugin {}: {e}", path.display()))?;
            let params = rule
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let limits = Limits {
                memory_bytes: config.plugins.memory_mb << 20,
                call_timeout: Duration::from_millis(config.plugins.call_timeout_ms),
            };
            let name = format!("ingest:{}", rule.filter);
            let plugin = IngestPlugin::load(host, &name, &wasm, params, limits)
                .map_err(|e| anyhow::anyhow!("[[mqtt.ingest]] {}: {e}", rule.filter))?;
            compiled.plugin = Some(Arc::new(plugin));
        }
        rules.push(compiled);
    }
    let mut listeners = vec![Listener::bind(m.listen, None, "mqtt").await?];
    if let Some(addr) = m.tls_listen {
        listeners.push(Listener::bind(addr, tls.cloned(), "mqtt TLS").await?);
    }
    let tls_addr = match (m.tls_listen, listeners.get(1)) {
        (Some(_), Some(l)) => Some(l.local_addr()?),
        _ => None,
    };
    let mut addrs = vec![("mqtt", listeners[0].local_addr()?, false)];
    addrs.extend(tls_addr.map(|a| ("mqtt", a, true)));
    // MQTT over WebSockets: the same broker behind an HTTP upgrade (`tls/websocket.rs`).
    let ws_max = m.max_packet_size as usize + 5;
    let mut ws_addrs = Vec::new();
    for (addr, secure) in [(m.ws_listen, false), (m.wss_listen, true)] {
        let Some(addr) = addr else { continue };
        let (what, tls) = match secure {
            false => ("mqtt WebSocket", None),
            true => ("mqtt secure WebSocket", tls.cloned()),
        };
        let listener = Listener::bind(addr, tls, what).await?.websocket(ws_max);
        let local = listener.local_addr()?;
        ws_addrs.push(local);
        addrs.push(("mqtt-ws", local, secure));
        listeners.push(listener);
    }
    let broker = {
        let log = log.clone();
        let metrics = metrics.clone();
        let max_queued = m.max_queued_messages;
        tokio::task::spawn_blocking(move || MqttBroker::open(log, rules, max_queued, metrics))
            .await??
    };
    let settings = m.clone();
    info!(mqtt = %listeners[0].local_addr()?, mqtt_tls = ?tls_addr, mqtt_ws = ?ws_addrs, sessions = broker.session_count(), ingest_rules = m.ingest.len(),
        downlinks = m.downlink.len(), bridges = m.bridge.len(), "MQTT listening");
    let mut tasks = Vec::new();
    for rule in &m.downlink {
        log.ensure_topic(&rule.topic, partitions, &defaults).await?;
        let template = compile_downlink(rule)?;
        let topic_partitions = log.topic(&rule.topic).map_or(0, |t| t.partitions);
        for partition in 0..topic_partitions {
            tasks.push(tokio::spawn(mqtt::run_downlink(
                broker.clone(),
                rule.clone(),
                template.clone(),
                partition,
                stop.clone(),
            )));
        }
    }
    for bridge in &m.bridge {
        tasks.push(tokio::spawn(mqtt::bridge::run_bridge(
            broker.clone(),
            bridge.clone(),
            stop.clone(),
        )));
    }
    let stop = stop.clone();
    let serving = broker.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = mqtt::serve(serving, settings, gate, listeners, stop).await {
            error!(error = %e, "mqtt listener failed");
        }
    }));
    Ok(MqttStarted {
        tasks,
        addrs,
        broker,
    })
}

/// Starts the pipelines of the config file and those created through the admin API.
async fn start_pipelines(
    config: &Config,
    log: &Log,
    host: &PluginHost,
    metrics: &PipelineMetrics,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Arc<Pipelines>> {
    let p = &config.plugins;
    let context = PipelineContext {
        log: log.clone(),
        registry: PluginRegistry::new(config.data_dir.join("plugins"), log.clone(), host.clone()),
        defaults: PipelineDefaults {
            batch_size: p.batch_size,
            memory_mb: p.memory_mb,
            call_timeout_ms: p.call_timeout_ms,
        },
        metrics: metrics.clone(),
        runtime: tokio::runtime::Handle::current(),
        stop: stop.clone(),
    };
    Pipelines::start(
        context,
        config.topic_config()?,
        config.topic_defaults.partitions,
        &p.pipeline,
    )
    .await
}

/// Runs a compaction pass over each partition of a compacted topic that is due one
/// (`storage/compaction.rs`), every `every`, one partition at a time on the blocking pool.
async fn run_compaction(log: Log, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut looks: HashMap<(String, u32), NextLook> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let topics: Vec<_> = log
            .topics()
            .into_iter()
            .filter(|t| t.config.cleanup_policy.compacts())
            .collect();
        looks.retain(|(t, _), _| topics.iter().any(|info| &info.name == t));
        for info in topics {
            for partition in 0..info.partitions {
                let key = (info.name.clone(), partition);
                let look = looks.get(&key).copied();
                let topic = info.name.clone();
                let started = std::time::Instant::now();
                let pass = log
                    .blocking(move |log| log.compact(&topic, partition, now_ms(), look))
                    .await;
                match pass {
                    Ok((pass, next)) => {
                        match next {
                            Some(next) => looks.insert(key, next),
                            None => looks.remove(&key),
                        };
                        if let Some(c) = pass {
                            info!(topic = %c.topic, partition = c.partition, from = c.from, to = c.to,
                                removed_records = c.removed_records,
                                rewritten_batches = c.applied.rewritten_batches,
                                removed_batches = c.applied.removed_batches,
                                freed_bytes = c.applied.freed_bytes,
                                stale_edits = c.applied.stale,
                                ms = started.elapsed().as_millis() as u64,
                                "compacted offsets {}..{}", c.from, c.to);
                        }
                    }
                    Err(e) => {
                        log.metrics().compaction_errors.inc();
                        warn!(topic = %info.name, partition, error = %e, "compaction failed");
                    }
                }
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}

async fn run_retention(log: Log, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match log.enforce_retention(now_ms()).await {
            Ok(deletions) => {
                for d in deletions {
                    info!(topic = %d.topic, partition = d.partition, from = d.from, to = d.to, bytes = d.bytes,
                        "retention deleted offsets {}..{}", d.from, d.to);
                }
            }
            Err(e) => warn!(error = %e, "retention run failed"),
        }
    }
}

/// Reloads the TLS certificates and the `[[auth.acl]]` rules (from the config file, if
/// the broker was started with one) on each SIGHUP until `stop`.
async fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    tls: Option<Arc<Tls>>,
    acl: Option<(std::path::PathBuf, Arc<Gate>)>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut hangups) = hangups else { return };
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match &tls {
            None => info!("SIGHUP: no certificates to reload ([tls] is not configured)"),
            Some(tls) => match tls.reload() {
                Ok(()) => info!("SIGHUP: TLS certificates reloaded"),
                Err(e) => {
                    error!(error = %e, "SIGHUP: TLS certificates not reloaded; the ones in use stay")
                }
            },
        }
        let Some((path, gate)) = &acl else { continue };
        match Config::load(path).and_then(|c| c.acl()) {
            Ok(rules) => {
                info!(rules = rules.len(), "SIGHUP: [[auth.acl]] rules reloaded");
                gate.set_acl(rules);
            }
            Err(e) => {
                error!(error = %e, "SIGHUP: [[auth.acl]] rules not reloaded; the ones in use stay")
            }
        }
    }
}

/// Feeds systemd's watchdog (`WatchdogSec`) at half its interval while the log's writer
/// is healthy. A writer stuck in one commit (a hung disk) for the whole interval, or a
/// runtime too wedged to run this task, stops the feeding, and systemd restarts the
/// service. Without a watchdog (`WATCHDOG_USEC` unset) it returns at once.
async fn feed_watchdog(log: Log, mut stop: watch::Receiver<bool>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    info!(
        interval_ms = interval.as_millis() as u64,
        "feeding systemd's watchdog"
    );
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if log.writer_healthy(interval) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            warn!(
                interval_ms = interval.as_millis() as u64,
                "the log writer is stuck in a commit: not feeding systemd's watchdog"
            );
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
