//! The host allowlist, namespace lists and the check of a Sentinel-reported master: the pure
//! rules the tenancy policy applies, at the bottom of the house (they import only `error` and
//! `secret`, so every broker may use them).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::error::{Error, Refusal, Result};
use crate::secret::shown;

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
pub fn normalise_host(host: &str) -> String {
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
    pub fn has_address_rules(&self) -> bool {
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
pub fn host_port(host: &str, port: u16) -> String {
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
        Err(Error::refused(
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

/// The namespace as shown in messages: quoted, or `(none given)`.
pub fn ns_shown(namespace: &str) -> String {
    if namespace.is_empty() {
        "(none given)".to_string()
    } else {
        format!("`{}`", shown(namespace))
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
