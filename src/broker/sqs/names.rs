//! Names SQS and kombu give things: kombu's SQS queue name for a Celery queue (prefix and
//! character translation) and AWS region names (`awsRegion`, a predefined queue's `region`).

use crate::error::{Error, Result};

/// Validates `awsRegion` (`us-east-1`, `eu-central-2`, `us-gov-west-1`, ...).
pub fn parse_region(raw: &str) -> Result<String> {
    let r = raw.trim();
    let ok = !r.is_empty()
        && r.len() <= 32
        && r.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && r.contains('-');
    if ok {
        Ok(r.to_string())
    } else {
        Err(Error::invalid(
            "awsRegion",
            format!(
                "must be an AWS region such as us-east-1, got `{}`",
                crate::secret::shown(r)
            ),
        ))
    }
}

/// kombu's SQS queue name for a Celery queue: `prefix + name`, `.` -> `-`, every other ASCII
/// punctuation but `-` and `_` -> `_`; a trailing `.fifo` is kept.
pub fn sqs_queue_name(prefix: &str, celery_name: &str) -> String {
    let full = format!("{prefix}{celery_name}");
    let translate = |s: &str| -> String {
        s.chars()
            .map(|c| match c {
                '.' => '-',
                '-' | '_' => c,
                c if c.is_ascii_punctuation() => '_',
                c => c,
            })
            .collect()
    };
    match full.strip_suffix(".fifo") {
        Some(stem) => format!("{}.fifo", translate(stem)),
        None => translate(&full),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_follow_kombu() {
        assert_eq!(sqs_queue_name("", "celery"), "celery");
        assert_eq!(sqs_queue_name("", "orders.high"), "orders-high");
        assert_eq!(sqs_queue_name("prod-", "orders.high"), "prod-orders-high");
        assert_eq!(sqs_queue_name("prod.", "a:b/c"), "prod-a_b_c");
        assert_eq!(sqs_queue_name("", "jobs.v2.fifo"), "jobs-v2.fifo");
        assert_eq!(sqs_queue_name("", "keep-this_one"), "keep-this_one");
    }

    #[test]
    fn regions() {
        assert_eq!(parse_region("eu-central-2").unwrap(), "eu-central-2");
        assert!(parse_region("EU WEST").is_err());
    }
}
