//! Tenancy: which namespaces may use a named broker, which hosts a trigger may make the scaler
//! contact, whether inline broker URLs are accepted, and who may borrow the scaler's AWS identity.
//!
//! Every decision that a name or a literal address settles is pure ([`Tenancy::admit`]), so
//! `GetMetricSpec` refuses exactly like the readings do without any I/O. A host name that only an
//! address range (CIDR) can admit needs a DNS lookup: [`Tenancy::resolve`] does it inside the
//! reading's deadline, checks *every* address, and rewrites the trigger to connect to the checked
//! address itself, so a second lookup (DNS rebinding) never decides where the scaler connects.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::broker::redis::RedisAddr;
use crate::broker::{BrokerTarget, Layout};
use crate::error::{Error, Result};
use crate::metadata::{BrokerEnv, Trigger, DEFAULT_BROKER_VAR, NAMED_BROKER_PREFIX};
use crate::secret::shown;

/// Environment variable prefix of a named broker's namespace list:
/// `CELERY_KEDA_NAMESPACES_<NAME>=team-a,team-b-*`. A different prefix from
/// `CELERY_KEDA_BROKER_<NAME>`, so no broker name can collide with it.
pub const NAMESPACES_PREFIX: &str = "CELERY_KEDA_NAMESPACES_";

/// Why a trigger was refused: the bounded label of `celery_keda_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A named broker whose namespace list does not include the trigger's namespace.
    Namespace,
    /// `brokerUrl` / `brokerUrlFromEnv` while only named brokers are allowed.
    InlineUrl,
    /// A host (or Unix socket) that no rule of the host allowlist admits.
    Host,
    /// A host name that resolves to an address outside the allowlist's ranges.
    Address,
    /// `sqs://` without keys (the scaler's own AWS identity) in an inline URL.
    AmbientIdentity,
}

impl Refusal {
    /// Every reason, for metrics that start at zero.
    pub const ALL: [Refusal; 5] = [
        Refusal::Namespace,
        Refusal::InlineUrl,
        Refusal::Host,
        Refusal::Address,
        Refusal::AmbientIdentity,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Namespace => "namespace",
            Refusal::InlineUrl => "inline_url",
            Refusal::Host => "host",
            Refusal::Address => "address",
            Refusal::AmbientIdentity => "ambient_identity",
        }
    }
}

/// The tenancy settings of one scaler (flags and environment of `serve` and `probe`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenancy {
    /// `--allowed-broker-hosts`: when set, every host a trigger names must match a rule.
    pub allowed_hosts: Option<HostAllowlist>,
    /// `--named-brokers-only`: refuse `brokerUrl` and `brokerUrlFromEnv`.
    pub named_brokers_only: bool,
    /// `--inline-sqs-ambient-identity`: let inline `sqs://` URLs without keys use the scaler's
    /// own AWS identity (named brokers always may).
    pub inline_sqs_ambient_identity: bool,
}

/// One rule of the host allowlist.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Rule {
    /// `redis.team-a.svc` or `redis.team-a.svc:6379` (lowercase, no trailing dot).
    Name { name: String, port: Option<u16> },
    /// `*.svc.cluster.local` (stored as `.svc.cluster.local`): any name with one or more labels
    /// in front of the suffix, not the suffix itself.
    Suffix { suffix: String, port: Option<u16> },
    /// `10.1.2.3`, `10.1.2.3:6379`, `[fd00::1]:6379`: one address.
    Addr { addr: IpAddr, port: Option<u16> },
    /// `10.0.0.0/8`, `fd00::/8`: a range, any port.
    Net(IpNet),
}

/// `--allowed-broker-hosts`: exact host names, `*.suffix` globs, either with `:port`, single
/// addresses (with an optional port) and address ranges.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HostAllowlist {
    rules: Vec<Rule>,
    /// The list as given, for the start-up log line.
    text: String,
}

impl fmt::Debug for HostAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for HostAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Lowercase, without a trailing dot (`Redis.svc.` is `redis.svc`).
fn normalise_host(host: &str) -> String {
    host.trim()
        .trim_matches(['[', ']'])
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn parse_port(text: &str, rule: &str) -> std::result::Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{rule}`: the port must be a number 1-65535"))
}

impl FromStr for HostAllowlist {
    type Err = String;

    /// Parses a list separated by commas or whitespace.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut rules = Vec::new();
        for raw in text.split(|c: char| c == ',' || c.is_whitespace()) {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            rules.push(parse_rule(raw)?);
        }
        if rules.is_empty() {
            return Err("the list is empty: give host names, *.suffix globs, host:port or address ranges (leave it unset to allow every host)".into());
        }
        Ok(HostAllowlist {
            rules,
            text: text.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }
}

fn parse_rule(raw: &str) -> std::result::Result<Rule, String> {
    if raw.contains('/') {
        return raw
            .parse::<IpNet>()
            .map(|n| Rule::Net(n.trunc()))
            .map_err(|_| {
                format!("`{raw}` is not an address range such as 10.0.0.0/8 or fd00::/8")
            });
    }
    // `[v6]` or `[v6]:port`
    if let Some(rest) = raw.strip_prefix('[') {
        let (addr, port) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{raw}`: missing `]`"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{raw}` is not an IPv6 address"))?;
        let port = match port {
            "" => None,
            p => Some(parse_port(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("`{raw}`: expected `]:port`"))?,
                raw,
            )?),
        };
        return Ok(Rule::Addr {
            addr: addr.to_canonical(),
            port,
        });
    }
    if let Ok(addr) = raw.parse::<IpAddr>() {
        return Ok(Rule::Addr {
            addr: addr.to_canonical(),
            port: None,
        });
    }
    let (host, port) = match raw.rsplit_once(':') {
        Some((h, p)) => (h, Some(parse_port(p, raw)?)),
        None => (raw, None),
    };
    if let Ok(addr) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(Rule::Addr {
            addr: IpAddr::V4(addr),
            port,
        });
    }
    let host = normalise_host(host);
    if let Some(suffix) = host.strip_prefix("*.") {
        if !valid_name(suffix) {
            return Err(format!(
                "`{raw}`: a glob is `*.` followed by a domain, such as *.svc.cluster.local"
            ));
        }
        return Ok(Rule::Suffix {
            suffix: format!(".{suffix}"),
            port,
        });
    }
    if !valid_name(&host) {
        return Err(format!(
            "`{raw}` is not a host name, *.suffix glob, host:port, address or address range"
        ));
    }
    Ok(Rule::Name { name: host, port })
}

impl HostAllowlist {
    fn port_ok(rule_port: Option<u16>, port: u16) -> bool {
        rule_port.is_none_or(|p| p == port)
    }

    /// Whether a name rule admits `host:port` (pure; `host` is a name, not an address).
    pub fn admits_name(&self, host: &str, port: u16) -> bool {
        let host = normalise_host(host);
        self.rules.iter().any(|r| match r {
            Rule::Name { name, port: p } => *name == host && Self::port_ok(*p, port),
            Rule::Suffix { suffix, port: p } => {
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && Self::port_ok(*p, port)
            }
            _ => false,
        })
    }

    /// Whether an address rule or range admits `addr:port`.
    pub fn admits_addr(&self, addr: IpAddr, port: u16) -> bool {
        let addr = addr.to_canonical();
        self.rules.iter().any(|r| match r {
            Rule::Addr { addr: a, port: p } => *a == addr && Self::port_ok(*p, port),
            Rule::Net(net) => net.contains(&addr),
            _ => false,
        })
    }

    /// Whether any rule is an address or a range (a host name may then be admitted by what it
    /// resolves to).
    fn has_address_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r, Rule::Addr { .. } | Rule::Net(_)))
    }
}

/// A named broker's namespace list: exact names and `*` globs (`team-a`, `team-b-*`, `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceList {
    patterns: Vec<String>,
}

impl NamespaceList {
    /// Parses a list separated by commas or whitespace; `var` names the variable in errors.
    pub fn parse(var: &str, text: &str) -> Result<Self> {
        let patterns: Vec<String> = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        let bad = patterns.iter().find(|p| {
            p.len() > 253
                || !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '*')
        });
        if patterns.is_empty() || bad.is_some() {
            return Err(Error::invalid(
                var,
                "must list Kubernetes namespaces (lowercase letters, digits, `-`) or `*` globs, separated by commas",
            ));
        }
        Ok(NamespaceList { patterns })
    }

    /// Whether `namespace` matches one of the patterns.
    pub fn allows(&self, namespace: &str) -> bool {
        self.patterns.iter().any(|p| glob(p, namespace))
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Which part of a trigger a host came from, so a checked address can be put in its place.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostField {
    /// The broker URL's host (Redis, AMQP).
    Broker,
    /// One node of a Sentinel list.
    SentinelNode(usize),
    /// The RabbitMQ management API (`managementUrl`, or derived from the AMQP URL).
    Management,
    /// The SQS endpoint (`awsEndpoint`, or the `sqs://host:port` of the URL).
    Endpoint,
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

/// The check of the Redis master a Sentinel reports, for an inline `sentinel://` trigger under a
/// host allowlist. The Sentinel nodes are checked like every other host, but the master is an
/// answer of theirs: a Sentinel inside an allowed range could name any server. The broker client
/// applies [`MasterCheck::admit`] to every master it is told about (first use and every lookup
/// after a failover) before it connects to it.
///
/// Part of the Redis target, so of the key that broker clients, shared polls and the result
/// window are kept under: an inline trigger never shares a client with a named or default
/// broker's Sentinel (whose master the operator vouches for, unchecked), nor with a trigger
/// whose refusal would name another key or namespace.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MasterCheck {
    allowlist: HostAllowlist,
    /// The metadata key the Sentinel URL came from (`brokerUrl`, `brokerUrlFromEnv`).
    key: String,
    namespace: String,
}

impl fmt::Debug for MasterCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "master checked by {} for `{}`, namespace {}",
            self.allowlist,
            self.key,
            ns_shown(&self.namespace)
        )
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{}]:{port}", host.trim_matches(['[', ']']))
    } else {
        format!("{host}:{port}")
    }
}

impl MasterCheck {
    /// A check of the masters reported to a trigger from `namespace` whose Sentinel URL came
    /// from metadata key `key`.
    pub fn new(allowlist: HostAllowlist, key: &str, namespace: &str) -> Self {
        MasterCheck {
            allowlist,
            key: key.to_string(),
            namespace: namespace.to_string(),
        }
    }

    /// Whether the scaler may connect to `host:port`, which the Sentinel at `sentinel` reports
    /// as the master named `master` (pure). An address must be admitted by an address rule or
    /// range; a name only by a name or glob rule: it is not resolved here, because the client
    /// would look it up again when it connects, and that second answer could point elsewhere.
    pub fn admit(&self, sentinel: &str, master: &str, host: &str, port: u16) -> Result<()> {
        let why = match normalise_host(host).parse::<IpAddr>() {
            Ok(addr) if self.allowlist.admits_addr(addr, port) => return Ok(()),
            Ok(_) => "",
            Err(_) if self.allowlist.admits_name(host, port) => return Ok(()),
            Err(_) if self.allowlist.has_address_rules() => ": a host name a Sentinel reports is admitted only by a name rule (the scaler does not resolve it to check it against address rules: a second DNS lookup could point elsewhere)",
            Err(_) => "",
        };
        Err(refused(
            Refusal::Host,
            format!(
                "metadata key `{}`: the Redis master `{}` that Sentinel `{}` reports for `{}` is not allowed by the scaler's broker host allowlist (--allowed-broker-hosts), namespace {}{why}; the scaler did not connect to it. Ask the scaler's operator to add it, or use a named broker",
                self.key,
                shown(&host_port(host, port)),
                shown(sentinel),
                shown(master),
                ns_shown(&self.namespace)
            ),
        ))
    }
}

/// One host a trigger makes the scaler contact.
struct Contact {
    field: HostField,
    key: String,
    host: String,
    port: u16,
    /// TLS: the certificate is checked against the name, so the name cannot be replaced by an
    /// address.
    tls: bool,
    /// A host this module cannot read (refused whatever the rules say).
    opaque: bool,
}

/// The namespace as shown in messages.
fn ns_shown(namespace: &str) -> String {
    if namespace.is_empty() {
        "(none given)".to_string()
    } else {
        format!("`{}`", shown(namespace))
    }
}

fn refused(reason: Refusal, message: String) -> Error {
    Error::Refused {
        reason,
        message: crate::secret::redact_urls(&message),
    }
}

fn url_host_port(url: &url::Url) -> Option<(String, u16)> {
    let host = url.host_str()?.trim_matches(['[', ']']).to_string();
    Some((host, url.port_or_known_default().unwrap_or(80)))
}

/// Every host the trigger's query makes the scaler contact (a Unix socket is `None`).
fn contacts(trigger: &Trigger, meta: &HashMap<String, String>) -> Option<Vec<Contact>> {
    let given = |key: &str| meta.get(key).is_some_and(|v| !v.trim().is_empty());
    let source = trigger.broker_source.clone();
    let q = &trigger.query;
    let mut out = Vec::new();
    match &q.target {
        BrokerTarget::Redis(t) => match &t.addr {
            RedisAddr::Tcp { host, port } => out.push(Contact {
                field: HostField::Broker,
                key: source,
                host: host.clone(),
                port: *port,
                tls: false,
                opaque: false,
            }),
            RedisAddr::Tls { host, port, .. } => out.push(Contact {
                field: HostField::Broker,
                key: source,
                host: host.clone(),
                port: *port,
                tls: true,
                opaque: false,
            }),
            RedisAddr::Unix { .. } => return None,
            RedisAddr::Sentinel { nodes, .. } => {
                for (i, (host, port)) in nodes.iter().enumerate() {
                    out.push(Contact {
                        field: HostField::SentinelNode(i),
                        key: source.clone(),
                        host: host.clone(),
                        port: *port,
                        tls: false,
                        opaque: false,
                    });
                }
            }
        },
        BrokerTarget::RabbitMq(t) => {
            out.push(Contact {
                field: HostField::Broker,
                key: source.clone(),
                host: t.host.clone(),
                port: t.port,
                tls: t.tls.is_some(),
                opaque: false,
            });
            if let Layout::RabbitMq(layout) = &q.layout {
                if let Some((host, port)) = url_host_port(&layout.management.base) {
                    out.push(Contact {
                        field: HostField::Management,
                        key: if given("managementUrl") {
                            "managementUrl".into()
                        } else {
                            source
                        },
                        host,
                        port,
                        tls: layout.management.base.scheme() == "https",
                        opaque: false,
                    });
                }
            }
        }
        BrokerTarget::Sqs(t) => {
            // Without an endpoint the SDK talks to AWS's regional endpoint: not a host a trigger
            // chooses (awsRegion is validated as a region name).
            if let Some(endpoint) = &t.endpoint {
                // An endpoint that does not parse here is refused (fail closed): `opaque`.
                let parsed = url::Url::parse(endpoint).ok();
                let (host, port, opaque) = match parsed.as_ref().and_then(url_host_port) {
                    Some((host, port)) => (host, port, false),
                    None => (endpoint.clone(), 0, true),
                };
                out.push(Contact {
                    field: HostField::Endpoint,
                    key: if given("awsEndpoint") {
                        "awsEndpoint".into()
                    } else {
                        source
                    },
                    host,
                    port,
                    tls: endpoint.starts_with("https://"),
                    opaque,
                });
            }
        }
    }
    Some(out)
}

/// Whether the trigger's broker is one the operator configured (named or default).
fn operator_broker(trigger: &Trigger) -> bool {
    trigger.broker_source == "broker" || trigger.broker_source == DEFAULT_BROKER_VAR
}

impl Tenancy {
    /// Whether any protection is on (for the start-up log line).
    pub fn describe(&self, env: &BrokerEnv) -> String {
        let mut on = Vec::new();
        if !env.namespaces.is_empty() {
            on.push(format!(
                "named brokers restricted to namespaces: {}",
                env.namespaces
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(list) = &self.allowed_hosts {
            on.push(format!("broker host allowlist: {list}"));
        }
        if self.named_brokers_only {
            on.push("inline broker URLs off".into());
        }
        on.push(if self.inline_sqs_ambient_identity {
            "inline sqs:// may use the scaler's AWS identity".into()
        } else {
            "inline sqs:// may not use the scaler's AWS identity".into()
        });
        on.join("; ")
    }

    /// Refuses inline broker URLs when only named brokers are allowed: checked before the URL
    /// is even parsed.
    pub fn check_inline(&self, meta: &HashMap<String, String>, namespace: &str) -> Result<()> {
        if !self.named_brokers_only {
            return Ok(());
        }
        for key in ["brokerUrl", "brokerUrlFromEnv"] {
            if meta.get(key).is_some_and(|v| !v.trim().is_empty()) {
                return Err(refused(
                    Refusal::InlineUrl,
                    format!(
                        "metadata key `{key}`: inline broker URLs are turned off in this scaler (--named-brokers-only), namespace {}: remove `{key}` and use `broker: <name>` with a broker the scaler's operator configures for your namespace ({NAMED_BROKER_PREFIX}<NAME> and {NAMESPACES_PREFIX}<NAME> in the scaler's environment)",
                        ns_shown(namespace)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The pure checks of a parsed trigger: namespace of a named broker, the scaler's AWS
    /// identity, and every host by name or literal address. Returns the hosts that only an
    /// address range can admit (resolved and checked by [`Tenancy::resolve`]).
    pub fn admit(
        &self,
        trigger: &Trigger,
        meta: &HashMap<String, String>,
        namespace: &str,
        env: &BrokerEnv,
    ) -> Result<Vec<Unresolved>> {
        if let Some(name) = &trigger.broker_name {
            if let Some(list) = env.namespaces.get(name) {
                if !list.allows(namespace) {
                    return Err(refused(
                        Refusal::Namespace,
                        format!(
                            "metadata key `broker`: broker `{name}` is not available to namespace {} (the scaler's {NAMESPACES_PREFIX}{} lists the namespaces that may use it); ask the scaler's operator to add your namespace, or use a broker configured for it",
                            ns_shown(namespace),
                            name.to_ascii_uppercase().replace('-', "_")
                        ),
                    ));
                }
            }
        }
        let operator = operator_broker(trigger);
        if let BrokerTarget::Sqs(t) = &trigger.query.target {
            if !operator && t.access_key.is_none() && !self.inline_sqs_ambient_identity {
                return Err(refused(
                    Refusal::AmbientIdentity,
                    format!(
                        "metadata key `{}`: `sqs://` without keys would use the scaler's own AWS identity, which this scaler lends only to named brokers (namespace {}); give the worker's keys in the URL (sqs://KEY:SECRET@), or ask the scaler's operator for a named broker ({NAMED_BROKER_PREFIX}<NAME>) or to set --inline-sqs-ambient-identity",
                        trigger.broker_source,
                        ns_shown(namespace)
                    ),
                ));
            }
        }
        let Some(list) = &self.allowed_hosts else {
            return Ok(Vec::new());
        };
        let Some(contacts) = contacts(trigger, meta) else {
            if operator {
                return Ok(Vec::new());
            }
            return Err(refused(
                Refusal::Host,
                format!(
                    "metadata key `{}`: a Unix socket is not allowed by the scaler's broker host allowlist (--allowed-broker-hosts), namespace {}; use a named broker",
                    trigger.broker_source,
                    ns_shown(namespace)
                ),
            ));
        };
        // The operator chose the hosts of a named or the default broker (and so the management
        // API derived from it); a host given in metadata is checked unless it is one of those
        // exact host:port pairs.
        let operator_hosts: Vec<(String, u16)> = if operator {
            contacts
                .iter()
                .filter(|c| c.key == trigger.broker_source)
                .map(|c| (normalise_host(&c.host), c.port))
                .collect()
        } else {
            Vec::new()
        };
        let mut unresolved = Vec::new();
        for c in contacts {
            if operator_hosts.contains(&(normalise_host(&c.host), c.port)) {
                continue;
            }
            let hostport = host_port(&c.host, c.port);
            let deny = |why: &str| {
                refused(
                    Refusal::Host,
                    format!(
                        "metadata key `{}`: host `{}` is not allowed by the scaler's broker host allowlist (--allowed-broker-hosts), namespace {}{why}; ask the scaler's operator to add it, or use a named broker",
                        c.key,
                        shown(&hostport),
                        ns_shown(namespace)
                    ),
                )
            };
            if c.opaque {
                return Err(deny(": it cannot be read as host:port"));
            }
            if let Ok(addr) = normalise_host(&c.host).parse::<IpAddr>() {
                if !list.admits_addr(addr, c.port) {
                    return Err(deny(""));
                }
            } else if list.admits_name(&c.host, c.port) {
                continue;
            } else if !list.has_address_rules() {
                return Err(deny(""));
            } else if c.tls {
                return Err(deny(": a TLS host is admitted only by its name (its certificate names it), not by an address range"));
            } else {
                unresolved.push(Unresolved {
                    field: c.field,
                    key: c.key,
                    host: c.host,
                    port: c.port,
                });
            }
        }
        Ok(unresolved)
    }

    /// Gives an inline `sentinel://` trigger under a host allowlist the [`MasterCheck`] of the
    /// masters its Sentinels report (pure). Named and default brokers are the operator's choice
    /// and keep reading whatever master their Sentinels report.
    pub fn check_reported_master(&self, trigger: &mut Trigger, namespace: &str) {
        let Some(list) = &self.allowed_hosts else {
            return;
        };
        if operator_broker(trigger) {
            return;
        }
        if let BrokerTarget::Redis(t) = &mut trigger.query.target {
            if let RedisAddr::Sentinel { check, .. } = &mut t.addr {
                *check = Some(MasterCheck::new(
                    list.clone(),
                    &trigger.broker_source,
                    namespace,
                ));
            }
        }
    }

    /// Resolves the hosts [`Tenancy::admit`] left open, within `deadline`; every address must lie
    /// in the allowlist's address rules, and the trigger then connects to the first one (the
    /// name is replaced by the checked address: no second lookup decides where it connects).
    pub async fn resolve(
        &self,
        trigger: &mut Trigger,
        namespace: &str,
        deadline: Duration,
    ) -> Result<()> {
        let Some(list) = &self.allowed_hosts else {
            return Ok(());
        };
        for u in std::mem::take(&mut trigger.unresolved) {
            let lookup =
                tokio::time::timeout(deadline, tokio::net::lookup_host((u.host.as_str(), u.port)))
                    .await;
            let addrs: Vec<IpAddr> = match lookup {
                Ok(Ok(addrs)) => addrs.map(|a| a.ip().to_canonical()).collect(),
                Ok(Err(e)) => {
                    return Err(Error::Unavailable(format!(
                        "metadata key `{}`: cannot resolve host `{}`: {e}",
                        u.key,
                        shown(&u.host)
                    )))
                }
                Err(_) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "metadata key `{}`: resolving host `{}` took longer than {deadline:?}",
                        u.key,
                        shown(&u.host)
                    )))
                }
            };
            let Some(first) = addrs.first().copied() else {
                return Err(Error::Unavailable(format!(
                    "metadata key `{}`: host `{}` resolves to no address",
                    u.key,
                    shown(&u.host)
                )));
            };
            if let Some(bad) = addrs.iter().find(|a| !list.admits_addr(**a, u.port)) {
                return Err(refused(
                    Refusal::Address,
                    format!(
                        "metadata key `{}`: host `{}` resolves to {bad}, which the scaler's broker host allowlist (--allowed-broker-hosts) does not admit, namespace {}; ask the scaler's operator to add the host, or use a named broker",
                        u.key,
                        shown(&u.host),
                        ns_shown(namespace)
                    ),
                ));
            }
            pin(trigger, &u.field, first);
        }
        Ok(())
    }
}

/// Puts `addr` in place of the host of `field`.
fn pin(trigger: &mut Trigger, field: &HostField, addr: IpAddr) {
    let text = addr.to_string();
    let q = &mut trigger.query;
    let set_url = |url: &mut url::Url| {
        let _ = url.set_ip_host(addr);
    };
    match (field, &mut q.target, &mut q.layout) {
        (HostField::Broker, BrokerTarget::Redis(t), _) => {
            if let RedisAddr::Tcp { host, .. } = &mut t.addr {
                *host = text;
            }
        }
        (HostField::SentinelNode(i), BrokerTarget::Redis(t), _) => {
            if let RedisAddr::Sentinel { nodes, .. } = &mut t.addr {
                if let Some(node) = nodes.get_mut(*i) {
                    node.0 = text;
                }
            }
        }
        (HostField::Broker, BrokerTarget::RabbitMq(t), _) => t.host = text,
        (HostField::Management, _, Layout::RabbitMq(layout)) => {
            set_url(&mut layout.management.base)
        }
        (HostField::Endpoint, BrokerTarget::Sqs(t), _) => {
            if let Some(endpoint) = &mut t.endpoint {
                if let Ok(mut url) = url::Url::parse(endpoint) {
                    set_url(&mut url);
                    *endpoint = url.as_str().trim_end_matches('/').to_string();
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> HostAllowlist {
        text.parse().unwrap()
    }

    #[test]
    fn rules_parse() {
        let l = list("redis.team-a.svc, *.svc.cluster.local:6379 10.0.0.0/8,fd00::/8 192.168.1.5:5672 [::1]:6379 ::2 Rabbit.Example.");
        assert!(l.admits_name("redis.team-a.svc", 1));
        assert!(l.admits_name("REDIS.team-a.svc.", 1));
        assert!(l.admits_name("r.ns.svc.cluster.local", 6379));
        assert!(!l.admits_name("r.ns.svc.cluster.local", 6380));
        assert!(!l.admits_name("svc.cluster.local", 6379));
        assert!(!l.admits_name("evilsvc.cluster.local", 6379));
        assert!(l.admits_name("rabbit.example", 5672));
        assert!(l.admits_addr("10.9.8.7".parse().unwrap(), 1));
        assert!(l.admits_addr("::ffff:10.9.8.7".parse().unwrap(), 1));
        assert!(!l.admits_addr("11.0.0.1".parse().unwrap(), 1));
        assert!(l.admits_addr("fd12::1".parse().unwrap(), 1));
        assert!(l.admits_addr("192.168.1.5".parse().unwrap(), 5672));
        assert!(!l.admits_addr("192.168.1.5".parse().unwrap(), 5673));
        assert!(l.admits_addr("::1".parse().unwrap(), 6379));
        assert!(!l.admits_addr("::1".parse().unwrap(), 6380));
        assert!(l.admits_addr("::2".parse().unwrap(), 1));
        for bad in [
            "",
            " , ",
            "*",
            "*.",
            "a..b",
            "h:0",
            "h:x",
            "10.0.0.0/33",
            "[::1",
            "a/b",
            "*.*.svc",
            "a b/c",
        ] {
            assert!(bad.parse::<HostAllowlist>().is_err(), "{bad:?}");
        }
    }

    fn refusal_text(r: Result<()>) -> String {
        match r {
            Err(Error::Refused {
                reason: Refusal::Host,
                message,
            }) => message,
            other => panic!("expected a host refusal, got {other:?}"),
        }
    }

    #[test]
    fn reported_masters_are_checked_without_dns() {
        let check = MasterCheck::new(
            list(
                "127.0.0.1:26379, 10.0.0.0/8, [fd00::1]:6379, redis.team-a.svc:6379, *.team-a.svc:6379",
            ),
            "brokerUrlFromEnv",
            "team-a",
        );
        let admit = |host: &str, port: u16| check.admit("127.0.0.1:26379", "mymaster", host, port);
        for (host, port) in [
            ("10.1.2.3", 6379),
            ("::ffff:10.1.2.3", 1),
            ("fd00::1", 6379),
            ("[fd00::1]", 6379),
            ("127.0.0.1", 26379),
            ("redis.team-a.svc", 6379),
            ("Redis.Team-A.svc.", 6379),
            ("x.team-a.svc", 6379),
        ] {
            assert_eq!(admit(host, port), Ok(()), "{host}:{port}");
        }
        assert_eq!(
            refusal_text(admit("127.0.0.1", 6379)),
            "metadata key `brokerUrlFromEnv`: the Redis master `127.0.0.1:6379` that Sentinel `127.0.0.1:26379` reports for `mymaster` is not allowed by the scaler's broker host allowlist (--allowed-broker-hosts), namespace `team-a`; the scaler did not connect to it. Ask the scaler's operator to add it, or use a named broker"
        );
        let text = refusal_text(admit("fd00::2", 6379));
        assert!(text.contains("`[fd00::2]:6379`"), "{text}");
        assert!(!text.contains("name rule"), "{text}");
        let text = refusal_text(admit("redis.team-a.svc", 6380));
        assert!(text.contains("`redis.team-a.svc:6380`"), "{text}");
        // A name that only an address rule could admit is not resolved to find out.
        let text = refusal_text(admit("redis.team-b.svc", 6379));
        assert!(text.contains("admitted only by a name rule"), "{text}");
        assert!(text.contains("DNS"), "{text}");
        // Without address rules there is nothing a lookup could change: no such hint.
        let names_only = MasterCheck::new(list("redis.team-a.svc"), "brokerUrl", "");
        let text = refusal_text(names_only.admit("s:26379", "m", "redis.team-b.svc", 6379));
        assert!(!text.contains("name rule"), "{text}");
        assert!(text.contains("metadata key `brokerUrl`"), "{text}");
        assert!(text.contains("namespace (none given)"), "{text}");
        assert_eq!(
            names_only.admit("s:26379", "m", "REDIS.team-a.svc", 1),
            Ok(())
        );
    }

    #[test]
    fn only_inline_sentinel_triggers_under_an_allowlist_carry_the_check() {
        let url = "sentinel://:SentPw@127.0.0.1:26379;sentinel://127.0.0.1:26380/0";
        let env = BrokerEnv::from_vars(
            [("CELERY_KEDA_BROKER_OPS", url), ("CELERY_BROKER_URL", url)]
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        let trigger = |pairs: &[(&str, &str)]| {
            let mut meta: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            meta.insert("sentinelMaster".into(), "mymaster".into());
            crate::metadata::parse(&meta, &env).unwrap()
        };
        let check_of = |t: &Trigger| match &t.query.target {
            BrokerTarget::Redis(r) => match &r.addr {
                RedisAddr::Sentinel { check, .. } => check.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let allowlist = list("127.0.0.0/8");
        let tenancy = Tenancy {
            allowed_hosts: Some(allowlist.clone()),
            ..Tenancy::default()
        };
        for (pairs, expected) in [
            (
                vec![("brokerUrl", url)],
                Some(MasterCheck::new(allowlist.clone(), "brokerUrl", "team-a")),
            ),
            (
                vec![("brokerUrlFromEnv", url)],
                Some(MasterCheck::new(
                    allowlist.clone(),
                    "brokerUrlFromEnv",
                    "team-a",
                )),
            ),
            (vec![("broker", "ops")], None),
            (vec![], None),
        ] {
            let mut t = trigger(&pairs);
            tenancy.check_reported_master(&mut t, "team-a");
            assert_eq!(check_of(&t), expected, "{pairs:?}");
        }
        // The check is part of the broker client's key: the named broker's Sentinel and an
        // inline trigger with the same URL do not share a client, nor do two namespaces.
        let mut inline = trigger(&[("brokerUrl", url)]);
        let mut named = trigger(&[("broker", "ops")]);
        let mut other_ns = trigger(&[("brokerUrl", url)]);
        assert_eq!(inline.query.target, named.query.target);
        tenancy.check_reported_master(&mut inline, "team-a");
        tenancy.check_reported_master(&mut named, "team-a");
        tenancy.check_reported_master(&mut other_ns, "team-b");
        assert_ne!(inline.query.target, named.query.target);
        assert_ne!(inline.query.target, other_ns.query.target);
        // No allowlist: nothing to carry.
        let mut t = trigger(&[("brokerUrl", url)]);
        Tenancy::default().check_reported_master(&mut t, "team-a");
        assert_eq!(check_of(&t), None);
        // Other schemes are untouched.
        let mut t = trigger(&[("brokerUrl", "redis://127.0.0.1:6379/0")]);
        let before = t.query.target.clone();
        tenancy.check_reported_master(&mut t, "team-a");
        assert_eq!(t.query.target, before);
    }

    #[test]
    fn namespace_globs() {
        let l = NamespaceList::parse("V", "team-a, team-b-*,*-ops").unwrap();
        assert!(l.allows("team-a"));
        assert!(!l.allows("team-a2"));
        assert!(l.allows("team-b-"));
        assert!(l.allows("team-b-x"));
        assert!(l.allows("prod-ops"));
        assert!(!l.allows(""));
        assert!(NamespaceList::parse("V", "*").unwrap().allows(""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "acb"));
        assert!(!glob("ab*ba", "aba"));
        for bad in ["", "Team", "a_b", " , "] {
            assert!(NamespaceList::parse("V", bad).is_err(), "{bad:?}");
        }
    }
}
