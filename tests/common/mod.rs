//! Shared fixtures of the integration tests: find the brokers, run the scaler in-process over real
//! gRPC, publish with real Celery, run real Celery workers, and start extra Redis servers
//! (TLS, Unix socket, password, Sentinel) as child processes.
//!
//! A missing broker or a missing Celery is a test failure with a message saying how to get it
//! (`scripts/test.sh` installs and starts everything), never a silent skip.
#![allow(dead_code)]

mod celery;
mod process;
mod rabbitmq;
mod redis;
mod running;
mod scaler;
mod sqs;

// Each test target uses some of these, none uses all of them.
#[allow(unused_imports)]
pub use self::{celery::*, process::*, rabbitmq::*, redis::*, running::*, scaler::*, sqs::*};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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
