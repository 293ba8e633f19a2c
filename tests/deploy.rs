//! The shipped examples against the scaler's own contract: every `external` / `external-push`
//! trigger in `deploy/examples/` and in the README uses only keys the scaler (or KEDA) reads, and
//! every example's metadata, resolved the way KEDA resolves it, parses with the scaler's parser
//! into a trigger for the broker the example is about.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::metadata::{self, KEDA_KEYS, KEYS};
use serde::Deserialize;
use serde_json::Value;

/// Every YAML document of a file.
fn documents(text: &str, origin: &Path) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| {
            Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", origin.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// A scaler trigger found in a document.
struct Found {
    origin: String,
    kind: String,
    /// The scale target's containers (Deployment by name, or the ScaledJob's template).
    target: Option<String>,
    job_containers: Option<Value>,
    metadata: BTreeMap<String, String>,
}

fn triggers(doc: &Value, origin: &str) -> Vec<Found> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    if kind != "ScaledObject" && kind != "ScaledJob" {
        return Vec::new();
    }
    let spec = &doc["spec"];
    let mut out = Vec::new();
    for t in spec["triggers"].as_array().into_iter().flatten() {
        let ty = t["type"].as_str().unwrap_or_default();
        if ty != "external" && ty != "external-push" {
            continue;
        }
        let metadata = t["metadata"]
            .as_object()
            .unwrap_or_else(|| panic!("{origin}: a {ty} trigger without metadata"))
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().unwrap_or_else(|| {
                    panic!("{origin}: metadata `{k}` must be a string (quote it)")
                });
                (k.clone(), v.to_string())
            })
            .collect();
        out.push(Found {
            origin: format!("{origin} ({kind} {})", doc["metadata"]["name"]),
            kind: kind.to_string(),
            target: spec["scaleTargetRef"]["name"].as_str().map(String::from),
            job_containers: (kind == "ScaledJob")
                .then(|| spec["jobTargetRef"]["template"]["spec"]["containers"].clone()),
            metadata,
        });
    }
    out
}

/// Keys only: every key is one the scaler or KEDA reads, and `scalerAddress` is there.
fn check_keys(found: &Found) {
    for key in found.metadata.keys() {
        assert!(
            KEYS.contains(&key.as_str()) || KEDA_KEYS.contains(&key.as_str()),
            "{}: metadata key `{key}` is read by neither the scaler nor KEDA",
            found.origin
        );
    }
    assert!(
        found.metadata.contains_key("scalerAddress"),
        "{}: no scalerAddress",
        found.origin
    );
}

/// The value of environment variable `name` in `containers`, following `secretKeyRef` into the
/// Secrets of `docs` (what KEDA does for `...FromEnv`).
fn container_env(containers: &Value, name: &str, docs: &[Value]) -> Option<String> {
    for c in containers.as_array().into_iter().flatten() {
        for e in c["env"].as_array().into_iter().flatten() {
            if e["name"] != name {
                continue;
            }
            if let Some(v) = e["value"].as_str() {
                return Some(v.to_string());
            }
            let r = &e["valueFrom"]["secretKeyRef"];
            let (secret, key) = (r["name"].as_str()?, r["key"].as_str()?);
            return docs
                .iter()
                .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == secret)
                .and_then(|d| d["stringData"][key].as_str().map(String::from));
        }
    }
    None
}

/// Resolves `...FromEnv` keys as KEDA does, from the scale target found in `docs`.
fn resolve(found: &Found, docs: &[Value]) -> HashMap<String, String> {
    let containers = match (&found.job_containers, &found.target) {
        (Some(c), _) => c.clone(),
        (None, Some(name)) => docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name.as_str())
            .map(|d| d["spec"]["template"]["spec"]["containers"].clone())
            .unwrap_or(Value::Null),
        (None, None) => Value::Null,
    };
    found
        .metadata
        .iter()
        .map(|(k, v)| {
            if k.ends_with("FromEnv") {
                let resolved = container_env(&containers, v, docs).unwrap_or_else(|| {
                    panic!(
                        "{}: `{k}: {v}` cannot be resolved: no container of the scale target in the example's directory sets {v}",
                        found.origin
                    )
                });
                (k.clone(), resolved)
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

/// The scaler's own broker environment as the example configures it (Secret `celery-keda-brokers`).
fn scaler_env(docs: &[Value]) -> BrokerEnv {
    let vars = docs
        .iter()
        .filter(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "celery-keda-brokers")
        .flat_map(|d| d["stringData"].as_object().cloned().unwrap_or_default())
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()));
    BrokerEnv::from_vars(vars).expect("the example's broker Secret is valid")
}

#[test]
fn every_example_trigger_parses_with_the_scalers_parser() {
    let examples = common::root().join("deploy/examples");
    let mut files = Vec::new();
    yaml_files(&examples, &mut files);
    files.sort();
    // Documents grouped by example directory: an example may rely on its siblings.
    let mut by_dir: BTreeMap<PathBuf, Vec<(PathBuf, Vec<Value>)>> = BTreeMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let dir = f
            .strip_prefix(&examples)
            .unwrap()
            .components()
            .next()
            .unwrap();
        by_dir
            .entry(PathBuf::from(dir.as_os_str()))
            .or_default()
            .push((f.clone(), documents(&text, f)));
    }
    let mut checked = BTreeMap::<String, usize>::new();
    for (dir, files) in &by_dir {
        // An example's own directory first; examples that build on another (tls/ says it uses
        // redis/worker.yaml) find the worker there.
        let mut all: Vec<Value> = files.iter().flat_map(|(_, d)| d.clone()).collect();
        let env = scaler_env(&all);
        if let Some(redis) = by_dir.get(Path::new("redis")) {
            all.extend(redis.iter().flat_map(|(_, d)| d.clone()));
        }
        for (path, docs) in files {
            let origin = path
                .strip_prefix(common::root())
                .unwrap()
                .display()
                .to_string();
            for doc in docs {
                for found in triggers(doc, &origin) {
                    check_keys(&found);
                    let meta = resolve(&found, &all);
                    let trigger = metadata::parse(&meta, &env).unwrap_or_else(|e| {
                        panic!("{}: the scaler refuses its metadata: {e}", found.origin)
                    });
                    let kind = trigger.query.backend.kind();
                    let dir = dir.to_string_lossy();
                    if ["redis", "rabbitmq", "sqs"].contains(&dir.as_ref()) {
                        assert_eq!(kind, dir, "{}: broker kind", found.origin);
                    }
                    if found.kind == "ScaledJob" {
                        assert!(
                            !trigger.query.in_flight && !trigger.query.running,
                            "{}: a ScaledJob must turn scaleOnInFlight and scaleOnRunning off",
                            found.origin
                        );
                    }
                    *checked.entry(format!("{dir}/{}", found.kind)).or_default() += 1;
                }
            }
        }
    }
    // Each broker ships a ScaledObject and a ScaledJob example.
    for dir in ["redis", "rabbitmq", "sqs"] {
        for kind in ["ScaledObject", "ScaledJob"] {
            assert!(
                checked.contains_key(&format!("{dir}/{kind}")),
                "no {kind} example for {dir}: {checked:?}"
            );
        }
    }
}

#[test]
fn readme_triggers_use_only_known_keys() {
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    let mut found = 0;
    for (i, block) in readme.split("```yaml").skip(1).enumerate() {
        let block = block.split("```").next().unwrap();
        for doc in documents(block, Path::new("README.md")) {
            for t in triggers(&doc, &format!("README.md yaml block {}", i + 1)) {
                check_keys(&t);
                found += 1;
            }
        }
    }
    assert!(
        found >= 2,
        "the README shows a ScaledObject and a ScaledJob"
    );
}

#[test]
fn unknown_keys_are_caught() {
    // The checks above can fail: a misspelt key is refused.
    let doc = documents(
        "kind: ScaledObject\nmetadata: {name: x}\nspec:\n  triggers:\n    - type: external\n      metadata: {scalerAddress: a, brokerURL: redis://x}\n",
        Path::new("inline"),
    );
    let found = triggers(&doc[0], "inline");
    assert!(std::panic::catch_unwind(|| check_keys(&found[0])).is_err());
}

/// The ScaledJob example's worker, run for real: the handler from its ConfigMap and its exact
/// worker flags (only the app and the queue changed), against a real broker.
fn oneshot_worker(broker: &str, queue: &str, handler_dir: &Path) -> std::process::Child {
    let path = common::root().join("deploy/examples/redis/scaledjob.yaml");
    let docs = documents(&std::fs::read_to_string(&path).unwrap(), &path);
    let job = docs.iter().find(|d| d["kind"] == "ScaledJob").unwrap();
    let container = &job["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0];
    let command: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[..4], ["celery", "-A", "app", "worker"]);
    let mut args: Vec<String> = vec!["-m".into(), "celery".into(), "-A".into(), "cks_app".into()];
    let mut rest = command[3..].iter();
    while let Some(a) = rest.next() {
        args.push(a.clone());
        if a == "-Q" {
            rest.next();
            args.push(queue.to_string());
        }
    }
    args.extend([
        "-n".into(),
        format!("{}@localhost", common::unique("oneshot")),
    ]);
    let mut cmd = std::process::Command::new(common::python());
    let mut conf = common::CeleryConf::new(broker);
    // The example says the app must use late acknowledgement.
    conf.acks_late = true;
    conf.apply(&mut cmd);
    for e in container["env"].as_array().unwrap() {
        if let Some(v) = e["value"].as_str() {
            if e["name"] != "PYTHONPATH" {
                cmd.env(e["name"].as_str().unwrap(), v);
            }
        }
    }
    cmd.args(&args)
        .env("PYTHONPATH", handler_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("celery worker starts")
}

/// Writes the ConfigMap's `oneshot.py` into a directory for PYTHONPATH.
fn oneshot_handler() -> tempfile::TempDir {
    let path = common::root().join("deploy/examples/redis/scaledjob.yaml");
    let docs = documents(&std::fs::read_to_string(&path).unwrap(), &path);
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the ScaledJob example ships its handler in a ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("oneshot.py"),
        cm["data"]["oneshot.py"].as_str().unwrap(),
    )
    .unwrap();
    dir
}

async fn each_worker_runs_exactly_one_task(broker: &str, queue: &str) {
    let handler = oneshot_handler();
    let conf = common::CeleryConf::new(broker);
    assert_eq!(conf.publish(queue, &["--count", "3"]), 3);
    let scaler =
        common::Scaler::start_with(BrokerEnv::default(), common::ServeSettingsExt::no_window())
            .await;
    let mut client = scaler.client().await;
    // The ScaledJob example's counting: neither in-flight nor running tasks.
    let job_meta = common::meta(&[
        ("brokerUrl", broker),
        ("queues", queue),
        ("queueLength", "1"),
        ("scaleOnInFlight", "false"),
        ("scaleOnRunning", "false"),
    ]);
    // Every task counted, held or not: what is left on the broker.
    let all_meta = common::meta(&[
        ("brokerUrl", broker),
        ("queues", queue),
        ("scaleOnRunning", "false"),
    ]);
    // The publisher does not wait for RabbitMQ to route its messages (no confirms): on a loaded
    // machine the first passive declare can come before they are queued.
    common::expect_depth(&scaler, &job_meta, 3, Duration::from_secs(20)).await;
    for left in [2, 1] {
        let mut worker = oneshot_worker(broker, queue, handler.path());
        let status = common::wait_for(
            "the one-shot worker to exit",
            Duration::from_secs(90),
            || {
                let s = worker.try_wait().unwrap();
                async move { s }
            },
        )
        .await;
        assert!(
            status.success(),
            "the worker exits 0 after its task: {status:?}"
        );
        // Exactly one task left the broker: acknowledged, nothing restored, nothing else taken.
        common::expect_depth(&scaler, &all_meta, left, Duration::from_secs(20)).await;
        assert_eq!(common::depth(&mut client, &job_meta).await.unwrap(), left);
    }
    scaler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaledjob_recipe_runs_one_task_per_worker_on_redis() {
    let queue = common::unique("oneshot");
    each_worker_runs_exactly_one_task(&common::redis_url(), &queue).await;
    common::cleanup_redis(&common::redis_url(), "", &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaledjob_recipe_runs_one_task_per_worker_on_rabbitmq() {
    let vhost = common::Vhost::create().await;
    let queue = common::unique("oneshot");
    each_worker_runs_exactly_one_task(&vhost.url(), &queue).await;
    vhost.delete().await;
}
