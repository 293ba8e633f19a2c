//! TLS and mTLS on the gRPC port, end to end: generated certificates laid out as a Kubernetes
//! Secret volume, a real tonic gRPC client, a real Redis with tasks published by real Celery, and
//! certificates rotated the way the kubelet does it (an atomic `..data` symlink swap) while the
//! scaler keeps running.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::server::ServeSettings;
use celery_keda_scaler::tls::{Reloader, TlsSettings};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A certificate authority that signs server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
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
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A directory laid out like a mounted Secret: `tls.crt -> ..data/tls.crt`, `..data -> ..vN`.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(server: &Pair, ca: Option<&Ca>) -> SecretVolume {
        let mut v = SecretVolume {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.path().join(name)).unwrap();
        }
        v.publish(&server.cert, &server.key, ca.map(|c| c.pem.as_str()));
        v
    }

    /// Writes a new version and swaps `..data` to it atomically, as the kubelet does.
    fn publish(&mut self, cert: &str, key: &str, ca: Option<&str>) {
        self.version += 1;
        let version = self.dir.path().join(format!("..v{}", self.version));
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("tls.crt"), cert).unwrap();
        std::fs::write(version.join("tls.key"), key).unwrap();
        std::fs::write(version.join("ca.crt"), ca.unwrap_or("")).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn settings(&self, mutual: bool, reload: Duration) -> ServeSettings {
        ServeSettings {
            tls: Some(Arc::new(
                Reloader::load(TlsSettings {
                    cert: self.path("tls.crt"),
                    key: self.path("tls.key"),
                    client_ca: mutual.then(|| self.path("ca.crt")),
                    reload_interval: reload,
                })
                .expect("valid certificate files"),
            )),
            ..ServeSettings::default()
        }
    }
}

/// A TLS channel to the scaler as KEDA opens it: trusting `ca`, checking the name `localhost`,
/// presenting `client` when given.
async fn connect(
    scaler: &Scaler,
    ca: &Ca,
    client: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    Channel::from_shared(format!("https://localhost:{}", scaler.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// One GetMetricSpec over a fresh connection: whether the TLS (and mTLS) handshake and a real RPC succeed.
async fn rpc_works(scaler: &Scaler, ca: &Ca, client: Option<&Pair>) -> bool {
    let Ok(channel) = connect(scaler, ca, client).await else {
        return false;
    };
    let m = meta(&[("brokerUrl", "redis://localhost:6379/0"), ("queues", "q")]);
    ExternalScalerClient::new(channel)
        .get_metric_spec(object_ref(&m))
        .await
        .is_ok()
}

#[tokio::test]
async fn tls_serves_keda_rpcs_with_exact_depth_and_refuses_plaintext() {
    let ca = Ca::new("cks tls CA");
    let server = ca.sign(&["localhost", "celery-keda-scaler.keda.svc"]);
    let volume = SecretVolume::new(&server, None);
    let scaler = Scaler::start_with(
        Default::default(),
        volume.settings(false, Duration::from_secs(10)),
    )
    .await;

    // Real Celery publishes 4 tasks; the scaler reports exactly 4 over TLS.
    let redis = redis_url();
    let queue = unique("tls");
    assert_eq!(
        CeleryConf::new(&redis).publish(&queue, &["--count", "4"]),
        4
    );
    let m = meta(&[("brokerUrl", redis.as_str()), ("queues", queue.as_str())]);
    let channel = connect(&scaler, &ca, None).await.expect("TLS connect");
    let mut client = ExternalScalerClient::new(channel.clone());
    assert_eq!(depth(&mut client, &m).await.unwrap(), 4);
    assert!(active(&mut client, &m).await.unwrap());
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING over TLS");

    // The server negotiates HTTP/2 by ALPN (grpc-go, which KEDA uses, requires it).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::pem::PemObject::from_pem_slice(ca.pem.as_bytes()).expect("CA PEM"))
        .unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(scaler.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("handshake with ALPN h2");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // A plaintext client gets no answer from the TLS port.
    let plain = Channel::from_shared(format!("http://{}", scaler.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(plain) = plain {
        let r = ExternalScalerClient::new(plain)
            .get_metric_spec(object_ref(&m))
            .await;
        assert!(r.is_err(), "a plaintext request must fail on the TLS port");
    }
    // A client that trusts another CA refuses the server.
    assert!(!rpc_works(&scaler, &Ca::new("other CA"), None).await);
    assert!(
        scaler
            .metric("celery_keda_tls_handshake_failures_total")
            .await
            >= Some(1.0)
    );

    cleanup_redis(&redis, "", &[&queue]).await;
    scaler.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let ca = Ca::new("cks mtls CA");
    let server = ca.sign(&["localhost"]);
    let volume = SecretVolume::new(&server, Some(&ca));
    let scaler = Scaler::start_with(
        Default::default(),
        volume.settings(true, Duration::from_secs(10)),
    )
    .await;

    let keda = ca.sign(&["keda-operator"]);
    let stranger = Ca::new("stranger CA").sign(&["keda-operator"]);
    assert!(
        rpc_works(&scaler, &ca, Some(&keda)).await,
        "a client certificate from the CA is accepted"
    );
    assert!(
        !rpc_works(&scaler, &ca, None).await,
        "no client certificate is refused"
    );
    assert!(
        !rpc_works(&scaler, &ca, Some(&stranger)).await,
        "a client certificate from another CA is refused"
    );
    assert_eq!(
        scaler
            .metric("celery_keda_tls_handshake_failures_total")
            .await,
        Some(2.0)
    );
    scaler.stop().await;
}

#[tokio::test]
async fn rotated_certificates_and_client_ca_apply_without_restart() {
    let old_ca = Ca::new("cks CA 1");
    let new_ca = Ca::new("cks CA 2");
    let mut volume = SecretVolume::new(&old_ca.sign(&["localhost"]), Some(&old_ca));
    let scaler = Scaler::start_with(
        Default::default(),
        volume.settings(true, Duration::from_millis(100)),
    )
    .await;
    let old_client = old_ca.sign(&["keda-operator"]);
    let new_client = new_ca.sign(&["keda-operator"]);
    assert!(rpc_works(&scaler, &old_ca, Some(&old_client)).await);
    assert!(!rpc_works(&scaler, &new_ca, Some(&new_client)).await);
    // A connection opened before the rotation.
    let m = meta(&[("brokerUrl", "redis://localhost:6379/0"), ("queues", "q")]);
    let mut before = ExternalScalerClient::new(
        connect(&scaler, &old_ca, Some(&old_client))
            .await
            .expect("connect before rotation"),
    );

    // cert-manager renews: new server certificate and a new CA for client certificates.
    let renewed = new_ca.sign(&["localhost"]);
    volume.publish(&renewed.cert, &renewed.key, Some(&new_ca.pem));
    wait_for(
        "the rotated certificates to be served",
        Duration::from_secs(10),
        || async {
            rpc_works(&scaler, &new_ca, Some(&new_client))
                .await
                .then_some(())
        },
    )
    .await;
    assert!(
        !rpc_works(&scaler, &old_ca, Some(&old_client)).await,
        "new connections no longer get the old certificate"
    );
    assert!(
        before.get_metric_spec(object_ref(&m)).await.is_ok(),
        "a connection opened before the rotation keeps working"
    );
    assert_eq!(
        scaler
            .metric("celery_keda_tls_reloads_total{result=\"ok\"}")
            .await,
        Some(1.0)
    );

    // A broken rotation (key of another certificate) keeps serving the last good certificates.
    let other = new_ca.sign(&["localhost"]);
    volume.publish(&renewed.cert, &other.key, Some(&new_ca.pem));
    wait_for(
        "the failed reload to be counted",
        Duration::from_secs(10),
        || async {
            scaler
                .metric("celery_keda_tls_reloads_total{result=\"error\"}")
                .await
                .filter(|v| *v >= 1.0)
        },
    )
    .await;
    assert!(rpc_works(&scaler, &new_ca, Some(&new_client)).await);
    scaler.stop().await;
}

#[test]
fn the_binary_refuses_bad_tls_files_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.crt");
    let out = serve_command("127.0.0.1:0", "127.0.0.1:0")
        .arg("--tls-cert-file")
        .arg(&missing)
        .arg("--tls-key-file")
        .arg(Path::new("/dev/null"))
        .env_remove("CELERY_BROKER_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid TLS configuration: cannot read --tls-cert-file")
            && stderr.contains("nope.crt"),
        "{stderr}"
    );
}
