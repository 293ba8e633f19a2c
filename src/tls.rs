//! TLS and mTLS on the gRPC port, with certificate files re-read when they change (cert-manager
//! rotates them in place), so a rotation needs no restart.
//!
//! Each accepted TCP connection is handshaken with the server configuration current at that
//! moment; connections already open keep the certificate they started with. A reload that fails
//! (a half-written file, a key that does not match) keeps the previous configuration and is logged
//! with the file paths, never their contents.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Where the certificate files are and how often to look at them.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// PEM certificate chain served to clients (the leaf first).
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate signed by it (mTLS).
    pub client_ca: Option<PathBuf>,
    /// How often the files are read and compared with what is loaded.
    pub reload_interval: Duration,
}

/// Longest time a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the certificate files could not be turned into a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{flag} {path}: {what}")]
    Content {
        flag: &'static str,
        path: String,
        what: String,
    },
    #[error("--tls-cert-file and --tls-key-file do not form a usable pair: {0}")]
    Config(String),
}

/// The bytes of the files last loaded: a reload happens only when they differ.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })
}

fn content(flag: &'static str, path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Content {
        flag,
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

impl Files {
    fn read(settings: &TlsSettings) -> Result<Files, TlsError> {
        Ok(Files {
            cert: read("--tls-cert-file", &settings.cert)?,
            key: read("--tls-key-file", &settings.key)?,
            client_ca: settings
                .client_ca
                .as_deref()
                .map(|p| read("--tls-client-ca-file", p))
                .transpose()?,
        })
    }

    fn server_config(&self, settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| content("--tls-cert-file", &settings.cert, e))?;
        if certs.is_empty() {
            return Err(content(
                "--tls-cert-file",
                &settings.cert,
                "no PEM certificate found",
            ));
        }
        // The error text of a key parse never includes the key itself.
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|_| content("--tls-key-file", &settings.key, "no PEM private key found"))?;
        // ring, as everywhere in the process, without depending on the process default being
        // installed first.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match (&self.client_ca, &settings.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for ca in CertificateDer::pem_slice_iter(pem) {
                    let ca = ca.map_err(|e| content("--tls-client-ca-file", path, e))?;
                    roots
                        .add(ca)
                        .map_err(|e| content("--tls-client-ca-file", path, e))?;
                }
                if roots.is_empty() {
                    return Err(content(
                        "--tls-client-ca-file",
                        path,
                        "no PEM certificate found",
                    ));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| content("--tls-client-ca-file", path, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // gRPC is HTTP/2 only; grpc-go (KEDA) refuses a TLS server that does not negotiate h2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The current server configuration, replaced when the files change.
pub struct Reloader {
    settings: TlsSettings,
    current: RwLock<(Arc<Files>, Arc<ServerConfig>)>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Loads the files once; an error here is a configuration error (nothing binds).
    pub fn load(settings: TlsSettings) -> Result<Reloader, TlsError> {
        let files = Files::read(&settings)?;
        let config = files.server_config(&settings)?;
        Ok(Reloader {
            settings,
            current: RwLock::new((Arc::new(files), Arc::new(config))),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(guard.1.clone())
    }

    /// Reads the files and swaps the configuration if they changed. Returns whether it changed.
    fn reload(&self) -> Result<bool, TlsError> {
        let files = Files::read(&self.settings)?;
        {
            let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
            if *guard.0 == files {
                return Ok(false);
            }
        }
        let config = files.server_config(&self.settings)?;
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = (Arc::new(files), Arc::new(config));
        Ok(true)
    }

    /// Watches the files every `reload_interval` until `token` is cancelled.
    async fn watch(self: Arc<Self>, metrics: Arc<Metrics>, token: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload() {
                Ok(false) => {}
                Ok(true) => {
                    metrics.tls_reload("ok");
                    tracing::info!(cert = %self.settings.cert.display(), "Reloaded TLS certificates");
                }
                Err(e) => {
                    metrics.tls_reload("error");
                    tracing::warn!(error = %e, "Keeping the previous TLS certificates: reload failed");
                }
            }
        }
    }
}

/// Accepts TCP connections on `listener`, handshakes TLS with the current configuration, and
/// yields the connections that completed it. A failed or slow handshake drops that connection
/// only. Also starts the file watcher. Everything stops when `token` is cancelled.
pub fn incoming(
    listener: TcpListener,
    reloader: Arc<Reloader>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsStream<tokio::net::TcpStream>>> {
    tokio::spawn(reloader.clone().watch(metrics.clone(), token.clone()));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = reloader.acceptor();
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failure();
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_handshake_failure();
                        tracing::debug!(peer = %peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, ca: bool) -> TlsSettings {
        TlsSettings {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: ca.then(|| dir.join("ca.crt")),
            reload_interval: Duration::from_secs(1),
        }
    }

    fn write_pair(dir: &Path, name: &str) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), cert.cert.pem()).unwrap();
    }

    #[test]
    fn missing_and_bad_files_name_the_flag_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = Reloader::load(settings(dir.path(), false)).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read --tls-cert-file "),
            "{e}"
        );
        write_pair(dir.path(), "a");
        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        let e = Reloader::load(settings(dir.path(), false)).unwrap_err();
        assert!(e.to_string().starts_with("--tls-key-file "), "{e}");
        assert!(e.to_string().ends_with("no PEM private key found"), "{e}");
        write_pair(dir.path(), "a");
        std::fs::write(dir.path().join("ca.crt"), "").unwrap();
        let e = Reloader::load(settings(dir.path(), true)).unwrap_err();
        assert!(e.to_string().starts_with("--tls-client-ca-file "), "{e}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a");
        let other = rcgen::generate_simple_self_signed(vec!["b".to_string()]).unwrap();
        std::fs::write(
            dir.path().join("tls.key"),
            other.signing_key.serialize_pem(),
        )
        .unwrap();
        let e = Reloader::load(settings(dir.path(), false)).unwrap_err();
        assert!(matches!(e, TlsError::Config(_)), "{e}");
    }

    #[test]
    fn reload_swaps_only_on_change_and_keeps_the_old_config_on_error() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a");
        let r = Reloader::load(settings(dir.path(), true)).unwrap();
        assert!(!r.reload().unwrap());
        write_pair(dir.path(), "b");
        assert!(r.reload().unwrap());
        assert!(!r.reload().unwrap());
        let before = r.current.read().unwrap().1.clone();
        std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
        assert!(r.reload().is_err());
        assert!(Arc::ptr_eq(&before, &r.current.read().unwrap().1));
    }
}
