//! The hosts a reading makes the scaler contact, as every backend's target reports them, so the
//! tenancy policy can check each one and put a checked address in place of a name.

use std::net::IpAddr;

/// Which host of a backend a contact is, so a checked address can be put in its place.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostField {
    /// The broker URL's host (Redis, AMQP): the index of the URL in a `;`-separated failover
    /// list, 0 for a single URL.
    Broker(usize),
    /// One node of a Sentinel list.
    SentinelNode(usize),
    /// The RabbitMQ management API given by `managementUrl`.
    Management,
    /// The RabbitMQ management API derived from the AMQP URL of host `i` of the list.
    DerivedManagement(usize),
    /// The SQS endpoint (`awsEndpoint`, or the `sqs://host:port` of the URL).
    Endpoint,
    /// The host of the URL of predefined SQS queue `i` (`predefinedQueues`, in the order of the
    /// trigger's queues).
    QueueUrl(usize),
}

/// One host a reading makes the scaler contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contact {
    pub field: HostField,
    pub host: String,
    pub port: u16,
    /// TLS: the certificate is checked against the name, so the name cannot be replaced by an
    /// address.
    pub tls: bool,
    /// A host that cannot be read as `host:port` (refused whatever the rules say).
    pub opaque: bool,
}

impl Contact {
    /// A contact named by host and port.
    pub fn new(field: HostField, host: &str, port: u16, tls: bool) -> Self {
        Contact {
            field,
            host: host.to_string(),
            port,
            tls,
            opaque: false,
        }
    }

    /// The host of `url` (HTTP APIs and endpoints): TLS for `https`; a URL without a host is
    /// opaque.
    pub fn of_url(field: HostField, url: Option<&url::Url>, raw: &str) -> Self {
        let tls = raw.starts_with("https://");
        match url.and_then(|u| Some((u.host_str()?, u.port_or_known_default().unwrap_or(80)))) {
            Some((host, port)) => Contact::new(field, host.trim_matches(['[', ']']), port, tls),
            None => Contact {
                field,
                host: raw.to_string(),
                port: 0,
                tls,
                opaque: true,
            },
        }
    }
}

/// A host name admitted only if what it resolves to lies in the allowlist's address rules: it is
/// resolved, checked and replaced by the checked address before any reading.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Unresolved {
    pub field: HostField,
    /// The metadata key the host came from (named in a refusal).
    pub key: String,
    pub host: String,
    pub port: u16,
}

/// Puts `addr` in place of the host of `url` (an address pinned into an HTTP API's URL).
pub fn pin_url(url: &mut url::Url, addr: IpAddr) {
    let _ = url.set_ip_host(addr);
}
