//! The broker abstraction, one folder per backend: [`Backend`] (a target and a trigger's layout
//! in one variant) and [`DepthQuery`], the reading types and the [`Broker`] trait, the [`Armed`] handle of change notifications, the hosts
//! each target contacts, and the [`Registry`] that keeps one client per distinct target.
//!
//! This file only names the parts: nothing below imports it.

pub mod armed;
pub mod census;
pub mod failover;
pub mod hosts;
pub mod query;
pub mod rabbitmq;
pub mod reading;
pub mod redis;
pub mod registry;
pub mod sqs;
pub mod url;

pub use self::armed::{Armed, ModeSink, PollReason, PushMode, Signal};
pub use self::hosts::{Contact, HostField, Unresolved};
pub use self::query::{Backend, DepthQuery};
pub use self::reading::{
    Broker, ClientSettings, Depth, NotifySettings, QueueDepth, ReadyPart, DEFAULT_SAFETY_INTERVAL,
};
pub use self::registry::Registry;
pub use self::url::BrokerTarget;
