//! `serve`: wires the gRPC service (with health and reflection) and the admin port onto
//! listeners, and shuts both down gracefully when the shutdown future resolves.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::admin::{self, AdminState};
use crate::broker::NotifySettings;
use crate::broker_env::BrokerEnv;
use crate::census::CensusSettings;
use crate::grpc::Service;
use crate::health;
use crate::hub::{Hub, PollIntervals};
use crate::metadata::Limits;
use crate::metrics::Metrics;
use crate::proto::external_scaler_server::ExternalScalerServer;
use crate::scaler::{Core, CoreSettings};
use crate::tenancy::Tenancy;
use crate::tls::{self, Reloader};
use crate::watch::{self, Watched};

/// Everything `serve` needs, validated before anything binds.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    /// Upper bound on one depth reading.
    pub deadline: Duration,
    /// How long a successful reading answers identical GetMetrics/IsActive requests.
    pub result_window: Duration,
    /// Time between two worker censuses (`inspect active` broadcasts) per broker.
    pub census_interval: Duration,
    /// How long a census collects replies.
    pub census_window: Duration,
    /// How often a shared stream poll reads its queues (Redis, RabbitMQ).
    pub stream_poll_interval: Duration,
    /// The same for SQS, where every read is a billed request.
    pub sqs_stream_poll_interval: Duration,
    /// How often a shared stream poll reads while every stream watching it is active (KEDA
    /// polls the queues itself then, and its readings reach the streams).
    pub stream_active_poll_interval: Duration,
    /// Whether idle Redis sets are armed with `CLIENT TRACKING` rather than polled.
    pub redis_client_tracking: bool,
    /// How often one safety read per Redis broker looks at every armed idle set at once.
    pub redis_tracking_safety_interval: Duration,
    /// How long in-flight RPCs may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// HTTP/2 concurrent streams per connection: KEDA multiplexes every trigger on one.
    pub max_concurrent_streams: u32,
    /// TLS (and mTLS) on the gRPC port, its certificate files already loaded (so they are
    /// checked before anything binds); plaintext when `None`.
    pub tls: Option<Arc<Reloader>>,
    /// Bounds on trigger metadata.
    pub limits: Limits,
    /// Largest gRPC request message accepted (a metadata map is a few KiB).
    pub max_request_bytes: usize,
    /// Most `celery_keda_queue_depth` series (broker, queue) exported; later queues are not.
    pub max_queue_series: usize,
    /// Named brokers per namespace, host allowlist, inline URLs, the scaler's AWS identity.
    pub tenancy: Tenancy,
    /// The watch list (`--watch`), already checked against the brokers of the environment.
    pub watch: Vec<Watched>,
    /// Time between two readings of each watched set.
    pub watch_interval: Duration,
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            deadline: Duration::from_millis(2500),
            result_window: crate::scaler::DEFAULT_RESULT_WINDOW,
            census_interval: Duration::from_secs(2),
            census_window: Duration::from_secs(1),
            stream_poll_interval: Duration::from_millis(200),
            sqs_stream_poll_interval: Duration::from_secs(5),
            stream_active_poll_interval: Duration::from_secs(30),
            redis_client_tracking: true,
            redis_tracking_safety_interval: crate::broker::DEFAULT_SAFETY_INTERVAL,
            shutdown_grace: Duration::from_secs(10),
            max_concurrent_streams: 16_384,
            tls: None,
            limits: Limits::default(),
            max_request_bytes: 1024 * 1024,
            max_queue_series: 1000,
            tenancy: Tenancy::default(),
            watch: Vec::new(),
            watch_interval: crate::watch::DEFAULT_INTERVAL,
        }
    }
}

/// HTTP/2 connection-level receive window (see `serve`).
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin server failed: {0}")]
    Admin(#[from] std::io::Error),
    #[error("reflection service could not be built: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves gRPC on `grpc` and the admin port on `admin` (if any) until `shutdown` resolves; then
/// reports NOT_SERVING, ends open streams with status OK, and lets in-flight RPCs finish
/// within the grace period.
pub async fn serve(
    grpc: TcpListener,
    admin: Option<TcpListener>,
    env: BrokerEnv,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls_reloader = settings.tls.clone();
    let metrics = Arc::new(Metrics::with_max_queue_series(settings.max_queue_series));
    let tls_metrics = metrics.clone();
    // One line at start-up saying which tenancy protections are on.
    tracing::info!(
        host_allowlist = settings.tenancy.allowed_hosts.is_some(),
        named_brokers_only = settings.tenancy.named_brokers_only,
        inline_sqs_ambient_identity = settings.tenancy.inline_sqs_ambient_identity,
        restricted_brokers = env.namespaces.len(),
        protections = %settings.tenancy.describe(&env),
        "Tenancy protections"
    );
    let core = Arc::new(Core::new(
        env,
        CoreSettings {
            deadline: settings.deadline,
            result_window: settings.result_window,
            census: CensusSettings {
                interval: settings.census_interval,
                window: settings.census_window,
                deadline: settings.deadline,
            },
            limits: settings.limits,
            tenancy: settings.tenancy,
            notify: NotifySettings {
                enabled: settings.redis_client_tracking,
                safety_interval: settings.redis_tracking_safety_interval,
                ..NotifySettings::default()
            },
        },
        metrics.clone(),
    ));
    let token = CancellationToken::new();
    let intervals = PollIntervals {
        default: settings.stream_poll_interval,
        sqs: settings.sqs_stream_poll_interval,
        active: settings.stream_active_poll_interval,
    };
    let hub = Hub::new(core.clone(), intervals, token.clone());
    let watcher = tokio::spawn(watch::run(
        core.clone(),
        settings.watch,
        settings.watch_interval,
        token.clone(),
    ));
    let service = Service::new(core.clone(), hub, token.clone());

    let (health_reporter, health_service) = health::service(token.clone());
    health_reporter
        .set_serving::<ExternalScalerServer<Service>>()
        .await;
    // v1 and v1alpha from the same descriptor sets (each lists both reflection services, as
    // grpc-go's server does): grpcurl and grpc-go ask v1, while Python's grpcio-reflection
    // client, Evans, Postman and older grpcurl still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;

    let admin_state = Arc::new(AdminState {
        metrics,
        ready: AtomicBool::new(true),
    });

    // One shutdown sequence for everything.
    let begin = {
        let token = token.clone();
        let admin_state = admin_state.clone();
        async move {
            shutdown.await;
            tracing::info!("Shutting down");
            admin_state.ready.store(false, Ordering::Relaxed);
            health_reporter
                .set_not_serving::<ExternalScalerServer<Service>>()
                .await;
            // "" is the whole server: what a Kubernetes gRPC probe without `service` asks.
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            token.cancel();
        }
    };

    let admin_task = admin.map(|listener| {
        let token = token.clone();
        tokio::spawn(async move {
            axum::serve(listener, admin::router(admin_state))
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
        })
    });

    let addr = grpc.local_addr().ok();
    tracing::info!(
        listen = ?addr,
        tls = tls_reloader.is_some(),
        mutual_tls = tls_reloader.as_ref().is_some_and(|r| r.mutual()),
        "Serving gRPC"
    );
    let router = Server::builder()
        .max_concurrent_streams(Some(settings.max_concurrent_streams))
        // KEDA opens every external-push stream on one connection, each with one small request
        // DATA frame; h2 caps buffered small frames at half the connection window, so a default
        // (64 KiB) window makes thousands of streams opened at once end in ENHANCE_YOUR_CALM.
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            ExternalScalerServer::new(service)
                .max_decoding_message_size(settings.max_request_bytes),
        );
    let server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match tls_reloader {
        Some(reloader) => Box::pin(router.serve_with_incoming_shutdown(
            tls::incoming(grpc, reloader, tls_metrics, token.clone()),
            begin,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(grpc), begin)),
    };

    let grace = settings.shutdown_grace;
    let result = tokio::select! {
        r = server => r.map_err(ServeError::from),
        _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "Grace period over, closing remaining connections");
            Ok(())
        }
    };
    // The watch loop ends at the token; a reading under way is bounded by the deadline. It must
    // be over before the censuses stop, or a reading could start a census loop again.
    let _ = watcher.await;
    core.stop_censuses().await;
    if let Some(task) = admin_task {
        if let Ok(Ok(r)) = tokio::time::timeout(grace, task).await {
            r?;
        }
    }
    result
}
