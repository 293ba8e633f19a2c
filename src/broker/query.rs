//! What one depth reading asks: which backend (its target and the trigger's layout on it, in one
//! variant), which queues, which counters. Equal queries share one reading.

use std::net::IpAddr;

use super::hosts::{Contact, HostField};
use super::rabbitmq::{RabbitLayout, RabbitTarget};
use super::redis::{RedisLayout, RedisTarget};
use super::sqs::{SqsLayout, SqsTarget};
use crate::allowlist::MasterCheck;

/// A broker with everything needed to connect to it (the target: the key of its client) and the
/// trigger's options on it (the layout). One variant per backend, so a target never meets
/// another backend's layout.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Backend {
    /// A Redis server, Sentinel-managed master or Unix socket, with kombu's key layout.
    Redis {
        target: RedisTarget,
        layout: RedisLayout,
    },
    /// A RabbitMQ virtual host, with its management API.
    RabbitMq {
        target: RabbitTarget,
        layout: RabbitLayout,
    },
    /// Amazon SQS (or a compatible endpoint), with kombu's queue name prefix.
    Sqs {
        target: SqsTarget,
        layout: SqsLayout,
    },
}

impl Backend {
    /// The broker kind, a bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Redis { .. } => "redis",
            Backend::RabbitMq { .. } => "rabbitmq",
            Backend::Sqs { .. } => "sqs",
        }
    }

    /// The broker's URL with its password replaced by `***`, for logs and messages.
    pub fn redacted(&self) -> String {
        match self {
            Backend::Redis { target, .. } => target.redacted(),
            Backend::RabbitMq { target, .. } => target.redacted(),
            Backend::Sqs { target, .. } => target.redacted(),
        }
    }

    /// Whether Celery workers on this broker answer remote control (`inspect active`), which
    /// `scaleOnRunning` needs; SQS has no broadcast, so there it has no effect.
    pub fn has_remote_control(&self) -> bool {
        match self {
            Backend::Redis { .. } | Backend::RabbitMq { .. } => true,
            Backend::Sqs { .. } => false,
        }
    }

    /// Every host a reading contacts. `None`: a Unix socket (no host to check).
    pub fn contacts(&self) -> Option<Vec<Contact>> {
        match self {
            Backend::Redis { target, .. } => target.contacts(),
            Backend::RabbitMq { target, layout } => Some(target.contacts(layout)),
            Backend::Sqs { target, layout } => {
                let mut contacts = target.contacts();
                contacts.extend(layout.contacts());
                Some(contacts)
            }
        }
    }

    /// Puts a checked address in place of the host of `field` (one of [`Backend::contacts`]):
    /// every reading connects to it, and no second DNS lookup decides where.
    pub fn pin(&mut self, field: &HostField, addr: IpAddr) {
        match self {
            Backend::Redis { target, .. } => target.pin(field, addr),
            Backend::RabbitMq { target, layout } => target.pin(layout, field, addr),
            Backend::Sqs { target, layout } => match field {
                HostField::QueueUrl(i) => layout.pin(*i, addr),
                _ => target.pin(addr),
            },
        }
    }

    /// Has every host that the broker itself reports (a Sentinel's master) checked by `check`
    /// before any connection to it. Brokers that report no host have nothing to check.
    pub fn check_reported_hosts(&mut self, check: MasterCheck) {
        match self {
            Backend::Redis { target, .. } => target.check_reported_masters(check),
            Backend::RabbitMq { .. } | Backend::Sqs { .. } => {}
        }
    }

    /// Whether a reading would use the scaler's own AWS identity (`sqs://` without keys, for a
    /// queue without keys of its own).
    pub fn uses_ambient_identity(&self) -> bool {
        match self {
            Backend::Sqs { target, layout } => {
                target.access_key.is_none() && layout.uses_broker_keys()
            }
            Backend::Redis { .. } | Backend::RabbitMq { .. } => false,
        }
    }
}

/// What one depth reading asks of a broker. Equal queries can share one reading.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DepthQuery {
    /// Which broker to ask, and the trigger's layout on it.
    pub backend: Backend,
    /// Celery queue names; the depth is the sum over them.
    pub queues: Vec<String>,
    /// Count delivered but unacknowledged tasks (reserved, ETA, `acks_late` running).
    pub in_flight: bool,
    /// Count running tasks that were already acknowledged (from the worker census).
    pub running: bool,
}

impl DepthQuery {
    /// How many sources one reading looks at: every priority list of every queue on Redis, one
    /// queue each on RabbitMQ and SQS. What a poll of this query costs the broker per tick.
    pub fn sources(&self) -> usize {
        match &self.backend {
            Backend::Redis { layout, .. } => self.queues.len() * layout.priority_steps.len().max(1),
            Backend::RabbitMq { .. } | Backend::Sqs { .. } => self.queues.len(),
        }
    }
}
