//! The semantic error type of the scaler and its one mapping to gRPC status codes.
//!
//! Variants say what went wrong for the caller (bad metadata, broker unreachable, ...), not which
//! backend produced it: each backend converts its own errors into these. Every message is built
//! from already-redacted text, so it can be logged, returned and counted as it is.

use tonic::{Code, Status};

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

/// What can go wrong while answering an RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The trigger metadata is missing a key or holds a bad value. `key` names the metadata key.
    #[error("metadata key `{key}`: {message}")]
    InvalidMetadata { key: String, message: String },
    /// A queue the trigger names does not exist on the broker (RabbitMQ, SQS).
    #[error("{0}")]
    NotFound(String),
    /// The broker could not be reached or dropped the connection.
    #[error("{0}")]
    Unavailable(String),
    /// The broker did not answer within the deadline.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The broker refused the credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credentials are valid but lack a permission the scaler needs.
    #[error("{0}")]
    PermissionDenied(String),
    /// The broker answered something the scaler cannot interpret.
    #[error("{0}")]
    Internal(String),
    /// The scaler's tenancy settings refuse the trigger (decided before any connection). The
    /// message names the key, host or broker and the namespace, never a secret.
    #[error("{message}")]
    Refused { reason: Refusal, message: String },
}

impl Error {
    /// Builds an [`Error::InvalidMetadata`] for `key`. Messages quote values through
    /// `secret::shown`; URL passwords are redacted here once more, for any quote that did not.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidMetadata {
            key: key.into(),
            message: crate::secret::redact_urls(&message.into()),
        }
    }

    /// Builds an [`Error::Refused`]: a tenancy refusal, its message redacted once more.
    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Error::Refused {
            reason,
            message: crate::secret::redact_urls(&message.into()),
        }
    }

    /// A bounded label for metrics and logs: never the message text.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidMetadata { .. } => "invalid_metadata",
            Error::NotFound(_) => "not_found",
            Error::Unavailable(_) => "unavailable",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Internal(_) => "internal",
            Error::Refused { .. } => "refused",
        }
    }

    /// Whether the same reading cannot succeed until the trigger's metadata changes: the
    /// scaler's own decisions on it (a tenancy refusal, bad metadata), which only the metadata or
    /// the scaler's configuration decide. A push stream whose reading fails this way ends with
    /// the error instead of polling: KEDA reopens it (with the ScaledObject's current metadata)
    /// after its backoff of 2 s doubling to 1 min. What a broker reports is never permanent,
    /// credentials and permissions included: an ACL edit or a password rotation changes it, and
    /// RabbitMQ refuses connections to a vhost that is still starting with `NOT_ALLOWED`.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::InvalidMetadata { .. } | Error::Refused { .. } => true,
            Error::NotFound(_)
            | Error::Unavailable(_)
            | Error::DeadlineExceeded(_)
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::Internal(_) => false,
        }
    }

    /// The gRPC code this error is returned with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidMetadata { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Internal(_) => Code::Internal,
            Error::Refused { .. } => Code::PermissionDenied,
        }
    }
}

/// Longest status message sent: messages quote (redacted) input, and input can be large.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// The one place where scaler errors become gRPC statuses.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let mut message = err.to_string();
        if message.len() > MAX_STATUS_MESSAGE {
            let mut end = MAX_STATUS_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("... (truncated)");
        }
        Status::new(err.code(), message)
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_metadata_names_the_key_and_maps_to_invalid_argument() {
        let status = Status::from(Error::invalid("queueLength", "must be > 0, got \"-1\""));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "metadata key `queueLength`: must be > 0, got \"-1\""
        );
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        let status = Status::from(Error::invalid("queues", "é".repeat(5000)));
        assert!(status.message().len() <= MAX_STATUS_MESSAGE + "... (truncated)".len());
        assert!(status.message().ends_with("... (truncated)"));
        assert!(status.message().starts_with("metadata key `queues`: é"));
    }

    #[test]
    fn each_variant_has_its_own_code() {
        let cases = [
            (Error::NotFound("q".into()), Code::NotFound),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (Error::DeadlineExceeded("x".into()), Code::DeadlineExceeded),
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (Error::Internal("x".into()), Code::Internal),
            (
                Error::Refused {
                    reason: Refusal::Host,
                    message: "x".into(),
                },
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn only_the_scalers_own_decisions_on_metadata_are_permanent() {
        let permanent = [
            Error::invalid("queues", "x"),
            Error::refused(Refusal::Host, "x"),
        ];
        assert!(permanent.iter().all(Error::is_permanent));
        let transient = [
            Error::NotFound("q".into()),
            Error::Unavailable("x".into()),
            Error::DeadlineExceeded("x".into()),
            Error::Unauthenticated("x".into()),
            Error::PermissionDenied("x".into()),
            Error::Internal("x".into()),
        ];
        assert!(!transient.iter().any(Error::is_permanent));
    }
}
