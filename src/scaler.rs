//! The scaler core shared by the gRPC service, the stream hub and `probe`: turns metadata into a
//! trigger and reads its depth within the deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::{ClientSettings, Depth, DepthQuery, Registry};
use crate::error::{Error, Result};
use crate::metadata::{self, BrokerEnv, Trigger};
use crate::metrics::Metrics;

/// Settings of the core.
#[derive(Clone, Debug)]
pub struct CoreSettings {
    /// Upper bound on one depth reading, broker connection included.
    pub deadline: Duration,
}

/// Parses triggers and reads depths. Cheap to share behind an `Arc`.
pub struct Core {
    env: BrokerEnv,
    registry: Registry,
    deadline: Duration,
    metrics: Arc<Metrics>,
}

impl Core {
    /// A core with no broker clients yet.
    pub fn new(env: BrokerEnv, settings: CoreSettings, metrics: Arc<Metrics>) -> Self {
        Core {
            env,
            registry: Registry::new(ClientSettings {
                timeout: settings.deadline,
            }),
            deadline: settings.deadline,
            metrics,
        }
    }

    /// Validates metadata (no broker I/O).
    pub fn trigger(&self, meta: &HashMap<String, String>) -> Result<Trigger> {
        metadata::parse(meta, &self.env)
    }

    /// The metrics this core records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Number of distinct broker clients (connections or pools) created so far.
    pub fn broker_clients(&self) -> usize {
        self.registry.len()
    }

    /// Reads the depth for `query`, failing with `DEADLINE_EXCEEDED` when the broker does not
    /// answer within the deadline. Never returns a depth for a failed reading.
    pub async fn read(&self, query: &DepthQuery) -> Result<Depth> {
        let kind = query.target.kind();
        let started = Instant::now();
        let result = match self.registry.client(&query.target) {
            Ok(client) => match tokio::time::timeout(self.deadline, client.depth(query)).await {
                Ok(r) => r,
                Err(_) => Err(Error::DeadlineExceeded(format!(
                    "{kind} broker {} did not answer within {:?}",
                    query.target.redacted(),
                    self.deadline
                ))),
            },
            Err(e) => Err(e),
        };
        match &result {
            Ok(depth) => self
                .metrics
                .reading(kind, started.elapsed().as_secs_f64(), depth),
            Err(e) => {
                self.metrics.broker_error(kind, e.kind());
                tracing::warn!(broker = kind, error_kind = e.kind(), error = %e, "Depth reading failed");
            }
        }
        result
    }
}
