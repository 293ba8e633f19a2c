//! The scaler under test: in-process over real gRPC (with the second pass's protections), the
//! real binary as a child process, and the calls and admin reads the suites make.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use celery_keda_scaler::server::{serve, ServeSettings};
use celery_keda_scaler::tenancy::Tenancy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::process::free_port;
use super::process::rss_kib;

// Scaler

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

/// The ScaledObject `worker` in namespace `default` with trigger metadata `m`.
pub fn object_ref(m: &HashMap<String, String>) -> ScaledObjectRef {
    object_ref_in("default", m)
}

/// The ScaledObject `worker` in `namespace` with trigger metadata `m`.
pub fn object_ref_in(namespace: &str, m: &HashMap<String, String>) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "worker".into(),
        namespace: namespace.into(),
        scaler_metadata: m.clone(),
    }
}

/// GetMetrics, checking the response shape: exactly one value, int and float equal.
pub async fn depth(
    client: &mut ExternalScalerClient<Channel>,
    m: &HashMap<String, String>,
) -> Result<i64, tonic::Status> {
    depth_in(client, "default", m).await
}

/// Waits (bounded) until `GetMetrics` answers exactly `n` for `m`, and fails the test otherwise:
/// for right after a push, whose reading may have seen only the first of several tasks a
/// publisher sends (the result window then answers with it for a moment).
pub async fn depth_settles(
    client: &mut ExternalScalerClient<Channel>,
    m: &HashMap<String, String>,
    n: i64,
) {
    let started = Instant::now();
    loop {
        let got = depth(client, m).await;
        if matches!(got, Ok(d) if d == n) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "GetMetrics did not settle at {n}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`depth`] for a ScaledObject in `namespace`.
pub async fn depth_in(
    client: &mut ExternalScalerClient<Channel>,
    namespace: &str,
    m: &HashMap<String, String>,
) -> Result<i64, tonic::Status> {
    let spec = client
        .get_metric_spec(object_ref_in(namespace, m))
        .await?
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let name = spec.metric_specs[0].metric_name.clone();
    let resp = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object_ref_in(namespace, m)),
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

/// The scaler's binary, built with the tests.
pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_celery-keda-scaler"))
}

/// The binary's `serve` on `listen` (gRPC) and `admin`; more flags and the environment are the
/// caller's.
pub fn serve_command(listen: &str, admin: &str) -> Command {
    let mut cmd = binary();
    cmd.args(["serve", "--listen", listen, "--admin-listen", admin]);
    cmd
}

/// The binary's `probe` of the trigger metadata `pairs` (given as `key=value` arguments).
pub fn probe_command(pairs: &[(&str, &str)]) -> Command {
    let mut cmd = binary();
    cmd.arg("probe")
        .args(pairs.iter().map(|(k, v)| format!("{k}={v}")));
    cmd
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

// The watch list (--watch)

/// The line prefix of `celery_keda_watched_queue_tasks` for `queue` of the default broker.
pub fn watched(queue: &str, state: &str) -> String {
    format!("celery_keda_watched_queue_tasks{{broker=\"default\",queue=\"{queue}\",state=\"{state}\"}} ")
}

/// An in-process scaler (result window off) whose watch list is `watch` over `env`, read every
/// `interval`.
pub async fn watching(env: BrokerEnv, watch: &str, interval: Duration) -> Scaler {
    let list = celery_keda_scaler::watch::parse(watch, &env, &Default::default())
        .expect("the watch list parses");
    Scaler::start_with(
        env,
        ServeSettings {
            watch: list,
            watch_interval: interval,
            ..ServeSettingsExt::no_window()
        },
    )
    .await
}

/// A scaler watching `queue` of the default broker `url` every 500 ms, once its gauges read
/// exactly `ready`, `in_flight` and `running` (waiting up to `limit`).
pub async fn watching_until(
    url: &str,
    queue: &str,
    [ready, in_flight, running]: [u64; 3],
    limit: Duration,
) -> Scaler {
    let env = BrokerEnv::from_vars([("CELERY_BROKER_URL".to_string(), url.to_string())]).unwrap();
    let scaler = watching(env, queue, Duration::from_millis(500)).await;
    let expected = [
        ("ready", ready),
        ("in_flight", in_flight),
        ("running", running),
    ]
    .map(|(state, n)| (watched(queue, state), n as f64));
    scaler
        .wait_metrics(
            "the watched gauges at the broker's numbers",
            limit,
            &expected,
        )
        .await;
    scaler
}

impl Scaler {
    /// Waits (up to `limit`) until every (line prefix, value) of `expected` is in `/metrics`;
    /// returns that body.
    pub async fn wait_metrics(
        &self,
        what: &str,
        limit: Duration,
        expected: &[(String, f64)],
    ) -> String {
        super::wait_for(what, limit, || async {
            let body = self.admin_get("/metrics").await.1;
            expected
                .iter()
                .all(|(line, v)| metric_in(&body, line) == Some(*v))
                .then_some(body)
        })
        .await
    }
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
        let mut cmd = serve_command(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{admin}"));
        cmd.args(args)
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
