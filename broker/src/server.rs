//! `weir serve`: the one place that starts the broker's tasks and shuts them down.
//!
//! Start: open the log, bind the admin listener, start retention. Stop (SIGINT or
//! SIGTERM): stop accepting, let in-flight requests and queued appends finish, close
//! the database cleanly, exit 0.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::kafka::{self, KafkaBroker, KafkaMetrics, KafkaSettings};
use crate::metrics::{self, StorageMetrics};
use crate::storage::{Log, now_ms};

pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let storage_metrics = StorageMetrics::default();
    let kafka_metrics = KafkaMetrics::default();
    let options = config.log_options();
    let data_dir = config.data_dir.clone();
    let log = {
        let metrics = storage_metrics.clone();
        tokio::task::spawn_blocking(move || Log::open_with_metrics(options, metrics)).await??
    };
    info!(data_dir = %data_dir.display(), topics = log.topics().len(), fsync = config.storage.fsync, "log opened");

    let (stop_tx, stop_rx) = watch::channel(false);

    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (admin): {e}", config.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let state = Arc::new(AdminState {
        log: log.clone(),
        registry: {
            let mut registry = metrics::registry(&storage_metrics);
            kafka_metrics.register(&mut registry);
            registry
        },
        topic_defaults: config.topic_config()?,
        default_partitions: config.topic_defaults.partitions,
    });
    let admin = tokio::spawn({
        let mut stop = stop_rx.clone();
        async move {
            axum::serve(admin_listener, admin::router(state))
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }
    });

    let retention = tokio::spawn(run_retention(
        log.clone(),
        Duration::from_millis(config.storage.retention_check_interval_ms),
        stop_rx.clone(),
    ));

    let kafka_listener = TcpListener::bind(config.kafka.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (kafka): {e}", config.kafka.listen))?;
    let (advertised_host, advertised_port) = config.kafka_advertised()?;
    let settings = KafkaSettings {
        advertised_host,
        advertised_port: i32::from(advertised_port),
        auto_create_topics: config.kafka.auto_create_topics,
        default_partitions: config.topic_defaults.partitions,
        topic_defaults: config.topic_config()?,
    };
    kafka::log_listening(kafka_listener.local_addr()?, &settings);
    let kafka_broker = KafkaBroker::new(log.clone(), settings, kafka_metrics)?;
    let kafka = tokio::spawn(kafka_broker.serve(kafka_listener, stop_rx.clone()));

    warn!(mqtt = %config.mqtt.listen, "the MQTT listener is not part of this build yet; that address is not bound");
    info!(admin = %admin_addr, "weir is serving");

    shutdown_signal().await;
    info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    if let Err(e) = admin.await? {
        error!(error = %e, "admin listener failed");
    }
    retention.await?;
    if let Err(e) = kafka.await? {
        error!(error = %e, "kafka listener failed");
    }
    log.close().await?;
    info!("stopped");
    Ok(())
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
