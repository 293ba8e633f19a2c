//! What a backend with change notifications hands an idle poll: an [`Armed`] handle that wakes
//! when the broker reports a change to the set's sources, and the [`PushMode`] each broker
//! client ends up in (notified, or polled and why), reported through a [`ModeSink`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// How a backend wakes an armed set: once fired, it stays fired (the set must be read again).
#[derive(Default)]
pub struct Signal {
    fired: AtomicBool,
    notify: Notify,
}

impl Signal {
    /// Marks the set changed and wakes its waiter (now, or at its next wait).
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether the set changed (or may have) since it was armed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// A set armed on its broker: [`Armed::changed`] returns once the broker reported a write to one
/// of the set's sources, the notifications may have been lost (the connection that carries them
/// dropped, or the server forgot what it tracked), or the broker's periodic safety read found a
/// source that should have been notified. The poll then reads (and arms) again. Dropping the
/// handle stops the notifications.
pub struct Armed {
    signal: Arc<Signal>,
    /// Unregisters the set when the handle is dropped.
    _registration: Box<dyn Send + Sync>,
}

impl Armed {
    /// A handle woken through `signal`, unregistered by dropping `registration`.
    pub fn new(signal: Arc<Signal>, registration: Box<dyn Send + Sync>) -> Self {
        Armed {
            signal,
            _registration: registration,
        }
    }

    /// Waits for the next change (a change that came before this call is not lost).
    pub async fn changed(&self) {
        if !self.signal.fired() {
            self.signal.notify.notified().await
        }
    }

    /// True while nothing changed since the arming read: what it found still holds.
    pub fn quiet(&self) -> bool {
        !self.signal.fired()
    }

    /// A view of [`Armed::quiet`] that others can hold while this handle lives (the
    /// registration stays with the handle: once it is dropped, the view is no longer woken and
    /// must not be trusted).
    pub fn view(&self) -> Arc<Signal> {
        self.signal.clone()
    }
}

impl fmt::Debug for Armed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Armed")
    }
}

/// Why a broker that could notify is polled instead.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PollReason {
    /// The operator turned notifications off (`--redis-client-tracking=false`).
    Disabled,
    /// The server does not speak RESP3 (`HELLO 3` refused: Redis older than 6, or a proxy).
    Resp3Unsupported,
    /// The ACL user may not run `CLIENT` (`NOPERM`).
    NoPermission,
    /// The server answered `CLIENT TRACKING ON` with another error.
    Refused,
}

/// How a broker client learns that an idle set got work.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PushMode {
    /// The server notifies (Redis `CLIENT TRACKING`): idle sets cost nothing between readings.
    Notified,
    /// Idle sets are polled at the fast interval.
    Polling(PollReason),
}

impl PushMode {
    /// Every mode, for gauges that start at zero.
    pub const ALL: [PushMode; 5] = [
        PushMode::Notified,
        PushMode::Polling(PollReason::Disabled),
        PushMode::Polling(PollReason::Resp3Unsupported),
        PushMode::Polling(PollReason::NoPermission),
        PushMode::Polling(PollReason::Refused),
    ];

    /// The `mode` metric label.
    pub fn mode_label(self) -> &'static str {
        match self {
            PushMode::Notified => "tracking",
            PushMode::Polling(_) => "polling",
        }
    }

    /// The `reason` metric label (`none` when notified).
    pub fn reason_label(self) -> &'static str {
        match self {
            PushMode::Notified => "none",
            PushMode::Polling(PollReason::Disabled) => "disabled",
            PushMode::Polling(PollReason::Resp3Unsupported) => "resp3_unsupported",
            PushMode::Polling(PollReason::NoPermission) => "no_permission",
            PushMode::Polling(PollReason::Refused) => "refused",
        }
    }
}

/// Told each time a broker client enters (`+1`) or leaves (`-1`) a mode: the metrics layer
/// counts the brokers per mode without the broker layer knowing it.
#[derive(Clone)]
pub struct ModeSink(Arc<dyn Fn(PushMode, i64) + Send + Sync>);

impl ModeSink {
    /// A sink calling `f`.
    pub fn new(f: impl Fn(PushMode, i64) + Send + Sync + 'static) -> Self {
        ModeSink(Arc::new(f))
    }

    /// A sink that records nothing (tests and tools).
    pub fn none() -> Self {
        ModeSink::new(|_, _| {})
    }

    /// Reports a change from `old` (if any) to `new`.
    pub fn moved(&self, old: Option<PushMode>, new: PushMode) {
        if old == Some(new) {
            return;
        }
        if let Some(old) = old {
            (self.0)(old, -1);
        }
        (self.0)(new, 1);
    }
}

impl fmt::Debug for ModeSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModeSink")
    }
}
