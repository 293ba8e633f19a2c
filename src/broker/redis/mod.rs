//! The Redis backend: Celery's kombu layout read with pipelined commands over one shared,
//! self-reconnecting connection per broker (plain, TLS, Unix socket, or Sentinel-managed).

mod layout;
mod pidbox;
mod sentinel;
mod target;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::Mutex;

pub use crate::broker::census::topic_matches;
pub use layout::{
    printable, route, unacked_routing, unescape, Binding, RedisLayout, DEFAULT_PRIORITY_STEPS,
    DEFAULT_SEPARATOR,
};
pub use target::{RedisAddr, RedisTarget, TlsSettings};

use super::census::{new_oid, Census, Command, Tickets, MAILBOX, REPLY_EXCHANGE};
use super::{Broker, ClientSettings, Depth, DepthQuery, Layout, QueueDepth, ReadyPart};
use crate::error::{Error, Result};
use crate::secret::{redact_urls, scrub};

/// How the connection to the server is obtained.
enum Source {
    /// A fixed address: the manager reconnects to it by itself.
    Direct(ConnectionManager),
    /// A Sentinel-managed master: looked up on first use and again after a connection error,
    /// so a failover moves the scaler to the new master.
    Sentinel {
        lookup: MasterLookup,
        current: Mutex<Option<ConnectionManager>>,
    },
}

/// How a Sentinel-managed master is looked up.
enum MasterLookup {
    /// The redis crate's client: named and default brokers, and inline triggers without a host
    /// allowlist.
    Crate(Box<Mutex<SentinelClient>>),
    /// The scaler's own lookup, which checks the reported master before any connection to it:
    /// inline triggers under a host allowlist.
    Checked(Box<sentinel::CheckedSentinel>),
}

/// A Redis broker client, shared by every trigger that names the same [`RedisTarget`].
pub struct RedisBroker {
    target: RedisTarget,
    source: Source,
    config: ConnectionManagerConfig,
}

impl RedisBroker {
    /// Builds the client without connecting: the first query connects.
    pub fn new(target: RedisTarget, settings: &ClientSettings) -> Result<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redacted = target.redacted();
        let fail = |e: redis::RedisError| convert(&redacted, &target, e);
        let redis_info = {
            let mut info = RedisConnectionInfo::default().set_db(target.db);
            if let Some(user) = &target.username {
                info = info.set_username(user);
            }
            if let Some(pw) = &target.password {
                info = info.set_password(pw.expose());
            }
            info
        };
        let source = match &target.addr {
            RedisAddr::Sentinel {
                nodes,
                master,
                check,
            } => {
                let master = master.as_deref().ok_or_else(|| {
                    Error::invalid(
                        "sentinelMaster",
                        "is required with a sentinel:// broker URL (kombu's master_name)",
                    )
                })?;
                let lookup = if let Some(check) = check {
                    MasterLookup::Checked(Box::new(sentinel::CheckedSentinel {
                        nodes: nodes.clone(),
                        master: master.to_string(),
                        check: check.clone(),
                        redis: redis_info,
                        timeout: settings.timeout,
                    }))
                } else {
                    let addrs = nodes
                        .iter()
                        .map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p));
                    let mut builder =
                        SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                            .map_err(fail)?
                            .set_client_to_redis_db(target.db);
                    if let Some(user) = &target.username {
                        builder = builder.set_client_to_redis_username(user);
                    }
                    if let Some(pw) = &target.password {
                        builder = builder.set_client_to_redis_password(pw.expose());
                    }
                    MasterLookup::Crate(Box::new(Mutex::new(builder.build().map_err(fail)?)))
                };
                Source::Sentinel {
                    lookup,
                    current: Mutex::new(None),
                }
            }
            addr => {
                let client = build_client(addr, redis_info, &redacted)?;
                Source::Direct(
                    ConnectionManager::new_lazy_with_config(client, config.clone())
                        .map_err(fail)?,
                )
            }
        };
        Ok(RedisBroker {
            target,
            source,
            config,
        })
    }

    async fn connection(&self) -> Result<ConnectionManager> {
        let (lookup, current) = match &self.source {
            Source::Direct(manager) => return Ok(manager.clone()),
            Source::Sentinel { lookup, current } => (lookup, current),
        };
        let mut current = current.lock().await;
        if let Some(conn) = current.as_ref() {
            return Ok(conn.clone());
        }
        let manager = match lookup {
            MasterLookup::Crate(sentinel) => {
                let client = sentinel
                    .lock()
                    .await
                    .async_get_client()
                    .await
                    .map_err(|e| self.convert(e))?;
                ConnectionManager::new_lazy_with_config(client, self.config.clone())
                    .map_err(|e| self.convert(e))?
            }
            MasterLookup::Checked(lookup) => lookup.master(&self.config, &self.target).await?,
        };
        *current = Some(manager.clone());
        Ok(manager)
    }

    /// After a connection-level failure, forget a Sentinel-resolved master.
    async fn forget_master(&self, err: &redis::RedisError) {
        if let Source::Sentinel { current, .. } = &self.source {
            if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() {
                *current.lock().await = None;
            }
        }
    }

    fn unexpected(&self, err: impl std::fmt::Display) -> Error {
        Error::Internal(format!(
            "Redis broker {}: unexpected reply: {}",
            self.target.redacted(),
            redact_urls(&err.to_string())
        ))
    }

    fn convert(&self, err: redis::RedisError) -> Error {
        convert(&self.target.redacted(), &self.target, err)
    }

    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        // The manager answers with the outcome of its last reconnect attempt and only then starts
        // a new one. A refusal can be that stale outcome from while the server was down (nothing
        // was sent), so one retry waits for the fresh attempt: without it the first reading after
        // the server returns fails.
        let mut retried = false;
        loop {
            let mut conn = self.connection().await?;
            match pipe.query_async(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.forget_master(&e).await;
                    if e.is_connection_refusal() && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(self.convert(e));
                }
            }
        }
    }
}

fn build_client(
    addr: &RedisAddr,
    redis_info: RedisConnectionInfo,
    redacted: &str,
) -> Result<Client> {
    let unavailable = |what: String| Error::Unavailable(format!("Redis broker {redacted}: {what}"));
    let conn_addr = match addr {
        RedisAddr::Tcp { host, port } => ConnectionAddr::Tcp(host.clone(), *port),
        RedisAddr::Tls { host, port, tls } => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: !tls.verify,
            tls_params: None,
        },
        RedisAddr::Unix { path } => ConnectionAddr::Unix(path.clone()),
        RedisAddr::Sentinel { .. } => {
            unreachable!("sentinel targets are built by RedisBroker::new")
        }
    };
    let info: ConnectionInfo = conn_addr
        .into_connection_info()
        .map_err(|e| unavailable(e.to_string()))?
        .set_redis_settings(redis_info);
    match addr {
        RedisAddr::Tls { tls, .. } if tls.ca_certs.is_some() || tls.client_cert.is_some() => {
            let read = |path: &std::path::Path| {
                std::fs::read(path)
                    .map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))
            };
            let root_cert = tls.ca_certs.as_deref().map(read).transpose()?;
            let client_tls = match &tls.client_cert {
                Some((cert, key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                None => None,
            };
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(|e| unavailable(e.to_string()))
        }
        _ => Client::open(info).map_err(|e| unavailable(e.to_string())),
    }
}

/// Converts a client error into the scaler's error, naming the broker by its redacted URL and
/// scrubbing the password from the library's text in case it quotes it.
fn convert(redacted: &str, target: &RedisTarget, err: redis::RedisError) -> Error {
    // A pipeline reports one server error per command: the first one says it all.
    let first = err.clone().into_server_errors().and_then(|errors| {
        errors
            .first()
            .map(|(_, e)| (e.code().to_string(), e.to_string()))
    });
    let code = first.as_ref().map(|(c, _)| c.as_str()).or(err.code());
    let raw = first
        .as_ref()
        .map_or_else(|| err.to_string(), |(_, t)| t.clone());
    let text = scrub(&raw, target.password.as_ref());
    let msg = format!("Redis broker {redacted}: {text}");
    match code {
        Some("WRONGPASS" | "NOAUTH") => return Error::Unauthenticated(msg),
        Some("NOPERM") => return Error::PermissionDenied(msg),
        Some("LOADING" | "MASTERDOWN" | "TRYAGAIN") => return Error::Unavailable(msg),
        _ => {}
    }
    match err.kind() {
        redis::ErrorKind::AuthenticationFailed => Error::Unauthenticated(msg),
        _ if err.is_timeout() => Error::DeadlineExceeded(msg),
        redis::ErrorKind::Io
        | redis::ErrorKind::InvalidClientConfig
        | redis::ErrorKind::MasterNameNotFoundBySentinel
        | redis::ErrorKind::NoValidReplicasFoundBySentinel
        | redis::ErrorKind::EmptySentinelList => Error::Unavailable(msg),
        _ if err.is_io_error() || err.is_connection_refusal() || err.is_connection_dropped() => {
            Error::Unavailable(msg)
        }
        _ => Error::Internal(msg),
    }
}

impl RedisBroker {
    /// Binding tables of `exchanges`, parsed.
    async fn tables<'a>(
        &self,
        layout: &RedisLayout,
        exchanges: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, Vec<Binding>>> {
        let exchanges: BTreeSet<&str> = exchanges.into_iter().filter(|e| !e.is_empty()).collect();
        let mut tables = HashMap::new();
        if exchanges.is_empty() {
            return Ok(tables);
        }
        let mut pipe = redis::pipe();
        for ex in &exchanges {
            pipe.smembers(layout.binding_key(ex));
        }
        let members: Vec<Vec<String>> = self.run(&pipe).await?;
        for (ex, rows) in exchanges.iter().zip(members) {
            tables.insert(
                ex.to_string(),
                rows.iter()
                    .filter_map(|m| layout.parse_binding(m))
                    .collect(),
            );
        }
        Ok(tables)
    }

    /// `inspect active` and `active_queues` over kombu's Redis pidbox.
    ///
    /// Writes only what the workers read the same way, and only for the census itself: the
    /// separator is the one of the workers' own bindings to `celery.pidbox` (a trigger whose
    /// `separator` differs gets the error, and writes nothing); with no worker bound nobody can
    /// answer, so the census is empty and writes nothing. Otherwise a fresh reply id is bound
    /// in `_kombu.binding.reply.celery.pidbox` just before the broadcast and unbound, with its
    /// list, as soon as the replies are in (as kombu's own `inspect` does). The list expires by
    /// itself, and members this scaler left behind (a kill mid-census) are removed by the next
    /// census once they are [`STALE_REPLY`] old.
    async fn inspect_active(&self, layout: &RedisLayout, window: Duration) -> Result<Census> {
        let broadcast_table = layout.binding_key(MAILBOX);
        let reply_table = layout.binding_key(REPLY_EXCHANGE);
        let mut pipe = redis::pipe();
        pipe.smembers(&broadcast_table).smembers(&reply_table);
        let (workers, replies): (Vec<String>, Vec<String>) = self.run(&pipe).await?;
        let mut census = Census::default();
        if workers.is_empty() {
            return Ok(census);
        }
        if let Some(foreign) = workers
            .iter()
            .find(|m| !pidbox::is_worker_binding(layout, m))
        {
            return Err(Error::invalid(
                "separator",
                format!(
                    "the workers' remote-control bindings (`{}`, for example `{}`) do not split with separator `{}`: the workers use another kombu `sep`; set `separator` to theirs, or scaleOnRunning: \"false\"",
                    printable(&broadcast_table),
                    printable(foreign),
                    printable(&layout.separator)
                ),
            ));
        }
        let now = unix_now();
        let mut pipe = redis::pipe();
        let mut stale = 0;
        for member in &replies {
            if let Some(list) = pidbox::stale_own_member(layout, member, now, STALE_REPLY.as_secs())
            {
                pipe.srem(&reply_table, member).ignore().del(list).ignore();
                stale += 1;
            } else if layout.parse_binding(member).is_none() {
                // Workers split this table's members with their own separator: one that does not
                // split makes every worker's reply fail (kombu's `_lookup` raises), ours included.
                return Err(Error::Unavailable(format!(
                    "a remote-control reply binding in `{}` (`{}`) does not split with the workers' separator `{}`: no worker can answer `celery inspect` (or this scaler) until it is removed (SREM)",
                    printable(&reply_table),
                    printable(member),
                    printable(&layout.separator)
                )));
            }
        }
        if stale > 0 {
            tracing::info!(
                stale,
                "Removing reply bindings a stopped scaler left behind"
            );
        }
        let oid = new_oid();
        let tickets = Tickets::new();
        let (reply_key, _, member) = pidbox::reply_queue(layout, &oid);
        // The list exists, with its expiry, before any worker can push to it: a push keeps the
        // expiry, so a process killed from here on leaves nothing that lasts. The placeholder is
        // not a reply envelope and is skipped when the replies are read.
        pipe.sadd(&reply_table, &member)
            .ignore()
            .rpush(&reply_key, REPLY_PLACEHOLDER)
            .ignore()
            .pexpire(&reply_key, STALE_REPLY.as_millis() as i64)
            .ignore();
        let channel = pidbox::broadcast_channel(layout, self.target.db);
        for command in Command::ALL {
            pipe.publish(
                &channel,
                pidbox::broadcast_message(command, tickets.of(command), &oid, window),
            );
        }
        let (receivers, _): (u64, u64) = self.run(&pipe).await?;
        let collected = self
            .collect_replies(&reply_key, receivers * 2 + 1, window)
            .await;
        // Unbound first, so a worker that answers late finds no binding rather than refilling
        // the list after it is deleted (kombu's `after_reply_message_received` does the same).
        let mut pipe = redis::pipe();
        pipe.srem(&reply_table, &member)
            .ignore()
            .lrange(&reply_key, 0, -1)
            .del(&reply_key)
            .ignore();
        let cleaned: Result<(Vec<Vec<u8>>,)> = self.run(&pipe).await;
        collected?;
        let (raw,) = cleaned?;
        pidbox::collect(&raw, &tickets, &mut census);
        tracing::debug!(
            receivers,
            replies = raw.len(),
            workers = census.workers.len(),
            tasks = census.tasks.len(),
            "Worker census collected"
        );
        let tables = self
            .tables(layout, census.tasks.iter().map(|t| t.exchange.as_str()))
            .await?;
        census.resolve(|ex, rk| {
            route(ex, rk, &tables)
                .into_iter()
                .map(str::to_string)
                .collect()
        });
        Ok(census)
    }

    /// Waits until `reply_key` holds `expected` entries (the placeholder and the replies) or
    /// `window` ends.
    async fn collect_replies(
        &self,
        reply_key: &str,
        expected: u64,
        window: Duration,
    ) -> Result<()> {
        if expected <= 1 {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        loop {
            let mut pipe = redis::pipe();
            pipe.llen(reply_key);
            let (len,): (u64,) = self.run(&pipe).await?;
            if len >= expected || started.elapsed() >= window {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The first entry of a reply list, so that the list exists with its expiry before the replies.
const REPLY_PLACEHOLDER: &str = "celery-keda-scaler: waiting for replies";

/// How long a reply binding and list of this scaler can be in use: a census lasts at most its
/// deadline (seconds), so an older one is a leftover of a stopped process. Also the reply list's
/// expiry.
const STALE_REPLY: Duration = Duration::from_secs(30);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait]
impl Broker for RedisBroker {
    async fn census(&self, layout: &Layout, window: Duration) -> Result<Option<Census>> {
        let Layout::Redis(layout) = layout else {
            return Err(Error::Internal(
                "Redis broker given a layout of another broker".into(),
            ));
        };
        self.inspect_active(layout, window).await.map(Some)
    }

    async fn depth(&self, query: &DepthQuery) -> Result<Depth> {
        let Layout::Redis(layout) = &query.layout else {
            return Err(Error::Internal(
                "Redis broker given a query for another broker".into(),
            ));
        };
        // One round trip: every priority list of every queue, then the unacked hash. Not a
        // MULTI: kombu itself moves a message from a list to `unacked` in two steps, so a
        // transaction buys no exactness, and the lists are read first so that a message moving
        // from list to `unacked` meanwhile is counted (twice, for one reading) rather than missed.
        let mut pipe = redis::pipe();
        let mut keys = Vec::with_capacity(query.queues.len());
        for queue in &query.queues {
            let queue_keys = layout.ready_keys(queue);
            for (_, key) in &queue_keys {
                pipe.llen(key);
            }
            keys.push(queue_keys);
        }
        if query.in_flight {
            pipe.hvals(layout.unacked_key());
        }
        let mut values: Vec<redis::Value> = self.run(&pipe).await?;
        let unacked: Vec<Vec<u8>> = if query.in_flight {
            let v = values.pop().unwrap_or(redis::Value::Nil);
            redis::from_redis_value(v).map_err(|e| self.unexpected(e))?
        } else {
            Vec::new()
        };
        let mut lens = values.into_iter();
        let mut queues = Vec::with_capacity(query.queues.len());
        for (queue, queue_keys) in query.queues.iter().zip(keys) {
            let mut ready = Vec::with_capacity(queue_keys.len());
            for (step, key) in queue_keys {
                let value = lens.next().ok_or_else(|| {
                    Error::Internal("Redis returned fewer replies than commands".into())
                })?;
                let count: u64 = redis::from_redis_value(value).map_err(|e| self.unexpected(e))?;
                ready.push(ReadyPart {
                    source: printable(&key),
                    priority: Some(step),
                    count,
                });
            }
            queues.push(QueueDepth {
                queue: queue.clone(),
                ready,
                in_flight: 0,
                running_workers: Vec::new(),
            });
        }
        if !unacked.is_empty() {
            let counts = self.count_unacked(layout, &unacked).await?;
            for q in &mut queues {
                q.in_flight = counts.get(q.queue.as_str()).copied().unwrap_or(0);
            }
        }
        Ok(Depth {
            queues,
            unresolved: Vec::new(),
        })
    }
}

impl RedisBroker {
    /// Routes each unacked entry to its queue(s) through the exchanges' binding tables, as kombu
    /// does when it restores them, and counts entries per queue.
    async fn count_unacked(
        &self,
        layout: &RedisLayout,
        unacked: &[Vec<u8>],
    ) -> Result<HashMap<String, u64>> {
        let routed: Vec<(String, String)> =
            unacked.iter().filter_map(|v| unacked_routing(v)).collect();
        let tables = self
            .tables(layout, routed.iter().map(|(ex, _)| ex.as_str()))
            .await?;
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (ex, rk) in &routed {
            for queue in route(ex, rk, &tables) {
                *counts.entry(queue.to_string()).or_default() += 1;
            }
        }
        Ok(counts)
    }
}
