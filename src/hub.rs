//! Shared polls for `StreamIsActive`: one background poll per distinct depth query, whatever the
//! number of streams watching it. The poll stops when its last watcher leaves.
//!
//! Only the step idle -> active needs speed: KEDA ignores a pushed `false` and polls `GetMetrics`
//! and `IsActive` itself while a target is active. So while at least one of its streams is
//! inactive (its depth is at most that stream's `activationQueueLength`) a poll reads with the
//! backend's cheap look first (on Redis one `EXISTS` over the set's lists) and arms the set where
//! the broker notifies changes (Redis `CLIENT TRACKING`): it then reads again only when notified
//! (at most once per fast interval), else at the fast interval. While every stream is active it
//! reads at the slow `active` interval,
//! and every reading an RPC makes for the same query (KEDA's own polls) is handed to the poll's
//! streams, so the poll learns the set went idle as soon as KEDA does. While an armed set's
//! latest reading is 0 and the broker has notified nothing since, the hub tells RPCs that the
//! set's ready sources are known empty ([`Hub::ready_known_empty`]), so KEDA's own polls of an
//! idle set do not read them either. A reading that fails
//! permanently ([`Error::is_permanent`]: a tenancy refusal or bad metadata) ends the poll: its
//! streams end with that error, and nothing polls for them. Credentials or permissions the
//! broker rejects are read again less and less often (from the fast interval, doubling, up to the
//! active one): a password rotation is seen, and a wrong password does not knock every tick.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{Backend, DepthQuery, Signal};
use crate::error::Error;
use crate::scaler::Core;

/// The latest reading of a shared poll: `None` until the first one completes.
pub type Reading = Option<Result<u64, Error>>;

/// Most sources (Redis lists, queues) one poll looks at per fast interval: a set with more is
/// polled proportionally less often, so one trigger (256 queues x 256 priority steps is 65,536
/// Redis lists) costs the broker at most this many key lookups per interval, in one command.
pub const MAX_SOURCES_PER_TICK: usize = 1024;

/// How often shared polls read.
#[derive(Clone, Copy, Debug)]
pub struct PollIntervals {
    /// Redis and RabbitMQ, while a stream is inactive: a short interval for fast activation.
    pub default: Duration,
    /// SQS, while a stream is inactive: every `GetQueueAttributes` is a billed request.
    pub sqs: Duration,
    /// Every broker, while every stream of the poll is active: KEDA polls the set itself then
    /// (and its readings reach the poll), so this read is only a safety net.
    pub active: Duration,
}

/// One shared poll.
struct Poll {
    sender: watch::Sender<Reading>,
    /// The highest `activationQueueLength` of the streams that joined, as `f64` bits (thresholds
    /// are >= 0, where bit order is numeric order). Never lowered while the poll runs: a stream
    /// that left can keep the poll fast for longer, never slow it down.
    threshold: AtomicU64,
    /// Woken when an RPC hands the poll a reading or a stream with a higher threshold joins, so
    /// it can switch to the fast interval.
    offered: Notify,
    /// While the set is armed and its latest reading was 0: the arming's signal. Unfired, it
    /// says the ready sources are still empty, so RPC readings of the query skip them.
    quiet: Mutex<Option<Arc<Signal>>>,
}

impl Poll {
    /// Whether the latest reading failed (an RPC's successful reading may have replaced it).
    fn failed(&self) -> bool {
        matches!(*self.sender.borrow(), Some(Err(_)))
    }

    /// Whether every stream is active at the latest reading (a failed or missing reading is
    /// not active: polled fast, as before the slice of idle sets began).
    fn all_active(&self) -> bool {
        let threshold = f64::from_bits(self.threshold.load(Ordering::Relaxed));
        matches!(*self.sender.borrow(), Some(Ok(depth)) if depth as f64 > threshold)
    }
}

/// Runs and shares the polls.
pub struct Hub {
    core: Arc<Core>,
    intervals: PollIntervals,
    shutdown: CancellationToken,
    polls: Mutex<HashMap<DepthQuery, Arc<Poll>>>,
}

impl Hub {
    /// A hub polling at `intervals`, stopping all polls when `shutdown` is cancelled.
    pub fn new(
        core: Arc<Core>,
        intervals: PollIntervals,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Hub {
            core,
            intervals,
            shutdown,
            polls: Mutex::new(HashMap::new()),
        })
    }

    /// Watches `query` for a stream active above `threshold`: joins its running poll, or starts
    /// one that reads at once.
    pub fn watch(self: &Arc<Self>, query: &DepthQuery, threshold: f64) -> watch::Receiver<Reading> {
        let bits = threshold.max(0.0).to_bits();
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(poll) = polls.get(query) {
            // A higher threshold may make the set inactive for the new stream: the poll, if it
            // waits at the active interval, is told to look again.
            if poll.threshold.fetch_max(bits, Ordering::Relaxed) < bits {
                poll.offered.notify_one();
            }
            return poll.sender.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        let poll = Arc::new(Poll {
            sender,
            threshold: AtomicU64::new(bits),
            offered: Notify::new(),
            quiet: Mutex::new(None),
        });
        polls.insert(query.clone(), poll.clone());
        self.core.metrics().polls().inc();
        let hub = self.clone();
        let query = query.clone();
        tokio::spawn(async move { hub.poll(query, poll).await });
        receiver
    }

    /// Hands a depth an RPC just read for `query` (KEDA's `GetMetrics` / `IsActive`) to its
    /// poll's streams, if a poll runs: the streams see transitions at KEDA's own readings, and a
    /// poll of an active set learns at once that the set went idle.
    pub fn offer(&self, query: &DepthQuery, depth: u64) {
        let polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let Some(poll) = polls.get(query) else {
            return;
        };
        let changed = poll.sender.send_if_modified(|latest| {
            let new = Some(Ok(depth));
            if *latest == new {
                return false;
            }
            *latest = new;
            true
        });
        if changed {
            poll.offered.notify_one();
        }
    }

    /// Whether a poll of `query` knows its ready sources are empty: its latest reading was 0 and
    /// the broker has not notified a change since the set was armed. An RPC may then read only
    /// the rest ([`Core::read_ready_empty`]).
    pub fn ready_known_empty(&self, query: &DepthQuery) -> bool {
        let polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let Some(poll) = polls.get(query) else {
            return false;
        };
        let zero = matches!(*poll.sender.borrow(), Some(Ok(0)));
        let quiet = poll.quiet.lock().unwrap_or_else(|e| e.into_inner());
        zero && quiet.as_ref().is_some_and(|s| !s.fired())
    }

    /// Number of running polls.
    pub fn polls(&self) -> usize {
        self.polls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn poll(self: Arc<Self>, query: DepthQuery, poll: Arc<Poll>) {
        let base = match query.backend {
            Backend::Sqs { .. } => self.intervals.sqs,
            Backend::Redis { .. } | Backend::RabbitMq { .. } => self.intervals.default,
        };
        let ticks = query.sources().div_ceil(MAX_SOURCES_PER_TICK).max(1);
        let idle_interval = base.saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX));
        let active_interval = self.intervals.active.max(idle_interval);
        let mut refused = 0u32;
        'poll: loop {
            // An inactive set is read with the cheap look and armed where the broker notifies
            // changes; an active one is read in full (KEDA polls it too).
            let arm = !poll.all_active();
            set_quiet(&poll, None);
            let read = async {
                if arm {
                    self.core.read_armed(&query).await
                } else {
                    self.core.read_fresh(&query).await.map(|d| (d, None))
                }
            };
            let (reading, armed) = tokio::select! {
                r = read => match r {
                    Ok((depth, armed)) => (Ok(depth.total()), armed),
                    Err(e) => (Err(e), None),
                },
                _ = poll.sender.closed() => (Err(Error::Internal(String::new())), None),
                _ = self.shutdown.cancelled() => break,
            };
            if let (Ok(0), Some(armed)) = (&reading, &armed) {
                set_quiet(&poll, Some(armed.view()));
            }
            // Rejected credentials or permissions: polled less and less often (a password
            // rotation or an ACL edit is seen within the active interval), never at every tick.
            refused = match &reading {
                Err(Error::Unauthenticated(_) | Error::PermissionDenied(_)) => refused + 1,
                _ => 0,
            };
            let permanent = matches!(&reading, Err(e) if e.is_permanent());
            if poll.sender.receiver_count() > 0 {
                poll.sender.send_replace(Some(reading));
            }
            if permanent {
                // Nothing to poll for: the streams end with the error, and KEDA reopens them
                // after its backoff (with new metadata, if the ScaledObject changed).
                break;
            }
            let read_at = Instant::now();
            loop {
                let active = poll.all_active();
                let interval = if active {
                    active_interval
                } else if refused > 0 && poll.failed() {
                    backoff(idle_interval, refused, active_interval)
                } else {
                    idle_interval
                };
                // An armed inactive set waits for the broker's notification; its next read comes
                // no sooner than one fast interval after this one, so a busy set costs at most
                // what polling would.
                let next_read = async {
                    match armed.as_ref().filter(|_| !active) {
                        Some(armed) => {
                            armed.changed().await;
                            tokio::time::sleep_until(read_at + idle_interval).await
                        }
                        None => tokio::time::sleep_until(read_at + interval).await,
                    }
                };
                tokio::select! {
                    _ = next_read => break,
                    // An RPC's reading: the interval may have changed.
                    _ = poll.offered.notified() => {}
                    _ = poll.sender.closed() => break,
                    _ = self.shutdown.cancelled() => break 'poll,
                }
            }
            // Leave only under the lock, so a watcher joining right now either finds this poll
            // alive (and is counted) or finds it gone and starts a new one.
            let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
            if poll.sender.receiver_count() == 0 {
                polls.remove(&query);
                break;
            }
        }
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        if polls.get(&query).is_some_and(|p| Arc::ptr_eq(p, &poll)) {
            polls.remove(&query);
        }
        self.core.metrics().polls().dec();
    }
}

fn set_quiet(poll: &Poll, signal: Option<Arc<Signal>>) {
    *poll.quiet.lock().unwrap_or_else(|e| e.into_inner()) = signal;
}

/// `base` doubled for each failure after the first, at most `cap`.
fn backoff(
    base: std::time::Duration,
    failures: u32,
    cap: std::time::Duration,
) -> std::time::Duration {
    base.saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_readings_back_off_to_the_cap() {
        let (base, cap) = (Duration::from_millis(200), Duration::from_secs(30));
        let steps: Vec<u64> = (1..=10)
            .map(|n| backoff(base, n, cap).as_millis() as u64)
            .collect();
        assert_eq!(
            steps,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(backoff(base, u32::MAX, cap), cap);
    }
}
