//! The `celery-keda-scaler` binary: command-line parsing, then `serve` or `probe` from the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use celery_keda_scaler::allowlist::HostAllowlist;
use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::census::CensusSettings;
use celery_keda_scaler::error::Error;
use celery_keda_scaler::metadata::Limits;
use celery_keda_scaler::metrics::Metrics;
use celery_keda_scaler::scaler::{Core, CoreSettings};
use celery_keda_scaler::server::{serve, ServeSettings};
use celery_keda_scaler::telemetry::{self, LogFormat};
use celery_keda_scaler::tenancy::Tenancy;
use celery_keda_scaler::tls::{Reloader, TlsSettings};
use celery_keda_scaler::watch;
use celery_keda_scaler::{install_crypto_provider, probe};

/// KEDA external scaler for Celery: exact queue depth from Redis.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the KEDA ExternalScaler gRPC API (the default).
    Serve(Box<ServeArgs>),
    /// Print one depth reading with its breakdown, for the same keys as trigger metadata.
    Probe(ProbeArgs),
}

#[derive(Args)]
struct Common {
    /// Log format.
    #[arg(
        long,
        env = "CELERY_KEDA_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Upper bound on one broker reading (connection included).
    #[arg(long, env = "CELERY_KEDA_DEADLINE", value_parser = parse_duration, default_value = "2500ms")]
    deadline: Duration,
    /// Hosts triggers may make the scaler contact (brokerUrl, brokerUrlFromEnv, Sentinel nodes,
    /// managementUrl, awsEndpoint): host names, *.suffix globs, host:port, addresses and
    /// address ranges (10.0.0.0/8, fd00::/8), separated by commas. Named and default brokers
    /// are exempt. Unset: every host.
    #[arg(long, env = "CELERY_KEDA_ALLOWED_BROKER_HOSTS", value_parser = parse_allowlist)]
    allowed_broker_hosts: Option<HostAllowlist>,
    /// Refuse brokerUrl and brokerUrlFromEnv: only named brokers (and the default broker).
    #[arg(long, env = "CELERY_KEDA_NAMED_BROKERS_ONLY")]
    named_brokers_only: bool,
    /// Let inline sqs:// URLs without keys use the scaler's own AWS identity (named brokers
    /// always may).
    #[arg(long, env = "CELERY_KEDA_INLINE_SQS_AMBIENT_IDENTITY")]
    inline_sqs_ambient_identity: bool,
}

impl Common {
    fn tenancy(&self) -> Tenancy {
        Tenancy {
            allowed_hosts: self.allowed_broker_hosts.clone(),
            named_brokers_only: self.named_brokers_only,
            inline_sqs_ambient_identity: self.inline_sqs_ambient_identity,
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// gRPC listen address (KEDA's scalerAddress points here).
    #[arg(long, env = "CELERY_KEDA_LISTEN", default_value = "0.0.0.0:6000")]
    listen: SocketAddr,
    /// Admin HTTP listen address: /metrics, /healthz, /readyz.
    #[arg(long, env = "CELERY_KEDA_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// How often a shared StreamIsActive poll reads its queues.
    #[arg(long, env = "CELERY_KEDA_STREAM_POLL_INTERVAL", value_parser = parse_duration, default_value = "200ms")]
    stream_poll_interval: Duration,
    /// How often a shared StreamIsActive poll reads SQS queues (each read is a billed request).
    #[arg(long, env = "CELERY_KEDA_SQS_STREAM_POLL_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    sqs_stream_poll_interval: Duration,
    /// How often a shared StreamIsActive poll reads while every stream watching it is active
    /// (KEDA polls the queues itself then, and its readings reach the streams).
    #[arg(long, env = "CELERY_KEDA_STREAM_ACTIVE_POLL_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    stream_active_poll_interval: Duration,
    /// Arm idle Redis sets with CLIENT TRACKING (the server notifies the first write) instead
    /// of polling them; brokers that refuse it are polled anyway.
    #[arg(long, env = "CELERY_KEDA_REDIS_CLIENT_TRACKING", default_value_t = true, action = clap::ArgAction::Set)]
    redis_client_tracking: bool,
    /// How often one safety read per Redis broker looks at the lists of every armed idle set
    /// (one EXISTS), bounding what a lost notification can cost.
    #[arg(long, env = "CELERY_KEDA_REDIS_TRACKING_SAFETY_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    redis_tracking_safety_interval: Duration,
    /// How long a successful reading answers identical GetMetrics/IsActive requests (0s: only
    /// requests arriving while a reading is under way share it).
    #[arg(long, env = "CELERY_KEDA_RESULT_WINDOW", value_parser = parse_window, default_value = "250ms")]
    result_window: Duration,
    /// Time between two worker censuses (Celery `inspect active` broadcasts) per broker, for scaleOnRunning.
    #[arg(long, env = "CELERY_KEDA_CENSUS_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    census_interval: Duration,
    /// How long a worker census collects replies [default: 1s, or 40% of --deadline if less].
    #[arg(long, env = "CELERY_KEDA_CENSUS_WINDOW", value_parser = parse_duration)]
    census_window: Option<Duration>,
    /// How long in-flight RPCs may take to finish after SIGTERM.
    #[arg(long, env = "CELERY_KEDA_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    shutdown_grace: Duration,
    /// HTTP/2 concurrent streams per connection (KEDA multiplexes every trigger on one).
    #[arg(
        long,
        env = "CELERY_KEDA_MAX_CONCURRENT_STREAMS",
        default_value_t = 16_384
    )]
    max_concurrent_streams: u32,
    /// PEM certificate chain for TLS on the gRPC port (with --tls-key-file; KEDA's `enableTLS`).
    #[arg(long, env = "CELERY_KEDA_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key for --tls-cert-file.
    #[arg(long, env = "CELERY_KEDA_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS; KEDA's `tlsClientCert`).
    #[arg(
        long,
        env = "CELERY_KEDA_TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file"
    )]
    tls_client_ca_file: Option<PathBuf>,
    /// How often the TLS files are re-read; changed files apply to new connections.
    #[arg(long, env = "CELERY_KEDA_TLS_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    tls_reload_interval: Duration,
    /// Most entries in one trigger's metadata map.
    #[arg(long, env = "CELERY_KEDA_MAX_METADATA_KEYS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_metadata_keys: u32,
    /// Most bytes in the value of a metadata key the scaler reads.
    #[arg(long, env = "CELERY_KEDA_MAX_METADATA_VALUE_BYTES", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    max_metadata_value_bytes: u32,
    /// Most distinct queues in one trigger's `queues`.
    #[arg(long, env = "CELERY_KEDA_MAX_QUEUES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_queues: u32,
    /// Largest gRPC request message, in bytes.
    #[arg(long, env = "CELERY_KEDA_MAX_REQUEST_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u32).range(1024..))]
    max_request_bytes: u32,
    /// Most (broker, queue) series in the celery_keda_queue_depth metric.
    #[arg(long, env = "CELERY_KEDA_MAX_QUEUE_SERIES", default_value_t = 1000)]
    max_queue_series: u32,
    /// Queue sets the scaler reads on its own and exports as celery_keda_watched_queue_tasks:
    /// `;`-separated entries [BROKER:]QUEUE[,QUEUE...][?KEY=VALUE&...], BROKER a named broker
    /// (none: CELERY_BROKER_URL), e.g. `orders:celery,emails;default-queue`.
    #[arg(long, env = "CELERY_KEDA_WATCH")]
    watch: Option<String>,
    /// Time between two readings of each watched queue set.
    #[arg(long, env = "CELERY_KEDA_WATCH_INTERVAL", value_parser = parse_duration, default_value = "15s")]
    watch_interval: Duration,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ProbeArgs {
    /// The namespace of the ScaledObject to check as (named brokers per namespace); also
    /// accepted among the metadata as namespace=NAME.
    #[arg(long)]
    namespace: Option<String>,
    /// Trigger metadata as key=value or --key value, e.g. brokerUrl=redis://host:6379/0 queues=celery
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    metadata: Vec<String>,
    #[command(flatten)]
    common: Common,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}`: {e} (use e.g. 2500ms or 2.5s)"))?;
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

fn parse_allowlist(s: &str) -> Result<HostAllowlist, String> {
    s.parse()
}

fn parse_window(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}`: {e} (use e.g. 250ms, or 0s to turn it off)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(Box::new(ServeArgs::parse_from_env())));
    install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Brokers from the scaler's own environment are validated before anything binds.
    let env = match BrokerEnv::from_vars(std::env::vars()) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("error: invalid broker configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Serve(args) => runtime.block_on(run_serve(*args, env)),
        Command::Probe(args) => runtime.block_on(run_probe(args, env)),
    }
}

impl ServeArgs {
    fn parse_from_env() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Only::parse_from(["celery-keda-scaler"]).serve
    }
}

async fn run_serve(args: ServeArgs, env: BrokerEnv) -> ExitCode {
    telemetry::init(args.common.log_format, "info");
    // A census waits its whole window for replies, inside the reading's deadline.
    let census_window = args
        .census_window
        .unwrap_or_else(|| CensusSettings::default_window(args.common.deadline));
    if census_window >= args.common.deadline {
        eprintln!(
            "error: --census-window ({census_window:?}) must be shorter than --deadline ({:?}): a worker census waits its whole window inside each reading's deadline",
            args.common.deadline
        );
        return ExitCode::from(2);
    }
    // The certificate files are loaded (and so checked) before anything binds.
    let tls = match (args.tls_cert_file, args.tls_key_file) {
        (Some(cert), Some(key)) => match Reloader::load(TlsSettings {
            cert,
            key,
            client_ca: args.tls_client_ca_file,
            reload_interval: args.tls_reload_interval,
        }) {
            Ok(reloader) => Some(Arc::new(reloader)),
            Err(e) => {
                eprintln!("error: invalid TLS configuration: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let limits = Limits {
        max_keys: args.max_metadata_keys as usize,
        max_value_bytes: args.max_metadata_value_bytes as usize,
        max_queues: args.max_queues as usize,
    };
    let watch = match watch::parse(args.watch.as_deref().unwrap_or(""), &env, &limits) {
        Ok(watch) => watch,
        Err(e) => {
            let message = match e {
                Error::InvalidMetadata { message, .. } => message,
                other => other.to_string(),
            };
            eprintln!("error: invalid watch list: {message}");
            return ExitCode::from(2);
        }
    };
    let grpc = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {} (--listen): {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let admin = match tokio::net::TcpListener::bind(args.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {} (--admin-listen): {e}",
                args.admin_listen
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        listen = %args.listen,
        admin_listen = %args.admin_listen,
        named_brokers = env.named.len(),
        default_broker = env.default.is_some(),
        "Configuration valid"
    );
    let settings = ServeSettings {
        deadline: args.common.deadline,
        result_window: args.result_window,
        census_interval: args.census_interval,
        census_window,
        stream_poll_interval: args.stream_poll_interval,
        sqs_stream_poll_interval: args.sqs_stream_poll_interval,
        stream_active_poll_interval: args.stream_active_poll_interval,
        redis_client_tracking: args.redis_client_tracking,
        redis_tracking_safety_interval: args.redis_tracking_safety_interval,
        shutdown_grace: args.shutdown_grace,
        max_concurrent_streams: args.max_concurrent_streams,
        tls,
        limits,
        max_request_bytes: args.max_request_bytes as usize,
        max_queue_series: args.max_queue_series as usize,
        tenancy: args.common.tenancy(),
        watch,
        watch_interval: args.watch_interval,
    };
    match serve(grpc, Some(admin), env, settings, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("Stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "Server failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run_probe(args: ProbeArgs, env: BrokerEnv) -> ExitCode {
    // The error is printed below; logs only when asked for with RUST_LOG.
    telemetry::init(args.common.log_format, "off");
    let mut meta = match probe::parse_args(&args.metadata) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // `--namespace` after the first metadata argument arrives among the metadata.
    let namespace = args
        .namespace
        .clone()
        .or_else(|| meta.remove("namespace"))
        .unwrap_or_default();
    let core = Core::new(
        env,
        CoreSettings {
            tenancy: args.common.tenancy(),
            ..CoreSettings::with_deadline(args.common.deadline)
        },
        Arc::new(Metrics::new()),
    );
    match probe::run(&core, &meta, &namespace).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let status = tonic::Status::from(e.clone());
            eprintln!("error: {:?}: {}", status.code(), status.message());
            // Bad metadata and a refusal by the tenancy settings: the trigger itself must change.
            if matches!(
                e,
                celery_keda_scaler::error::Error::InvalidMetadata { .. }
                    | celery_keda_scaler::error::Error::Refused { .. }
            ) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
