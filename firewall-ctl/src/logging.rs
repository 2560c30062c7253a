//! Logs through `tracing`: text for a terminal or the journal, or one JSON
//! object per line (`--log-format json`) with the fields of the record and
//! of the spans it happened in — an FTP control connection (`ftp`: client,
//! server), a connection object (`conn`: id, kind, session, mode) — and the
//! events stream as records of their own (target `firewall::events`, debug
//! level). `RUST_LOG` filters as before (default `info`); records made with
//! the `log` crate's macros are carried over.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the subscriber (once, at start); to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (a test harness) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .try_init(),
    };
}
