//! Tenancy, the policy: which namespaces may use a named broker, which hosts a trigger may make
//! the scaler contact, whether inline broker URLs are accepted, and who may borrow the scaler's
//! AWS identity. The rules it applies are `allowlist`'s; the hosts are what each backend's target
//! says it contacts (`Backend::contacts`); a trigger reaches it parsed (`metadata`, which refuses
//! an inline URL itself when told to) and leaves it admitted for the broker.
//!
//! Every decision that a name or a literal address settles is pure ([`Tenancy::admit`]), so
//! `GetMetricSpec` refuses exactly like the readings do without any I/O. A host name that only an
//! address range (CIDR) can admit needs a DNS lookup: [`Tenancy::resolve`] does it inside the
//! reading's deadline, checks *every* address, and rewrites the trigger to connect to the checked
//! address itself, so a second lookup (DNS rebinding) never decides where the scaler connects.

use std::net::IpAddr;
use std::time::Duration;

use crate::allowlist::{host_port, normalise_host, ns_shown, HostAllowlist, MasterCheck};
use crate::broker::Unresolved;
use crate::broker_env::{BrokerEnv, DEFAULT_BROKER_VAR, NAMED_BROKER_PREFIX, NAMESPACES_PREFIX};
use crate::error::{Error, Refusal, Result};
use crate::metadata::{InlineUrls, Trigger};
use crate::secret::shown;

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

    /// Whether a trigger from `namespace` may give a broker URL inline: the metadata parser
    /// refuses one before it reads the URL.
    pub fn inline_urls<'a>(&self, namespace: &'a str) -> InlineUrls<'a> {
        if self.named_brokers_only {
            InlineUrls::Refused { namespace }
        } else {
            InlineUrls::Accepted
        }
    }

    /// The pure checks of a parsed trigger from `namespace` (no I/O): the namespace of a named
    /// broker, the scaler's AWS identity, and every host by name or literal address. The hosts
    /// that only an address range can admit are left in `Trigger::unresolved` (resolved and
    /// checked by [`Tenancy::resolve`]); an inline Sentinel trigger carries the check of the
    /// masters its Sentinels report.
    pub fn admit(&self, mut trigger: Trigger, namespace: &str, env: &BrokerEnv) -> Result<Trigger> {
        trigger.unresolved = self.check(&trigger, namespace, env)?;
        self.check_reported_master(&mut trigger, namespace);
        Ok(trigger)
    }

    fn check(
        &self,
        trigger: &Trigger,
        namespace: &str,
        env: &BrokerEnv,
    ) -> Result<Vec<Unresolved>> {
        if let Some(name) = &trigger.broker_name {
            if let Some(list) = env.namespaces.get(name) {
                if !list.allows(namespace) {
                    return Err(Error::refused(
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
        let backend = &trigger.query.backend;
        if !operator && backend.uses_ambient_identity() && !self.inline_sqs_ambient_identity {
            return Err(Error::refused(
                Refusal::AmbientIdentity,
                format!(
                    "metadata key `{}`: `sqs://` without keys would use the scaler's own AWS identity, which this scaler lends only to named brokers (namespace {}); give the worker's keys in the URL (sqs://KEY:SECRET@), or ask the scaler's operator for a named broker ({NAMED_BROKER_PREFIX}<NAME>) or to set --inline-sqs-ambient-identity",
                    trigger.broker_source,
                    ns_shown(namespace)
                ),
            ));
        }
        let Some(list) = &self.allowed_hosts else {
            return Ok(Vec::new());
        };
        let Some(contacts) = backend.contacts() else {
            if operator {
                return Ok(Vec::new());
            }
            return Err(Error::refused(
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
                .filter(|c| trigger.key_of(&c.field) == trigger.broker_source)
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
            let key = trigger.key_of(&c.field);
            let hostport = host_port(&c.host, c.port);
            let deny = |why: &str| {
                Error::refused(
                    Refusal::Host,
                    format!(
                        "metadata key `{}`: host `{}` is not allowed by the scaler's broker host allowlist (--allowed-broker-hosts), namespace {}{why}; ask the scaler's operator to add it, or use a named broker",
                        key,
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
                    key: key.to_string(),
                    field: c.field,
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
    fn check_reported_master(&self, trigger: &mut Trigger, namespace: &str) {
        let Some(list) = &self.allowed_hosts else {
            return;
        };
        if operator_broker(trigger) {
            return;
        }
        let check = MasterCheck::new(list.clone(), &trigger.broker_source, namespace);
        trigger.query.backend.check_reported_hosts(check);
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
                return Err(Error::refused(
                    Refusal::Address,
                    format!(
                        "metadata key `{}`: host `{}` resolves to {bad}, which the scaler's broker host allowlist (--allowed-broker-hosts) does not admit, namespace {}; ask the scaler's operator to add the host, or use a named broker",
                        u.key,
                        shown(&u.host),
                        ns_shown(namespace)
                    ),
                ));
            }
            trigger.query.backend.pin(&u.field, first);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::broker::redis::RedisAddr;
    use crate::broker::Backend;

    fn list(text: &str) -> HostAllowlist {
        text.parse().unwrap()
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
        let check_of = |t: &Trigger| match &t.query.backend {
            Backend::Redis { target: r, .. } => match &r.addr {
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
        assert_eq!(inline.query.backend, named.query.backend);
        tenancy.check_reported_master(&mut inline, "team-a");
        tenancy.check_reported_master(&mut named, "team-a");
        tenancy.check_reported_master(&mut other_ns, "team-b");
        assert_ne!(inline.query.backend, named.query.backend);
        assert_ne!(inline.query.backend, other_ns.query.backend);
        // No allowlist: nothing to carry.
        let mut t = trigger(&[("brokerUrl", url)]);
        Tenancy::default().check_reported_master(&mut t, "team-a");
        assert_eq!(check_of(&t), None);
        // Other schemes are untouched.
        let mut t = trigger(&[("brokerUrl", "redis://127.0.0.1:6379/0")]);
        let before = t.query.backend.clone();
        tenancy.check_reported_master(&mut t, "team-a");
        assert_eq!(t.query.backend, before);
    }
}
