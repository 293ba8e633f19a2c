//! Real Celery: the Python interpreter with Celery, the test app's configuration, publishing,
//! workers, and Flower beside them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::process::ChildGuard;
use super::root;
use super::unique;

// Celery

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
    /// JSON: kombu's SQS `predefined_queues` (queue name -> {url, access_key_id, ...}).
    pub predefined_queues: Option<String>,
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
        opt(cmd, "CKS_PREDEFINED_QUEUES", &self.predefined_queues);
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

    /// Starts Flower (`celery flower`, from PyPI) on 127.0.0.1:`port` for this app, its HTTP API
    /// open without authentication (`FLOWER_UNAUTHENTICATED_API`); `broker_api`: the RabbitMQ
    /// management API it reads queue lengths from.
    pub fn flower(&self, port: u16, broker_api: Option<&str>) -> ChildGuard {
        let mut cmd = Command::new(python());
        cmd.args(["-m", "celery", "-A", "cks_app", "flower"])
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(api) = broker_api {
            cmd.arg(format!("--broker_api={api}"));
        }
        self.apply(&mut cmd);
        ChildGuard(cmd.spawn().expect("celery flower starts"))
    }
}

/// Flower's `GET /api/queues/length`: the queues it knows (those of the workers it has seen)
/// and the `messages` it reports for each; `None` until it answers.
pub async fn flower_queue_lengths(port: u16) -> Option<HashMap<String, u64>> {
    let body: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/api/queues/length"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
    body["active_queues"]
        .as_array()?
        .iter()
        .map(|q| Some((q["name"].as_str()?.to_string(), q["messages"].as_u64()?)))
        .collect()
}
