//! Celery remote control over Redis (kombu's pidbox on the Redis transport): broadcast
//! `inspect active` and `active_queues` on the `celery.pidbox` fanout (PUB/SUB) and collect the
//! workers' replies from a reply list bound to `reply.celery.pidbox`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;

use super::layout::RedisLayout;
use crate::broker::census::{
    oid_created, request, Census, Command, Tickets, MAILBOX, OID_PREFIX, REPLY_EXCHANGE,
};

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

/// Whether `member` of the broadcast exchange's binding table (`_kombu.binding.celery.pidbox`)
/// is a worker's pidbox binding written with `layout`'s separator: three fields, the last one the
/// worker's `<node>.celery.pidbox` queue. Workers split every member of a table they route
/// through with their own separator, so this is how the scaler learns theirs.
pub fn is_worker_binding(layout: &RedisLayout, member: &str) -> bool {
    layout.parse_binding(member).is_some_and(|b| {
        b.queue.ends_with(&format!(".{MAILBOX}")) && !b.queue.contains(layout.separator.as_str())
    })
}

/// A reply-table member this scaler left behind (a killed process, a census cut short) that no
/// census can still be using: its reply id is older than `stale` seconds at `now`. Returns the
/// reply list's key (under the layout's prefix), whatever separator the member was written with.
pub fn stale_own_member(
    layout: &RedisLayout,
    member: &str,
    now: u64,
    stale: u64,
) -> Option<String> {
    let created = oid_created(member)?;
    if now.saturating_sub(created) < stale {
        return None;
    }
    let start = member.rfind(OID_PREFIX)?;
    let queue = &member[start..];
    queue
        .ends_with(&format!(".{REPLY_EXCHANGE}"))
        .then(|| format!("{}{queue}", layout.prefix))
}

/// The PUBLISH payload of a `command` broadcast with `ticket`, replies to `oid`.
pub fn broadcast_message(command: Command, ticket: &str, oid: &str, window: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let body = base64::engine::general_purpose::STANDARD.encode(request(command, ticket, oid));
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

/// Adds the replies to `tickets` found in `raw` (the reply list's entries) to `census`.
pub fn collect(raw: &[Vec<u8>], tickets: &Tickets, census: &mut Census) {
    for entry in raw {
        let Ok(env) = serde_json::from_slice::<Envelope>(entry) else {
            continue;
        };
        let Some(ticket) = env.headers.get("ticket").and_then(|t| t.as_str()) else {
            continue;
        };
        let ticket = ticket.to_string();
        let body = if env.properties.get("body_encoding").and_then(|e| e.as_str()) == Some("base64")
        {
            match base64::engine::general_purpose::STANDARD.decode(env.body.as_bytes()) {
                Ok(b) => b,
                Err(_) => continue,
            }
        } else {
            env.body.into_bytes()
        };
        tickets.add(census, &ticket, &body);
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
    fn worker_bindings_tell_the_separator() {
        let default = RedisLayout::default();
        let colon = RedisLayout {
            separator: ":".into(),
            ..RedisLayout::default()
        };
        let worker = "\x06\x16\x06\x16celery@h1.celery.pidbox";
        assert!(is_worker_binding(&default, worker));
        assert!(!is_worker_binding(&colon, worker));
        assert!(is_worker_binding(&colon, "::celery@h1.celery.pidbox"));
        assert!(!is_worker_binding(&default, "::celery@h1.celery.pidbox"));
        let double = RedisLayout {
            separator: "::".into(),
            ..RedisLayout::default()
        };
        assert!(!is_worker_binding(&colon, "::::celery@h1.celery.pidbox"));
        assert!(!is_worker_binding(&double, "::celery@h1.celery.pidbox"));
    }

    #[test]
    fn own_leftovers_are_recognised_by_name_and_age() {
        let l = RedisLayout {
            prefix: "app:".into(),
            ..RedisLayout::default()
        };
        let oid = "celery-keda-scaler-1000-abc";
        let queue = format!("{oid}.reply.celery.pidbox");
        let member = format!("{oid}::{queue}");
        assert_eq!(
            stale_own_member(&l, &member, 1100, 30),
            Some(format!("app:{queue}"))
        );
        assert_eq!(stale_own_member(&l, &member, 1010, 30), None);
        let kombu = "0b5c\x06\x16\x06\x160b5c.reply.celery.pidbox";
        assert_eq!(stale_own_member(&l, kombu, 1100, 30), None);
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
        let tickets = Tickets::new();
        collect(
            &[entry(&tickets.active), entry("other"), b"junk".to_vec()],
            &tickets,
            &mut c,
        );
        assert_eq!(c.tasks.len(), 1);
        assert_eq!(c.workers, ["w@h"]);
        let msg: serde_json::Value = serde_json::from_str(&broadcast_message(
            Command::Active,
            "t",
            "o",
            Duration::from_secs(1),
        ))
        .unwrap();
        assert_eq!(msg["properties"]["body_encoding"], "base64");
    }
}
