//! The worker census on RabbitMQ: `inspect active` and `active_queues` broadcast on the
//! `celery.pidbox` fanout exchange, the replies read from a reply queue of the census's own
//! (declared as `celery inspect` declares it), and the tasks attributed to queues through the
//! vhost's bindings.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::amqp::{RabbitBroker, Stage};
use super::routing::Routes;
use super::target::RabbitLayout;
use crate::broker::census::{new_oid, request, Census, Command, Tickets, MAILBOX, REPLY_EXCHANGE};
use crate::error::{Error, Result};

/// The reply queue's `x-expires`: Celery's `control_queue_expires` default (10 s).
const REPLY_QUEUE_EXPIRES_MS: u32 = 10_000;
/// The reply queue's `x-message-ttl`: Celery's `control_queue_ttl` default (300 s).
const REPLY_MESSAGE_TTL_MS: u32 = 300_000;

impl RabbitBroker {
    /// `inspect active` and `active_queues` over kombu's AMQP pidbox. Without the
    /// `celery.pidbox` exchange no worker ever listened in this vhost: the census is empty and
    /// declares nothing. Otherwise the mailbox exchanges and this process's reply queue are
    /// declared as Celery's own `inspect` declares them (the queue exclusive and auto-delete,
    /// `x-expires` 10 s, `x-message-ttl` 300 s), so the queue goes with the connection and
    /// nothing of it outlives the process. Tasks that came through a named exchange are
    /// attributed to queues through the vhost's bindings (management API).
    pub(super) async fn inspect_active(
        &self,
        layout: &RabbitLayout,
        window: Duration,
    ) -> Result<Census> {
        if !self.mailbox_exists().await? {
            return Ok(Census::default());
        }
        let result = self.broadcast(window).await;
        if result.is_err() {
            self.amqp.lock().await.census = None;
        }
        let mut census = result?;
        let routed = |c: &Census| c.tasks.iter().any(|t| !t.exchange.is_empty());
        let routes = if routed(&census) {
            let management = self.management(layout)?;
            let mut routes = self.routes(management, false).await?;
            if census.tasks.iter().any(|t| !routes.knows(&t.exchange)) {
                // An exchange declared since the routes were read.
                routes = self.routes(management, true).await?;
            }
            routes
        } else {
            // Every task came through the default exchange: no binding to read.
            Arc::new(Routes::default())
        };
        census.resolve(|ex, rk| routes.route(ex, rk));
        Ok(census)
    }

    /// Whether the `celery.pidbox` exchange exists (a passive declare, which writes nothing).
    async fn mailbox_exists(&self) -> Result<bool> {
        use lapin::options::ExchangeDeclareOptions;
        let ch = self.channel_in(true).await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match ch
            .exchange_declare(
                MAILBOX.into(),
                lapin::ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                // The broker closes the channel on a failed passive declare.
                self.amqp.lock().await.census = None;
                match self.convert(e, Stage::Query) {
                    Error::NotFound(_) => Ok(false),
                    other => Err(other),
                }
            }
        }
    }

    /// Declares a reply queue of its own (a fresh reply id per census, so that censuses of
    /// several layouts on one broker never take each other's replies), broadcasts both commands,
    /// collects the replies that arrive within `window`, and deletes the queue.
    async fn broadcast(&self, window: Duration) -> Result<Census> {
        use lapin::options::{
            BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
            QueueDeleteOptions,
        };
        use lapin::types::{AMQPValue, ShortString};
        use lapin::{BasicProperties, ExchangeKind};
        let ch = self.channel_in(true).await?;
        let conv = |e| self.convert(e, Stage::Query);
        // kombu declares both exchanges transient (durable=False).
        let transient = ExchangeDeclareOptions::default();
        ch.exchange_declare(
            MAILBOX.into(),
            ExchangeKind::Fanout,
            transient,
            FieldTable::default(),
        )
        .await
        .map_err(conv)?;
        ch.exchange_declare(
            REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            transient,
            FieldTable::default(),
        )
        .await
        .map_err(conv)?;
        let oid = new_oid();
        let queue = format!("{oid}.{REPLY_EXCHANGE}");
        // Celery's `control_queue_expires` (10 s) and `control_queue_ttl` (300 s) defaults.
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(REPLY_QUEUE_EXPIRES_MS),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongUInt(REPLY_MESSAGE_TTL_MS),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(conv)?;
        ch.queue_bind(
            queue.as_str().into(),
            REPLY_EXCHANGE.into(),
            oid.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(conv)?;
        let tickets = Tickets::new();
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
            + window.as_secs_f64();
        for command in Command::ALL {
            let mut headers = FieldTable::default();
            headers.insert("clock".into(), AMQPValue::LongLongInt(1));
            headers.insert("expires".into(), AMQPValue::Double(expires));
            let props = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_content_encoding(ShortString::from("utf-8"))
                .with_delivery_mode(1)
                .with_headers(headers);
            ch.basic_publish(
                MAILBOX.into(),
                "".into(),
                BasicPublishOptions::default(),
                &request(command, tickets.of(command), &oid),
                props,
            )
            .await
            .map_err(conv)?;
        }
        tokio::time::sleep(window).await;
        let mut census = Census::default();
        while let Some(msg) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(conv)?
        {
            let ticket = msg
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("ticket").cloned())
                .and_then(|t| match t {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
                    _ => None,
                });
            if let Some(ticket) = ticket {
                tickets.add(&mut census, &ticket, &msg.delivery.data);
            }
        }
        // As kombu's clients end: the queue goes now, not with the connection (a census cut
        // short leaves it to the connection's end or its 10 s expiry).
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(conv)?;
        Ok(census)
    }
}
