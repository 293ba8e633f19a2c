//! The Redis client's connection: one shared, self-reconnecting connection per broker (plain,
//! TLS, Unix socket, or a Sentinel-managed master looked up again after a connection error),
//! pipelines run over it, and the binding tables read through it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::Mutex;

use super::error::convert;
use super::layout::{Binding, RedisLayout};
use super::sentinel;
use super::target::{RedisAddr, RedisTarget};
use super::tracking::Tracker;
use crate::broker::armed::Armed;
use crate::broker::failover::{did_not_answer, none_answered, share, Rotation};
use crate::broker::reading::ClientSettings;
use crate::error::{Error, Result};
use crate::secret::redact_urls;

/// How the connection to the server is obtained.
enum Source {
    /// A fixed address: the manager reconnects to it by itself after connection errors, and is
    /// replaced after rejected credentials (it would keep answering with that rejection); the
    /// client builds the replacement and the change-notification connection.
    Direct(std::sync::Mutex<ConnectionManager>, Client),
    /// A Sentinel-managed master: looked up on first use and again after a connection error,
    /// so a failover moves the scaler to the new master.
    Sentinel {
        lookup: MasterLookup,
        current: Mutex<Option<ConnectionManager>>,
    },
    /// A `;`-separated failover list: one self-reconnecting connection per host, tried in
    /// kombu's order from the host that answered last.
    Failover {
        hosts: Vec<ConnectionManager>,
        /// The same hosts' clients, for the change-notification connection.
        clients: Vec<Client>,
        rotation: Rotation,
        /// Each host's share of the deadline: a host's attempt (connect, retry, answer) ends
        /// within it.
        each: Duration,
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
    pub(super) target: RedisTarget,
    source: Source,
    config: ConnectionManagerConfig,
    /// The `unacked` hash routed to queues, per key layout, shared by the idle polls of every
    /// set on this broker for [`UNACKED_SHARED_FOR`] (concurrent ones share one read): the hash
    /// is one per database, so reading it once per set and tick would multiply its cost by the
    /// number of sets.
    pub(super) unacked: moka::future::Cache<RedisLayout, Arc<HashMap<String, u64>>>,
    /// The routed `unacked` counts of the last read made with the hash armed, per layout: they
    /// answer until Redis says the hash changed (one entry per key layout in use).
    pub(super) unacked_armed: std::sync::Mutex<HashMap<RedisLayout, ArmedCounts>>,
    /// Change notifications for the idle sets on this broker.
    pub(super) tracker: Tracker,
}

/// Routed `unacked` counts per queue, and the arming that says whether they still hold.
pub(super) type ArmedCounts = (Arc<HashMap<String, u64>>, Armed);

/// How long one read of the `unacked` hash answers the idle polls of every set on the broker:
/// at most one `HVALS` per layout per 100 ms, whatever the number of sets. A message that moves
/// into the hash is seen by an idle poll at most this much later than by a full reading.
pub const UNACKED_SHARED_FOR: Duration = Duration::from_millis(100);

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
            RedisAddr::Failover { hosts, .. } => {
                // Each host gets an equal share of the deadline, so a reading that moves on
                // from a silent host still answers in time.
                let each = share(settings.timeout, hosts.len());
                // No retry inside a host: the next host is the retry.
                let host_config = config
                    .clone()
                    .set_connection_timeout(Some(each))
                    .set_response_timeout(Some(each))
                    .set_number_of_retries(0);
                let mut managers = Vec::with_capacity(hosts.len());
                let mut clients = Vec::with_capacity(hosts.len());
                for i in 0..hosts.len() {
                    let shown = target.redacted_host(i);
                    let client = build_client(&target.host_addr(i), redis_info.clone(), &shown)?;
                    managers.push(
                        ConnectionManager::new_lazy_with_config(
                            client.clone(),
                            host_config.clone(),
                        )
                        .map_err(|e| convert(&shown, &target, e))?,
                    );
                    clients.push(client);
                }
                Source::Failover {
                    rotation: Rotation::new(managers.len()),
                    hosts: managers,
                    clients,
                    each,
                }
            }
            addr => {
                let client = build_client(addr, redis_info, &redacted)?;
                Source::Direct(
                    std::sync::Mutex::new(
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                            .map_err(fail)?,
                    ),
                    client,
                )
            }
        };
        let tracker = Tracker::new(settings.notify.clone(), settings.timeout, redacted.clone());
        Ok(RedisBroker {
            target,
            source,
            config,
            tracker,
            unacked_armed: std::sync::Mutex::new(HashMap::new()),
            unacked: moka::future::Cache::builder()
                .max_capacity(1024)
                .time_to_live(UNACKED_SHARED_FOR)
                .build(),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager> {
        let (lookup, current) = match &self.source {
            Source::Direct(manager, _) => {
                return Ok(manager.lock().unwrap_or_else(|e| e.into_inner()).clone())
            }
            Source::Failover {
                hosts, rotation, ..
            } => {
                return hosts
                    .get(rotation.current())
                    .cloned()
                    .ok_or_else(|| Error::Internal("empty failover list".into()))
            }
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
            MasterLookup::Checked(lookup) => lookup.master(&self.config, &self.target).await?.1,
        };
        *current = Some(manager.clone());
        Ok(manager)
    }

    /// A client for the master as it is now, for the change-notification connection: the fixed
    /// address, the host of a failover list that answered last, or the master the Sentinels
    /// report (looked up again, never a remembered one, so the notifications follow a failover).
    pub(super) async fn master_client(&self) -> Result<Client> {
        match &self.source {
            Source::Direct(_, client) => Ok(client.clone()),
            Source::Failover {
                clients, rotation, ..
            } => clients
                .get(rotation.current())
                .cloned()
                .ok_or_else(|| Error::Internal("empty failover list".into())),
            Source::Sentinel {
                lookup: MasterLookup::Crate(sentinel),
                ..
            } => sentinel
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(|e| self.convert(e)),
            Source::Sentinel {
                lookup: MasterLookup::Checked(lookup),
                ..
            } => Ok(lookup.master(&self.config, &self.target).await?.0),
        }
    }

    /// Which host of a failover list the readings use now (`None` for other sources): the
    /// change-notification connection must be on that host.
    pub(super) fn current_host(&self) -> Option<usize> {
        match &self.source {
            Source::Failover { rotation, .. } => Some(rotation.current()),
            _ => None,
        }
    }

    /// After a connection-level failure, forget a Sentinel-resolved master; after rejected
    /// credentials, a new manager (a fixed address) or a new lookup (Sentinel) too: the
    /// next reading connects and authenticates again, so a password rotation or an ACL edit on
    /// the server is seen.
    async fn forget_master(&self, err: &redis::RedisError) {
        let rejected = err.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(err.code(), Some("WRONGPASS" | "NOAUTH"));
        match &self.source {
            Source::Sentinel { current, .. }
                if rejected
                    || err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_timeout() =>
            {
                *current.lock().await = None;
            }
            Source::Direct(manager, client) if rejected => {
                if let Ok(fresh) =
                    ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())
                {
                    *manager.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                }
            }
            _ => {}
        }
    }

    /// The host of a failover list that answered last, as a URL for people; `None` for a
    /// single host.
    pub(super) fn answered_by(&self) -> Option<String> {
        match &self.source {
            Source::Failover { rotation, .. } => {
                Some(self.target.redacted_host(rotation.current()))
            }
            _ => None,
        }
    }

    pub(super) fn unexpected(&self, err: impl std::fmt::Display) -> Error {
        Error::Internal(format!(
            "Redis broker {}: unexpected reply: {}",
            self.target.redacted(),
            redact_urls(&err.to_string())
        ))
    }

    pub(super) fn convert(&self, err: redis::RedisError) -> Error {
        convert(&self.target.redacted(), &self.target, err)
    }

    pub(super) async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        if let Source::Failover {
            hosts,
            rotation,
            each,
            ..
        } = &self.source
        {
            return self.run_failover(hosts, rotation, *each, pipe).await;
        }
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

    /// kombu's failover: from the host that answered last, each host once, in the list's order;
    /// the first that answers (even with an error of its own) serves the reading and the next
    /// reading starts from it.
    async fn run_failover<T: redis::FromRedisValue>(
        &self,
        hosts: &[ConnectionManager],
        rotation: &Rotation,
        each: Duration,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let mut errors = Vec::new();
        for i in rotation.order() {
            let Some(mut conn) = hosts.get(i).cloned() else {
                continue;
            };
            let attempt = async {
                // One retry after a refusal, for the same stale-outcome reason as above.
                let outcome = pipe.query_async(&mut conn).await;
                if matches!(&outcome, Err(e) if e.is_connection_refusal()) {
                    return pipe.query_async(&mut conn).await;
                }
                outcome
            };
            let outcome = match tokio::time::timeout(each, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    errors.push(Error::DeadlineExceeded(format!(
                        "Redis broker {}: no answer within {each:?}",
                        self.target.redacted_host(i)
                    )));
                    continue;
                }
            };
            match outcome {
                Ok(v) => {
                    rotation.answered(i);
                    return Ok(v);
                }
                Err(e) => {
                    let err = convert(&self.target.redacted_host(i), &self.target, e);
                    if !did_not_answer(&err) {
                        rotation.answered(i);
                        return Err(err);
                    }
                    errors.push(err);
                }
            }
        }
        Err(none_answered(errors))
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
        RedisAddr::Sentinel { .. } | RedisAddr::Failover { .. } => {
            return Err(unavailable(
                "a Sentinel or failover list is not one address".into(),
            ))
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

impl RedisBroker {
    /// Binding tables of `exchanges`, parsed.
    pub(super) async fn tables<'a>(
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
}
