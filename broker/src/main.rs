//! The `weir` command line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use weir::admin::{AdminClient, CreateTopic};
use weir::config::{Config, LogFormat};

/// mimalloc: small allocations (records, frames, plugin outputs) are most of what the
/// broker allocates, and glibc's malloc was a quarter of the plugin boundary's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A WebAssembly-extensible message broker for edge and IoT gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. With no options: data in ./weir-data, admin API on 127.0.0.1:9644.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics on a running broker.
    Topic {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce lines from stdin to a topic, one record per line.
    Produce {
        topic: String,
        #[arg(long, short, env = "WEIR_BOOTSTRAP", default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// Split each line at the first SEP into key and value (e.g. -K :).
        #[arg(long = "key-separator", short = 'K')]
        key_separator: Option<String>,
        /// Send everything to this partition (default: by key, like Kafka clients).
        #[arg(long, short)]
        partition: Option<u32>,
        /// 1 (the leader stored it) or all; both wait for the durable commit here.
        #[arg(long, default_value = "all", value_parser = parse_acks)]
        acks: i16,
        /// Lines per produce request.
        #[arg(long, default_value_t = 500)]
        batch_lines: usize,
    },
    /// Print a topic's records as lines.
    Consume {
        topic: String,
        #[arg(long, short, env = "WEIR_BOOTSTRAP", default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// Only this partition (default: all).
        #[arg(long, short)]
        partition: Option<u32>,
        /// earliest, latest, or an offset (per partition).
        #[arg(long, short, default_value = "earliest")]
        offset: String,
        /// Resume from and commit to this group's offsets (standalone, no rebalancing).
        #[arg(long, short)]
        group: Option<String>,
        /// Print key SEP value.
        #[arg(long = "key-separator", short = 'K')]
        key_separator: Option<String>,
        /// Stop after this many records.
        #[arg(long, short = 'n')]
        max_messages: Option<u64>,
        /// Stop at the end of the log as it was when consume started.
        #[arg(long, short)]
        exit: bool,
    },
    /// Test WebAssembly plugins, deploy them to a running broker, list them.
    Plugin {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Create, list, describe, pause, resume and delete pipelines on a running broker.
    Pipeline {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Add, remove and list the users devices and apps log in as (a running broker).
    User {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// The broker at a glance: health, listeners, rates, MQTT clients, topics, groups,
    /// pipelines, replication, storage, recent warnings (what the status page shows).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print `/v1/status` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replication with the central cluster.
    Replication {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: ReplicationCommand,
    },
    /// Measure the broker's parts on this machine.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Print the configuration `serve` would run with (defaults, file, flags), as TOML.
    Config(ServeArgs),
}

#[derive(Args, Clone)]
struct AdminArgs {
    /// Admin API of the broker (URL or host:port).
    #[arg(
        long,
        env = "WEIR_ADMIN",
        default_value = "127.0.0.1:9644",
        global = true
    )]
    admin: String,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a component on sample records (JSON lines) without a broker; print what it
    /// outputs, fails and drops, as JSON lines.
    Test {
        /// The component (.wasm).
        file: PathBuf,
        /// Sample records: {"key": …, "value": …, "headers": {…}} per line; - for stdin.
        #[arg(long, short)]
        input: PathBuf,
        /// A param for init, NAME=VALUE (repeat).
        #[arg(long = "param", short = 'p', value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        #[arg(long, default_value_t = 16)]
        memory_mb: usize,
        #[arg(long, default_value_t = 1000)]
        call_timeout_ms: u64,
    },
    /// Make a component of a core module that exports the plugin world by the canonical
    /// ABI (wit-bindgen's C layout: C, Zig, any language that emits wasm32), with the WIT
    /// embedded and, if it imports wasi_snapshot_preview1, the WASI adapter linked in.
    Componentize {
        /// The core module (.wasm).
        core: PathBuf,
        /// Where to write the component.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Upload a component to the broker as plugin NAME (a new version if NAME exists;
    /// pipelines running NAME switch to it between two batches).
    Deploy { name: String, file: PathBuf },
    /// List deployed plugins, their versions and the pipelines that run them.
    List,
    /// Remove a deployed plugin that no pipeline runs.
    Remove { name: String },
}

#[derive(Subcommand)]
enum ReplicationCommand {
    /// Each rule's state, last success, errors, and lag per partition.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user, or set a new password for one; the password is the first line of
    /// stdin (`echo "$PASSWORD" | weir user add NAME`). Effective for the next login.
    Add { name: String },
    /// Remove a user: it can no longer log in (open connections stay).
    Remove { name: String },
    /// List the users and what they can log in with.
    List,
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Create a pipeline: records of the inputs go through the plugin to the outputs.
    Create {
        name: String,
        /// A deployed plugin's name, or a component file (.wasm) the broker can read.
        #[arg(long)]
        plugin: String,
        /// A source topic (repeat).
        #[arg(long = "input", short = 'i', required = true)]
        inputs: Vec<String>,
        /// An output, NAME=TOPIC: the plugin's output NAME goes to TOPIC (repeat).
        #[arg(long = "output", short = 'o', required = true, value_parser = parse_key_value)]
        outputs: Vec<(String, String)>,
        /// Topic for records the plugin fails (default: NAME-dlq).
        #[arg(long)]
        dead_letter: Option<String>,
        /// A param for the plugin's init, NAME=VALUE (repeat).
        #[arg(long = "param", short = 'p', value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// earliest, latest, offset:N, or timestamp:MS (ms since the epoch).
        #[arg(long, default_value = "earliest")]
        start: String,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        memory_mb: Option<usize>,
        #[arg(long)]
        call_timeout_ms: Option<u64>,
    },
    /// List pipelines with their state and counts.
    List,
    /// Show a pipeline's config, plugin version, position per source partition, counts.
    Describe {
        name: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop processing after the current batch; the cursor stays.
    Pause { name: String },
    /// Go on from the cursor (also restarts a pipeline that failed).
    Resume { name: String },
    /// Stop a pipeline and forget its cursors; its topics stay.
    Delete { name: String },
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// A weir.toml; see weir.example.toml for every key.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    kafka_listen: Option<SocketAddr>,
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Log format: text (default) or json.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. info or weir=debug. RUST_LOG overrides it.
    #[arg(long)]
    log_level: Option<String>,
    /// Test only: replication never writes its cursors (as if every write were
    /// lost to a crash), to show the centre is read back.
    #[arg(long, hide = true)]
    unsafe_hold_replication_cursors: bool,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = self.kafka_listen {
            config.kafka.listen = v;
        }
        if let Some(v) = self.mqtt_listen {
            config.mqtt.listen = v;
        }
        if let Some(v) = self.admin_listen {
            config.admin.listen = v;
        }
        if let Some(v) = self.log_format {
            config.log.format = v;
        }
        if let Some(v) = &self.log_level {
            config.log.level = v.clone();
        }
        config.replication.unsafe_hold_cursors = self.unsafe_hold_replication_cursors;
        config.validate()?;
        Ok(config)
    }
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Default: [topic_defaults] partitions of the broker.
        #[arg(long, short)]
        partitions: Option<u32>,
        /// Topic config as Kafka names it, e.g. --config retention.ms=3600000. Repeatable.
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Show a topic's config and each partition's offsets and size.
    Describe { name: String },
    /// Delete a topic and everything stored in it.
    Delete { name: String },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Append and read throughput of the log against a plain fsync'd file.
    Log {
        /// Scratch directory, on the disk to measure. Removed afterwards.
        #[arg(long, default_value = "weir-bench")]
        dir: PathBuf,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        producers: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "100,1024")]
        record_sizes: Vec<usize>,
        #[arg(long, default_value_t = 16384)]
        batch_bytes: usize,
        /// Measure without fsync (the raw-file baseline still fsyncs).
        #[arg(long)]
        no_fsync: bool,
        /// Runs per configuration; the median (by log/raw ratio) is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The durability window, as `storage.commit_interval_ms` (default: its default).
        #[arg(long, default_value_t = weir::config::DEFAULT_COMMIT_INTERVAL_MS)]
        commit_interval_ms: u64,
    },
    /// Per-record cost of the pass-through and json-filter plugins, WebAssembly against
    /// the same logic compiled natively, at batch sizes 1, 100 and 1,000.
    Plugins {
        /// Where passthrough.wasm and json_filter.wasm are.
        #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
        dir: PathBuf,
        /// Seconds per measurement, split into 5 alternating rounds of WASM and native.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

fn parse_acks(s: &str) -> Result<i16, String> {
    match s {
        "all" | "-1" => Ok(-1),
        "1" => Ok(1),
        _ => Err(format!("acks must be 1 or all, got {s:?}")),
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn init_tracing(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a journal or a file gets plain lines.
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // The status page's recent warnings and errors see what the filter lets through.
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(weir::status::RecentEventsLayer);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            init_tracing(config.log.format, &config.log.level);
            weir::server::serve(config).await
        }
        Command::Config(args) => {
            print!("{}", toml::to_string(&args.config()?)?);
            Ok(())
        }
        Command::Topic { admin, command } => {
            topic(&AdminClient::from_env(&admin.admin)?, command).await
        }
        Command::Produce {
            topic,
            bootstrap,
            key_separator,
            partition,
            acks,
            batch_lines,
        } => {
            let args = weir::shell::ProduceArgs {
                bootstrap,
                topic,
                key_separator,
                partition,
                acks,
                batch_lines,
            };
            let sent = weir::shell::produce(args).await?;
            eprintln!("produced {sent} records");
            Ok(())
        }
        Command::Consume {
            topic,
            bootstrap,
            partition,
            offset,
            group,
            key_separator,
            max_messages,
            exit,
        } => {
            let start = match offset.as_str() {
                "earliest" | "beginning" => weir::shell::StartAt::Earliest,
                "latest" | "end" => weir::shell::StartAt::Latest,
                n => weir::shell::StartAt::Offset(n.parse().map_err(|_| {
                    anyhow::anyhow!("--offset takes earliest, latest or a number, not {n:?}")
                })?),
            };
            let args = weir::shell::ConsumeArgs {
                bootstrap,
                topic,
                partition,
                start,
                group,
                key_separator,
                max_messages,
                exit_at_end: exit,
            };
            weir::shell::consume(args, &mut std::io::stdout().lock()).await?;
            Ok(())
        }
        Command::Replication {
            admin,
            command: ReplicationCommand::Status { json },
        } => {
            let rules = AdminClient::from_env(&admin.admin)?
                .replication_status()
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rules)?);
                return Ok(());
            }
            for r in rules {
                let when = r.last_success_ms.map_or("never".to_string(), |ms| {
                    format!("{} ms ago", weir::storage::now_ms() - ms)
                });
                println!(
                    "rule {} ({}, {}): {} | last success {when} | upstream errors {} since start ({} ms ago) | lost {}",
                    r.name,
                    serde_json::to_value(r.direction)?.as_str().unwrap_or("?"),
                    r.upstream,
                    serde_json::to_value(r.state)?.as_str().unwrap_or("?"),
                    r.upstream_errors,
                    weir::storage::now_ms() - r.errors_since_ms,
                    r.lost_records
                );
                if let Some(e) = &r.last_error {
                    let at = r.last_error_ms.map_or(String::new(), |ms| {
                        format!(" {} ms ago", weir::storage::now_ms() - ms)
                    });
                    let over = if r.last_error_over { ", over" } else { "" };
                    println!("  last error ({at}{over}): {e}", at = at.trim_start());
                }
                for p in r.partitions {
                    println!(
                        "  {}/{}\tcursor {}\thigh watermark {}\tlag {} records, {} bytes",
                        p.topic,
                        p.partition,
                        p.cursor,
                        p.high_watermark,
                        p.lag_records,
                        p.lag_bytes
                    );
                }
            }
            Ok(())
        }
        Command::Status { admin, json } => {
            let status = AdminClient::from_env(&admin.admin)?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!(
                    "{}",
                    weir::status::render_text(&status, weir::storage::now_ms())
                );
            }
            Ok(())
        }
        Command::User { admin, command } => {
            user(&AdminClient::from_env(&admin.admin)?, command).await
        }
        Command::Pipeline { admin, command } => {
            pipeline(&AdminClient::from_env(&admin.admin)?, command).await
        }
        Command::Plugin {
            admin,
            command:
                command @ (PluginCommand::Deploy { .. }
                | PluginCommand::List
                | PluginCommand::Remove { .. }),
        } => plugin(&AdminClient::from_env(&admin.admin)?, command).await,
        Command::Plugin {
            command:
                PluginCommand::Test {
                    file,
                    input,
                    params,
                    memory_mb,
                    call_timeout_ms,
                },
            ..
        } => {
            let wasm = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let jsonl = if input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&input)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", input.display()))?
            };
            // The plugin's own `log` lines go to stderr, the results to stdout.
            init_tracing(LogFormat::Text, "weir::plugins::host=trace,warn");
            let limits = weir::plugins::harness::default_limits(memory_mb, call_timeout_ms);
            // On the blocking pool, as pipelines run: a plugin's WASI calls (its stdio)
            // block on tokio, which they may not do from inside the async runtime.
            let lines = tokio::task::spawn_blocking(move || {
                weir::plugins::harness::run(&wasm, &jsonl, &params, limits)
            })
            .await??;
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::Componentize { core, output },
            ..
        } => componentize(&core, &output),
        Command::Bench {
            command: BenchCommand::Plugins { dir, seconds },
        } => {
            println!("| plugin | batch | WASM records/s | native records/s | WASM/native cost |");
            println!("|---|---|---|---|---|");
            for row in weir::plugins::bench::run(&dir, seconds)? {
                println!(
                    "| {} | {} | {:.0} | {:.0} | {:.2} |",
                    row.plugin,
                    row.batch,
                    row.wasm_per_sec,
                    row.native_per_sec,
                    row.native_per_sec / row.wasm_per_sec
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Log {
                    dir,
                    seconds,
                    producers,
                    record_sizes,
                    batch_bytes,
                    no_fsync,
                    rounds,
                    commit_interval_ms,
                },
        } => {
            let bench = weir::bench::LogBench {
                dir,
                seconds,
                producers,
                record_sizes,
                batch_bytes,
                fsync: !no_fsync,
                rounds,
                commit_interval: std::time::Duration::from_millis(commit_interval_ms),
            };
            let results = weir::bench::run(&bench).await?;
            print!("{}", weir::bench::table(&results));
            Ok(())
        }
    }
}

async fn plugin(client: &AdminClient, command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Deploy { name, file } => {
            let wasm = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let p = client.deploy_plugin(&name, wasm).await?;
            println!(
                "deployed plugin {} version {} ({} bytes, sha256 {}){}",
                p.plugin.name,
                p.plugin.version,
                p.plugin.size,
                &p.plugin.hash[..12],
                if p.used_by.is_empty() {
                    String::new()
                } else {
                    format!("; pipelines switching to it: {}", p.used_by.join(", "))
                }
            );
        }
        PluginCommand::List => {
            println!("name\tversion\tsha256\tbytes\tused by");
            for p in client.list_plugins().await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    p.plugin.name,
                    p.plugin.version,
                    &p.plugin.hash[..12],
                    p.plugin.size,
                    p.used_by.join(",")
                );
            }
        }
        PluginCommand::Remove { name } => {
            client.remove_plugin(&name).await?;
            println!("removed plugin {name}");
        }
        PluginCommand::Test { .. } | PluginCommand::Componentize { .. } => {
            unreachable!("runs without a broker")
        }
    }
    Ok(())
}

async fn user(client: &AdminClient, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add { name } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.strip_suffix('\n').unwrap_or(&line);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                anyhow::bail!("no password on stdin: echo \"$PASSWORD\" | weir user add {name}");
            }
            let created = client.set_user(&name, password).await?;
            println!(
                "{} user {name}",
                if created { "added" } else { "new password for" }
            );
        }
        UserCommand::Remove { name } => {
            client.remove_user(&name).await?;
            println!("removed user {name}");
        }
        UserCommand::List => {
            println!("name\tmechanisms\tcreated");
            for u in client.list_users().await? {
                println!("{}\t{}\t{}", u.name, u.mechanisms.join(","), u.created_ms);
            }
        }
    }
    Ok(())
}

async fn pipeline(client: &AdminClient, command: PipelineCommand) -> anyhow::Result<()> {
    match command {
        PipelineCommand::Create {
            name,
            plugin,
            inputs,
            outputs,
            dead_letter,
            params,
            start,
            batch_size,
            memory_mb,
            call_timeout_ms,
        } => {
            let config = weir::plugins::PipelineConfig {
                name,
                plugin,
                inputs,
                outputs: outputs.into_iter().collect(),
                dead_letter,
                params: params.into_iter().collect(),
                start,
                batch_size,
                memory_mb,
                call_timeout_ms,
            };
            let p = client.create_pipeline(&config).await?;
            println!("created pipeline {} ({:?})", p.name, p.status.state);
        }
        PipelineCommand::List => {
            println!("name\tstate\tplugin\tin\tout\tdropped\tfailed\tlag");
            for p in client.list_pipelines().await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    p.name,
                    serde_json::to_value(p.status.state)?
                        .as_str()
                        .unwrap_or("?"),
                    p.config.plugin,
                    p.records_in,
                    p.records_out,
                    p.dropped,
                    p.failed,
                    p.lag
                );
            }
        }
        PipelineCommand::Describe { name, json } => {
            let p = client.describe_pipeline(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
                return Ok(());
            }
            let c = &p.config;
            println!("pipeline: {}", p.name);
            println!(
                "origin: {}",
                serde_json::to_value(p.origin)?.as_str().unwrap_or("?")
            );
            println!(
                "state: {}",
                serde_json::to_value(p.status.state)?
                    .as_str()
                    .unwrap_or("?")
            );
            if let Some(e) = &p.status.error {
                println!("error: {e}");
            }
            let version = p
                .status
                .plugin_version
                .map(|v| format!(" version {v}"))
                .unwrap_or_default();
            let hash = p
                .status
                .plugin_hash
                .get(..12)
                .unwrap_or(&p.status.plugin_hash);
            println!("plugin: {}{version} (sha256 {hash})", c.plugin);
            println!("inputs: {}", c.inputs.join(", "));
            for (output, topic) in &c.outputs {
                println!("output: {output} -> {topic}");
            }
            println!("dead letters: {}", c.dead_letter_topic());
            for (k, v) in &c.params {
                println!("param: {k}={v}");
            }
            println!(
                "records: in {} out {} dropped {} failed {} lag {}",
                p.records_in, p.records_out, p.dropped, p.failed, p.lag
            );
            println!("topic\tpartition\tnext_offset\thigh_watermark");
            for s in &p.status.positions {
                println!(
                    "{}\t{}\t{}\t{}",
                    s.topic, s.partition, s.next_offset, s.high_watermark
                );
            }
        }
        PipelineCommand::Pause { name } => {
            let p = client.control_pipeline(&name, "pause").await?;
            println!("paused pipeline {}", p.name);
        }
        PipelineCommand::Resume { name } => {
            let p = client.control_pipeline(&name, "resume").await?;
            println!("resumed pipeline {}", p.name);
        }
        PipelineCommand::Delete { name } => {
            client.delete_pipeline(&name).await?;
            println!("deleted pipeline {name}");
        }
    }
    Ok(())
}

async fn topic(client: &AdminClient, command: TopicCommand) -> anyhow::Result<()> {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            configs,
        } => {
            let config: BTreeMap<String, String> = configs.into_iter().collect();
            let topic = client
                .create_topic(&CreateTopic {
                    name,
                    partitions,
                    config,
                })
                .await?;
            println!(
                "created topic {} with {} partitions",
                topic.name, topic.partitions
            );
        }
        TopicCommand::List => {
            for t in client.list_topics().await? {
                println!("{}\t{} partitions", t.name, t.partitions);
            }
        }
        TopicCommand::Describe { name } => {
            let d = client.describe_topic(&name).await?;
            println!(
                "topic: {}\npartitions: {}",
                d.topic.name, d.topic.partitions
            );
            for (k, v) in &d.topic.config {
                println!("config: {k}={v}");
            }
            println!("partition\tlog_start\thigh_watermark\tbatches\tbytes");
            for p in d.partitions {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    p.partition, p.log_start, p.high_watermark, p.batches, p.bytes
                );
            }
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

/// `weir plugin componentize`: a core module made into a plugin component.
#[cfg(feature = "componentize")]
fn componentize(core: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(core).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", core.display()))?;
    let made = weir::plugins::componentize::componentize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", core.display()))?;
    std::fs::write(output, &made.component)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
    println!(
        "{}: {} bytes{}{}",
        output.display(),
        made.component.len(),
        if made.embedded_wit {
            ", plugin.wit embedded"
        } else {
            ""
        },
        if made.adapted_wasi {
            ", WASI preview1 adapter linked in"
        } else {
            ""
        },
    );
    Ok(())
}

/// This build was made without the `componentize` feature (the gateway build leaves it
/// out for its size budget).
#[cfg(not(feature = "componentize"))]
fn componentize(core: &std::path::Path, _output: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!(
        "{}: this build of weir has no `plugin componentize` (it was built without the \
         `componentize` feature, as the aarch64 gateway build is, to stay within its size \
         budget); run it with weir on a development machine: the component it writes runs \
         on any build",
        core.display()
    )
}
