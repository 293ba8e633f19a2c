//! The RabbitMQ backend: ready counts by passive `queue.declare` over one shared AMQP connection
//! per broker (re-established after a failure), in-flight counts (`messages_unacknowledged`) from
//! the management HTTP API.

mod routing;
mod target;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{AMQPUriTcpExt, OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

pub use target::{AmqpTls, Management, RabbitTarget, MANAGEMENT_PORT};

pub use routing::{BindingRow, ExchangeRow, Routes};

use super::census::{new_oid, request, Census, Command, Tickets, MAILBOX, REPLY_EXCHANGE};
use super::{Broker, ClientSettings, Depth, DepthQuery, Layout, QueueDepth, ReadyPart};
use crate::error::{Error, Result};
use crate::secret::{redact_urls, scrub};

/// Trigger options for RabbitMQ: where the management API is.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RabbitLayout {
    /// Management API, from `managementUrl` or derived from the AMQP URL.
    pub management: Management,
}

/// A RabbitMQ client shared by every trigger naming the same [`RabbitTarget`].
pub struct RabbitBroker {
    target: RabbitTarget,
    timeout: Duration,
    /// The connection and a channel on it, opened on first use and after a failure.
    amqp: Mutex<Amqp>,
    http: reqwest::Client,
    /// The vhost's exchanges and bindings, and when they were read.
    routes: Mutex<Option<(tokio::time::Instant, Arc<Routes>)>>,
}

/// The reply queue's `x-expires`: Celery's `control_queue_expires` default (10 s).
const REPLY_QUEUE_EXPIRES_MS: u32 = 10_000;
/// The reply queue's `x-message-ttl`: Celery's `control_queue_ttl` default (300 s).
const REPLY_MESSAGE_TTL_MS: u32 = 300_000;

#[derive(Default)]
struct Amqp {
    connection: Option<Connection>,
    channel: Option<Channel>,
    /// A second channel for remote control, so its failures never close the depth channel.
    census: Option<Channel>,
}

impl Amqp {
    /// The cached channel for depth readings, or for the census.
    fn slot(&mut self, census: bool) -> &mut Option<Channel> {
        if census {
            &mut self.census
        } else {
            &mut self.channel
        }
    }
}

/// Where an AMQP error happened: a refusal while connecting means bad credentials.
#[derive(Clone, Copy)]
enum Stage {
    Connect,
    Query,
}

impl RabbitBroker {
    /// Builds the client without connecting.
    pub fn new(target: RabbitTarget, settings: &ClientSettings) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(RabbitBroker {
            target,
            timeout: settings.timeout,
            amqp: Mutex::new(Amqp::default()),
            http,
            routes: Mutex::new(None),
        })
    }

    fn uri(&self) -> AMQPUri {
        let t = &self.target;
        AMQPUri {
            scheme: if t.tls.is_some() {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: t.username.clone(),
                    password: t.password.expose().to_string(),
                },
                host: t.host.clone(),
                port: t.port,
            },
            vhost: t.vhost.clone(),
            query: AMQPQueryString {
                connection_timeout: Some(self.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
                heartbeat: Some(30),
                ..AMQPQueryString::default()
            },
        }
    }

    fn tls_config(&self) -> Result<OwnedTLSConfig> {
        let Some(tls) = &self.target.tls else {
            return Ok(OwnedTLSConfig::default());
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                Error::Unavailable(format!(
                    "RabbitMQ broker {}: cannot read {}: {e}",
                    self.target.redacted(),
                    p.display()
                ))
            })
        };
        let cert_chain = match &tls.ca_certs {
            Some(p) => Some(String::from_utf8_lossy(&read(p)?).into_owned()),
            None => None,
        };
        let identity = match &tls.client_cert {
            Some((cert, key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            None => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    /// A usable channel: the cached one, or a new one (on a new connection if needed).
    async fn channel(&self) -> Result<Channel> {
        self.channel_in(false).await
    }

    async fn channel_in(&self, census: bool) -> Result<Channel> {
        let mut amqp = self.amqp.lock().await;
        if let Some(ch) = amqp.slot(census).as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *amqp.slot(census) = None;
        let alive = amqp
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !alive {
            if let Some(old) = amqp.connection.take() {
                tokio::spawn(async move {
                    let _ = old.close(200, "reconnecting".into()).await;
                });
            }
            let runtime =
                lapin::runtime::default_runtime().map_err(|e| self.convert(e, Stage::Connect))?;
            let props =
                ConnectionProperties::default().with_connection_name("celery-keda-scaler".into());
            // The transport (TCP, TLS) is set up here and handed to lapin, not set up by lapin:
            // when lapin's own transport connect fails, its connection's internal RPC task is
            // never stopped (one leaked task per failed attempt, every poll of an outage).
            let uri = self.uri();
            let tls = self.tls_config()?;
            let stream = uri
                .connect_with_config_async(tls.as_ref(), &runtime)
                .await
                .map_err(|e| self.convert(e.into(), Stage::Connect))?;
            // A handshake abandoned at the deadline (a server that accepts and stays silent)
            // would keep its socket, I/O thread and tasks for as long as the server says
            // nothing: unless the handshake completes, the socket is shut down, which ends them.
            let socket = match &stream {
                lapin::AsyncTcpStream::Plain(s) => Some(s.get_ref().as_fd()),
                lapin::AsyncTcpStream::Rustls(s) => Some(s.get_ref().0.get_ref().as_fd()),
                _ => None,
            };
            let socket = socket.and_then(|fd| fd.try_clone_to_owned().ok());
            let mut abandoned = ShutdownOnDrop(socket.map(std::net::TcpStream::from));
            let stream = std::sync::Mutex::new(Some(stream));
            let connect = async move |_: AMQPUri, _| {
                stream
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected).into())
            };
            let connection = Connection::connector(uri, runtime, connect, props)
                .await
                .map_err(|e| self.convert(e, Stage::Connect))?;
            abandoned.0 = None;
            amqp.connection = Some(connection);
        }
        let connection = amqp.connection.as_ref().expect("set above");
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.convert(e, Stage::Connect))?;
        *amqp.slot(census) = Some(channel.clone());
        Ok(channel)
    }

    /// `inspect active` and `active_queues` over kombu's AMQP pidbox. Without the
    /// `celery.pidbox` exchange no worker ever listened in this vhost: the census is empty and
    /// declares nothing. Otherwise the mailbox exchanges and this process's reply queue are
    /// declared as Celery's own `inspect` declares them (the queue exclusive and auto-delete,
    /// `x-expires` 10 s, `x-message-ttl` 300 s), so the queue goes with the connection and
    /// nothing of it outlives the process. Tasks that came through a named exchange are
    /// attributed to queues through the vhost's bindings (management API).
    async fn inspect_active(&self, layout: &RabbitLayout, window: Duration) -> Result<Census> {
        if !self.mailbox_exists().await? {
            return Ok(Census::default());
        }
        let result = self.broadcast(window).await;
        if result.is_err() {
            self.amqp.lock().await.census = None;
        }
        let mut census = result?;
        let routed = |c: &Census| c.tasks.iter().any(|t| !t.exchange.is_empty());
        let routes = if routed(&census) {
            let mut routes = self.routes(&layout.management, false).await?;
            if census.tasks.iter().any(|t| !routes.knows(&t.exchange)) {
                // An exchange declared since the routes were read.
                routes = self.routes(&layout.management, true).await?;
            }
            routes
        } else {
            // Every task came through the default exchange: no binding to read.
            Arc::new(Routes::default())
        };
        census.resolve(|ex, rk| routes.route(ex, rk));
        Ok(census)
    }

    /// Whether the `celery.pidbox` exchange exists (a passive declare, which writes nothing).
    async fn mailbox_exists(&self) -> Result<bool> {
        use lapin::options::ExchangeDeclareOptions;
        let ch = self.channel_in(true).await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match ch
            .exchange_declare(
                MAILBOX.into(),
                lapin::ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                // The broker closes the channel on a failed passive declare.
                self.amqp.lock().await.census = None;
                match self.convert(e, Stage::Query) {
                    Error::NotFound(_) => Ok(false),
                    other => Err(other),
                }
            }
        }
    }

    /// Declares a reply queue of its own (a fresh reply id per census, so that censuses of
    /// several layouts on one broker never take each other's replies), broadcasts both commands,
    /// collects the replies that arrive within `window`, and deletes the queue.
    async fn broadcast(&self, window: Duration) -> Result<Census> {
        use lapin::options::{
            BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
            QueueDeleteOptions,
        };
        use lapin::types::{AMQPValue, ShortString};
        use lapin::{BasicProperties, ExchangeKind};
        let ch = self.channel_in(true).await?;
        let conv = |e| self.convert(e, Stage::Query);
        // kombu declares both exchanges transient (durable=False).
        let transient = ExchangeDeclareOptions::default();
        ch.exchange_declare(
            MAILBOX.into(),
            ExchangeKind::Fanout,
            transient,
            FieldTable::default(),
        )
        .await
        .map_err(conv)?;
        ch.exchange_declare(
            REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            transient,
            FieldTable::default(),
        )
        .await
        .map_err(conv)?;
        let oid = new_oid();
        let queue = format!("{oid}.{REPLY_EXCHANGE}");
        // Celery's `control_queue_expires` (10 s) and `control_queue_ttl` (300 s) defaults.
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(REPLY_QUEUE_EXPIRES_MS),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongUInt(REPLY_MESSAGE_TTL_MS),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(conv)?;
        ch.queue_bind(
            queue.as_str().into(),
            REPLY_EXCHANGE.into(),
            oid.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(conv)?;
        let tickets = Tickets::new();
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
            + window.as_secs_f64();
        for command in Command::ALL {
            let mut headers = FieldTable::default();
            headers.insert("clock".into(), AMQPValue::LongLongInt(1));
            headers.insert("expires".into(), AMQPValue::Double(expires));
            let props = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_content_encoding(ShortString::from("utf-8"))
                .with_delivery_mode(1)
                .with_headers(headers);
            ch.basic_publish(
                MAILBOX.into(),
                "".into(),
                BasicPublishOptions::default(),
                &request(command, tickets.of(command), &oid),
                props,
            )
            .await
            .map_err(conv)?;
        }
        tokio::time::sleep(window).await;
        let mut census = Census::default();
        while let Some(msg) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(conv)?
        {
            let ticket = msg
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("ticket").cloned())
                .and_then(|t| match t {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
                    _ => None,
                });
            if let Some(ticket) = ticket {
                tickets.add(&mut census, &ticket, &msg.delivery.data);
            }
        }
        // As kombu's clients end: the queue goes now, not with the connection (a census cut
        // short leaves it to the connection's end or its 10 s expiry).
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(conv)?;
        Ok(census)
    }

    fn convert(&self, err: lapin::Error, stage: Stage) -> Error {
        let broker = self.target.redacted();
        let text = scrub(&err.to_string(), Some(&self.target.password));
        let msg = format!("RabbitMQ broker {broker}: {text}");
        match err.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => match (amqp.kind(), stage) {
                (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), Stage::Connect) => {
                    Error::Unauthenticated(msg)
                }
                (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), Stage::Query)
                | (AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED), _) => {
                    Error::PermissionDenied(msg)
                }
                (AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), _) => Error::NotFound(msg),
                (AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED), _) => {
                    Error::Unavailable(msg)
                }
                _ => Error::Internal(msg),
            },
            lapin::ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                Error::DeadlineExceeded(msg)
            }
            lapin::ErrorKind::IOError(_)
            | lapin::ErrorKind::MissingHeartbeatError
            | lapin::ErrorKind::InvalidConnectionState(_)
            | lapin::ErrorKind::InvalidChannelState(..)
            | lapin::ErrorKind::RuntimeShutdownError(_) => Error::Unavailable(msg),
            _ => Error::Internal(msg),
        }
    }

    async fn ready(&self, queue: &str) -> Result<u64> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
        {
            Ok(q) => Ok(u64::from(q.message_count())),
            Err(e) => {
                // The broker closes the channel on a failed passive declare: open a fresh one next time.
                self.amqp.lock().await.channel = None;
                Err(match self.convert(e, Stage::Query) {
                    Error::NotFound(_) => Error::NotFound(format!(
                        "RabbitMQ queue `{queue}` does not exist in vhost `{}` ({})",
                        self.target.vhost,
                        self.target.redacted()
                    )),
                    other => other,
                })
            }
        }
    }

    async fn unacked(&self, management: &Management, queue: &str) -> Result<u64> {
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
        let shown = crate::secret::redact_url(management.base.as_str());
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
    async fn routes(&self, management: &Management, fresh: bool) -> Result<Arc<Routes>> {
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
                crate::secret::redact_url(management.base.as_str())
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

/// Shuts its socket down when dropped, unless emptied first.
struct ShutdownOnDrop(Option<std::net::TcpStream>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        if let Some(socket) = self.0.take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

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

#[async_trait]
impl Broker for RabbitBroker {
    async fn census(&self, layout: &Layout, window: Duration) -> Result<Option<Census>> {
        let Layout::RabbitMq(layout) = layout else {
            return Err(Error::Internal(
                "RabbitMQ broker given a layout of another broker".into(),
            ));
        };
        self.inspect_active(layout, window).await.map(Some)
    }

    async fn depth(&self, query: &DepthQuery) -> Result<Depth> {
        let Layout::RabbitMq(layout) = &query.layout else {
            return Err(Error::Internal(
                "RabbitMQ broker given a query for another broker".into(),
            ));
        };
        // One after the other: a missing queue closes the channel, and its NOT_FOUND must be the
        // error reported, not a closed-channel error of a concurrent declare.
        let ready = async {
            let mut counts = Vec::with_capacity(query.queues.len());
            for q in &query.queues {
                counts.push(self.ready(q).await?);
            }
            Ok::<_, Error>(counts)
        };
        let unacked = async {
            if query.in_flight {
                futures::future::try_join_all(
                    query
                        .queues
                        .iter()
                        .map(|q| self.unacked(&layout.management, q)),
                )
                .await
            } else {
                Ok(vec![0; query.queues.len()])
            }
        };
        // Both run to the end, and the AMQP error wins: the same outage must give the same code
        // (the management API of a node whose AMQP port is down may answer 401 or not at all).
        let (ready, unacked) = futures::future::join(ready, unacked).await;
        let (ready, unacked) = (ready?, unacked?);
        Ok(Depth {
            queues: query
                .queues
                .iter()
                .zip(ready.into_iter().zip(unacked))
                .map(|(queue, (ready, in_flight))| QueueDepth {
                    queue: queue.clone(),
                    ready: vec![ReadyPart {
                        source: format!("{queue} (messages ready)"),
                        priority: None,
                        count: ready,
                    }],
                    in_flight,
                    running_workers: Vec::new(),
                })
                .collect(),
            unresolved: Vec::new(),
        })
    }
}
