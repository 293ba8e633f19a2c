//! The Amazon SQS backend: `GetQueueAttributes` for kombu's SQS queue names, one client per
//! distinct region, endpoint and credentials.
//!
//! `target.rs` (URLs, `awsRegion`/`awsEndpoint`, kombu's queue-name translation), `client.rs`
//! (the client and its readings). This file only names the parts.

mod client;
mod target;

pub use client::{SqsBroker, DEFAULT_REGION};
pub use target::{parse_endpoint, parse_region, sqs_queue_name, SqsLayout, SqsTarget};
