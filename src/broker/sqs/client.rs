//! The SQS client: `GetQueueAttributes` (approximate visible and not-visible counts) for kombu's
//! SQS queue names (URLs resolved once and cached) or at a predefined queue's URL, the AWS
//! clients built on first use (one per region, endpoint and keys: a predefined queue may have
//! its own), SDK errors mapped to meanings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use tokio::sync::OnceCell;

use super::names::sqs_queue_name;
use super::predefined::PredefinedQueue;
use super::target::{SqsLayout, SqsTarget};
use crate::broker::census::Census;
use crate::broker::reading::{Broker, ClientSettings, Depth, QueueDepth, ReadyPart};
use crate::error::{Error, Result};
use crate::secret::scrub;

/// Region used when neither `awsRegion` nor the scaler's environment names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// An SQS client shared by every trigger naming the same [`SqsTarget`].
pub struct SqsBroker {
    target: SqsTarget,
    timeout: Duration,
    /// One AWS client per effective target: the broker's own, and those of predefined queues
    /// with their own keys, region or endpoint.
    clients: Mutex<HashMap<SqsTarget, Arc<OnceCell<Client>>>>,
    /// SQS queue name -> queue URL.
    urls: Mutex<HashMap<String, String>>,
}

impl SqsBroker {
    /// Builds the broker; the AWS client itself is built on first use.
    pub fn new(target: SqsTarget, settings: &ClientSettings) -> Result<Self> {
        Ok(SqsBroker {
            target,
            timeout: settings.timeout,
            clients: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
        })
    }

    fn region(target: &SqsTarget) -> String {
        target
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
            .or_else(|| {
                std::env::var("AWS_DEFAULT_REGION")
                    .ok()
                    .filter(|r| !r.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_REGION.to_string())
    }

    /// The client of `target` (built on first use).
    async fn client(&self, target: &SqsTarget) -> Client {
        let cell = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(target.clone())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let timeouts = aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                .connect_timeout(self.timeout)
                .operation_timeout(self.timeout)
                .build();
            let retry = aws_sdk_sqs::config::retry::RetryConfig::standard().with_max_attempts(2);
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(Self::region(target)))
                .timeout_config(timeouts)
                .retry_config(retry);
            if let Some((id, secret)) = &target.access_key {
                loader = loader.credentials_provider(Credentials::new(
                    id.clone(),
                    secret.expose().to_string(),
                    None,
                    None,
                    "celery-keda-scaler broker URL",
                ));
            }
            if let Some(endpoint) = &target.endpoint {
                loader = loader.endpoint_url(endpoint.clone());
            }
            Client::new(&loader.load().await)
        })
        .await
        .clone()
    }

    /// Where a predefined queue is read: its own keys and region when it has them (else the
    /// broker's; `awsRegion` before the region its URL names), at the broker's endpoint when
    /// one is set (as kombu sends every request there), else at the URL's own host.
    fn predefined_target(&self, q: &PredefinedQueue) -> SqsTarget {
        SqsTarget {
            region: q
                .region
                .clone()
                .or_else(|| self.target.region.clone())
                .or_else(|| q.url_region.clone()),
            endpoint: self
                .target
                .endpoint
                .clone()
                .or_else(|| Some(q.endpoint.clone())),
            access_key: q
                .access_key
                .clone()
                .or_else(|| self.target.access_key.clone()),
        }
    }

    fn convert<E, R>(
        &self,
        err: SdkError<E, R>,
        (celery, sqs): (&str, &str),
        target: &SqsTarget,
    ) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let secret = target.access_key.as_ref().map(|(_, s)| s);
        let text = scrub(&DisplayErrorContext(&err).to_string(), secret);
        let msg = format!(
            "SQS {}: queue `{sqs}` (Celery queue `{celery}`): {text}",
            target.redacted()
        );
        match &err {
            SdkError::TimeoutError(_) => Error::DeadlineExceeded(msg),
            SdkError::DispatchFailure(f) if f.is_timeout() => Error::DeadlineExceeded(msg),
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
                if text.contains("credentials") {
                    Error::Unauthenticated(msg)
                } else {
                    Error::Unavailable(msg)
                }
            }
            SdkError::ServiceError(service) => match service.err().code().unwrap_or_default() {
                "AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist" => {
                    Error::NotFound(format!(
                        "SQS queue `{sqs}` (Celery queue `{celery}`) does not exist ({})",
                        target.redacted()
                    ))
                }
                "InvalidClientTokenId"
                | "UnrecognizedClientException"
                | "SignatureDoesNotMatch"
                | "InvalidSignatureException"
                | "MissingAuthenticationToken"
                | "ExpiredToken"
                | "IncompleteSignature" => Error::Unauthenticated(msg),
                "AccessDenied" | "AccessDeniedException" | "AuthorizationError" => {
                    Error::PermissionDenied(msg)
                }
                "Throttling"
                | "ThrottlingException"
                | "RequestThrottled"
                | "ServiceUnavailable" => Error::Unavailable(msg),
                _ => Error::Internal(msg),
            },
            _ => Error::Internal(msg),
        }
    }

    async fn queue_url(&self, celery: &str, sqs: &str) -> Result<String> {
        if let Some(url) = self.urls.lock().unwrap_or_else(|e| e.into_inner()).get(sqs) {
            return Ok(url.clone());
        }
        let out = self
            .client(&self.target)
            .await
            .get_queue_url()
            .queue_name(sqs)
            .send()
            .await
            .map_err(|e| self.convert(e, (celery, sqs), &self.target))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::Internal(format!("SQS returned no URL for queue `{sqs}`")))?
            .to_string();
        self.urls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sqs.to_string(), url.clone());
        Ok(url)
    }

    async fn read(&self, layout: &SqsLayout, celery: &str, in_flight: bool) -> Result<QueueDepth> {
        // A predefined queue is read at its URL (no lookup by name), with its own client.
        let (target, sqs, url, predefined) = match layout.predefined.get(celery) {
            Some(q) => {
                let name = q.url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
                (
                    self.predefined_target(q),
                    name.to_string(),
                    q.url.clone(),
                    true,
                )
            }
            None => {
                let sqs = sqs_queue_name(&layout.queue_name_prefix, celery);
                let url = self.queue_url(celery, &sqs).await?;
                (self.target.clone(), sqs, url, false)
            }
        };
        let mut request = self
            .client(&target)
            .await
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages);
        if in_flight {
            request =
                request.attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        }
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) => {
                let err = self.convert(e, (celery, &sqs), &target);
                if matches!(err, Error::NotFound(_)) && !predefined {
                    // Deleted (or recreated under a new URL): resolve it again next time.
                    self.urls
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&sqs);
                }
                return Err(err);
            }
        };
        let attrs = out.attributes();
        let number = |name: QueueAttributeName| -> Result<u64> {
            let raw = attrs.and_then(|a| a.get(&name)).ok_or_else(|| {
                Error::Internal(format!(
                    "SQS returned no {} for queue `{sqs}`",
                    name.as_str()
                ))
            })?;
            raw.parse().map_err(|_| {
                Error::Internal(format!(
                    "SQS returned {} = `{raw}` for queue `{sqs}`",
                    name.as_str()
                ))
            })
        };
        let ready = number(QueueAttributeName::ApproximateNumberOfMessages)?;
        let not_visible = if in_flight {
            number(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?
        } else {
            0
        };
        Ok(QueueDepth {
            queue: celery.to_string(),
            ready: vec![ReadyPart {
                source: format!("{sqs} (ApproximateNumberOfMessages)"),
                priority: None,
                count: ready,
            }],
            in_flight: not_visible,
            running_workers: Vec::new(),
        })
    }
}

#[async_trait]
impl Broker for SqsBroker {
    type Layout = SqsLayout;

    async fn depth(&self, layout: &SqsLayout, queues: &[String], in_flight: bool) -> Result<Depth> {
        let queues =
            futures::future::try_join_all(queues.iter().map(|q| self.read(layout, q, in_flight)))
                .await?;
        Ok(Depth {
            queues,
            unresolved: Vec::new(),
            answered_by: None,
        })
    }

    /// SQS has no worker remote control: `scaleOnRunning` has no effect there.
    async fn census(&self, _layout: &SqsLayout, _window: Duration) -> Result<Option<Census>> {
        Ok(None)
    }
}
