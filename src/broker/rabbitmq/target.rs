//! RabbitMQ broker URLs as Celery accepts them (`amqp://`, `amqps://`, `pyamqp://`), and the
//! management API endpoint derived from them or given by `managementUrl`.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use url::Url;

use crate::broker::hosts::{pin_url, Contact, HostField};
use crate::error::{Error, Result};
use crate::secret::{at_after_host, decode, misread_char, redact_url, Secret, AT_AFTER_HOST};

/// Default management API port.
pub const MANAGEMENT_PORT: u16 = 15672;

/// TLS settings of an `amqps://` URL, from Celery-style query parameters.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct AmqpTls {
    /// `ssl_ca_certs`: PEM file of trusted roots; the system roots when absent.
    pub ca_certs: Option<PathBuf>,
    /// `ssl_certfile` + `ssl_keyfile`: client certificate (PEM) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Trigger options for RabbitMQ: where the management API is.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RabbitLayout {
    /// Management API, from `managementUrl` or derived from the AMQP URL.
    pub management: ManagementApi,
}

/// Where the management API of a reading is.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum ManagementApi {
    /// `managementUrl`: this one, whichever AMQP host answers.
    Given(Management),
    /// Derived from each AMQP host (`http://host:15672/`, the AMQP credentials), one per host
    /// of the list in its order: the reading uses the one of the host that answered.
    Derived(Vec<Management>),
}

impl ManagementApi {
    /// The management API of a reading served by AMQP host `host` of the list (`None` only
    /// for a host the list does not have).
    pub fn for_host(&self, host: usize) -> Option<&Management> {
        match self {
            ManagementApi::Given(m) => Some(m),
            ManagementApi::Derived(list) => list.get(host),
        }
    }
}

/// One AMQP connection: host (or the hosts of a failover list), credentials, vhost, TLS. Equal
/// targets share a connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RabbitTarget {
    /// The host and port of each URL: one, or the `;`-separated failover list in its order
    /// (kombu tries them in turn). Never empty.
    pub hosts: Vec<(String, u16)>,
    pub username: String,
    pub password: Secret,
    /// The virtual host, decoded (`/` is the default vhost).
    pub vhost: String,
    pub tls: Option<AmqpTls>,
}

impl fmt::Debug for RabbitTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The management HTTP API: base URL and credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Management {
    /// Base URL without credentials, ending in `/`.
    pub base: Url,
    pub username: String,
    pub password: Secret,
}

impl fmt::Debug for Management {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (user {})",
            // The base holds no user info; quoted strictly anyway, as a user-given URL.
            redact_url(self.base.as_str()),
            self.username
        )
    }
}

impl RabbitTarget {
    /// Parses a Celery AMQP broker URL from metadata key (or env var) `key`: one URL, or a
    /// `;`-separated failover list of URLs that differ only in host and port.
    pub fn parse(key: &str, raw: &str) -> Result<Self> {
        let parts: Vec<&str> = raw
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if parts.len() < 2 {
            return Self::parse_one(key, raw);
        }
        let bad = |why: &str| Error::invalid(key, format!("{why} in `{}`", redact_url(raw)));
        let mut list: Option<RabbitTarget> = None;
        for part in parts {
            let t = Self::parse_one(key, part)?;
            match &mut list {
                None => list = Some(t),
                Some(first) => {
                    if first.username != t.username
                        || first.password != t.password
                        || first.vhost != t.vhost
                        || first.tls != t.tls
                    {
                        return Err(bad(
                            "the URLs of a failover list must differ only in host and port (same scheme, user, password, vhost and ssl_* options): they name the nodes of one broker",
                        ));
                    }
                    first.hosts.extend(t.hosts);
                }
            }
        }
        list.ok_or_else(|| bad("no URL"))
    }

    /// Parses one AMQP URL.
    fn parse_one(key: &str, raw: &str) -> Result<Self> {
        // Redacted only when an error is built: parsing runs on every request.
        let bad = |why: &str| Error::invalid(key, format!("{why} in `{}`", redact_url(raw)));
        if raw.contains(';') {
            return Err(bad("no URL"));
        }
        let url = Url::parse(raw.trim()).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
        if at_after_host(&url) {
            return Err(bad(AT_AFTER_HOST));
        }
        let tls = match url.scheme().to_ascii_lowercase().as_str() {
            "amqp" | "pyamqp" => false,
            "amqps" => true,
            other => return Err(bad(&format!("`{other}://` is not an AMQP scheme"))),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let port = url.port().unwrap_or(if tls { 5671 } else { 5672 });
        // kombu: no user means guest/guest.
        let username = Some(decode(url.username()))
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "guest".into());
        let password = Secret::new(url.password().map(decode).unwrap_or_else(|| {
            if url.username().is_empty() {
                "guest".into()
            } else {
                String::new()
            }
        }));
        // kombu: the path after the first `/` is the vhost, percent-decoded; empty means `/`.
        let path = url.path();
        let vhost = decode(path.strip_prefix('/').unwrap_or(path));
        let vhost = if vhost.is_empty() {
            "/".to_string()
        } else {
            vhost
        };
        let query: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let q = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let tls = if tls {
            let client_cert = match (q("ssl_certfile"), q("ssl_keyfile")) {
                (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                (None, None) => None,
                _ => return Err(bad("ssl_certfile and ssl_keyfile must be given together")),
            };
            Some(AmqpTls {
                ca_certs: q("ssl_ca_certs").map(PathBuf::from),
                client_cert,
            })
        } else {
            None
        };
        Ok(RabbitTarget {
            hosts: vec![(host, port)],
            username,
            password,
            vhost,
            tls,
        })
    }

    /// A URL for people: the password is `***`; a failover list as its URLs joined by `;`.
    pub fn redacted(&self) -> String {
        (0..self.hosts.len())
            .map(|i| self.redacted_host(i))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The URL of host `i` of the list, for people: the password is `***`.
    pub fn redacted_host(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "amqps" } else { "amqp" };
        let vhost =
            percent_encoding::utf8_percent_encode(&self.vhost, percent_encoding::NON_ALPHANUMERIC);
        let (host, port) = self.host(i);
        format!("{scheme}://{}:***@{host}:{port}/{vhost}", self.username)
    }

    /// Host and port of host `i` of the list (the first if there is no such host).
    pub fn host(&self, i: usize) -> (&str, u16) {
        self.hosts
            .get(i)
            .or(self.hosts.first())
            .map_or(("localhost", 5672), |(h, p)| (h.as_str(), *p))
    }

    /// Every host a reading with `layout` contacts: each AMQP host, then the management API
    /// (`managementUrl`, or the one derived from each AMQP host).
    pub fn contacts(&self, layout: &RabbitLayout) -> Vec<Contact> {
        let mut contacts: Vec<Contact> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (host, port))| {
                Contact::new(HostField::Broker(i), host, *port, self.tls.is_some())
            })
            .collect();
        match &layout.management {
            ManagementApi::Given(m) => contacts.push(Contact::of_url(
                HostField::Management,
                Some(&m.base),
                m.base.as_str(),
            )),
            ManagementApi::Derived(list) => {
                contacts.extend(list.iter().enumerate().map(|(i, m)| {
                    Contact::of_url(
                        HostField::DerivedManagement(i),
                        Some(&m.base),
                        m.base.as_str(),
                    )
                }))
            }
        }
        contacts
    }

    /// Puts the checked `addr` in place of the host of `field` (an AMQP host, or a management
    /// API's in `layout`).
    pub fn pin(&mut self, layout: &mut RabbitLayout, field: &HostField, addr: IpAddr) {
        match (field, &mut layout.management) {
            (HostField::Management, ManagementApi::Given(m)) => pin_url(&mut m.base, addr),
            (HostField::DerivedManagement(i), ManagementApi::Derived(list)) => {
                if let Some(m) = list.get_mut(*i) {
                    pin_url(&mut m.base, addr);
                }
            }
            (HostField::Broker(i), _) => {
                if let Some(host) = self.hosts.get_mut(*i) {
                    host.0 = addr.to_string();
                }
            }
            _ => {}
        }
    }

    /// The management API derived from each host of this URL: same host and credentials,
    /// `http://host:15672/`, in the list's order. Fails (naming `managementUrl`) for a host AMQP
    /// URLs allow but HTTP URLs do not.
    pub fn derived_management(&self) -> Result<ManagementApi> {
        let mut list = Vec::with_capacity(self.hosts.len());
        for (host, _) in &self.hosts {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            let base = Url::parse(&format!("http://{host}:{MANAGEMENT_PORT}/")).map_err(|e| {
                Error::invalid(
                    "managementUrl",
                    format!(
                        "cannot be derived from the broker URL's host ({e}): set managementUrl, or scaleOnInFlight: \"false\""
                    ),
                )
            })?;
            list.push(Management {
                base,
                username: self.username.clone(),
                password: self.password.clone(),
            });
        }
        Ok(ManagementApi::Derived(list))
    }
}

impl Management {
    /// Parses `managementUrl`; credentials missing from it are taken from the AMQP URL.
    pub fn parse(raw: &str, amqp: &RabbitTarget) -> Result<Self> {
        let shown = || redact_url(raw);
        if misread_char(raw).is_some() {
            return Err(Error::invalid(
                "managementUrl",
                format!(
                    "holds a backslash or a control character, which URL parsers read as `/` or drop: percent-encode it (`\\` as %5C), got `{}`",
                    shown()
                ),
            ));
        }
        let mut url = Url::parse(raw.trim()).map_err(|e| {
            Error::invalid(
                "managementUrl",
                format!("not a valid URL ({e}) in `{}`", shown()),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::invalid(
                "managementUrl",
                format!(
                    "must be an http:// or https:// URL with a host, got `{}`",
                    shown()
                ),
            ));
        }
        if at_after_host(&url) {
            return Err(Error::invalid(
                "managementUrl",
                format!("has {AT_AFTER_HOST}, got `{}`", shown()),
            ));
        }
        let username = Some(decode(url.username())).filter(|u| !u.is_empty());
        let password = url.password().map(decode);
        let (username, password) = match (username, password) {
            (Some(u), Some(p)) => (u, Secret::new(p)),
            (Some(u), None) => (u, Secret::new("")),
            _ => (amqp.username.clone(), amqp.password.clone()),
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
        url.set_fragment(None);
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Management {
            base: url,
            username,
            password,
        })
    }

    /// `GET /api/queues/{vhost}/{name}` for one queue.
    pub fn queue_url(&self, vhost: &str, queue: &str) -> Url {
        self.api_url(
            &["queues", vhost, queue],
            "name,messages_ready,messages_unacknowledged",
        )
    }

    /// `GET /api/exchanges/{vhost}`: every exchange's name and type.
    pub fn exchanges_url(&self, vhost: &str) -> Url {
        self.api_url(&["exchanges", vhost], "name,type")
    }

    /// `GET /api/bindings/{vhost}`: every binding of the vhost.
    pub fn bindings_url(&self, vhost: &str) -> Url {
        self.api_url(
            &["bindings", vhost],
            "source,destination,destination_type,routing_key",
        )
    }

    /// `api/` + the percent-encoded `segments` (the first one is the collection), asking only
    /// for `columns`.
    fn api_url(&self, segments: &[&str], columns: &str) -> Url {
        let mut path = String::from("api");
        for (i, s) in segments.iter().enumerate() {
            path.push('/');
            if i == 0 {
                path.push_str(s);
            } else {
                path.push_str(
                    &percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                        .to_string(),
                );
            }
        }
        let mut url = self
            .base
            .join(&path)
            .expect("an encoded path joins a base URL");
        url.set_query(Some(&format!("columns={columns}")));
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> RabbitTarget {
        RabbitTarget::parse("brokerUrl", url).unwrap()
    }

    #[test]
    fn celery_urls() {
        let t = parse("amqp://guest:guest@localhost:5672//");
        assert_eq!((t.host(0), t.vhost.as_str()), (("localhost", 5672), "/"));
        assert_eq!(parse("amqp://u:p@h/%2F").vhost, "/");
        assert_eq!(parse("amqp://u:p@h/").vhost, "/");
        assert_eq!(parse("amqp://u:p@h").vhost, "/");
        assert_eq!(parse("pyamqp://u:p@h/orders").vhost, "orders");
        assert_eq!(parse("amqp://u:p@h/a%2Fb").vhost, "a/b");
        let t = parse("amqps://u:p%40ss@h/v?ssl_ca_certs=/ca.pem");
        assert_eq!(t.host(0).1, 5671);
        assert_eq!(t.password.expose(), "p@ss");
        assert_eq!(t.tls.unwrap().ca_certs, Some(PathBuf::from("/ca.pem")));
        let t = parse("amqp://");
        assert_eq!(
            (t.username.as_str(), t.password.expose()),
            ("guest", "guest")
        );
        assert_eq!(
            parse("amqp://u:secret@h:1/v").redacted(),
            "amqp://u:***@h:1/v"
        );
        assert_eq!(
            parse("amqp://u:secret@h:1//").redacted(),
            "amqp://u:***@h:1/%2F"
        );
    }

    #[test]
    fn bad_urls_name_the_key() {
        for url in [
            "amqp://u:secret@a;amqp://u:other@b",
            "amqp://u:secret@a/v1;amqp://u:secret@b/v2",
            "amqp://u:secret@a;amqps://u:secret@b",
            "amqps://h/?ssl_certfile=/c",
            "amqp://u:secret@h:notaport/",
            "amqp:///u:secret@h",
            "amqp://u:1/secret@h/vhost",
        ] {
            let err = RabbitTarget::parse("brokerUrlFromEnv", url).unwrap_err();
            assert!(err.to_string().contains("brokerUrlFromEnv"), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn failover_lists() {
        let t = parse("amqp://u:pw@r1:5673/v;amqp://u:pw@r2/v;");
        assert_eq!(
            t.hosts,
            [("r1".to_string(), 5673), ("r2".to_string(), 5672)]
        );
        assert_eq!(
            t.redacted(),
            "amqp://u:***@r1:5673/v;amqp://u:***@r2:5672/v"
        );
        let mut layout = RabbitLayout {
            management: t.derived_management().unwrap(),
        };
        assert_eq!(
            layout.management.for_host(1).unwrap().base.as_str(),
            "http://r2:15672/"
        );
        let fields: Vec<HostField> = t.contacts(&layout).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                HostField::Broker(0),
                HostField::Broker(1),
                HostField::DerivedManagement(0),
                HostField::DerivedManagement(1)
            ]
        );
        let mut pinned = t.clone();
        pinned.pin(
            &mut layout,
            &HostField::Broker(1),
            "10.0.0.2".parse().unwrap(),
        );
        pinned.pin(
            &mut layout,
            &HostField::DerivedManagement(1),
            "10.0.0.2".parse().unwrap(),
        );
        assert_eq!(pinned.host(1), ("10.0.0.2", 5672));
        assert_eq!(
            layout.management.for_host(1).unwrap().base.as_str(),
            "http://10.0.0.2:15672/"
        );
        assert_eq!(
            layout.management.for_host(0).unwrap().base.as_str(),
            "http://r1:15672/"
        );
    }

    #[test]
    fn management_endpoints() {
        let t = parse("amqp://mon:pw@rabbit.svc:5672/prod");
        let api = t.derived_management().unwrap();
        let m = api.for_host(0).unwrap();
        assert_eq!(m.base.as_str(), "http://rabbit.svc:15672/");
        assert_eq!((m.username.as_str(), m.password.expose()), ("mon", "pw"));
        assert_eq!(
            m.queue_url("/", "orders.high").as_str(),
            "http://rabbit.svc:15672/api/queues/%2F/orders%2Ehigh?columns=name,messages_ready,messages_unacknowledged"
        );
        let m = Management::parse("https://ops:x@mgmt.example/rabbitmq", &t).unwrap();
        assert_eq!(m.base.as_str(), "https://mgmt.example/rabbitmq/");
        assert_eq!(m.username, "ops");
        assert!(m
            .queue_url("prod", "q")
            .as_str()
            .starts_with("https://mgmt.example/rabbitmq/api/queues/prod/q"));
        let m = Management::parse("http://mgmt:15672", &t).unwrap();
        assert_eq!((m.username.as_str(), m.password.expose()), ("mon", "pw"));
        assert!(Management::parse("ftp://x", &t).is_err());
        assert!(format!("{m:?}").contains("mon") && !format!("{m:?}").contains("pw"));
    }

    /// WHATWG parsing (the `url` crate) ends an http(s) URL's user info at `\`, `/`, `?` or `#`
    /// and drops tabs and newlines: a password holding one would move into the path, query or
    /// fragment, be sent to the wrong host and be shown with the URL. Found by tests/fuzz.rs.
    #[test]
    fn management_urls_that_move_a_password_out_of_the_user_info_are_refused() {
        let t = parse("amqp://");
        for raw in [
            r"http://=\;:PwaAA0aA0A@localhost",
            r"http://u\:PwaAA0aA0A@localhost",
            r"HTTPS://u\:PwaAA0aA0A@localhost:15672/",
            r"http://localhost\:PwaAA0aA0A@localhost",
            r"http:\\ops:PwaAA0aA0A@localhost",
            "http://u:12/PwaAA0aA0A@localhost",
            "http://u:12/x@PwaAA0aA0A@localhost",
            "http://u?:PwaAA0aA0A@localhost",
            "http://u#:PwaAA0aA0A@localhost",
            "http://localhost/api?:PwaAA0aA0A@localhost",
            "http://u:Pwa\tAA0aA0A@localhost",
            "http://u:Pwa\nAA0aA0A@localhost",
        ] {
            match Management::parse(raw, &t) {
                Ok(m) => panic!("{raw:?} accepted as {m:?}"),
                Err(e) => {
                    let text = e.to_string();
                    assert!(text.contains("managementUrl"), "{text}");
                    assert!(!text.contains("PwaAA0aA0A"), "{text}");
                    assert!(!text.contains("Pwa"), "{text}");
                }
            }
        }
        // What a WHATWG parser reads as user info is the password: kept secret, never shown.
        for raw in [
            "http:ops:PwaAA0aA0A@localhost",
            "http://ops:a@PwaAA0aA0A@localhost",
            "http://ops:PwaAA0aA0A%2F%3F%23%5C@localhost",
        ] {
            let m = Management::parse(raw, &t).unwrap();
            assert_eq!(m.base.as_str(), "http://localhost/", "{raw:?}");
            assert_eq!(m.username, "ops");
            assert!(m.password.expose().contains("PwaAA0aA0A"));
            assert!(!format!("{m:?}").contains("PwaAA0aA0A"), "{m:?}");
        }
    }
}
