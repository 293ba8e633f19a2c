//! The Redis backend: Celery's kombu layout read with pipelined commands over one shared,
//! self-reconnecting connection per broker (plain, TLS, Unix socket, or Sentinel-managed).
//!
//! `target.rs` (URLs), `layout.rs` (kombu's keys and bindings; pure), `connection.rs`,
//! `sentinel.rs` (the checked master lookup), `error.rs` (error mapping), `reading.rs` (the
//! depth), `tracking.rs` (change notifications for idle sets, `CLIENT TRACKING`), `census.rs` and `pidbox.rs` (the worker census). This file only names the parts.

mod census;
mod connection;
mod error;
mod layout;
mod pidbox;
mod reading;
mod sentinel;
mod target;
mod tracking;

pub use connection::RedisBroker;
pub use layout::{
    printable, route, unacked_routing, unescape, Binding, RedisLayout, DEFAULT_PRIORITY_STEPS,
    DEFAULT_SEPARATOR,
};
pub use target::{RedisAddr, RedisTarget, TlsSettings};
