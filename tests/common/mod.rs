//! Shared fixtures of the integration tests: find the brokers, run the scaler in-process over real
//! gRPC, publish with real Celery, run real Celery workers, and start extra Redis servers
//! (TLS, Unix socket, password, Sentinel) as child processes.
//!
//! A missing broker or a missing Celery is a test failure with a message saying how to get it
//! (`scripts/test.sh` installs and starts everything), never a silent skip.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use celery_keda_scaler::metadata::BrokerEnv;
use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use celery_keda_scaler::server::{serve, ServeSettings};
use celery_keda_scaler::tenancy::Tenancy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Trigger metadata from pairs.
pub fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Polls `check` until it returns `Some`, or fails the test after `limit` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- Redis

/// The shared Redis of the suite: `CKS_REDIS_URL`, or the default local one.
pub fn redis_url() -> String {
    let url = std::env::var("CKS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str()).expect("CKS_REDIS_URL is a valid URL");
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(3))
        .unwrap_or_else(|e| {
            panic!("no Redis at {url} ({e}): run the suite with scripts/test.sh, which installs and starts Redis")
        });
    let pong: String = redis::cmd("PING")
        .query(&mut conn)
        .expect("Redis answers PING");
    assert_eq!(pong, "PONG");
    url
}

/// A raw connection for setting up and checking broker state independently of the scaler.
pub async fn raw_redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// Removes every key and `unacked` entry a test created for `queues` under `prefix`.
pub async fn cleanup_redis(url: &str, prefix: &str, queues: &[&str]) {
    let mut conn = raw_redis(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for key in keys {
        if queues.iter().any(|q| key.contains(q)) {
            let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
        }
    }
    let entries: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}unacked"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for (tag, value) in entries {
        if queues.iter().any(|q| value.contains(&format!("\"{q}\""))) {
            let _: Result<(), _> = redis::cmd("HDEL")
                .arg(format!("{prefix}unacked"))
                .arg(&tag)
                .query_async(&mut conn)
                .await;
            let _: Result<(), _> = redis::cmd("ZREM")
                .arg(format!("{prefix}unacked_index"))
                .arg(&tag)
                .query_async(&mut conn)
                .await;
        }
    }
}

/// Frees a local TCP port number for a child process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(binary: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(binary);
        if p.is_file() {
            return p;
        }
    }
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(binary);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{binary}` not found: run the suite with scripts/test.sh, which installs it")
}

fn wait_port(port: u16, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis server of the test's own, for TLS, Unix socket, password and Sentinel cases.
pub struct OwnRedis {
    pub port: u16,
    pub tls_port: Option<u16>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl OwnRedis {
    /// Starts `redis-server` on a free port and a Unix socket, with `extra` arguments.
    pub fn start(password: Option<&str>, tls: Option<&TlsFiles>) -> OwnRedis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let socket = dir.path().join("redis.sock");
        let mut cmd = Command::new(which("redis-server"));
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        let mut tls_port = None;
        if let Some(files) = tls {
            let p = free_port();
            tls_port = Some(p);
            cmd.args(["--tls-port", &p.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.server_cert)
                .arg("--tls-key-file")
                .arg(&files.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca_cert)
                .args(["--tls-auth-clients", "no"]);
        }
        let child = ChildGuard(cmd.spawn().expect("redis-server starts"));
        wait_port(port, "redis-server");
        if let Some(p) = tls_port {
            wait_port(p, "redis-server TLS");
        }
        OwnRedis {
            port,
            tls_port,
            socket,
            dir,
            _child: child,
        }
    }

    /// Plain URL with an optional password.
    pub fn url(&self, password: Option<&str>) -> String {
        match password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }
}

/// A CA and a server certificate for `127.0.0.1` / `localhost`, written as PEM files.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cks test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let server = server_params.signed_by(&server_key, &issuer).unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let ca_cert = write("ca.pem", ca.pem());
        let server_cert = write("server.pem", server.pem());
        let server_key = write("server.key", server_key.serialize_pem());
        TlsFiles {
            dir,
            ca_cert,
            server_cert,
            server_key,
        }
    }
}

/// A Redis Sentinel watching `master_port` under `name`.
pub struct OwnSentinel {
    pub port: u16,
    _dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl OwnSentinel {
    pub fn start(master_port: u16, name: &str, master_password: Option<&str>) -> OwnSentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} 1\n",
            dir.path().display()
        );
        if let Some(pw) = master_password {
            text.push_str(&format!("sentinel auth-pass {name} {pw}\n"));
        }
        std::fs::write(&conf, text).unwrap();
        let child = Command::new(which("redis-sentinel"))
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel starts");
        wait_port(port, "redis-sentinel");
        OwnSentinel {
            port,
            _dir: dir,
            _child: ChildGuard(child),
        }
    }
}

// ---------------------------------------------------------------- Celery

/// The Python interpreter with Celery: `CKS_PYTHON`, else the repository's `.venv`.
pub fn python() -> PathBuf {
    let p = std::env::var("CKS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv/bin/python"));
    assert!(
        p.is_file(),
        "no Python with Celery at {} (set CKS_PYTHON, or run scripts/test.sh, which creates .venv)",
        p.display()
    );
    p
}

pub fn app_dir() -> PathBuf {
    root().join("tests/celery_app")
}

/// How the test Celery app is configured (see tests/celery_app/cks_app.py).
#[derive(Clone, Default)]
pub struct CeleryConf {
    pub broker: String,
    pub global_keyprefix: Option<String>,
    pub priority_steps: Option<String>,
    pub sep: Option<String>,
    pub acks_late: bool,
    pub prefetch: Option<u32>,
    pub marker_redis: Option<String>,
    pub master_name: Option<String>,
    /// JSON {queue: {argument: value}} (RabbitMQ queue arguments).
    pub queue_args: Option<String>,
    pub confirm_publish: bool,
    /// kombu's SQS `queue_name_prefix`.
    pub queue_name_prefix: Option<String>,
    /// JSON [{"name", "exchange", "type", "routing_key"}]: custom routing (`task_queues`).
    pub task_queues: Option<String>,
}

impl CeleryConf {
    pub fn new(broker: &str) -> Self {
        CeleryConf {
            broker: broker.to_string(),
            ..Default::default()
        }
    }

    pub fn apply(&self, cmd: &mut Command) {
        cmd.current_dir(app_dir())
            .env("CKS_BROKER", &self.broker)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let opt = |cmd: &mut Command, k: &str, v: &Option<String>| {
            if let Some(v) = v {
                cmd.env(k, v);
            } else {
                cmd.env_remove(k);
            }
        };
        opt(cmd, "CKS_GLOBAL_KEYPREFIX", &self.global_keyprefix);
        opt(cmd, "CKS_PRIORITY_STEPS", &self.priority_steps);
        opt(cmd, "CKS_SEP", &self.sep);
        opt(cmd, "CKS_MARKER_REDIS", &self.marker_redis);
        opt(cmd, "CKS_MASTER_NAME", &self.master_name);
        opt(cmd, "CKS_QUEUE_ARGS", &self.queue_args);
        opt(cmd, "CKS_QUEUE_NAME_PREFIX", &self.queue_name_prefix);
        opt(cmd, "CKS_TASK_QUEUES", &self.task_queues);
        cmd.env(
            "CKS_CONFIRM_PUBLISH",
            if self.confirm_publish { "1" } else { "0" },
        );
        opt(cmd, "CKS_PREFETCH", &self.prefetch.map(|p| p.to_string()));
        cmd.env("CKS_ACKS_LATE", if self.acks_late { "1" } else { "0" });
    }

    /// Publishes with `publish.py`; `args` are its flags. Returns the count it published.
    pub fn publish(&self, queue: &str, args: &[&str]) -> u64 {
        let mut cmd = Command::new(python());
        cmd.arg("publish.py").args(["--queue", queue]).args(args);
        self.apply(&mut cmd);
        let out = cmd.output().expect("python runs publish.py");
        assert!(
            out.status.success(),
            "publish.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("publish.py prints a count")
    }

    /// Runs `celery -A cks_app inspect <args>` (real Celery remote control), bounded.
    pub fn inspect(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(python());
        cmd.args(["-m", "celery", "-A", "cks_app", "inspect"])
            .args(args)
            .stdin(Stdio::null());
        self.apply(&mut cmd);
        cmd.output().expect("celery inspect runs")
    }

    /// Starts a real Celery worker (threads pool) consuming `queues`.
    pub fn worker(&self, queues: &[&str], concurrency: u32) -> ChildGuard {
        let mut cmd = Command::new(python());
        cmd.args(["-m", "celery", "-A", "cks_app", "worker", "-P", "threads"])
            .args(["-c", &concurrency.to_string()])
            .args(["-Q", &queues.join(",")])
            .args(["-n", &format!("{}@localhost", unique("w"))])
            .args(["--without-mingle", "--without-gossip", "-l", "info"])
            .stdout(Stdio::null());
        // CKS_WORKER_LOGS=<dir> keeps each worker's log there, for debugging a failing test.
        match std::env::var("CKS_WORKER_LOGS") {
            Ok(dir) => {
                let file = std::fs::File::create(
                    Path::new(&dir).join(format!("{}.log", queues.join("_"))),
                )
                .expect("CKS_WORKER_LOGS is a writable directory");
                cmd.stderr(file);
            }
            Err(_) => {
                cmd.stderr(Stdio::null());
            }
        }
        self.apply(&mut cmd);
        ChildGuard(cmd.spawn().expect("celery worker starts"))
    }
}

// ---------------------------------------------------------------- Scaler

/// The scaler, served in-process on `127.0.0.1:0`, shut down with a oneshot.
pub struct Scaler {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Scaler {
    pub async fn start() -> Scaler {
        Self::start_with(BrokerEnv::default(), ServeSettings::default()).await
    }

    pub async fn start_with(env: BrokerEnv, mut settings: ServeSettings) -> Scaler {
        if protections_on() && settings.tenancy == Tenancy::default() {
            settings.tenancy = protected_tenancy();
        }
        celery_keda_scaler::install_crypto_provider();
        // Logs only when asked for (RUST_LOG=celery_keda_scaler=debug), on stderr.
        celery_keda_scaler::telemetry::init(celery_keda_scaler::telemetry::LogFormat::Text, "off");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            serve(grpc, Some(admin), env, settings, async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        Scaler {
            addr,
            admin: admin_addr,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn client(&self) -> ExternalScalerClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects to the scaler");
        ExternalScalerClient::new(channel)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// GET on the admin port; returns (status line, body).
    pub async fn admin_get(&self, path: &str) -> (String, String) {
        admin_get_at(self.admin, path).await
    }

    /// The value of a metric line that starts with `prefix` (name and labels).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        metric_in(&self.admin_get("/metrics").await.1, prefix)
    }

    /// Shuts down and waits for the server to stop.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(15), h)
                .await
                .expect("server stops within 15 s")
                .unwrap();
        }
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// `CKS_TEST_PROTECTIONS=on`: scripts/test.sh's second pass over the broker suites. Every
/// in-process scaler started with the default tenancy settings then runs with the protections a
/// multi-team cluster turns on (see [`protected_tenancy`]), and the suites must read the same
/// exact depths. Any other value but unset or `off` is a mistake, refused loudly.
pub fn protections_on() -> bool {
    match std::env::var("CKS_TEST_PROTECTIONS").as_deref() {
        Err(_) | Ok("") | Ok("off") => false,
        Ok("on") => true,
        Ok(other) => panic!("CKS_TEST_PROTECTIONS must be on or off (got {other:?})"),
    }
}

/// The protections of the second pass: a broker host allowlist admitting only this machine's
/// loopback (every test broker, Sentinel, management API and moto listens there), checked on
/// the resolved addresses; inline `sqs://` URLs without keys keep being refused (the default).
/// Inline URLs stay on: the suites name their brokers inline.
pub fn protected_tenancy() -> Tenancy {
    Tenancy {
        allowed_hosts: Some(
            "127.0.0.0/8,::1/128"
                .parse()
                .expect("the loopback allowlist parses"),
        ),
        ..Tenancy::default()
    }
}

pub fn object_ref(m: &HashMap<String, String>) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "worker".into(),
        namespace: "default".into(),
        scaler_metadata: m.clone(),
    }
}

/// GetMetrics, checking the response shape: exactly one value, int and float equal.
pub async fn depth(
    client: &mut ExternalScalerClient<Channel>,
    m: &HashMap<String, String>,
) -> Result<i64, tonic::Status> {
    let spec = client.get_metric_spec(object_ref(m)).await?.into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let name = spec.metric_specs[0].metric_name.clone();
    let resp = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object_ref(m)),
            metric_name: name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(resp.metric_values.len(), 1, "exactly one metric value");
    let v = &resp.metric_values[0];
    assert_eq!(v.metric_name, name);
    assert_eq!(v.metric_value as f64, v.metric_value_float);
    Ok(v.metric_value)
}

pub async fn active(
    client: &mut ExternalScalerClient<Channel>,
    m: &HashMap<String, String>,
) -> Result<bool, tonic::Status> {
    Ok(client.is_active(object_ref(m)).await?.into_inner().result)
}

// ---------------------------------------------------------------- RabbitMQ

/// The suite's RabbitMQ AMQP address (`CKS_AMQP_URL`), checked to accept connections.
pub fn amqp_base() -> (String, u16) {
    let url = std::env::var("CKS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into());
    let parsed = url::Url::parse(&url).expect("CKS_AMQP_URL is a URL");
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_string();
    let port = parsed.port().unwrap_or(5672);
    std::net::TcpStream::connect((host.as_str(), port)).unwrap_or_else(|e| {
        panic!("no RabbitMQ at {host}:{port} ({e}): run the suite with scripts/test.sh, which installs and starts RabbitMQ")
    });
    (host, port)
}

/// The management API base (`CKS_RABBITMQ_MANAGEMENT_URL`).
pub fn management_base() -> String {
    std::env::var("CKS_RABBITMQ_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into())
        .trim_end_matches('/')
        .to_string()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A vhost of the test's own on the suite's RabbitMQ, with guest allowed; deleted by `delete`.
pub struct Vhost {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl Vhost {
    pub async fn create() -> Vhost {
        celery_keda_scaler::install_crypto_provider();
        let (host, port) = amqp_base();
        let name = unique("cks");
        let api = management_base();
        let client = http();
        let r = client
            .put(format!("{api}/api/vhosts/{name}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ management API at {api} ({e}): scripts/test.sh enables rabbitmq_management"));
        assert!(r.status().is_success(), "create vhost: {}", r.status());
        let r = client
            .put(format!("{api}/api/permissions/{name}/guest"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "permissions: {}", r.status());
        Vhost { name, host, port }
    }

    /// `amqp://guest:guest@host:port/<vhost>`.
    pub fn url(&self) -> String {
        self.url_via(self.port)
    }

    /// The same through another local port (a proxy).
    pub fn url_via(&self, port: u16) -> String {
        format!("amqp://guest:guest@{}:{port}/{}", self.host, self.name)
    }

    /// A queue's counters as the management API reports them.
    pub async fn queue(&self, queue: &str) -> Option<serde_json::Value> {
        let r = http()
            .get(format!(
                "{}/api/queues/{}/{queue}",
                management_base(),
                self.name
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Declares a durable queue as Celery would (no arguments).
    pub async fn declare(&self, queue: &str) {
        let r = http()
            .put(format!(
                "{}/api/queues/{}/{queue}",
                management_base(),
                self.name
            ))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"durable": true, "auto_delete": false}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "declare {queue}: {}", r.status());
    }

    pub async fn delete(self) {
        let _ = http()
            .delete(format!("{}/api/vhosts/{}", management_base(), self.name))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }
}

/// A TCP proxy to a local port that a test can stop (connections cut, new ones refused) and
/// start again on the same port: a broker outage as the scaler sees it.
pub struct Proxy {
    pub port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let mut p = Proxy {
            port: free_port(),
            target,
            task: None,
        };
        p.resume().await;
        p
    }

    /// Cuts every connection and closes the port.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&mut self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- SQS

/// The suite's SQS-compatible endpoint (`CKS_SQS_ENDPOINT`, a moto server), checked to answer.
pub fn sqs_endpoint() -> (String, u16) {
    let endpoint = std::env::var("CKS_SQS_ENDPOINT").unwrap_or_else(|_| {
        panic!("CKS_SQS_ENDPOINT is not set: run the suite with scripts/test.sh, which starts a moto server")
    });
    let url = url::Url::parse(&endpoint).expect("CKS_SQS_ENDPOINT is a URL");
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(80);
    std::net::TcpStream::connect((host.as_str(), port))
        .unwrap_or_else(|e| panic!("no SQS server at {endpoint} ({e}): run scripts/test.sh"));
    (host, port)
}

/// `sqs://testing:testing@host:port`, as Celery (kombu) spells a local endpoint.
pub fn sqs_broker_url() -> String {
    let (host, port) = sqs_endpoint();
    format!("sqs://testing:testing@{host}:{port}")
}

/// A raw SQS client for checking the server's own attributes.
pub async fn raw_sqs() -> aws_sdk_sqs::Client {
    let (host, port) = sqs_endpoint();
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(format!("http://{host}:{port}"))
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

/// (ApproximateNumberOfMessages, ApproximateNumberOfMessagesNotVisible) of an SQS queue.
pub async fn sqs_attributes(sqs_name: &str) -> (u64, u64) {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let client = raw_sqs().await;
    let url = client
        .get_queue_url()
        .queue_name(sqs_name)
        .send()
        .await
        .unwrap();
    let out = client
        .get_queue_attributes()
        .queue_url(url.queue_url().unwrap())
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let a = out.attributes().unwrap();
    (
        a[&A::ApproximateNumberOfMessages].parse().unwrap(),
        a[&A::ApproximateNumberOfMessagesNotVisible]
            .parse()
            .unwrap(),
    )
}

// ---------------------------------------------------------------- running tasks (scaleOnRunning)

/// Waits until `marker` (incremented by each started `cks.sleep`) reaches `n`.
pub async fn wait_started(marker: &str, n: i64) {
    let url = redis_url();
    let conn = raw_redis(&url).await;
    wait_for(
        &format!("{n} tasks started ({marker})"),
        Duration::from_secs(90),
        || {
            let mut conn = conn.clone();
            async move {
                let v: Option<i64> = redis::cmd("GET")
                    .arg(marker)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                (v == Some(n)).then_some(())
            }
        },
    )
    .await;
}

/// Metadata for one queue with both counters set as given.
pub fn counting(
    broker: &str,
    queue: &str,
    in_flight: bool,
    running: bool,
) -> HashMap<String, String> {
    meta(&[
        ("brokerUrl", broker),
        ("queues", queue),
        ("scaleOnInFlight", if in_flight { "true" } else { "false" }),
        ("scaleOnRunning", if running { "true" } else { "false" }),
    ])
}

/// Waits (bounded) until the scaler reports `expected` for `m`, then checks it once more and
/// checks `IsActive` against it. The wait covers the census interval and, on RabbitMQ, the
/// management statistics interval.
pub async fn expect_depth(
    scaler: &Scaler,
    m: &HashMap<String, String>,
    expected: i64,
    limit: Duration,
) {
    let client = scaler.client().await;
    let what = format!(
        "depth {expected} for queues={:?} scaleOnInFlight={:?} scaleOnRunning={:?}",
        m.get("queues"),
        m.get("scaleOnInFlight"),
        m.get("scaleOnRunning")
    );
    wait_for(&what, limit, || {
        let mut client = client.clone();
        let m = m.clone();
        async move { (depth(&mut client, &m).await.ok()? == expected).then_some(()) }
    })
    .await;
    let mut client = client.clone();
    assert_eq!(depth(&mut client, m).await.unwrap(), expected, "{what}");
    assert_eq!(
        active(&mut client, m).await.unwrap(),
        expected > 0,
        "IsActive for {what}"
    );
}

/// Two tasks running on a two-slot worker with early ack: the broker shows nothing (queue empty,
/// nothing unacknowledged), the scaler shows 2 until they finish, then 0. Running tasks of one
/// queue never count for another.
pub async fn running_tasks_keep_the_scaler_active(
    broker: &str,
    conf: CeleryConf,
    queue: &str,
    other: &str,
) {
    let marker = unique("started");
    let mut conf = conf;
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.publish(
        queue,
        &["--count", "2", "--seconds", "8", "--marker", &marker],
    );
    let worker = conf.worker(&[queue], 2);
    wait_started(&marker, 2).await;
    let settings = ServeSettingsExt::no_window();
    let scaler = Scaler::start_with(Default::default(), settings).await;
    let bound = Duration::from_secs(30);
    // What every queue-depth scaler sees: nothing.
    expect_depth(&scaler, &counting(broker, queue, true, false), 0, bound).await;
    // What this one sees.
    expect_depth(&scaler, &counting(broker, queue, true, true), 2, bound).await;
    expect_depth(&scaler, &counting(broker, queue, false, true), 2, bound).await;
    expect_depth(&scaler, &counting(broker, other, true, true), 0, bound).await;
    // `probe` shows them per worker.
    let out = Command::new(env!("CARGO_BIN_EXE_celery-keda-scaler"))
        .args([
            "probe",
            &format!("brokerUrl={broker}"),
            &format!("queues={queue}"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let running: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("running, already acknowledged"))
        .collect();
    assert_eq!(running.len(), 1, "{text}");
    assert_eq!(running[0].split_whitespace().nth(1), Some("2"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("2  on w-") && l.ends_with("@localhost")),
        "{text}"
    );
    // When they finish: back to 0 within the census bound.
    expect_depth(&scaler, &counting(broker, queue, true, true), 0, bound).await;
    drop(worker);
}

/// Ten long tasks, a two-slot worker with prefetch 1: with both counters on the depth is the
/// number of tasks published and not finished (10), for early ack and for `acks_late` alike.
/// A killed worker's running tasks stop counting within the census bound.
pub async fn depth_is_published_minus_finished(
    broker: &str,
    conf: CeleryConf,
    queue: &str,
    acks_late: bool,
    after_kill: i64,
) {
    let marker = unique("started");
    let mut conf = conf;
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.acks_late = acks_late;
    conf.publish(
        queue,
        &["--count", "10", "--seconds", "120", "--marker", &marker],
    );
    let worker = conf.worker(&[queue], 2);
    wait_started(&marker, 2).await;
    let scaler = Scaler::start_with(Default::default(), ServeSettingsExt::no_window()).await;
    let bound = Duration::from_secs(30);
    let ready = if acks_late { 8 } else { 6 };
    expect_depth(
        &scaler,
        &counting(broker, queue, false, false),
        ready,
        bound,
    )
    .await;
    expect_depth(&scaler, &counting(broker, queue, true, true), 10, bound).await;
    let in_flight_only = if acks_late { 10 } else { 8 };
    expect_depth(
        &scaler,
        &counting(broker, queue, true, false),
        in_flight_only,
        bound,
    )
    .await;
    // A worker that stops answering (SIGSTOP) no longer reports its running tasks: they stop
    // counting at the next census; what the broker still holds keeps counting.
    let pid = worker.0.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill {sig} {pid}");
    };
    signal("-STOP");
    let all = counting(broker, queue, true, true);
    expect_depth(&scaler, &all, after_kill, bound).await;
    signal("-CONT");
    expect_depth(&scaler, &all, 10, bound).await;
    drop(worker); // SIGKILL: early-acked running tasks are lost with it
    expect_depth(&scaler, &all, after_kill, bound).await;
}

/// Settings helpers for tests.
pub struct ServeSettingsExt;

impl ServeSettingsExt {
    /// Default settings without the result window, so every reading reaches the broker.
    pub fn no_window() -> ServeSettings {
        ServeSettings {
            result_window: Duration::ZERO,
            ..ServeSettings::default()
        }
    }
}

// ---------------------------------------------------------------- the real binary

/// A TCP server that accepts connections and never answers (a hanging broker). Returns its
/// port and the number of connections it accepted so far.
pub async fn silent_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    (port, accepted)
}

/// `/proc/<pid>/status` VmRSS of a process, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// GET on an admin port; returns (status line, body).
pub async fn admin_get_at(admin: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the metric line of `body` that starts with `prefix` (name and labels).
pub fn metric_in(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The release or debug binary built with the tests, run as `serve` on free local ports, its
/// stdout and stderr collected; killed when dropped, unless stopped with [`ScalerProcess::terminate`].
pub struct ScalerProcess {
    pub child: Child,
    pub port: u16,
    pub admin: u16,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// What a stopped [`ScalerProcess`] left: exit status, stdout, stderr.
pub struct ScalerExit {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ScalerProcess {
    /// `celery-keda-scaler serve --listen .. --admin-listen .. <args>` with `env` added to (and
    /// `remove` taken from) the test's environment; returns once the gRPC port accepts.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)], remove: &[&str]) -> ScalerProcess {
        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_celery-keda-scaler"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for name in remove {
            cmd.env_remove(name);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the scaler binary starts");
        let drain = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                use std::io::Read as _;
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        let mut p = ScalerProcess {
            child,
            port,
            admin,
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = p.child.try_wait() {
                let err = p.stderr.take().map(|h| h.join().unwrap_or_default());
                panic!(
                    "the scaler exited with {status}: {}",
                    err.unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the scaler did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// A new HTTP/2 connection to the gRPC port.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect()
            .await
            .expect("connects to the scaler")
    }

    pub async fn client(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::new(self.channel().await)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        admin_get_at(self.admin_addr(), "/metrics").await.1
    }

    /// One metric value by line prefix (see [`metric_in`]).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        metric_in(&self.metrics_text().await, prefix)
    }

    /// The scaler's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdout.take();
        self.stderr.take();
    }

    /// SIGTERM, then waits (bounded) for the exit and the collected output.
    pub fn terminate(mut self) -> ScalerExit {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.take().unwrap().join().unwrap_or_default();
        let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
        ScalerExit {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for ScalerProcess {
    fn drop(&mut self) {
        if self.stdout.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- RabbitMQ management helpers

impl Vhost {
    /// `method` on the management API's `/api/<what>/<vhost><rest>`, as guest.
    pub async fn management(
        &self,
        method: reqwest::Method,
        what: &str,
        rest: &str,
    ) -> reqwest::Response {
        http()
            .request(
                method,
                format!("{}/api/{what}/{}{rest}", management_base(), self.name),
            )
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap()
    }

    /// Drops every message of `queue` (management API `DELETE .../contents`).
    pub async fn purge(&self, queue: &str) {
        let path = format!("/{queue}/contents");
        let r = self
            .management(reqwest::Method::DELETE, "queues", &path)
            .await;
        assert!(r.status().is_success(), "purge {queue}: {}", r.status());
    }

    /// Removes the binding of `queue` to `exchange` by `key` (no arguments).
    pub async fn unbind(&self, exchange: &str, queue: &str, key: &str) {
        let path = format!("/e/{exchange}/q/{queue}/{key}");
        let r = self
            .management(reqwest::Method::DELETE, "bindings", &path)
            .await;
        assert!(r.status().is_success(), "unbind {queue}: {}", r.status());
    }

    /// Creates RabbitMQ user `user` with `password` and `tags` (e.g. `monitoring`), with full
    /// permissions on this vhost. Delete it with [`Vhost::delete_user`].
    pub async fn create_user(&self, user: &str, password: &str, tags: &str) {
        let api = management_base();
        let r = http()
            .put(format!("{api}/api/users/{user}"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"password": password, "tags": tags}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "create user: {}", r.status());
        let r = http()
            .put(format!("{api}/api/permissions/{}/{user}", self.name))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "user permissions: {}", r.status());
    }

    pub async fn delete_user(&self, user: &str) {
        let _ = http()
            .delete(format!("{}/api/users/{user}", management_base()))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }
}

// ---------------------------------------------------------------- faults (tests/faults.rs)

impl OwnRedis {
    /// Kills the server with SIGKILL (a crash: no shutdown, every connection cut by the kernel).
    pub fn kill(&mut self) {
        let _ = self._child.0.kill();
        let _ = self._child.0.wait();
    }

    /// Starts a new, empty `redis-server` on the same port and socket (no TLS), and waits until
    /// it listens.
    pub fn restart(&mut self, password: Option<&str>) {
        assert!(
            self.tls_port.is_none(),
            "restart supports plain servers only"
        );
        self.kill();
        let mut cmd = Command::new(which("redis-server"));
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&self.socket)
            .args(["--unixsocketperm", "700"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        self._child = ChildGuard(cmd.spawn().expect("redis-server starts"));
        wait_port(self.port, "restarted redis-server");
    }
}

/// The other clients of a Redis server (`CLIENT LIST` without the asking connection), one map of
/// fields (`id`, `addr`, `lib-name`, `cmd`, ...) per connection.
pub async fn redis_clients(url: &str) -> Vec<HashMap<String, String>> {
    let mut conn = raw_redis(url).await;
    let me: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    list.lines()
        .map(|line| {
            line.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        })
        .filter(|c| c.get("id").map(String::as_str) != Some(me.to_string().as_str()))
        .collect()
}

/// This process's established TCP connections to `127.0.0.1:port` (`/proc/net/tcp` rows whose
/// socket inode is one of this process's descriptors).
pub fn tcp_connections_to(port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let remote = format!(":{port:04X}");
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .filter(|f| {
            f.len() > 9 && f[2].ends_with(&remote) && f[3] == "01" && inodes.contains(&f[9])
        })
        .count()
}

/// Tasks alive on the current tokio runtime (each `#[tokio::test]` has its own runtime, and the
/// in-process scaler spawns its polls, streams, census loops and connection drivers on it).
pub fn runtime_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

fn wait_listening(port: u16, what: &str, limit: Duration) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < limit,
            "{what} did not listen on {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A moto SQS server of the test's own, on a free port; it can be killed and started again on
/// the same port (moto keeps no state across a restart: queues must be created again).
pub struct OwnMoto {
    pub port: u16,
    child: Option<ChildGuard>,
}

impl OwnMoto {
    pub fn start() -> OwnMoto {
        let mut m = OwnMoto {
            port: free_port(),
            child: None,
        };
        m.restart();
        m
    }

    fn binary() -> PathBuf {
        let beside_python = python().with_file_name("moto_server");
        if beside_python.is_file() {
            beside_python
        } else {
            which("moto_server")
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Kills the server if it runs, starts a new one on the same port, waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(Self::binary())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        self.child = Some(ChildGuard(child));
        wait_listening(self.port, "moto_server", Duration::from_secs(60));
    }

    /// `sqs://testing:testing@127.0.0.1:<port>`, as kombu spells a local endpoint.
    pub fn broker_url(&self) -> String {
        format!("sqs://testing:testing@127.0.0.1:{}", self.port)
    }

    /// Creates an SQS queue from another process (boto3 from the Celery virtualenv), so that no
    /// connection of the test process stays open to the server.
    pub fn create_queue(&self, sqs_name: &str) {
        let script = "import sys, boto3\n\
            c = boto3.client('sqs', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                aws_access_key_id='testing', aws_secret_access_key='testing')\n\
            c.create_queue(QueueName=sys.argv[2])\n";
        let out = Command::new(python())
            .args(["-c", script])
            .arg(format!("http://127.0.0.1:{}", self.port))
            .arg(sqs_name)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "create_queue {sqs_name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The shared RabbitMQ node's application stopped (`rabbitmqctl stop_app`: AMQP and management
/// listeners closed, every client connection cut; the node, its vhosts and durable queues stay).
/// Started again by [`RabbitAppStopped::start`], or on drop, so a failing test never leaves the
/// suite's broker down.
pub struct RabbitAppStopped {
    running: bool,
}

impl RabbitAppStopped {
    /// Runs `rabbitmqctl stop_app` and checks that port 5672 refuses connections.
    pub fn stop() -> RabbitAppStopped {
        let (_, port) = amqp_base();
        // Marked stopped first: whatever happens from here, drop starts the app again.
        let guard = RabbitAppStopped { running: false };
        rabbitmqctl("stop_app").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still accepts after stop_app"
        );
        guard
    }

    /// Runs `rabbitmqctl start_app`, then waits until port 5672 accepts and the management API
    /// answers. Returns when AMQP listened and when the management API answered, measured
    /// from the call.
    pub fn start(&mut self) -> (Duration, Duration) {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RabbitAppStopped::start`] without panicking (it also runs in `drop`, maybe while a
    /// failed test unwinds).
    fn try_start(&mut self) -> Result<(Duration, Duration), String> {
        let started = Instant::now();
        self.running = true;
        rabbitmqctl("start_app")?;
        let url = std::env::var("CKS_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into());
        let url = url::Url::parse(&url).map_err(|e| format!("CKS_AMQP_URL: {e}"))?;
        let (host, port) = (
            url.host_str().unwrap_or("127.0.0.1").to_string(),
            url.port().unwrap_or(5672),
        );
        let limit = Duration::from_secs(60);
        while std::net::TcpStream::connect((host.as_str(), port)).is_err() {
            if started.elapsed() > limit {
                return Err(format!(
                    "RabbitMQ did not listen on {port} within {limit:?} of start_app"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let amqp = started.elapsed();
        while management_status_blocking("/api/overview") != Some(200) {
            if started.elapsed() > limit {
                return Err(format!(
                    "the management API did not answer within {limit:?} of start_app"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((amqp, started.elapsed()))
    }
}

impl Drop for RabbitAppStopped {
    fn drop(&mut self) {
        if !self.running {
            if let Err(e) = self.try_start() {
                eprintln!("starting RabbitMQ again after a failed test: {e}");
            }
        }
    }
}

fn rabbitmqctl(command: &str) -> Result<(), String> {
    let out = Command::new(which("rabbitmqctl"))
        .arg(command)
        .output()
        .map_err(|e| format!("rabbitmqctl {command}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The HTTP status of a GET on the management API (guest), blocking; `None` when nothing answers.
pub fn management_status_blocking(path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let base = url::Url::parse(&management_base()).ok()?;
    let addr = (
        base.host_str().unwrap_or("127.0.0.1").to_string(),
        base.port().unwrap_or(15672),
    );
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // guest:guest
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The scaler's AMQP connections to `vhost` as the management API lists them (the scaler names
/// its connections `celery-keda-scaler`); `None` when the API does not answer.
pub async fn scaler_amqp_connections(vhost: &str) -> Option<usize> {
    let r = http()
        .get(format!(
            "{}/api/vhosts/{vhost}/connections",
            management_base()
        ))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let list: Vec<serde_json::Value> = r.json().await.ok()?;
    Some(
        list.iter()
            .filter(|c| c["client_properties"]["connection_name"] == "celery-keda-scaler")
            .count(),
    )
}
