//! The KEDA `ExternalScaler` gRPC service: request plumbing around [`Core`] and the stream hub.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::hub::Hub;
use crate::metadata::Trigger;
use crate::proto::external_scaler_server::ExternalScaler;
use crate::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use crate::scaler::Core;

/// The service handed to tonic.
pub struct Service {
    core: Arc<Core>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
}

impl Service {
    /// A service over `core`, sharing stream polls through `hub`; streams end when `shutdown`
    /// is cancelled.
    pub fn new(core: Arc<Core>, hub: Arc<Hub>, shutdown: CancellationToken) -> Self {
        Service {
            core,
            hub,
            shutdown,
        }
    }

    /// The trigger without any I/O (for `GetMetricSpec`).
    fn trigger(&self, r: &ScaledObjectRef) -> Result<Trigger, Status> {
        self.core
            .trigger(&r.scaler_metadata, &r.namespace)
            .map_err(Status::from)
    }

    /// The trigger with every host checked and pinned, ready for readings.
    async fn admit(&self, r: &ScaledObjectRef) -> Result<Trigger, Status> {
        self.core
            .admit(&r.scaler_metadata, &r.namespace)
            .await
            .map_err(Status::from)
    }

    /// The depth of `trigger`'s queues, handed to the push streams watching them too. Where a
    /// stream's poll knows the ready sources are still empty (armed, nothing written since), they
    /// are not read again.
    async fn depth(&self, trigger: &Trigger) -> Result<u64, Status> {
        let query = &trigger.query;
        let reading = if self.hub.ready_known_empty(query) {
            self.core.read_ready_empty(query).await
        } else {
            self.core.read(query).await
        };
        let depth = reading.map(|d| d.total()).map_err(Status::from)?;
        self.hub.offer(&trigger.query, depth);
        Ok(depth)
    }

    fn record<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.core
            .metrics()
            .rpc(method, code, started.elapsed().as_secs_f64());
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;
type SpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

/// After an inactive -> active transition, `true` is pushed again after each of these delays
/// (while the queues stay active): KEDA drops a push that arrives before the ScaledObject's
/// `status.externalMetricNames` is written ("will retry on next activation"), which happens to the
/// first activation of a ScaledObject created or updated a moment before its queue filled. Four
/// pushes in about 7 s, never a steady stream: each costs KEDA a `/scale` round trip.
pub const PUSH_REPEATS: [std::time::Duration; 3] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(4),
];

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Converts a depth to KEDA's integer field without wrapping.
fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[tonic::async_trait]
impl ExternalScaler for Service {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let trigger = self.admit(request.get_ref()).await?;
            let depth = self.depth(&trigger).await?;
            Ok(Response::new(IsActiveResponse {
                result: trigger.is_active(depth),
            }))
        }
        .await;
        self.record("IsActive", started, &result);
        result
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let started = Instant::now();
        let trigger = self.admit(request.get_ref()).await;
        self.record("StreamIsActive", started, &trigger);
        let trigger = trigger?;
        let mut readings = self
            .hub
            .watch(&trigger.query, trigger.activation_queue_length);
        let (tx, rx) = mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        let metrics = self.core.metrics().clone();
        metrics.streams().inc();
        tokio::spawn(async move {
            let mut was_active = false;
            // Repeats of the last activation still due: (when, index into PUSH_REPEATS).
            let mut repeat: Option<(tokio::time::Instant, usize)> = None;
            loop {
                // The current reading first (a shared poll may already have one), then changes.
                let reading = readings.borrow_and_update().clone();
                if let Some(Err(e)) = reading {
                    // Refused or bad metadata: the poll has stopped, and the
                    // stream ends with the error (KEDA logs it and reopens after its backoff).
                    if e.is_permanent() {
                        let _ = tx.send(Err(Status::from(e))).await;
                        break;
                    }
                } else if let Some(Ok(depth)) = reading {
                    let active = trigger.is_active(depth);
                    if active && !was_active {
                        if tx
                            .send(Ok(IsActiveResponse { result: true }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        repeat = PUSH_REPEATS
                            .first()
                            .map(|d| (tokio::time::Instant::now() + *d, 0));
                    } else if !active {
                        // The queues went idle: a repeat would wake workers for nothing.
                        repeat = None;
                    }
                    was_active = active;
                }
                // Any other failed reading changes nothing: the stream stays open and pushes
                // nothing.
                tokio::select! {
                    changed = readings.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = shutdown.cancelled() => break,
                    _ = sleep_until_some(repeat.map(|(at, _)| at)) => {
                        let i = repeat.map_or(0, |(_, i)| i);
                        if tx.send(Ok(IsActiveResponse { result: true })).await.is_err() {
                            break;
                        }
                        repeat = PUSH_REPEATS
                            .get(i + 1)
                            .map(|d| (tokio::time::Instant::now() + *d, i + 1));
                    }
                }
            }
            metrics.streams().dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let started = Instant::now();
        // Never touches a broker: KEDA's fallback depends on this answering during an outage.
        let result = self.trigger(request.get_ref()).map(|t| {
            Response::new(GetMetricSpecResponse {
                metric_specs: vec![MetricSpec {
                    metric_name: t.metric_name.clone(),
                    target_size: t.queue_length.ceil() as i64,
                    target_size_float: t.queue_length,
                }],
            })
        });
        self.record("GetMetricSpec", started, &result);
        result
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let req = request.get_ref();
            let empty = ScaledObjectRef::default();
            let trigger = self
                .admit(req.scaled_object_ref.as_ref().unwrap_or(&empty))
                .await?;
            let depth = self.depth(&trigger).await?;
            Ok(Response::new(GetMetricsResponse {
                metric_values: vec![MetricValue {
                    metric_name: trigger.metric_name.clone(),
                    metric_value: as_i64(depth),
                    metric_value_float: depth as f64,
                }],
            }))
        }
        .await;
        self.record("GetMetrics", started, &result);
        result
    }

    type StreamMetricSpecStream = SpecStream;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented(
            "StreamMetricSpec is not implemented: the metric spec only changes with the ScaledObject",
        ))
    }
}
