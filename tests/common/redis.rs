//! Redis fixtures: the suite's Redis, raw connections and cleanup, Redis and Sentinel servers of
//! a test's own (TLS, Unix socket, password), killed and restarted for the fault cases.
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{free_port, wait_port, which, ChildGuard};

// Redis

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

// faults (tests/faults.rs)

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

/// Calls per command (lowercase, e.g. `exists`, `llen`) since the server's last `CONFIG
/// RESETSTAT`, from `INFO commandstats`: what a test's own server was asked.
pub async fn command_calls(conn: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// Zeroes the server's command counts (`CONFIG RESETSTAT`).
pub async fn reset_command_calls(conn: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .unwrap();
}
