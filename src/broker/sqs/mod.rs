//! The Amazon SQS backend: `GetQueueAttributes` for kombu's SQS queue names, or at the URLs of
//! kombu's predefined queues; one AWS client per distinct region, endpoint and credentials.
//!
//! `target.rs` (URLs, `awsRegion`/`awsEndpoint`), `names.rs` (kombu's queue-name translation,
//! region names; pure),
//! `predefined.rs` (kombu's `predefined_queues`: the JSON map, its URLs and keys), `client.rs`
//! (the client and its readings). This file only names the parts.

mod client;
mod names;
mod predefined;
mod target;

pub use client::{SqsBroker, DEFAULT_REGION};
pub use names::{parse_region, sqs_queue_name};
pub use predefined::{parse_predefined, select_predefined, PredefinedQueue, PredefinedQueues};
pub use target::{parse_endpoint, SqsLayout, SqsTarget};
