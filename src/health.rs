//! `grpc.health.v1` for Kubernetes probes: tonic-health's service, except that `Watch` streams
//! end (after a last NOT_SERVING) when shutdown begins, so a watcher cannot hold the server open
//! for the whole grace period.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// Health service whose watches end on shutdown.
pub struct DrainingHealth {
    inner: HealthService,
    shutdown: CancellationToken,
}

/// The reporter that sets statuses, and the service to add to the server.
pub fn service(shutdown: CancellationToken) -> (HealthReporter, HealthServer<DrainingHealth>) {
    let reporter = HealthReporter::new();
    let inner = HealthService::from_health_reporter(reporter.clone());
    (
        reporter,
        HealthServer::new(DrainingHealth { inner, shutdown }),
    )
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let updates = self.inner.watch(request).await?.into_inner();
        let last = HealthCheckResponse {
            status: ServingStatus::NotServing as i32,
        };
        let stream = updates
            .take_until(self.shutdown.clone().cancelled_owned())
            .chain(futures::stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}
