//! The container image, run the way each manifest runs it. Command, args, env, envFrom, ports,
//! probes, volumes, resources and security context are read from the rendered manifests
//! (`kubectl kustomize` of deploy/base, deploy/overlays/tls and the sidecar component on KEDA's own
//! operator Deployment; `helm template` of the chart with its defaults and with TLS on), never from
//! copies, and turned into `podman run` flags on the host network (the pod IP is the host's),
//! against the suite's Redis and RabbitMQ with tasks published by real Celery.
//!
//! For each shape: the running process's uid, gid and groups, capabilities, no_new_privs, seccomp,
//! read-only root and memory limit; the ports it listens on against the declared ones; the
//! liveness and readiness probes asked as the kubelet asks them, within their timing; GetMetrics
//! through the container equal to a real Celery publish on Redis (a named broker from the
//! `envFrom` Secret) and RabbitMQ; with TLS, certificates from a read-only Secret-like mount and a
//! rotation in place picked up; then termination as the kubelet does it: the preStop hook (the
//! scaler keeps serving), SIGTERM with an open push stream, the stream ending with status OK and
//! the process exiting 0 within `terminationGracePeriodSeconds`.
//!
//! Needs the image and podman (`bash scripts/image.sh`), kubectl, Helm (`CKS_E2E_BIN`, default
//! ~/.cache/celery-keda-scaler/e2e/bin; `CKS_E2E_ONLY=helm bash e2e/scripts/build.sh`) and Go
//! (KEDA's operator Deployment from the module pinned in e2e/keda/go.mod). Nothing skips. The
//! containers bind the manifests' own ports on the host (6000, 9090, 9095): one shape at a time.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde::Deserialize;
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The containers use the host's ports 6000, 9090 and 9095, as the manifests say: one at a time.
static HOST_PORTS: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

/// Label on every container this suite starts; its value is the test process's pid, so a later
/// run removes the containers of a run that died.
const LABEL: &str = "io.celery-keda-scaler.image-test";

/// The Secret `celery-keda-brokers` (the manifests' `envFrom`) holds this named broker.
const NAMED_BROKER: &str = "images";

/// How KEDA names the scaler when it goes through the Service (the server certificate's name).
const SERVICE_DNS: &str = "celery-keda-scaler.keda.svc";

// ---------------------------------------------------------------- tools

fn image() -> String {
    std::env::var("CKS_IMAGE").unwrap_or_else(|_| "localhost/celery-keda-scaler:test".into())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME is set")
        .join("celery-keda-scaler")
}

/// The containers.conf scripts/image.sh writes (runc, ulimits this host allows).
fn containers_conf() -> PathBuf {
    if let Some(p) = std::env::var_os("CONTAINERS_CONF") {
        return p.into();
    }
    std::env::var_os("CKS_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("images"))
        .join("containers.conf")
}

fn podman(args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd`; its stdout, or a failure naming `what` with its stderr.
fn output(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it ({e})"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Podman, the containers.conf and the image are there (else: fail, pointing at scripts/image.sh);
/// containers left by a run that died are removed. Once per test binary.
fn preflight() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        celery_keda_scaler::install_crypto_provider();
        let hint = "run `bash scripts/image.sh` first (it installs podman and builds the image)";
        match Command::new("podman").arg("--version").output() {
            Ok(o) if o.status.success() => {}
            _ => panic!("podman is not installed: {hint}"),
        }
        assert!(
            containers_conf().is_file(),
            "no containers.conf at {}: {hint}",
            containers_conf().display()
        );
        let status = podman(&["image", "exists", &image()])
            .status()
            .expect("podman runs");
        assert!(status.success(), "no image {}: {hint}", image());
        let listed = output(
            podman(&[
                "ps",
                "-a",
                "--filter",
                &format!("label={LABEL}"),
                "--format",
                &format!("{{{{.Names}}}} {{{{index .Labels \"{LABEL}\"}}}}"),
            ]),
            "podman ps",
        );
        for line in listed.lines() {
            let mut f = line.split_whitespace();
            let (Some(name), Some(pid)) = (f.next(), f.next()) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = podman(&["rm", "-f", "-t", "0", name]).output();
            }
        }
    });
}

// ---------------------------------------------------------------- rendering

fn kustomize(dir: &Path) -> String {
    let mut cmd = Command::new("kubectl");
    cmd.arg("kustomize").arg(dir);
    output(
        cmd,
        &format!(
            "kubectl kustomize {} (kubectl is needed to render deploy/)",
            dir.display()
        ),
    )
}

fn helm_template(sets: &[&str]) -> String {
    let bin = std::env::var_os("CKS_E2E_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("e2e/bin"))
        .join("helm");
    assert!(
        bin.is_file(),
        "no Helm at {}: `CKS_E2E_ONLY=helm bash e2e/scripts/build.sh` builds it (scripts/check-helm.sh does too)",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["template", "celery-keda-scaler"])
        .arg(root().join("deploy/helm/celery-keda-scaler"))
        .args(["--namespace", "keda"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    output(cmd, &format!("helm template {sets:?}"))
}

/// The sidecar component applied to KEDA's own operator Deployment (config/manager/manager.yaml of
/// the KEDA module pinned in e2e/keda/go.mod), as tests/k8s/sidecar renders it.
fn sidecar_render() -> String {
    let mut cmd = Command::new("go");
    cmd.args(["mod", "download", "-json", "github.com/kedacore/keda/v2"])
        .current_dir(root().join("e2e/keda"));
    let info: Value = serde_json::from_str(&output(
        cmd,
        "go mod download github.com/kedacore/keda/v2 (Go reads KEDA's operator Deployment)",
    ))
    .expect("go mod download -json prints JSON");
    let dir = PathBuf::from(info["Dir"].as_str().expect("the module's Dir"));
    let manager = std::fs::read_to_string(dir.join("config/manager/manager.yaml"))
        .expect("config/manager/manager.yaml in the KEDA module");
    // Inside the repository (target/ is ignored): kustomize loads components by relative path only.
    let target = root().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let work = tempfile::Builder::new()
        .prefix("image-sidecar")
        .tempdir_in(&target)
        .unwrap();
    std::fs::write(work.path().join("keda-operator.yaml"), manager).unwrap();
    std::fs::write(
        work.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources: [keda-operator.yaml]\ncomponents: [../../deploy/overlays/sidecar]\n",
    )
    .unwrap();
    kustomize(work.path())
}

/// Every document of a multi-document YAML stream. A plain scalar like `0440` is octal, as the
/// YAML 1.1 parser of the API server reads it (Helm writes `defaultMode: 0440`).
fn documents(yaml: &str) -> Vec<Value> {
    let text: String = yaml
        .lines()
        .map(|line| match line.rsplit_once(": ") {
            Some((key, v))
                if v.len() > 1
                    && v.starts_with('0')
                    && v.bytes().all(|b| (b'0'..=b'7').contains(&b)) =>
            {
                format!("{key}: 0o{}\n", &v[1..])
            }
            _ => format!("{line}\n"),
        })
        .collect();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

// ---------------------------------------------------------------- one way of running the image

/// One rendered workload that runs the image: the pod spec, the container and the render's
/// other objects (its Service).
struct Shape {
    name: &'static str,
    objects: Vec<Value>,
    pod: Value,
    container: Value,
}

/// The security settings the kubelet applies, container over pod.
#[derive(Debug)]
struct Security {
    user: Option<i64>,
    group: Option<i64>,
    fs_group: Option<i64>,
    non_root: bool,
    read_only_root: bool,
    no_escalation: bool,
    drop: Vec<String>,
    add: Vec<String>,
    privileged: bool,
    seccomp: Option<String>,
}

/// How the kubelet asks one probe.
#[derive(Debug)]
struct Probe {
    kind: ProbeKind,
    initial_delay: u64,
    period: u64,
    timeout: u64,
}

#[derive(Debug, PartialEq)]
enum ProbeKind {
    Grpc { port: u16, service: String },
    Http { port: u16, path: String },
}

impl Shape {
    fn new(name: &'static str, yaml: &str) -> Shape {
        let objects = documents(yaml);
        let mut found = Vec::new();
        for o in &objects {
            if o["kind"] != "Deployment" {
                continue;
            }
            let pod = &o["spec"]["template"]["spec"];
            for c in pod["containers"].as_array().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default();
                let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
                if repo.ends_with("/celery-keda-scaler") {
                    found.push((pod.clone(), c.clone()));
                }
            }
        }
        assert_eq!(
            found.len(),
            1,
            "{name}: exactly one container runs the scaler's image"
        );
        let (pod, container) = found.pop().unwrap();
        Shape {
            name,
            objects,
            pod,
            container,
        }
    }

    /// The manifest's image tag (the release it pins).
    fn image_tag(&self) -> &str {
        let image = self.container["image"].as_str().unwrap();
        image.rsplit_once(':').map_or("latest", |(_, t)| t)
    }

    fn env(&self, name: &str) -> Option<String> {
        self.container["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_string))
    }

    fn tls(&self) -> bool {
        self.env("CELERY_KEDA_TLS_CERT_FILE").is_some()
    }

    fn mutual_tls(&self) -> bool {
        self.env("CELERY_KEDA_TLS_CLIENT_CA_FILE").is_some()
    }

    /// A container port by number or by name.
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let name = port.as_str().expect("a port is a number or a name");
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.name))
            as u16
    }

    fn declared_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                assert!(
                    p["protocol"].is_null() || p["protocol"] == "TCP",
                    "{}: TCP ports only",
                    self.name
                );
                p["containerPort"].as_u64().unwrap() as u16
            })
            .collect();
        ports.sort();
        ports
    }

    /// Where KEDA reaches the gRPC port: through the render's Service (its `grpc` port's target
    /// at the pod IP), or, with no Service (the sidecar), at the address the container listens on
    /// (`scalerAddress: localhost:6000`).
    fn grpc_target(&self, pod_ip: IpAddr) -> SocketAddr {
        let labels = &self.pod_labels();
        let service = self.objects.iter().find(|o| {
            o["kind"] == "Service"
                && o["spec"]["selector"]
                    .as_object()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        match service {
            Some(s) => {
                let port = s["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == "grpc")
                    .unwrap_or_else(|| panic!("{}: the Service has no port `grpc`", self.name));
                SocketAddr::new(pod_ip, self.port(&port["targetPort"]))
            }
            None => self
                .env("CELERY_KEDA_LISTEN")
                .unwrap_or_else(|| panic!("{}: no Service and no CELERY_KEDA_LISTEN", self.name))
                .parse()
                .expect("CELERY_KEDA_LISTEN is an address"),
        }
    }

    fn pod_labels(&self) -> serde_json::Map<String, Value> {
        // The pod's labels sit beside its spec in the Deployment.
        for o in &self.objects {
            if o["kind"] == "Deployment" && o["spec"]["template"]["spec"] == self.pod {
                return o["spec"]["template"]["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
            }
        }
        unreachable!("the pod came from a Deployment")
    }

    fn grace(&self) -> Duration {
        // Kubernetes' default when unset.
        Duration::from_secs(
            self.pod["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        )
    }

    fn pre_stop(&self) -> Duration {
        let hook = &self.container["lifecycle"]["preStop"];
        if hook.is_null() {
            return Duration::ZERO;
        }
        let seconds = hook["sleep"]["seconds"].as_u64().unwrap_or_else(|| {
            panic!(
                "{}: a preStop hook other than `sleep` (the image has no shell)",
                self.name
            )
        });
        Duration::from_secs(seconds)
    }

    fn security(&self) -> Security {
        let c = &self.container["securityContext"];
        let p = &self.pod["securityContext"];
        let either = |k: &str| if c[k].is_null() { &p[k] } else { &c[k] };
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        Security {
            user: either("runAsUser").as_i64(),
            group: either("runAsGroup").as_i64(),
            fs_group: p["fsGroup"].as_i64(),
            non_root: either("runAsNonRoot").as_bool() == Some(true),
            read_only_root: c["readOnlyRootFilesystem"].as_bool() == Some(true),
            no_escalation: c["allowPrivilegeEscalation"].as_bool() == Some(false),
            drop: strings(&c["capabilities"]["drop"]),
            add: strings(&c["capabilities"]["add"]),
            privileged: c["privileged"].as_bool() == Some(true),
            seccomp: either("seccompProfile")["type"]
                .as_str()
                .map(str::to_string),
        }
    }

    fn probe(&self, which: &str) -> Probe {
        let p = &self.container[which];
        assert!(!p.is_null(), "{}: no {which}", self.name);
        let kind = if !p["grpc"].is_null() {
            ProbeKind::Grpc {
                port: self.port(&p["grpc"]["port"]),
                service: p["grpc"]["service"].as_str().unwrap_or("").to_string(),
            }
        } else if !p["httpGet"].is_null() {
            let h = &p["httpGet"];
            assert!(
                h["scheme"].is_null() || h["scheme"] == "HTTP",
                "{}: {which} over HTTPS",
                self.name
            );
            assert!(h["host"].is_null(), "{}: {which} names a host", self.name);
            ProbeKind::Http {
                port: self.port(&h["port"]),
                path: h["path"].as_str().unwrap_or("/").to_string(),
            }
        } else {
            panic!("{}: {which} is neither grpc nor httpGet", self.name)
        };
        // Kubernetes' defaults.
        Probe {
            kind,
            initial_delay: p["initialDelaySeconds"].as_u64().unwrap_or(0),
            period: p["periodSeconds"].as_u64().unwrap_or(10),
            timeout: p["timeoutSeconds"].as_u64().unwrap_or(1),
        }
    }

    fn memory_limit(&self) -> Option<u64> {
        let q = self.container["resources"]["limits"]["memory"].as_str()?;
        let (n, unit) = q
            .find(|c: char| !c.is_ascii_digit())
            .map_or((q, ""), |i| q.split_at(i));
        let n: u64 = n.parse().expect("a memory quantity");
        let factor = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "k" => 1000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            other => panic!("{}: memory unit {other}", self.name),
        };
        Some(n * factor)
    }

    /// `podman run` arguments that run the image as the kubelet would run this container.
    /// `secrets` are the Secrets of the namespace (name -> keys); `volumes` host directories laid
    /// out as the kubelet lays out each Secret volume (by secret name).
    fn run_args(
        &self,
        name: &str,
        secrets: &BTreeMap<&str, BTreeMap<String, String>>,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> Vec<String> {
        let s = self.security();
        let mut a: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.into(),
            "--label".into(),
            format!("{LABEL}={}", std::process::id()),
            "--pull=never".into(),
            // hostNetwork-like: the pod IP is the host's, and the brokers are on its loopback.
            "--network=host".into(),
        ];
        assert!(!s.privileged, "{}: privileged", self.name);
        if s.read_only_root {
            // No tmpfs on /tmp, /run: Kubernetes mounts none either.
            a.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        for c in &s.drop {
            a.push(format!("--cap-drop={c}"));
        }
        for c in &s.add {
            a.push(format!("--cap-add={c}"));
        }
        if s.no_escalation {
            a.push("--security-opt=no-new-privileges".into());
        }
        match s.seccomp.as_deref() {
            // podman's default profile is the runtime's default.
            Some("RuntimeDefault") => {}
            Some("Unconfined") | None => a.push("--security-opt=seccomp=unconfined".into()),
            Some(other) => panic!("{}: seccompProfile {other}", self.name),
        }
        match (s.user, s.group) {
            (Some(u), Some(g)) => a.push(format!("--user={u}:{g}")),
            (Some(u), None) => a.push(format!("--user={u}")),
            (None, _) => {}
        }
        if let Some(g) = s.fs_group {
            a.push(format!("--group-add={g}"));
        }
        if let Some(bytes) = self.memory_limit() {
            a.push(format!("--memory={bytes}b"));
        }
        // envFrom first; env entries override it, as in Kubernetes.
        for from in self.container["envFrom"].as_array().into_iter().flatten() {
            let r = &from["secretRef"];
            let secret = r["name"]
                .as_str()
                .expect("envFrom supports secretRef only here");
            match secrets.get(secret) {
                Some(keys) => {
                    for (k, v) in keys {
                        a.push(format!("--env={k}={v}"));
                    }
                }
                None => assert_eq!(
                    r["optional"].as_bool(),
                    Some(true),
                    "{}: envFrom Secret {secret} is required",
                    self.name
                ),
            }
        }
        for e in self.container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap();
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    let (secret, key) = (r["name"].as_str(), r["key"].as_str());
                    secrets
                        .get(secret.unwrap_or_else(|| {
                            panic!("{}: env {name}: only values and secretKeyRef", self.name)
                        }))
                        .and_then(|keys| keys.get(key.unwrap()))
                        .unwrap_or_else(|| {
                            panic!(
                                "{}: env {name}: Secret {secret:?} key {key:?} is missing",
                                self.name
                            )
                        })
                        .clone()
                }
            };
            a.push(format!("--env={name}={value}"));
        }
        for m in self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(
                m["subPath"].is_null(),
                "{}: subPath mounts are never updated",
                self.name
            );
            let volume = self.pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("{}: no volume {}", self.name, m["name"]));
            let secret = volume["secret"]["secretName"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: only Secret volumes here", self.name));
            let host = volumes
                .get(secret)
                .unwrap_or_else(|| panic!("{}: no Secret {secret} prepared", self.name));
            // Secret volumes are read-only whatever readOnly says.
            a.push(format!(
                "--volume={}:{}:ro",
                host.display(),
                m["mountPath"].as_str().unwrap()
            ));
        }
        if let Some(cmd) = self.container["command"].as_array() {
            a.push(format!("--entrypoint={}", Value::Array(cmd.clone())));
        }
        a.push(image());
        for arg in self.container["args"].as_array().into_iter().flatten() {
            a.push(arg.as_str().unwrap().to_string());
        }
        a
    }
}

// ---------------------------------------------------------------- the running container

struct Container {
    name: String,
    started: Instant,
}

impl Container {
    fn start(
        shape: &Shape,
        secrets: &BTreeMap<&str, BTreeMap<String, String>>,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> Container {
        // The ports the container will take must be free on the host.
        let mut ports = shape.declared_ports();
        for (var, default) in [
            ("CELERY_KEDA_LISTEN", "0.0.0.0:6000"),
            ("CELERY_KEDA_ADMIN_LISTEN", "0.0.0.0:9090"),
        ] {
            let addr: SocketAddr = shape
                .env(var)
                .unwrap_or_else(|| default.into())
                .parse()
                .unwrap();
            ports.push(addr.port());
        }
        for port in ports {
            assert!(
                std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
                "port {port} is taken on this host: the image runs on the host network with the \
                 manifests' ports (see `ss -ltnp 'sport = :{port}'`)"
            );
        }
        let name = unique("cks-image");
        let args = shape.run_args(&name, secrets, volumes);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        output(
            podman(&args),
            &format!("{}: podman {}", shape.name, args.join(" ")),
        );
        Container { name, started }
    }

    fn inspect(&self, format: &str) -> String {
        output(
            podman(&["inspect", "--format", format, &self.name]),
            "podman inspect",
        )
        .trim()
        .to_string()
    }

    /// The container's main process as the host sees it.
    fn pid(&self) -> u32 {
        let pid: u32 = self.inspect("{{.State.Pid}}").parse().unwrap();
        assert_ne!(pid, 0, "the container is not running: {}", self.logs());
        pid
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]).output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    }

    /// The exit code once the container has stopped, waiting until `deadline`.
    fn wait_exit(&self, deadline: Instant) -> Option<i64> {
        loop {
            let state = self.inspect("{{.State.Status}} {{.State.ExitCode}}");
            let (status, code) = state.split_once(' ').unwrap();
            if status == "exited" || status == "stopped" {
                return Some(code.parse().unwrap());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// The address the kubelet probes and a Service routes to: with the host network, the host's.
fn pod_ip() -> IpAddr {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("`ip` (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            cidr.split('/').next()?.parse().ok()
        })
        .expect("a non-loopback IPv4 address on this host, to stand for the pod IP")
}

/// One `Name:\tvalue` line of /proc/<pid>/status.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The TCP addresses the process listens on (its sockets matched in /proc/<pid>/net/tcp{,6}).
fn listening(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(link) = std::fs::read_link(fd.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.push(inode.to_string());
            }
        }
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode
            if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
                continue;
            }
            let (addr, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            // The kernel prints each 32-bit word of the address in host (little-endian) order.
            let words: Vec<[u8; 4]> = (0..addr.len() / 8)
                .map(|i| {
                    u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16)
                        .unwrap()
                        .to_le_bytes()
                })
                .collect();
            let ip = if words.len() == 1 {
                IpAddr::V4(Ipv4Addr::from(words[0]))
            } else {
                let bytes: Vec<u8> = words.concat();
                IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap()))
            };
            found.push(SocketAddr::new(ip, port));
        }
    }
    found.sort();
    found
}

/// What the kubelet enforces, read back from the running process: user, groups, capabilities,
/// no_new_privs, seccomp, read-only root, memory limit.
fn check_process(shape: &Shape, ctr: &Container) {
    let s = shape.security();
    let name = shape.name;
    // What the issue asks of every shape: non-root, read-only root filesystem, no capabilities.
    assert!(s.non_root, "{name}: runAsNonRoot is not set");
    assert!(
        s.read_only_root,
        "{name}: readOnlyRootFilesystem is not true"
    );
    assert_eq!(s.drop, ["ALL"], "{name}: capabilities.drop");
    assert!(s.add.is_empty(), "{name}: capabilities.add {:?}", s.add);
    assert!(
        s.no_escalation,
        "{name}: allowPrivilegeEscalation is not false"
    );
    assert_eq!(
        s.seccomp.as_deref(),
        Some("RuntimeDefault"),
        "{name}: seccompProfile"
    );

    let pid = ctr.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // runAsUser / runAsGroup unset: the image's USER, which runAsNonRoot accepts only numeric.
    let image_user = output(
        podman(&["image", "inspect", "--format", "{{.Config.User}}", &image()]),
        "podman image inspect",
    );
    let (image_uid, image_gid) = image_user
        .trim()
        .split_once(':')
        .unwrap_or((image_user.trim(), "0"));
    let uid = s
        .user
        .unwrap_or_else(|| image_uid.parse().expect("a numeric USER in the image"));
    let gid = s.group.unwrap_or_else(|| {
        image_gid
            .parse()
            .expect("a numeric group in the image's USER")
    });
    assert_ne!(uid, 0, "{name}: runs as root");
    assert_eq!(
        status_field(&status, "Uid"),
        format!("{uid} {uid} {uid} {uid}"),
        "{name}: uid"
    );
    assert_eq!(
        status_field(&status, "Gid"),
        format!("{gid} {gid} {gid} {gid}"),
        "{name}: gid"
    );
    // The runtime adds the primary group to the supplementary ones (containerd and CRI-O do
    // too), and the kubelet adds fsGroup.
    let mut want_groups = vec![gid];
    want_groups.extend(s.fs_group);
    want_groups.sort();
    want_groups.dedup();
    let want_groups: Vec<String> = want_groups.iter().map(i64::to_string).collect();
    assert_eq!(
        status_field(&status, "Groups"),
        want_groups.join(" "),
        "{name}: supplementary groups (primary group, fsGroup)"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(&status, cap),
            "0000000000000000",
            "{name}: {cap}"
        );
    }
    assert_eq!(
        status_field(&status, "NoNewPrivs"),
        "1",
        "{name}: no_new_privs"
    );
    assert_eq!(
        status_field(&status, "Seccomp"),
        "2",
        "{name}: seccomp filter mode"
    );

    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[4] == "/")
        .expect("a root mount");
    assert!(
        root[5].split(',').any(|o| o == "ro"),
        "{name}: the root filesystem is mounted {}",
        root[5]
    );

    if let Some(limit) = shape.memory_limit() {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let (file, path) = match cgroups
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        {
            Some(p) => ("memory.limit_in_bytes", format!("/sys/fs/cgroup/memory{p}")),
            None => {
                let p = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
                ("memory.max", format!("/sys/fs/cgroup{p}"))
            }
        };
        let got = std::fs::read_to_string(Path::new(&path).join(file)).unwrap();
        assert_eq!(got.trim(), limit.to_string(), "{name}: memory limit");
    }
}

/// The process listens on exactly the declared container ports (on every address, so at the pod
/// IP), plus only loopback addresses no one outside the pod reaches.
fn check_ports(shape: &Shape, ctr: &Container) {
    let listening = listening(ctr.pid());
    let external: Vec<u16> = listening
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(|a| {
            assert!(a.ip().is_unspecified(), "{}: listens on {a}", shape.name);
            a.port()
        })
        .collect();
    assert_eq!(
        external,
        shape.declared_ports(),
        "{}: ports listened on at the pod IP ({listening:?}) vs containerPorts",
        shape.name
    );
}

impl Probe {
    /// One probe as the kubelet sends it (to the pod IP, bounded by timeoutSeconds): what came back.
    async fn ask(&self, pod_ip: IpAddr) -> Result<String, String> {
        let timeout = Duration::from_secs(self.timeout);
        match &self.kind {
            ProbeKind::Grpc { port, service } => {
                let channel = Channel::from_shared(format!("http://{pod_ip}:{port}"))
                    .unwrap()
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect()
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let r = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: service.clone(),
                    })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                Ok(format!("{:?}", r.into_inner().status()))
            }
            ProbeKind::Http { port, path } => {
                let r = reqwest::Client::builder()
                    .timeout(timeout)
                    .build()
                    .unwrap()
                    .get(format!("http://{pod_ip}:{port}{path}"))
                    .send()
                    .await
                    .map_err(|e| format!("GET: {e}"))?;
                let status = r.status().as_u16();
                let body = r.text().await.map_err(|e| format!("body: {e}"))?;
                Ok(format!("{status} {body:?}"))
            }
        }
    }

    /// What a passing probe of this kind answers (the kubelet passes gRPC SERVING and HTTP
    /// 200-399; the scaler answers exactly these).
    fn passing(&self) -> String {
        match &self.kind {
            ProbeKind::Grpc { .. } => format!("{:?}", ServingStatus::Serving),
            ProbeKind::Http { path, .. } if path == "/healthz" => "200 \"ok\\n\"".into(),
            ProbeKind::Http { path, .. } if path == "/readyz" => "200 \"ready\\n\"".into(),
            ProbeKind::Http { path, .. } => {
                panic!("a probe of {path}, which the scaler does not serve")
            }
        }
    }
}

/// Both probes pass as the kubelet asks them: liveness at its first probe (initialDelaySeconds
/// after start), readiness at the latest at its second (initialDelaySeconds + periodSeconds);
/// each answer within timeoutSeconds; and again afterwards.
async fn check_probes(shape: &Shape, ctr: &Container, pod_ip: IpAddr) {
    for (which, slack) in [("readinessProbe", true), ("livenessProbe", false)] {
        let probe = shape.probe(which);
        let bound = Duration::from_secs(probe.initial_delay + if slack { probe.period } else { 0 })
            .max(Duration::from_secs(1));
        let want = probe.passing();
        let mut last = Err(String::new());
        while ctr.started.elapsed() < bound {
            last = probe.ask(pod_ip).await;
            if last.as_deref() == Ok(want.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            last.as_deref(),
            Ok(want.as_str()),
            "{}: {which} {probe:?} within {bound:?} of the start; log:\n{}",
            shape.name,
            ctr.logs()
        );
        assert_eq!(
            probe.ask(pod_ip).await.as_deref(),
            Ok(want.as_str()),
            "{}: {which} again",
            shape.name
        );
    }
}

// ---------------------------------------------------------------- TLS material

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn sign(&self, names: &[&str]) -> Pair {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A CA with the scaler's certificate (for the Service name and the pod IP) and KEDA's client one.
struct Pki {
    ca: Ca,
    server: Pair,
    client: Pair,
}

impl Pki {
    fn new(name: &str, pod_ip: IpAddr) -> Pki {
        let ca = Ca::new(name);
        let ip = pod_ip.to_string();
        let server = ca.sign(&[SERVICE_DNS, "localhost", &ip]);
        let client = ca.sign(&["keda-operator"]);
        Pki { ca, server, client }
    }
}

/// A host directory laid out as the kubelet lays out a Secret volume (`tls.crt -> ..data/tls.crt`,
/// `..data -> ..vN`, swapped atomically on update), files owned by root and the pod's fsGroup
/// with the volume's defaultMode.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
    group: Option<u32>,
    mode: u32,
}

impl SecretVolume {
    fn new(shape: &Shape, secret: &str, pki: &Pki) -> SecretVolume {
        let volume = shape.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["secret"]["secretName"] == secret)
            .unwrap_or_else(|| panic!("{}: no Secret volume {secret}", shape.name));
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut v = SecretVolume {
            dir,
            version: 0,
            group: shape.security().fs_group.map(|g| g as u32),
            // Kubernetes' default mode when unset.
            mode: volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32,
        };
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.path().join(name)).unwrap();
        }
        v.publish(pki);
        v
    }

    fn publish(&mut self, pki: &Pki) {
        use std::os::unix::fs::PermissionsExt;
        self.version += 1;
        let version = self.dir.path().join(format!("..v{}", self.version));
        std::fs::create_dir(&version).unwrap();
        std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (name, text) in [
            ("tls.crt", &pki.server.cert),
            ("tls.key", &pki.server.key),
            ("ca.crt", &pki.ca.pem),
        ] {
            let f = version.join(name);
            std::fs::write(&f, text).unwrap();
            std::os::unix::fs::chown(&f, Some(0), self.group).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(self.mode)).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

/// A channel to the scaler's gRPC port as KEDA opens it: plaintext, or TLS trusting `pki`'s CA
/// for the Service name and presenting KEDA's client certificate when `mutual`.
async fn connect(target: SocketAddr, tls: Option<(&Pki, bool)>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{target}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    if let Some((pki, mutual)) = tls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca.pem))
            .domain_name(SERVICE_DNS);
        if mutual {
            config = config.identity(Identity::from_pem(&pki.client.cert, &pki.client.key));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| e.to_string())?;
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// A GetMetricSpec over a fresh connection: whether this client gets through.
async fn rpc_works(target: SocketAddr, tls: Option<(&Pki, bool)>) -> bool {
    let Ok(channel) = connect(target, tls).await else {
        return false;
    };
    let m = meta(&[("brokerUrl", "redis://127.0.0.1:6379/0"), ("queues", "q")]);
    ExternalScalerClient::new(channel)
        .get_metric_spec(object_ref(&m))
        .await
        .is_ok()
}

// ---------------------------------------------------------------- the checks of one shape

/// Tasks published by real Celery, read through the container: Redis through the named broker of
/// the `envFrom` Secret (inline when the manifest has no envFrom), RabbitMQ inline.
async fn check_depths(shape: &Shape, channel: Channel, named_broker: bool) {
    let mut client = ExternalScalerClient::new(channel);
    let url = redis_url();
    let q = unique("img");
    assert_eq!(
        CeleryConf::new(&url).publish(&q, &["--count", "2", "--priorities", "0-9"]),
        20
    );
    let m = if named_broker {
        meta(&[("broker", NAMED_BROKER), ("queues", &q)])
    } else {
        meta(&[("brokerUrl", &url), ("queues", &q)])
    };
    assert_eq!(
        depth(&mut client, &m)
            .await
            .unwrap_or_else(|s| panic!("{}: Redis GetMetrics: {s:?}", shape.name)),
        20,
        "{}: Redis depth of 20 Celery tasks over priorities 0-9",
        shape.name
    );
    assert!(
        active(&mut client, &m).await.unwrap(),
        "{}: IsActive",
        shape.name
    );
    cleanup_redis(&url, "", &[&q]).await;

    let vhost = Vhost::create().await;
    let q = unique("img");
    assert_eq!(
        CeleryConf::new(&vhost.url()).publish(&q, &["--count", "7"]),
        7
    );
    let m = meta(&[("brokerUrl", &vhost.url()), ("queues", &q)]);
    let got = depth(&mut client, &m).await;
    vhost.delete().await;
    assert_eq!(
        got.unwrap_or_else(|s| panic!("{}: RabbitMQ GetMetrics: {s:?}", shape.name)),
        7,
        "{}: RabbitMQ depth of 7 Celery tasks",
        shape.name
    );
}

/// Termination as the kubelet does it, with a push stream open: the preStop hook runs first (the
/// scaler keeps serving: the stream stays open, readiness still passes), then SIGTERM; the stream
/// ends with status OK and the process exits 0, all within terminationGracePeriodSeconds.
async fn check_termination(shape: &Shape, ctr: &Container, channel: Channel, pod_ip: IpAddr) {
    let name = shape.name;
    let url = redis_url();
    let q = unique("img-term");
    assert_eq!(CeleryConf::new(&url).publish(&q, &["--count", "3"]), 3);
    let m = meta(&[("brokerUrl", &url), ("queues", &q)]);
    let mut stream = ExternalScalerClient::new(channel)
        .stream_is_active(object_ref(&m))
        .await
        .unwrap_or_else(|s| panic!("{name}: StreamIsActive: {s:?}"))
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(ref r))) if r.result),
        "{name}: the stream sends `true` for 3 tasks at once, got {first:?}"
    );

    let grace = shape.grace();
    let pre_stop = shape.pre_stop();
    assert!(
        pre_stop < grace,
        "{name}: preStop {pre_stop:?} >= grace {grace:?}"
    );
    let t0 = Instant::now();
    // preStop: only repeated `true`s (a few re-sends after an activation) may arrive.
    while t0.elapsed() < pre_stop {
        let left = pre_stop.saturating_sub(t0.elapsed());
        if let Ok(msg) = tokio::time::timeout(left, stream.message()).await {
            assert!(
                matches!(msg, Ok(Some(ref r)) if r.result),
                "{name}: during preStop the stream must stay open, got {msg:?}"
            );
        }
    }
    if !pre_stop.is_zero() {
        let readiness = shape.probe("readinessProbe");
        assert_eq!(
            readiness.ask(pod_ip).await.as_deref(),
            Ok(readiness.passing().as_str()),
            "{name}: still ready at the end of preStop"
        );
    }

    output(
        podman(&["kill", "--signal", "TERM", &ctr.name]),
        "podman kill --signal TERM",
    );
    let deadline = t0 + grace;
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(r))) if r.result => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Ok(Ok(None))),
        "{name}: after SIGTERM the stream ends with status OK, got {end:?}"
    );
    let code = ctr.wait_exit(deadline);
    let took = t0.elapsed();
    let logs = ctr.logs();
    assert_eq!(
        code,
        Some(0),
        "{name}: exit code within terminationGracePeriodSeconds ({grace:?}; {took:?} since preStop began); log:\n{logs}"
    );
    assert!(
        took < grace,
        "{name}: exited after {took:?}, grace {grace:?}"
    );
    // The manifests ask for JSON logs: every line is a JSON object, the last one says it stopped.
    if shape.env("CELERY_KEDA_LOG_FORMAT").as_deref() == Some("json") {
        let lines: Vec<Value> = logs
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{name}: log line {l:?} is not JSON ({e})"))
            })
            .collect();
        assert_eq!(
            lines.last().map(|l| l["message"].clone()),
            Some(Value::from("Stopped")),
            "{name}: the last log line"
        );
    }
    cleanup_redis(&url, "", &[&q]).await;
}

/// Everything above for one rendered shape.
async fn run_shape(name: &'static str, yaml: String) {
    preflight();
    let shape = Shape::new(name, &yaml);
    let label = output(
        podman(&[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"org.opencontainers.image.version\"}}",
            &image(),
        ]),
        "podman image inspect",
    );
    assert_eq!(
        label.trim(),
        shape.image_tag(),
        "{name}: the manifest's image tag and the image's version label"
    );
    let pod_ip = pod_ip();
    let _ports = HOST_PORTS.lock().await;

    // The namespace's Secrets: named brokers for envFrom (what users put in celery-keda-brokers).
    let mut secrets = BTreeMap::new();
    secrets.insert(
        "celery-keda-brokers",
        BTreeMap::from([(
            format!("CELERY_KEDA_BROKER_{}", NAMED_BROKER.to_uppercase()),
            redis_url(),
        )]),
    );
    let named_broker = shape.container["envFrom"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f["secretRef"]["name"] == "celery-keda-brokers");
    let mut volumes = BTreeMap::new();
    let tls_secret = shape.pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|v| v["secret"]["secretName"].as_str().map(str::to_string));
    let first = shape.tls().then(|| Pki::new("cks image CA 1", pod_ip));
    let mut volume = None;
    if let Some(first) = &first {
        let secret = tls_secret.expect("TLS files come from a Secret volume");
        let v = SecretVolume::new(&shape, &secret, first);
        volumes.insert(secret, v.dir.path().to_path_buf());
        volume = Some(v);
    }

    let ctr = Container::start(&shape, &secrets, &volumes);
    check_probes(&shape, &ctr, pod_ip).await;
    check_process(&shape, &ctr);
    check_ports(&shape, &ctr);

    let target = shape.grpc_target(pod_ip);
    let mutual = shape.mutual_tls();
    let pki = if let (Some(volume), Some(first)) = (volume.as_mut(), first.as_ref()) {
        // Kubernetes' gRPC probes cannot speak TLS: plaintext gets nothing from the TLS port.
        assert!(
            !rpc_works(target, None).await,
            "{name}: plaintext on the TLS port"
        );
        assert!(
            rpc_works(target, Some((first, mutual))).await,
            "{name}: TLS with the first CA"
        );
        if mutual {
            assert!(
                !rpc_works(target, Some((first, false))).await,
                "{name}: mTLS refuses a client without a certificate"
            );
        }
        // Rotation in place (a renewal by cert-manager): a new CA, server and client certificate.
        let second = Pki::new("cks image CA 2", pod_ip);
        volume.publish(&second);
        let reload: Duration = humantime::parse_duration(
            &shape
                .env("CELERY_KEDA_TLS_RELOAD_INTERVAL")
                .unwrap_or_else(|| "10s".into()),
        )
        .unwrap();
        wait_for(
            &format!("{name}: the rotated certificates served"),
            // Two intervals and a margin, at most a minute (a longer interval fails here).
            (2 * reload + Duration::from_secs(5)).min(Duration::from_secs(60)),
            || async {
                rpc_works(target, Some((&second, mutual)))
                    .await
                    .then_some(())
            },
        )
        .await;
        assert!(
            !rpc_works(target, Some((first, mutual))).await,
            "{name}: the first CA's certificates after the rotation"
        );
        Some(second)
    } else {
        None
    };
    let channel = || async {
        connect(target, pki.as_ref().map(|p| (p, mutual)))
            .await
            .unwrap_or_else(|e| panic!("{name}: connect to {target}: {e}"))
    };
    check_depths(&shape, channel().await, named_broker).await;
    check_termination(&shape, &ctr, channel().await, pod_ip).await;
}

// ---------------------------------------------------------------- the shapes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_base() {
    run_shape("deploy/base", kustomize(&root().join("deploy/base"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_overlays_tls() {
    run_shape(
        "deploy/overlays/tls",
        kustomize(&root().join("deploy/overlays/tls")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_of_keda_operator() {
    run_shape("deploy/overlays/sidecar on keda-operator", sidecar_render()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_chart_defaults() {
    run_shape("helm chart (defaults)", helm_template(&[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_chart_tls() {
    run_shape(
        "helm chart (tls.enabled)",
        helm_template(&[
            "tls.enabled=true",
            "tls.existingSecret=celery-keda-scaler-tls",
            "tls.triggerAuthentication.clientSecret=keda-client-tls",
        ]),
    )
    .await;
}
