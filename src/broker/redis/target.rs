//! Redis broker URLs as Celery/kombu accept them, and the connection settings they produce.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use url::Url;

use crate::allowlist::MasterCheck;
use crate::broker::hosts::{Contact, HostField};
use crate::error::{Error, Result};
use crate::secret::{at_after_host, decode, redact_url, Secret, AT_AFTER_HOST};

/// Default Redis port, as kombu uses it.
const DEFAULT_PORT: u16 = 6379;
/// Default Sentinel port.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Where the Redis server is and how to reach it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum RedisAddr {
    /// Plain TCP.
    Tcp { host: String, port: u16 },
    /// TLS (`rediss://`).
    Tls {
        host: String,
        port: u16,
        tls: TlsSettings,
    },
    /// A Unix socket (`redis+socket:///path`).
    Unix { path: PathBuf },
    /// A `;`-separated failover list of `redis://` or `rediss://` URLs, which kombu tries in
    /// turn: the hosts in the order given. The URLs differ only in host and port; `tls` holds
    /// the `rediss://` settings they share.
    Failover {
        hosts: Vec<(String, u16)>,
        tls: Option<TlsSettings>,
    },
    /// A master found through Redis Sentinel (`sentinel://h1:26379;sentinel://h2:26379`).
    Sentinel {
        nodes: Vec<(String, u16)>,
        /// kombu's `master_name`, from the `sentinelMaster` metadata key.
        master: Option<String>,
        /// For an inline URL under a host allowlist: the check of every master a Sentinel
        /// reports, before the scaler connects to it (set by the tenancy settings).
        check: Option<MasterCheck>,
    },
}

/// Celery's `ssl_*` query parameters on a `rediss://` URL.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TlsSettings {
    /// `ssl_cert_reqs`: `required` (default here, Celery's recommendation) or `optional` verify the
    /// server certificate; `none` does not.
    pub verify: bool,
    /// `ssl_ca_certs`: a PEM file of trusted roots; the system roots when absent.
    pub ca_certs: Option<PathBuf>,
    /// `ssl_certfile` / `ssl_keyfile`: a client certificate for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to connect to one Redis database. Equal targets share a connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RedisTarget {
    pub addr: RedisAddr,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl RedisTarget {
    /// Parses a Celery Redis broker URL that came from metadata key (or env var) `key`.
    pub fn parse(key: &str, raw: &str) -> Result<Self> {
        // Redacted only when an error is built: parsing runs on every request.
        let bad = |why: &str| Error::invalid(key, format!("{why} in `{}`", redact_url(raw)));
        let parts: Vec<&str> = raw
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let first = parts.first().ok_or_else(|| bad("no URL"))?;
        let url = Url::parse(first).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
        if at_after_host(&url) {
            return Err(bad(AT_AFTER_HOST));
        }
        let scheme = url.scheme().to_ascii_lowercase();
        if parts.len() > 1 && scheme != "sentinel" {
            return Self::parse_failover(key, raw, &parts);
        }
        let username = Some(decode(url.username())).filter(|u| !u.is_empty());
        let password = url.password().map(|p| Secret::new(decode(p)));
        let query: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let q = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };

        let (addr, db_text) = match scheme.as_str() {
            "redis" | "rediss" => {
                let host = url
                    .host_str()
                    .unwrap_or("127.0.0.1")
                    .trim_matches(['[', ']'])
                    .to_string();
                let port = url.port().unwrap_or(DEFAULT_PORT);
                let addr = if scheme == "rediss" {
                    RedisAddr::Tls {
                        host,
                        port,
                        tls: parse_tls(q, &bad)?,
                    }
                } else {
                    RedisAddr::Tcp { host, port }
                };
                (addr, url.path().to_string())
            }
            "redis+socket" | "socket" => {
                let path = url.path();
                if path.is_empty() || path == "/" {
                    return Err(bad(
                        "a socket URL needs a path, like redis+socket:///run/redis.sock",
                    ));
                }
                (
                    RedisAddr::Unix {
                        path: PathBuf::from(decode(path)),
                    },
                    // kombu reads the database of a socket URL from `virtual_host`.
                    q("virtual_host").unwrap_or("").to_string(),
                )
            }
            "sentinel" => {
                let mut nodes = Vec::with_capacity(parts.len());
                for part in &parts {
                    let u = Url::parse(part).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
                    if at_after_host(&u) {
                        return Err(bad(AT_AFTER_HOST));
                    }
                    if !u.scheme().eq_ignore_ascii_case("sentinel") {
                        return Err(bad("every `;`-separated URL must be sentinel://"));
                    }
                    let host = u
                        .host_str()
                        .filter(|h| !h.is_empty())
                        .ok_or_else(|| bad("a sentinel URL needs a host"))?;
                    nodes.push((
                        host.trim_matches(['[', ']']).to_string(),
                        u.port().unwrap_or(DEFAULT_SENTINEL_PORT),
                    ));
                }
                (
                    RedisAddr::Sentinel {
                        nodes,
                        master: None,
                        check: None,
                    },
                    url.path().to_string(),
                )
            }
            other => return Err(bad(&format!("`{other}://` is not a Redis scheme"))),
        };
        let db = parse_db(
            q("virtual_host")
                .filter(|_| scheme != "redis+socket")
                .map_or(db_text.as_str(), |v| v),
        )
        .ok_or_else(|| bad("the database must be a number between 0 and 65535"))?;
        Ok(RedisTarget {
            addr,
            db,
            username,
            password,
        })
    }

    /// A `;`-separated failover list of `redis://` or `rediss://` URLs (`parts`, from `raw`):
    /// each URL parsed alone, and all of them the same but for host and port, so every host
    /// of the list serves the same database with the same credentials.
    fn parse_failover(key: &str, raw: &str, parts: &[&str]) -> Result<Self> {
        let bad = |why: &str| Error::invalid(key, format!("{why} in `{}`", redact_url(raw)));
        let mut hosts = Vec::with_capacity(parts.len());
        let mut first: Option<(RedisTarget, Option<TlsSettings>)> = None;
        for part in parts {
            let t = RedisTarget::parse(key, part)?;
            let (host, port, tls) = match t.addr.clone() {
                RedisAddr::Tcp { host, port } => (host, port, None),
                RedisAddr::Tls { host, port, tls } => (host, port, Some(tls)),
                _ => {
                    return Err(bad(
                        "a `;`-separated failover list takes redis:// or rediss:// URLs (Sentinel nodes: sentinel://h1;sentinel://h2)",
                    ))
                }
            };
            match &first {
                None => first = Some((t, tls)),
                Some((f, f_tls)) => {
                    if f.db != t.db
                        || f.username != t.username
                        || f.password != t.password
                        || *f_tls != tls
                    {
                        return Err(bad(
                            "the URLs of a failover list must differ only in host and port (same scheme, user, password, database and ssl_* options): they name the nodes of one broker",
                        ));
                    }
                }
            }
            hosts.push((host, port));
        }
        let (first, tls) = first.ok_or_else(|| bad("no URL"))?;
        Ok(RedisTarget {
            addr: RedisAddr::Failover { hosts, tls },
            ..first
        })
    }

    /// How many hosts a reading may try: the URLs of a failover list, else one.
    pub fn host_count(&self) -> usize {
        match &self.addr {
            RedisAddr::Failover { hosts, .. } => hosts.len(),
            _ => 1,
        }
    }

    /// Host `i` of a failover list as a single address (the list itself otherwise).
    pub fn host_addr(&self, i: usize) -> RedisAddr {
        match &self.addr {
            RedisAddr::Failover { hosts, tls } => {
                let (host, port) = hosts.get(i).or(hosts.first()).cloned().unwrap_or_default();
                match tls {
                    Some(tls) => RedisAddr::Tls {
                        host,
                        port,
                        tls: tls.clone(),
                    },
                    None => RedisAddr::Tcp { host, port },
                }
            }
            other => other.clone(),
        }
    }

    /// Host `i` of a failover list as a URL for people (the whole target otherwise).
    pub fn redacted_host(&self, i: usize) -> String {
        RedisTarget {
            addr: self.host_addr(i),
            db: self.db,
            username: self.username.clone(),
            password: self.password.clone(),
        }
        .redacted()
    }

    /// A URL for people: the password, if any, is `***`.
    pub fn redacted(&self) -> String {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".to_string(),
            (Some(u), None) => format!("{u}@"),
            (None, None) => String::new(),
        };
        match &self.addr {
            RedisAddr::Tcp { host, port } => format!("redis://{auth}{host}:{port}/{}", self.db),
            RedisAddr::Tls { host, port, .. } => {
                format!("rediss://{auth}{host}:{port}/{}", self.db)
            }
            RedisAddr::Unix { path } => format!(
                "redis+socket://{auth}{}?virtual_host={}",
                path.display(),
                self.db
            ),
            RedisAddr::Failover { hosts, .. } => (0..hosts.len())
                .map(|i| self.redacted_host(i))
                .collect::<Vec<_>>()
                .join(";"),
            RedisAddr::Sentinel { nodes, master, .. } => {
                let list: Vec<String> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, (h, p))| {
                        if i == 0 {
                            format!("sentinel://{auth}{h}:{p}/{}", self.db)
                        } else {
                            format!("sentinel://{h}:{p}")
                        }
                    })
                    .collect();
                match master {
                    Some(m) => format!("{} (master {})", list.join(";"), crate::secret::shown(m)),
                    None => list.join(";"),
                }
            }
        }
    }

    /// Whether this target needs `sentinelMaster`.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.addr, RedisAddr::Sentinel { .. })
    }

    /// Every host a reading contacts: the server, or each Sentinel node (the master a Sentinel
    /// reports is checked by the client itself, [`MasterCheck`]). `None`: a Unix socket.
    pub fn contacts(&self) -> Option<Vec<Contact>> {
        match &self.addr {
            RedisAddr::Tcp { host, port } => {
                Some(vec![Contact::new(HostField::Broker(0), host, *port, false)])
            }
            RedisAddr::Tls { host, port, .. } => {
                Some(vec![Contact::new(HostField::Broker(0), host, *port, true)])
            }
            RedisAddr::Failover { hosts, tls } => Some(
                hosts
                    .iter()
                    .enumerate()
                    .map(|(i, (host, port))| {
                        Contact::new(HostField::Broker(i), host, *port, tls.is_some())
                    })
                    .collect(),
            ),
            RedisAddr::Unix { .. } => None,
            RedisAddr::Sentinel { nodes, .. } => Some(
                nodes
                    .iter()
                    .enumerate()
                    .map(|(i, (host, port))| {
                        Contact::new(HostField::SentinelNode(i), host, *port, false)
                    })
                    .collect(),
            ),
        }
    }

    /// Puts the checked `addr` in place of the host of `field`.
    pub fn pin(&mut self, field: &HostField, addr: IpAddr) {
        match &mut self.addr {
            RedisAddr::Tcp { host, .. } => *host = addr.to_string(),
            RedisAddr::Failover { hosts, tls: None } => {
                if let HostField::Broker(i) = field {
                    if let Some(node) = hosts.get_mut(*i) {
                        node.0 = addr.to_string();
                    }
                }
            }
            RedisAddr::Sentinel { nodes, .. } => {
                if let HostField::SentinelNode(i) = field {
                    if let Some(node) = nodes.get_mut(*i) {
                        node.0 = addr.to_string();
                    }
                }
            }
            // Never pinned: a TLS host is admitted by its name alone (its certificate names it),
            // and a socket has no host.
            RedisAddr::Tls { .. } | RedisAddr::Failover { .. } | RedisAddr::Unix { .. } => {}
        }
    }

    /// Has every master the Sentinels report checked by `check` before any connection to it
    /// (an inline `sentinel://` trigger under a host allowlist); other addresses report none.
    pub fn check_reported_masters(&mut self, check: MasterCheck) {
        if let RedisAddr::Sentinel { check: slot, .. } = &mut self.addr {
            *slot = Some(check);
        }
    }
}

fn parse_db(text: &str) -> Option<i64> {
    let t = text.trim().trim_start_matches('/');
    if t.is_empty() {
        return Some(0);
    }
    t.parse::<u16>().ok().map(i64::from)
}

fn parse_tls<'a>(
    q: impl Fn(&str) -> Option<&'a str>,
    bad: &dyn Fn(&str) -> Error,
) -> Result<TlsSettings> {
    let verify = match q("ssl_cert_reqs").map(str::to_ascii_lowercase).as_deref() {
        None | Some("required" | "cert_required" | "optional" | "cert_optional") => true,
        Some("none" | "cert_none") => false,
        Some(other) => {
            return Err(bad(&format!(
                "ssl_cert_reqs must be required, optional or none, not `{other}`"
            )))
        }
    };
    let client_cert = match (q("ssl_certfile"), q("ssl_keyfile")) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => None,
        _ => return Err(bad("ssl_certfile and ssl_keyfile must be given together")),
    };
    Ok(TlsSettings {
        verify,
        ca_certs: q("ssl_ca_certs").map(PathBuf::from),
        client_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> RedisTarget {
        RedisTarget::parse("brokerUrl", url).unwrap()
    }

    #[test]
    fn plain_urls() {
        let t = parse("redis://");
        assert_eq!(
            t.addr,
            RedisAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 6379
            }
        );
        assert_eq!(t.db, 0);
        let t = parse("redis://user:p%40ss@cache.svc:6380/3");
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert_eq!(t.db, 3);
        assert_eq!(t.redacted(), "redis://user:***@cache.svc:6380/3");
        let t = parse("redis://:pw@h/");
        assert_eq!((t.username, t.db), (None, 0));
    }

    #[test]
    fn tls_urls_follow_celery_query_parameters() {
        let t = parse("rediss://h:6380/1?ssl_cert_reqs=CERT_NONE");
        match t.addr {
            RedisAddr::Tls { tls, .. } => assert!(!tls.verify),
            other => panic!("{other:?}"),
        }
        let t = parse("rediss://h/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem");
        match t.addr {
            RedisAddr::Tls { tls, port, .. } => {
                assert!(tls.verify);
                assert_eq!(port, 6379);
                assert_eq!(tls.ca_certs, Some(PathBuf::from("/etc/ca.pem")));
            }
            other => panic!("{other:?}"),
        }
        assert!(RedisTarget::parse("brokerUrl", "rediss://h/0?ssl_cert_reqs=maybe").is_err());
        assert!(RedisTarget::parse("brokerUrl", "rediss://h/0?ssl_certfile=/a").is_err());
    }

    #[test]
    fn socket_urls() {
        let t = parse("redis+socket:///run/redis/redis.sock?virtual_host=2");
        assert_eq!(
            t.addr,
            RedisAddr::Unix {
                path: "/run/redis/redis.sock".into()
            }
        );
        assert_eq!(t.db, 2);
        assert!(RedisTarget::parse("brokerUrl", "redis+socket://").is_err());
    }

    #[test]
    fn sentinel_urls() {
        let t = parse("sentinel://:pw@s1:26379/1;sentinel://s2;sentinel://s3:26380");
        assert_eq!(
            t.addr,
            RedisAddr::Sentinel {
                nodes: vec![
                    ("s1".into(), 26379),
                    ("s2".into(), 26379),
                    ("s3".into(), 26380)
                ],
                master: None,
                check: None
            }
        );
        assert_eq!(t.db, 1);
        assert!(t.is_sentinel());
        assert!(RedisTarget::parse("brokerUrl", "sentinel://s1;redis://s2").is_err());
    }

    #[test]
    fn failover_lists() {
        let t = parse("redis://:pw@a:6380/2;redis://:pw@b/2;");
        assert_eq!(
            t.addr,
            RedisAddr::Failover {
                hosts: vec![("a".into(), 6380), ("b".into(), 6379)],
                tls: None
            }
        );
        assert_eq!((t.db, t.host_count()), (2, 2));
        assert_eq!(t.redacted(), "redis://:***@a:6380/2;redis://:***@b:6379/2");
        assert_eq!(t.redacted_host(1), "redis://:***@b:6379/2");
        let contacts = t.contacts().unwrap();
        assert_eq!(contacts[1].field, HostField::Broker(1));
        let mut pinned = t.clone();
        pinned.pin(&HostField::Broker(1), "10.0.0.2".parse().unwrap());
        assert_eq!(pinned.redacted_host(1), "redis://:***@10.0.0.2:6379/2");
        let t = parse("rediss://a/0?ssl_cert_reqs=none;rediss://b/0?ssl_cert_reqs=none");
        assert!(matches!(t.addr, RedisAddr::Failover { tls: Some(ref tls), .. } if !tls.verify));
        for bad in [
            "redis://:secret@a/0;redis://:other@b/0",
            "redis://:secret@a/0;redis://:secret@b/1",
            "redis://:secret@a/0;rediss://:secret@b/0",
            "redis://:secret@a/0;sentinel://b",
            "redis://:secret@a/0;redis+socket:///s.sock",
        ] {
            let err = RedisTarget::parse("brokerUrlFromEnv", bad).unwrap_err();
            assert!(err.to_string().contains("brokerUrlFromEnv"), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn bad_db_names_the_key_without_the_password() {
        let err = RedisTarget::parse("brokerUrlFromEnv", "redis://:topsecret@h/abc").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("brokerUrlFromEnv"), "{text}");
        assert!(text.contains("database"), "{text}");
        assert!(!text.contains("topsecret"), "{text}");
    }
}
