//! Redis client errors as the scaler's errors: the broker named by its redacted URL, the
//! password scrubbed from the library's text, the server's error code mapped to a meaning.

use super::target::RedisTarget;
use crate::error::Error;
use crate::secret::scrub;

/// Converts a client error into the scaler's error, naming the broker by its redacted URL and
/// scrubbing the password from the library's text in case it quotes it.
pub(super) fn convert(redacted: &str, target: &RedisTarget, err: redis::RedisError) -> Error {
    // A pipeline reports one server error per command: the first one says it all.
    let first = err.clone().into_server_errors().and_then(|errors| {
        errors
            .first()
            .map(|(_, e)| (e.code().to_string(), e.to_string()))
    });
    let code = first.as_ref().map(|(c, _)| c.as_str()).or(err.code());
    let raw = first
        .as_ref()
        .map_or_else(|| err.to_string(), |(_, t)| t.clone());
    let text = scrub(&raw, target.password.as_ref());
    let msg = format!("Redis broker {redacted}: {text}");
    match code {
        Some("WRONGPASS" | "NOAUTH") => return Error::Unauthenticated(msg),
        Some("NOPERM") => return Error::PermissionDenied(msg),
        Some("LOADING" | "MASTERDOWN" | "TRYAGAIN") => return Error::Unavailable(msg),
        _ => {}
    }
    match err.kind() {
        redis::ErrorKind::AuthenticationFailed => Error::Unauthenticated(msg),
        _ if err.is_timeout() => Error::DeadlineExceeded(msg),
        redis::ErrorKind::Io
        | redis::ErrorKind::InvalidClientConfig
        | redis::ErrorKind::MasterNameNotFoundBySentinel
        | redis::ErrorKind::NoValidReplicasFoundBySentinel
        | redis::ErrorKind::EmptySentinelList => Error::Unavailable(msg),
        _ if err.is_io_error() || err.is_connection_refusal() || err.is_connection_dropped() => {
            Error::Unavailable(msg)
        }
        _ => Error::Internal(msg),
    }
}
