//! The RabbitMQ backend: ready counts by passive `queue.declare` over one shared AMQP connection
//! per broker (re-established after a failure), in-flight counts (`messages_unacknowledged`)
//! from the management HTTP API.
//!
//! `target.rs` (URLs, the management endpoint), `amqp.rs` (the client and its connection),
//! `management.rs` (the HTTP API), `reading.rs` (the depth), `census.rs` and `routing.rs`
//! (the worker census and the vhost's routing; pure). This file only names the parts.

mod amqp;
mod census;
mod management;
mod reading;
mod routing;
mod target;

pub use amqp::RabbitBroker;
pub use routing::{BindingRow, ExchangeRow, Routes};
pub use target::{AmqpTls, Management, ManagementApi, RabbitLayout, RabbitTarget, MANAGEMENT_PORT};
