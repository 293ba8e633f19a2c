//! Child processes, ports and this process's own counts: free ports, a guard that kills its
//! child, a silent server (a hanging broker), a stoppable TCP proxy (a broker outage), RSS, TCP
//! connections and runtime tasks.
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

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

pub fn which(binary: &str) -> PathBuf {
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

pub fn wait_port(port: u16, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

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

/// A TCP proxy to a local port that a test can stop (connections cut, new ones refused) and
/// start again on the same port: a broker outage as the scaler sees it. It listens on a loopback
/// address of its own choosing (`127.0.0.1` by default; any `127.x.y.z` works on Linux, so two
/// proxies can stand for two hosts) and counts the connections it accepted.
pub struct Proxy {
    pub port: u16,
    /// The loopback address it listens on.
    pub ip: std::net::Ipv4Addr,
    target: u16,
    /// Connections accepted since the start.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, target).await
    }

    /// A proxy listening on `ip` (a loopback address), to `127.0.0.1:target`.
    pub async fn start_on(ip: std::net::Ipv4Addr, target: u16) -> Proxy {
        let mut p = Proxy {
            port: free_port(),
            ip,
            target,
            accepted: Default::default(),
            task: None,
        };
        p.resume().await;
        p
    }

    /// `host:port` of the proxy.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
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
            match TcpListener::bind((self.ip, self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let target = self.target;
        let accepted = self.accepted.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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

pub fn wait_listening(port: u16, what: &str, limit: Duration) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < limit,
            "{what} did not listen on {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
