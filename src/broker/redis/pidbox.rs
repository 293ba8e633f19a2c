//! Celery remote control over Redis (kombu's pidbox on the Redis transport): broadcast
//! `inspect active` on the `celery.pidbox` fanout (PUB/SUB) and collect the workers' replies from
//! a reply list bound to `reply.celery.pidbox`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;

use super::layout::RedisLayout;
use crate::broker::census::{active_request, Census, MAILBOX, REPLY_EXCHANGE};

/// kombu's virtual-transport envelope, as it is stored in Redis lists and PUB/SUB messages.
#[derive(Deserialize)]
struct Envelope {
    body: String,
    #[serde(default)]
    headers: serde_json::Value,
    #[serde(default)]
    properties: serde_json::Value,
}

/// The fanout topic the workers' pidbox queues subscribe to (`keyprefix_fanout` + exchange).
pub fn broadcast_channel(layout: &RedisLayout, db: i64) -> String {
    format!("{}/{db}.{MAILBOX}", layout.prefix)
}

/// The reply queue (a list) for `oid`, and its member in the reply exchange's binding table.
pub fn reply_queue(layout: &RedisLayout, oid: &str) -> (String, String, String) {
    let queue = format!("{oid}.{REPLY_EXCHANGE}");
    let key = format!("{}{queue}", layout.prefix);
    let member = format!("{oid}{sep}{sep}{queue}", sep = layout.separator);
    (key, layout.binding_key(REPLY_EXCHANGE), member)
}

/// The PUBLISH payload of an `inspect active` broadcast with `ticket`, replies to `oid`.
pub fn broadcast_message(ticket: &str, oid: &str, window: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let body = base64::engine::general_purpose::STANDARD.encode(active_request(ticket, oid));
    serde_json::json!({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"clock": 1, "expires": now + window.as_secs_f64()},
        "properties": {
            "delivery_info": {"exchange": MAILBOX, "routing_key": ""},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// Adds the replies for `ticket` found in `raw` (the reply list's entries) to `census`.
pub fn collect(raw: &[Vec<u8>], ticket: &str, census: &mut Census) {
    for entry in raw {
        let Ok(env) = serde_json::from_slice::<Envelope>(entry) else {
            continue;
        };
        if env.headers.get("ticket").and_then(|t| t.as_str()) != Some(ticket) {
            continue;
        }
        let body = if env.properties.get("body_encoding").and_then(|e| e.as_str()) == Some("base64")
        {
            match base64::engine::general_purpose::STANDARD.decode(env.body.as_bytes()) {
                Ok(b) => b,
                Err(_) => continue,
            }
        } else {
            env.body.into_bytes()
        };
        census.add_reply(&body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kombu() {
        let l = RedisLayout::default();
        assert_eq!(broadcast_channel(&l, 0), "/0.celery.pidbox");
        let (key, table, member) = reply_queue(&l, "abc");
        assert_eq!(key, "abc.reply.celery.pidbox");
        assert_eq!(table, "_kombu.binding.reply.celery.pidbox");
        assert_eq!(member, "abc\x06\x16\x06\x16abc.reply.celery.pidbox");
        let p = RedisLayout {
            prefix: "app:".into(),
            ..RedisLayout::default()
        };
        assert_eq!(broadcast_channel(&p, 3), "app:/3.celery.pidbox");
    }

    #[test]
    fn replies_with_other_tickets_are_ignored() {
        let body = base64::engine::general_purpose::STANDARD.encode(br#"{"w@h": [{"id": "x", "acknowledged": true, "delivery_info": {"exchange": "q", "routing_key": "q"}}]}"#);
        let entry = |ticket: &str| {
            serde_json::json!({"body": body, "headers": {"ticket": ticket}, "properties": {"body_encoding": "base64"}})
                .to_string()
                .into_bytes()
        };
        let mut c = Census::default();
        collect(
            &[entry("mine"), entry("other"), b"junk".to_vec()],
            "mine",
            &mut c,
        );
        assert_eq!(c.tasks.len(), 1);
        assert_eq!(c.workers, ["w@h"]);
        let msg: serde_json::Value =
            serde_json::from_str(&broadcast_message("t", "o", Duration::from_secs(1))).unwrap();
        assert_eq!(msg["properties"]["body_encoding"], "base64");
    }
}
