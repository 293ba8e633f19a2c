//! Sentinel lookups of the scaler's own, for inline `sentinel://` triggers under a host
//! allowlist: the master a Sentinel reports is checked ([`MasterCheck`]) before any connection
//! to it, at every lookup (first use, and after each connection error, so after a failover).
//!
//! The redis crate's `SentinelClient` connects to each master a Sentinel names (to confirm its
//! role) before it returns a client, so what it returns is known only after the connection: too
//! late to check. Named and default brokers, whose masters are the operator's choice, keep using
//! it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
    RedisError,
};

use super::error::convert;
use super::target::RedisTarget;
use crate::allowlist::{host_port, MasterCheck};
use crate::error::{Error, Result};
use crate::secret::{scrub, shown};

/// How one lookup reaches the Sentinels and the master they report.
pub(super) struct CheckedSentinel {
    /// The Sentinel nodes, asked in this order.
    pub nodes: Vec<(String, u16)>,
    /// kombu's `master_name`.
    pub master: String,
    pub check: MasterCheck,
    /// Database and credentials of the master (the Sentinels are asked without any, as the
    /// crate's client does).
    pub redis: RedisConnectionInfo,
    /// Connect and response timeout of each Sentinel connection.
    pub timeout: Duration,
}

/// What one Sentinel said about the master.
enum Answer {
    /// The master's address: up, as far as this Sentinel knows.
    Up(String, u16),
    /// Why this Sentinel named no usable master.
    Nothing(String),
}

impl CheckedSentinel {
    /// Asks the Sentinels in order for the master. The first one that names a master that is up
    /// decides: a master the allowlist refuses fails the lookup at once (no connection to it,
    /// and no other Sentinel is asked to outvote the refusal); an admitted one is connected to
    /// (through a new manager, with `config`) and used once it confirms that it is the master
    /// (`ROLE`, or `INFO replication` where `ROLE` is not allowed), else the next Sentinel is
    /// asked. Errors name `target` by its redacted URL.
    pub async fn master(
        &self,
        config: &ConnectionManagerConfig,
        target: &RedisTarget,
    ) -> Result<(Client, ConnectionManager)> {
        let redacted = target.redacted();
        let text = |e: &RedisError| scrub(&e.to_string(), target.password.as_ref());
        let mut reasons = Vec::new();
        // An error from a master (a wrong password, say) says more than "not found".
        let mut master_err = None;
        for (host, port) in &self.nodes {
            let node = host_port(host, *port);
            let (m_host, m_port) = match self.ask(host, *port).await {
                Ok(Answer::Up(h, p)) => (h, p),
                Ok(Answer::Nothing(why)) => {
                    reasons.push(format!("{}: {why}", shown(&node)));
                    continue;
                }
                Err(e) => {
                    reasons.push(format!("{}: {}", shown(&node), text(&e)));
                    continue;
                }
            };
            self.check.admit(&node, &self.master, &m_host, m_port)?;
            match self.confirm(&m_host, m_port, config).await {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => reasons.push(format!(
                    "{}: reports `{}`, which is not a master",
                    shown(&node),
                    shown(&host_port(&m_host, m_port))
                )),
                Err(e) => {
                    reasons.push(format!("{}: {}", shown(&node), text(&e)));
                    master_err = Some(e);
                }
            }
        }
        if let Some(e) = master_err {
            return Err(convert(&redacted, target, e));
        }
        Err(Error::Unavailable(format!(
            "Redis broker {redacted}: no Sentinel reports a master `{}` that is up ({})",
            shown(&self.master),
            reasons.join("; ")
        )))
    }

    /// `SENTINEL MASTER <name>` on one node, over a connection of its own.
    async fn ask(&self, host: &str, port: u16) -> redis::RedisResult<Answer> {
        let client = Client::open(ConnectionAddr::Tcp(host.to_string(), port))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let fields: std::collections::HashMap<String, String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        Ok(read_answer(&fields))
    }

    /// Connects to the admitted master and asks for its role: `Some` client and manager if it is
    /// the master.
    async fn confirm(
        &self,
        host: &str,
        port: u16,
        config: &ConnectionManagerConfig,
    ) -> redis::RedisResult<Option<(Client, ConnectionManager)>> {
        let info = ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()?
            .set_redis_settings(self.redis.clone());
        let client = Client::open(info)?;
        let mut manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        let master = match redis::cmd("ROLE")
            .query_async::<redis::Role>(&mut manager)
            .await
        {
            Ok(role) => matches!(role, redis::Role::Primary { .. }),
            // The server refused ROLE (an ACL, or too old): the role line of INFO replication.
            Err(e) if matches!(e.code(), Some("NOPERM" | "ERR")) => {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut manager)
                    .await
                    .map_err(|_| e)?;
                info.lines().any(|l| l.trim() == "role:master")
            }
            Err(e) => return Err(e),
        };
        Ok(master.then_some((client, manager)))
    }
}

/// Reads a `SENTINEL MASTER` reply: the master's address if its flags say it is a master that is
/// not down (subjectively or objectively).
fn read_answer(fields: &std::collections::HashMap<String, String>) -> Answer {
    let flags = fields.get("flags").map(String::as_str).unwrap_or("");
    let flag = |f: &str| flags.split(',').any(|x| x == f);
    let port = fields.get("port").and_then(|p| p.parse::<u16>().ok());
    match (fields.get("ip"), port) {
        (Some(ip), Some(port)) if flag("master") && !flag("s_down") && !flag("o_down") => {
            Answer::Up(ip.clone(), port)
        }
        (Some(_), Some(_)) => Answer::Nothing(format!(
            "reports the master down (flags `{}`)",
            shown(flags)
        )),
        _ => Answer::Nothing("gave no master address".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(pairs: &[(&str, &str)]) -> Answer {
        read_answer(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn only_a_master_that_is_up_is_taken() {
        let up = answer(&[("ip", "10.1.2.3"), ("port", "6380"), ("flags", "master")]);
        assert!(matches!(up, Answer::Up(ref h, 6380) if h == "10.1.2.3"));
        for flags in [
            "master,s_down",
            "master,o_down,s_down",
            "slave",
            "",
            "master_x",
        ] {
            let a = answer(&[("ip", "10.1.2.3"), ("port", "6380"), ("flags", flags)]);
            assert!(matches!(a, Answer::Nothing(_)), "{flags}");
        }
        let no_port = answer(&[("ip", "10.1.2.3"), ("port", "x"), ("flags", "master")]);
        assert!(matches!(no_port, Answer::Nothing(ref w) if w == "gave no master address"));
    }
}
