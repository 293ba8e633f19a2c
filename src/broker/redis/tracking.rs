//! Server-assisted change notifications for idle sets: one RESP3 connection per broker with
//! `CLIENT TRACKING ON` (default mode), on which an idle set is armed by one `EXISTS` over its
//! lists. Redis then remembers those keys, existing or not, and sends one `invalidate` push when
//! any of them is written; the set's poll wakes, reads once, and arms again. Nothing is written
//! to the server and nothing is configured on it.
//!
//! RESP3 pushes on the same connection, not RESP2 with `REDIRECT` to a subscriber: the redis
//! crate parses RESP3 `invalidate` pushes and reports a dropped connection through the same
//! channel, so one connection carries both the arming reads and the notifications, and nothing
//! can be lost between two connections.
//!
//! Every set is woken again (to re-read and re-arm) when the notifications may have been lost:
//! the connection dropped (a `CLIENT KILL`, a restart, a Sentinel failover, which closes the old
//! master's client connections), or the server sent a flush-all invalidation (its tracking
//! table outgrew `tracking-table-max-keys`). A safety read per broker (one `EXISTS` over the
//! lists of every set armed empty, every [`NotifySettings::safety_interval`]) bounds what a
//! lost notification can cost, and notices a connection that died without closing.
//!
//! Where the server refuses (no RESP3, an ACL user without `CLIENT`, a proxy), the broker polls
//! as before: logged once per broker, counted by [`crate::broker::ModeSink`], and tried again
//! after [`RETRY_REFUSED_AFTER`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::broker::armed::{Armed, PollReason, PushMode, Signal};
use crate::broker::reading::NotifySettings;
use crate::error::{Error, Result};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind, Value};

/// How long a broker that refused notifications is polled before it is asked again (an ACL or
/// a server upgrade may have changed meanwhile).
pub const RETRY_REFUSED_AFTER: Duration = Duration::from_secs(300);

/// Most keys one `EXISTS` of the safety read names.
const SAFETY_KEYS_PER_COMMAND: usize = 16_384;

/// One armed set.
struct Watcher {
    signal: Arc<Signal>,
    keys: Vec<Vec<u8>>,
    /// Its arming read found none of its keys: the safety read covers it.
    empty: bool,
}

/// What the push handler, the arming reads and the safety read share.
#[derive(Default)]
struct State {
    next_id: u64,
    sets: HashMap<u64, Watcher>,
    by_key: HashMap<Vec<u8>, HashSet<u64>>,
    /// The connection in use and its generation; pushes of older generations are ignored.
    live: Option<(u64, MultiplexedConnection)>,
    /// Which host of a failover list the live connection is on.
    live_host: Option<usize>,
    next_generation: u64,
    /// Since when the server refuses, and why.
    refused: Option<(PollReason, Instant)>,
    mode: Option<PushMode>,
}

impl State {
    fn wake_all(&self) {
        for set in self.sets.values() {
            set.signal.fire();
        }
    }

    fn wake_keys<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        let mut woken = HashSet::new();
        for key in keys {
            for id in self.by_key.get(key).into_iter().flatten() {
                if woken.insert(*id) {
                    if let Some(set) = self.sets.get(id) {
                        set.signal.fire();
                    }
                }
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(set) = self.sets.remove(&id) {
            for key in set.keys {
                if let Some(ids) = self.by_key.get_mut(&key) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_key.remove(&key);
                    }
                }
            }
        }
    }

    /// Forgets connection `generation` (if still in use) and wakes every set to re-arm.
    fn lost(&mut self, generation: u64) {
        if self.live.as_ref().is_some_and(|(g, _)| *g == generation) {
            self.live = None;
            self.wake_all();
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unregisters a set when its [`Armed`] handle is dropped.
struct Registration {
    state: Weak<Mutex<State>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(state) = self.state.upgrade() {
            lock(&state).remove(self.id);
        }
    }
}

/// The change notifications of one Redis broker.
pub(super) struct Tracker {
    settings: NotifySettings,
    timeout: Duration,
    /// The broker's redacted URL, for the log line of a refusal.
    redacted: String,
    state: Shared,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    sweeping: std::sync::Once,
}

/// What the arming read found.
pub(super) struct Arming {
    pub armed: Armed,
    /// How many of the set's lists exist (are not empty).
    pub existing: u64,
}

impl Tracker {
    pub(super) fn new(settings: NotifySettings, timeout: Duration, redacted: String) -> Self {
        let tracker = Tracker {
            settings,
            timeout,
            redacted,
            state: Arc::default(),
            connecting: tokio::sync::Mutex::new(()),
            sweeping: std::sync::Once::new(),
        };
        if !tracker.settings.enabled {
            tracker.set_mode(PushMode::Polling(PollReason::Disabled));
        }
        tracker
    }

    /// Arms `keys` (one `EXISTS` on the tracking connection, connecting first with `client` if
    /// needed): `None` when this broker is polled instead. `host`: the host of a failover list
    /// the readings use now; a connection on another host is replaced (every set re-arms). An
    /// error is a failure of the tracking connection (the caller polls this time).
    pub(super) async fn arm(
        &self,
        client: impl std::future::Future<Output = Result<Client>>,
        host: Option<usize>,
        keys: &[String],
    ) -> Result<Option<Arming>> {
        if !self.settings.enabled || keys.is_empty() {
            return Ok(None);
        }
        let Some((generation, mut conn)) = self.connection(client, host).await? else {
            return Ok(None);
        };
        let signal = Arc::new(Signal::default());
        let id = {
            let mut state = lock(&self.state);
            let id = state.next_id;
            state.next_id += 1;
            let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
            for key in &keys {
                state.by_key.entry(key.clone()).or_default().insert(id);
            }
            state.sets.insert(
                id,
                Watcher {
                    signal: signal.clone(),
                    keys,
                    empty: false,
                },
            );
            id
        };
        let registration = Registration {
            state: Arc::downgrade(&self.state),
            id,
        };
        let existing: u64 = match redis::cmd("EXISTS").arg(keys).query_async(&mut conn).await {
            Ok(n) => n,
            Err(e) => {
                lock(&self.state).lost(generation);
                return Err(self.error(&e));
            }
        };
        if let Some(set) = lock(&self.state).sets.get_mut(&id) {
            set.empty = existing == 0;
        }
        Ok(Some(Arming {
            armed: Armed::new(signal, Box::new(registration)),
            existing,
        }))
    }

    /// The tracking connection: the live one, or a new one (`None` while the server refuses).
    async fn connection(
        &self,
        client: impl std::future::Future<Output = Result<Client>>,
        host: Option<usize>,
    ) -> Result<Option<(u64, MultiplexedConnection)>> {
        let _connecting = self.connecting.lock().await;
        {
            let mut state = lock(&self.state);
            if let Some((generation, conn)) = state.live.clone() {
                if state.live_host == host {
                    return Ok(Some((generation, conn)));
                }
                // The readings moved to another host of the failover list.
                state.lost(generation);
            }
            if let Some((_, since)) = state.refused {
                if since.elapsed() < RETRY_REFUSED_AFTER {
                    return Ok(None);
                }
            }
        }
        let client = resp3(client.await?).map_err(|e| self.error(&e))?;
        let generation = {
            let mut state = lock(&self.state);
            state.next_generation += 1;
            state.next_generation
        };
        let pushes = Arc::downgrade(&self.state);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(move |push: PushInfo| {
                if let Some(state) = pushes.upgrade() {
                    on_push(&state, generation, push);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let connected = client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let mut conn = match connected {
            Ok(conn) => conn,
            // A server error reply to HELLO 3 (sent while connecting): no RESP3 here.
            Err(e) if refused_hello(&e) => {
                return Ok(self.refuse(PollReason::Resp3Unsupported, &e));
            }
            Err(e) => return Err(self.error(&e)),
        };
        if let Err(e) = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .query_async::<()>(&mut conn)
            .await
        {
            return match e.code() {
                Some("NOPERM") => Ok(self.refuse(PollReason::NoPermission, &e)),
                Some(_) => Ok(self.refuse(PollReason::Refused, &e)),
                None => Err(self.error(&e)),
            };
        }
        {
            let mut state = lock(&self.state);
            state.live = Some((generation, conn.clone()));
            state.live_host = host;
            state.refused = None;
        }
        self.set_mode(PushMode::Notified);
        self.sweeping.call_once(|| {
            tokio::spawn(sweep(
                Arc::downgrade(&self.state),
                self.settings.safety_interval,
                self.timeout,
            ));
        });
        Ok(Some((generation, conn)))
    }

    fn refuse(
        &self,
        reason: PollReason,
        err: &redis::RedisError,
    ) -> Option<(u64, MultiplexedConnection)> {
        lock(&self.state).refused = Some((reason, Instant::now()));
        let mode = PushMode::Polling(reason);
        if self.set_mode(mode) {
            tracing::warn!(
                broker = %self.redacted,
                reason = mode.reason_label(),
                code = err.code().unwrap_or(""),
                "Redis broker refuses change notifications (CLIENT TRACKING); its idle sets are polled"
            );
        }
        None
    }

    /// Records `mode`; true if it changed.
    fn set_mode(&self, mode: PushMode) -> bool {
        let old = lock(&self.state).mode.replace(mode);
        self.settings.modes.moved(old, mode);
        old != Some(mode)
    }

    fn error(&self, err: &redis::RedisError) -> Error {
        Error::Unavailable(format!(
            "Redis broker {}: change-notification connection: {}",
            self.redacted,
            crate::secret::redact_urls(&err.to_string())
        ))
    }
}

/// `client` speaking RESP3 (same address, database and credentials).
fn resp3(client: Client) -> redis::RedisResult<Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings))
}

/// Whether a failed RESP3 connection attempt is the server refusing `HELLO 3` (rather than
/// credentials, or the network).
fn refused_hello(err: &redis::RedisError) -> bool {
    match err.code() {
        Some("WRONGPASS" | "NOAUTH" | "NOPERM" | "LOADING" | "BUSY" | "MASTERDOWN") | None => false,
        Some(_) => true,
    }
}

/// Handles one push of connection `generation`.
fn on_push(state: &Mutex<State>, generation: u64, push: PushInfo) {
    let mut state = lock(state);
    if state.live.as_ref().is_none_or(|(g, _)| *g != generation) {
        return;
    }
    match push.kind {
        PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) => {
                let keys: Vec<&[u8]> = keys
                    .iter()
                    .filter_map(|k| match k {
                        Value::BulkString(k) => Some(k.as_slice()),
                        _ => None,
                    })
                    .collect();
                state.wake_keys(keys);
            }
            // A null invalidation: the server forgot every tracked key.
            _ => state.wake_all(),
        },
        PushKind::Disconnection => state.lost(generation),
        _ => {}
    }
}

/// The safety read, every `interval` while the broker has armed sets: one `EXISTS` over the
/// lists of every set armed empty (which also re-arms them), waking them all if any exists;
/// sets armed with something in them are woken to read again. A failure drops the connection
/// (every set re-arms on a new one).
async fn sweep(state: Weak<Mutex<State>>, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let (generation, mut conn, keys, empty) = {
            let s = lock(&state);
            let Some((generation, conn)) = s.live.clone() else {
                continue;
            };
            let mut keys = HashSet::new();
            let mut empty = Vec::new();
            for (id, set) in &s.sets {
                if set.empty {
                    keys.extend(set.keys.iter().cloned());
                    empty.push(*id);
                } else {
                    set.signal.fire();
                }
            }
            (
                generation,
                conn,
                keys.into_iter().collect::<Vec<_>>(),
                empty,
            )
        };
        let mut found = 0u64;
        for chunk in keys.chunks(SAFETY_KEYS_PER_COMMAND) {
            let mut exists = redis::cmd("EXISTS");
            exists.arg(chunk);
            match tokio::time::timeout(timeout, exists.query_async::<u64>(&mut conn)).await {
                Ok(Ok(n)) => found += n,
                _ => {
                    lock(&state).lost(generation);
                    found = 0;
                    break;
                }
            }
        }
        if found > 0 {
            let s = lock(&state);
            for id in empty {
                if let Some(set) = s.sets.get(&id) {
                    set.signal.fire();
                }
            }
        }
    }
}
