//! The RabbitMQ management HTTP API: in-flight counts (`messages_unacknowledged`) and the
//! vhost's exchanges and bindings, with HTTP failures mapped to meanings.

use std::sync::Arc;
use std::time::Duration;

use super::amqp::RabbitBroker;
use super::routing::Routes;
use super::target::Management;
use crate::error::{Error, Result};
use crate::secret::{redact_url, redact_urls};

impl RabbitBroker {
    pub(super) async fn unacked(&self, management: &Management, queue: &str) -> Result<u64> {
        let url = management.queue_url(&self.target.vhost, queue);
        let body = self
            .management_get(
                management,
                url,
                &format!("queue `{queue}`"),
                ("count in-flight tasks", "scaleOnInFlight"),
            )
            .await?;
        // A queue whose statistics have not been emitted yet has no such field: nothing unacked.
        Ok(body
            .get("messages_unacknowledged")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0))
    }

    /// `GET url` on the management API, about `what` (for messages: "queue `q`"), needed to
    /// `purpose` (for messages: "count in-flight tasks"). HTTP failures mapped to meanings.
    async fn management_get(
        &self,
        management: &Management,
        url: reqwest::Url,
        what: &str,
        (purpose, switch): (&str, &str),
    ) -> Result<serde_json::Value> {
        let shown = redact_url(management.base.as_str());
        let hint = format!("set managementUrl to the management API (port 15672, plugin rabbitmq_management) or {switch}: \"false\"");
        let resp = self
            .http
            .get(url)
            .basic_auth(&management.username, Some(management.password.expose()))
            .send()
            .await
            .map_err(|e| {
                let failed = if e.is_timeout() { "did not answer in time" } else { "cannot be reached" };
                let msg = format!(
                    "RabbitMQ management API {shown} {failed} ({}); it is needed to {purpose}: {hint}",
                    redact_urls(&without_url(&e))
                );
                if e.is_timeout() {
                    Error::DeadlineExceeded(msg)
                } else {
                    Error::Unavailable(msg)
                }
            })?;
        let status = resp.status();
        let who = &management.username;
        let vhost = &self.target.vhost;
        match status.as_u16() {
            200 => {}
            401 => {
                return Err(Error::Unauthenticated(format!(
                    "RabbitMQ management API {shown} refused user `{who}` (401): wrong credentials, or the user has neither the `monitoring` nor the `management` tag; or {hint}"
                )))
            }
            403 => {
                return Err(Error::PermissionDenied(format!(
                    "RabbitMQ management API {shown}: user `{who}` may not read {what} in vhost `{vhost}` (403): it needs the `monitoring` tag and read access to the vhost"
                )))
            }
            404 => {
                return Err(Error::NotFound(format!(
                    "RabbitMQ {what} does not exist in vhost `{vhost}` (management API {shown})"
                )))
            }
            code => {
                return Err(Error::Unavailable(format!(
                    "RabbitMQ management API {shown} answered HTTP {code} for {what}"
                )))
            }
        }
        resp.json().await.map_err(|e| {
            Error::Internal(format!(
                "RabbitMQ management API {shown}: unreadable answer for {what}: {}",
                without_url(&e)
            ))
        })
    }

    /// The vhost's exchanges and bindings, at most [`ROUTES_TTL`] old (`fresh`: read now).
    pub(super) async fn routes(&self, management: &Management, fresh: bool) -> Result<Arc<Routes>> {
        if let Some((at, routes)) = self.routes.lock().await.as_ref() {
            if !fresh && at.elapsed() < ROUTES_TTL {
                return Ok(routes.clone());
            }
        }
        let vhost = &self.target.vhost;
        let purpose = (
            "find the queue each running task came from",
            "scaleOnRunning",
        );
        let (exchanges, bindings) = futures::future::try_join(
            self.management_get(
                management,
                management.exchanges_url(vhost),
                "the exchange list",
                purpose,
            ),
            self.management_get(
                management,
                management.bindings_url(vhost),
                "the binding list",
                purpose,
            ),
        )
        .await?;
        let unreadable = |e: serde_json::Error| {
            Error::Internal(format!(
                "RabbitMQ management API {}: unreadable exchange or binding list: {e}",
                redact_url(management.base.as_str())
            ))
        };
        let routes = Arc::new(Routes::new(
            serde_json::from_value(exchanges).map_err(unreadable)?,
            serde_json::from_value(bindings).map_err(unreadable)?,
        ));
        *self.routes.lock().await = Some((tokio::time::Instant::now(), routes.clone()));
        Ok(routes)
    }
}

/// How long the vhost's exchanges and bindings are reused: Celery declares its routing once at
/// worker start, and a census every few seconds need not list them every time.
const ROUTES_TTL: Duration = Duration::from_secs(10);

/// A reqwest error's text without the request URL (which has no credentials, but is noise).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.replace(" ()", "").replace("  ", " ")
}
