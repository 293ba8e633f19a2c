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
use super::target::RabbitTarget;
use crate::broker::reading::ClientSettings;
use crate::error::{Error, Result};
use crate::secret::scrub;

/// A RabbitMQ client shared by every trigger naming the same [`RabbitTarget`].
pub struct RabbitBroker {
    pub(super) target: RabbitTarget,
    timeout: Duration,
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

    pub(super) fn convert(&self, err: lapin::Error, stage: Stage) -> Error {
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

    pub(super) async fn ready(&self, queue: &str) -> Result<u64> {
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
