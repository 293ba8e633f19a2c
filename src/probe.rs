//! `probe`: one depth reading with its breakdown, for a person debugging a ScaledObject.

use std::collections::HashMap;
use std::fmt::Write;

use crate::error::Error;
use crate::scaler::Core;

/// Turns `key=value`, `--key=value` and `--key value` arguments into a metadata map.
pub fn parse_args(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut meta = HashMap::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let arg = arg.as_str();
        let (key, value) = if let Some(flag) = arg.strip_prefix("--") {
            match flag.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => {
                    let v = iter
                        .next()
                        .ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_string(), v.clone())
                }
            }
        } else if let Some((k, v)) = arg.split_once('=') {
            (k.to_string(), v.to_string())
        } else {
            return Err(format!(
                "`{arg}` is neither key=value nor --key value (keys are the trigger metadata keys, e.g. brokerUrl=redis://... queues=celery)"
            ));
        };
        meta.insert(key, value);
    }
    Ok(meta)
}

/// Runs one reading for a trigger from `namespace` (the tenancy settings apply as in the RPCs)
/// and renders it. `Err` carries the text the RPC would return as its status.
pub async fn run(
    core: &Core,
    meta: &HashMap<String, String>,
    namespace: &str,
) -> Result<String, Error> {
    let trigger = core.admit(meta, namespace).await?;
    let depth = core.read(&trigger.query).await;
    // The process exits next: no census may be left half done on the broker.
    core.stop_censuses().await;
    let depth = depth?;
    let q = &trigger.query;
    let mut out = String::new();
    let on_off = |b: bool| if b { "on" } else { "off" };
    let _ = writeln!(
        out,
        "broker       {} (from {})",
        q.backend.redacted(),
        trigger.broker_source
    );
    if let Some(host) = &depth.answered_by {
        let _ = writeln!(
            out,
            "answered by  {host} (the host of the failover list that answered)"
        );
    }
    if !namespace.is_empty() {
        let _ = writeln!(out, "namespace    {namespace} (tenancy settings applied)");
    }
    let _ = writeln!(
        out,
        "metric       {} (queueLength {}, active when depth > {})",
        trigger.metric_name, trigger.queue_length, trigger.activation_queue_length
    );
    let census = q.backend.has_remote_control();
    let _ = writeln!(
        out,
        "counting     ready, in flight {} (scaleOnInFlight), running {} (scaleOnRunning{})",
        on_off(q.in_flight),
        on_off(q.running),
        if q.running && !census {
            ": no effect on SQS"
        } else {
            ""
        }
    );
    for queue in &depth.queues {
        let _ = writeln!(out, "queue {}: {}", queue.queue, queue.total());
        for part in &queue.ready {
            let pri = part
                .priority
                .map(|p| format!("priority {p}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  ready      {:>8}  {}  {}",
                part.count, part.source, pri
            );
        }
        if q.in_flight {
            let _ = writeln!(
                out,
                "  in flight  {:>8}  reserved, ETA/countdown, or acks_late running",
                queue.in_flight
            );
        }
        if q.running && census {
            let _ = writeln!(
                out,
                "  running    {:>8}  running, already acknowledged (worker census)",
                queue.running()
            );
            let mut per_worker: std::collections::BTreeMap<&str, u64> = Default::default();
            for w in &queue.running_workers {
                *per_worker.entry(w.as_str()).or_default() += 1;
            }
            for (worker, n) in per_worker {
                let _ = writeln!(out, "             {n:>8}  on {worker}");
            }
        }
    }
    if !depth.unresolved.is_empty() {
        let _ = writeln!(
            out,
            "unresolved   {:>8}  running, acknowledged, queue unknown (not counted)",
            depth.unresolved.len()
        );
        for line in &depth.unresolved {
            let _ = writeln!(out, "             {line}");
        }
    }
    let total = depth.total();
    let _ = writeln!(out, "depth        {total}");
    let _ = writeln!(out, "active       {}", trigger.is_active(total));
    let replicas = (total as f64 / trigger.queue_length).ceil();
    let _ = writeln!(
        out,
        "replicas     {replicas} (HPA: ceil(depth / queueLength))"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_in_all_three_spellings() {
        let args: Vec<String> = [
            "brokerUrl=redis://h/0",
            "--queues",
            "a,b",
            "--queueLength=2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let meta = parse_args(&args).unwrap();
        assert_eq!(meta["brokerUrl"], "redis://h/0");
        assert_eq!(meta["queues"], "a,b");
        assert_eq!(meta["queueLength"], "2");
        assert!(parse_args(&["oops".to_string()]).is_err());
        assert!(parse_args(&["--queues".to_string()]).is_err());
    }
}
