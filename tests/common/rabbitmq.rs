//! RabbitMQ fixtures: the suite's node (AMQP and management API), vhosts of a test's own, the
//! node's application stopped and started for the outage cases, the scaler's connections.
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::which;
use super::unique;

// RabbitMQ

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

/// A new AMQP connection to the default vhost of the node at `amqp` (a Celery `amqp://` URL)
/// and a channel on it, for publishing and declaring outside the scaler. The channel works as
/// long as the connection is kept.
pub async fn amqp_channel(amqp: &str) -> (lapin::Connection, lapin::Channel) {
    let u = url::Url::parse(amqp).unwrap();
    let lapin_url = format!(
        "amqp://{}:{}@{}:{}/%2f",
        u.username(),
        u.password().unwrap_or(""),
        u.host_str().unwrap(),
        u.port().unwrap_or(5672)
    );
    let conn = lapin::Connection::connect(&lapin_url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
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

// RabbitMQ management helpers

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
