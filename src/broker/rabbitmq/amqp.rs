//! The RabbitMQ client and its AMQP side: one connection per broker with a channel for depth
//! readings and one for the census (re-established after a failure), ready counts by passive
//! `queue.declare`, and AMQP errors mapped to meanings.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{AMQPUriTcpExt, OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::routing::Routes;
use super::target::{Management, RabbitLayout, RabbitTarget};
use crate::broker::failover::{did_not_answer, none_answered, share, Rotation};
use crate::broker::reading::ClientSettings;
use crate::error::{Error, Result};
use crate::secret::scrub;

/// A RabbitMQ client shared by every trigger naming the same [`RabbitTarget`].
pub struct RabbitBroker {
    pub(super) target: RabbitTarget,
    timeout: Duration,
    /// The host of a failover list that answered last: new connections start from it.
    rotation: Rotation,
    /// The connection and a channel on it, opened on first use and after a failure.
    pub(super) amqp: Mutex<Amqp>,
    pub(super) http: reqwest::Client,
    /// The vhost's exchanges and bindings, and when they were read.
    pub(super) routes: Mutex<Option<(tokio::time::Instant, Arc<Routes>)>>,
}

#[derive(Default)]
pub(super) struct Amqp {
    connection: Option<Connection>,
    pub(super) channel: Option<Channel>,
    /// A second channel for remote control, so its failures never close the depth channel.
    pub(super) census: Option<Channel>,
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
pub(super) enum Stage {
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
            rotation: Rotation::new(target.hosts.len()),
            target,
            timeout: settings.timeout,
            amqp: Mutex::new(Amqp::default()),
            http,
            routes: Mutex::new(None),
        })
    }

    /// The URI of host `i` of the list, with `connect` as its connection timeout.
    fn uri(&self, i: usize, connect: Duration) -> AMQPUri {
        let t = &self.target;
        let (host, port) = t.host(i);
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
                host: host.to_string(),
                port,
            },
            vhost: t.vhost.clone(),
            query: AMQPQueryString {
                connection_timeout: Some(connect.as_millis().try_into().unwrap_or(u64::MAX)),
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

    pub(super) async fn channel_in(&self, census: bool) -> Result<Channel> {
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
            amqp.connection = Some(self.connect_first_answering().await?);
        }
        let Some(connection) = amqp.connection.as_ref() else {
            return Err(Error::Internal(
                "no AMQP connection after connecting".into(),
            ));
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.convert(e, Stage::Connect))?;
        *amqp.slot(census) = Some(channel.clone());
        Ok(channel)
    }

    /// Whether a connection is open (as far as the client knows).
    pub(super) async fn connected(&self) -> bool {
        let amqp = self.amqp.lock().await;
        amqp.connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Drops the connection and its channels (closed in the background): the next use opens a
    /// new one.
    pub(super) async fn forget_connection(&self) {
        let mut amqp = self.amqp.lock().await;
        amqp.channel = None;
        amqp.census = None;
        if let Some(old) = amqp.connection.take() {
            tokio::spawn(async move {
                let _ = old.close(200, "reconnecting".into()).await;
            });
        }
    }

    /// A new connection to the first host that answers, in kombu's failover order (from the
    /// host that answered last, on through the list); each host of a list gets an equal share
    /// of the deadline. A host that answers with an error (refused credentials) ends the search
    /// with that error.
    async fn connect_first_answering(&self) -> Result<Connection> {
        let each = share(self.timeout, self.target.hosts.len());
        let mut errors = Vec::new();
        for i in self.rotation.order() {
            // Connect and handshake together within the host's share.
            let attempt = match tokio::time::timeout(each, self.connect(i, each)).await {
                Ok(result) => result,
                Err(_) => Err(Error::DeadlineExceeded(format!(
                    "RabbitMQ broker {}: no AMQP connection within {each:?}",
                    self.target.redacted_host(i)
                ))),
            };
            match attempt {
                Ok(connection) => {
                    self.rotation.answered(i);
                    return Ok(connection);
                }
                Err(e) if did_not_answer(&e) && self.target.hosts.len() > 1 => errors.push(e),
                Err(e) => {
                    self.rotation.answered(i);
                    return Err(e);
                }
            }
        }
        Err(none_answered(errors))
    }

    /// A new connection to host `i` of the list (`timeout`: its TCP connect timeout; the caller
    /// bounds the whole).
    async fn connect(&self, i: usize, timeout: Duration) -> Result<Connection> {
        let fail = |e: lapin::Error| self.convert_at(i, e, Stage::Connect);
        let runtime = lapin::runtime::default_runtime().map_err(fail)?;
        let props =
            ConnectionProperties::default().with_connection_name("celery-keda-scaler".into());
        // The transport (TCP, TLS) is set up here and handed to lapin, not set up by lapin:
        // when lapin's own transport connect fails, its connection's internal RPC task is
        // never stopped (one leaked task per failed attempt, every poll of an outage).
        let uri = self.uri(i, timeout);
        let tls = self.tls_config()?;
        let stream = uri
            .connect_with_config_async(tls.as_ref(), &runtime)
            .await
            .map_err(|e| fail(e.into()))?;
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
            .map_err(fail)?;
        abandoned.0 = None;
        Ok(connection)
    }

    /// The host of a failover list that answered last, as a URL for people; `None` for a
    /// single host.
    pub(super) fn answered_by(&self) -> Option<String> {
        (self.target.hosts.len() > 1).then(|| self.target.redacted_host(self.rotation.current()))
    }

    /// The management API of the host that answered last (or `managementUrl`).
    pub(super) fn management<'a>(&self, layout: &'a RabbitLayout) -> Result<&'a Management> {
        layout
            .management
            .for_host(self.rotation.current())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "RabbitMQ broker {}: no management API for the host that answered",
                    self.target.redacted()
                ))
            })
    }

    pub(super) fn convert(&self, err: lapin::Error, stage: Stage) -> Error {
        self.convert_at(self.rotation.current(), err, stage)
    }

    /// [`RabbitBroker::convert`] for an error of host `i` of the list.
    fn convert_at(&self, i: usize, err: lapin::Error, stage: Stage) -> Error {
        let broker = self.target.redacted_host(i);
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

    pub(super) async fn ready(&self, queue: &str) -> Result<u64> {
        self.declare(queue).await.map(|(ready, _)| ready)
    }

    /// One passive `queue.declare`: the queue's ready messages and consumers (`declare-ok`).
    pub(super) async fn declare(&self, queue: &str) -> Result<(u64, u32)> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
        {
            Ok(q) => Ok((u64::from(q.message_count()), q.consumer_count())),
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
}

/// Shuts its socket down when dropped, unless emptied first.
struct ShutdownOnDrop(Option<std::net::TcpStream>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        if let Some(socket) = self.0.take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}
