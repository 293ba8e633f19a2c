//! Logging set-up: `tracing` with `RUST_LOG` filtering, as text or JSON lines.

use std::io::IsTerminal;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Never logged, whatever `RUST_LOG` says: lapin's trace events print every AMQP frame it reads
/// or writes, and `Connection.StartOk` carries the SASL PLAIN response with the password.
fn is_wire_trace(meta: &Metadata<'_>) -> bool {
    *meta.level() == Level::TRACE
        && (meta.target().starts_with("lapin") || meta.target().starts_with("amq_protocol"))
}

/// Installs the global subscriber (logs go to stderr). `RUST_LOG` overrides `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let safe = filter_fn(|meta| !is_wire_trace(meta));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(layer.with_filter(safe)).try_init(),
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_filter(safe))
            .try_init(),
    };
}
