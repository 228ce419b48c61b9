//! Logging, set up once per process.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter used when `RUST_LOG` is unset. rumqttd's own spans cost throughput at any level, so they stay
/// at `warn` unless asked for.
pub const DEFAULT_FILTER: &str = "info,rumqttd=warn,sqlx=warn";

/// Installs the global subscriber: `RUST_LOG` filter (or [`DEFAULT_FILTER`]), text or JSON lines on stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second call (tests) keeps the first subscriber; that is fine.
    let _ = result;
}

/// For tests: logs only when `TEST_LOG` is set, so test output stays quiet by default.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(LogFormat::Text);
    }
}
