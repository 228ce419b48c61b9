//! The operator contract: defaults, then an optional TOML file, then environment, then flags.
//!
//! clap reads flags and environment together (a flag wins over its variable); the file fills only what
//! neither gave; defaults fill the rest. [`Settings`] is the resolved result the application is built from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// Command line of the `antumbra` binary.
#[derive(Debug, Parser)]
#[command(
    name = "antumbra",
    version,
    about = "Self-hosted device-shadow IoT platform",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve`'s flags and environment, read when no subcommand is given: plain `antumbra` (and `cargo run`)
    /// is `antumbra serve`, with the same `ANTUMBRA_*` variables and flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// The subcommand, `serve` with the top-level flags and environment when none was given.
    pub fn command(self) -> Command {
        self.command
            .unwrap_or_else(|| Command::Serve(Box::new(self.serve)))
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: REST API, MQTT broker, everything.
    Serve(Box<ServeArgs>),
    /// Print the OpenAPI document (or write it to a file).
    Openapi {
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Options of `antumbra serve`; each also comes from the environment and from the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Optional TOML config file; environment and flags override it.
    #[arg(long, env = "ANTUMBRA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory: SQLite file, CA, embedded shadow store [default: ./data].
    #[arg(long, env = "ANTUMBRA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST listen address, IP:port or host:port; port 0 picks a free port [default: 127.0.0.1:8080].
    #[arg(long = "http", env = "ANTUMBRA_HTTP_ADDR", value_parser = listen_addr)]
    pub http_addr: Option<SocketAddr>,
    /// MQTT over TLS listen address, IP:port or host:port; port 0 picks a free port [default: 127.0.0.1:8883].
    #[arg(long = "mqtts", env = "ANTUMBRA_MQTTS_ADDR", value_parser = listen_addr)]
    pub mqtts_addr: Option<SocketAddr>,
    /// Registry database: sqlite:… or postgres://… [default: SQLite file in the data dir].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis for the shadow store; unset means the embedded store in the data dir.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis [default: antumbra:].
    #[arg(long, env = "ANTUMBRA_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Admin API key; when unset, one is generated on first start and printed once.
    #[arg(long, env = "ANTUMBRA_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// DNS names (or IPs) of the MQTT server certificate, comma-separated [default: localhost].
    #[arg(long, env = "ANTUMBRA_MQTT_DNS_NAMES", value_delimiter = ',')]
    pub mqtt_dns_names: Option<Vec<String>>,
    /// Operator-provided CA certificate (PEM); needs --ca-key.
    #[arg(long, env = "ANTUMBRA_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Operator-provided CA private key (PEM); needs --ca-cert.
    #[arg(long, env = "ANTUMBRA_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Validity of issued device certificates, in days [default: 365].
    #[arg(long, env = "ANTUMBRA_CERT_VALIDITY_DAYS")]
    pub cert_validity_days: Option<u32>,
    /// Largest accepted REST request body, in bytes [default: 65536].
    #[arg(long, env = "ANTUMBRA_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Log format [default: text].
    #[arg(long, env = "ANTUMBRA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM [default: 30].
    #[arg(long, env = "ANTUMBRA_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Development only: also serve MQTT without TLS here (loopback addresses only; the client id is trusted).
    #[arg(long = "mqtt-plain", env = "ANTUMBRA_MQTT_PLAIN_ADDR", value_parser = listen_addr)]
    pub mqtt_plain_addr: Option<SocketAddr>,
    /// Most MQTT device sessions at once [default: 50000].
    #[arg(long, env = "ANTUMBRA_MQTT_MAX_CONNECTIONS")]
    pub mqtt_max_connections: Option<usize>,
    /// Largest MQTT packet accepted, in bytes [default: 262144].
    #[arg(long, env = "ANTUMBRA_MQTT_MAX_PACKET_BYTES")]
    pub mqtt_max_packet_bytes: Option<usize>,
    /// Seconds a persistent MQTT session (subscriptions, queued QoS 1/2 messages) is kept after its device
    /// leaves; MQTT 5 clients may ask for less; 0 keeps none [default: 3600].
    #[arg(long, env = "ANTUMBRA_MQTT_SESSION_EXPIRY_SECS")]
    pub mqtt_session_expiry_secs: Option<u32>,
    /// Seconds a write to a device may wait for the device to read it; a session whose device stops reading
    /// ends then [default: 60].
    #[arg(long, env = "ANTUMBRA_MQTT_WRITE_TIMEOUT_SECS")]
    pub mqtt_write_timeout_secs: Option<u32>,
    /// Largest shadow state (desired + reported, serialized), in bytes [default: 65536].
    #[arg(long, env = "ANTUMBRA_SHADOW_MAX_STATE_BYTES")]
    pub shadow_max_state_bytes: Option<usize>,
    /// Deepest nesting inside a shadow section [default: 8].
    #[arg(long, env = "ANTUMBRA_SHADOW_MAX_DEPTH")]
    pub shadow_max_depth: Option<usize>,
    /// Longest shadow clientToken, in bytes [default: 64].
    #[arg(long, env = "ANTUMBRA_SHADOW_MAX_CLIENT_TOKEN")]
    pub shadow_max_client_token: Option<usize>,
}

/// A listen address: `IP:port` (`[::1]:8080` for IPv6), or `host:port` with a name that resolves, such as
/// `localhost:8080` (its first IPv4 address, else its first address).
pub fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("`{text}` is neither IP:port nor host:port ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("`{text}` resolves to no address"))
}

fn file_listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    listen_addr(&text).map(Some).map_err(serde::de::Error::custom)
}

/// The config file: the same settings, snake_case, all optional. Unknown keys are an error, so a typo is
/// reported instead of silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "file_listen_addr")]
    http_addr: Option<SocketAddr>,
    #[serde(default, deserialize_with = "file_listen_addr")]
    mqtts_addr: Option<SocketAddr>,
    database_url: Option<String>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    admin_token: Option<String>,
    mqtt_dns_names: Option<Vec<String>>,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    cert_validity_days: Option<u32>,
    max_body_bytes: Option<usize>,
    log_format: Option<LogFormat>,
    shutdown_timeout_secs: Option<u64>,
    #[serde(default, deserialize_with = "file_listen_addr")]
    mqtt_plain_addr: Option<SocketAddr>,
    mqtt_max_connections: Option<usize>,
    mqtt_max_packet_bytes: Option<usize>,
    mqtt_session_expiry_secs: Option<u32>,
    mqtt_write_timeout_secs: Option<u32>,
    shadow_max_state_bytes: Option<usize>,
    shadow_max_depth: Option<usize>,
    shadow_max_client_token: Option<usize>,
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The config file is not valid TOML for these settings.
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Fully resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// REST listen address.
    pub http_addr: SocketAddr,
    /// MQTT over TLS listen address.
    pub mqtts_addr: SocketAddr,
    /// Registry database URL.
    pub database_url: String,
    /// Redis URL, when the shadow store is Redis.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// Configured admin token.
    pub admin_token: Option<String>,
    /// MQTT server certificate names.
    pub mqtt_dns_names: Vec<String>,
    /// Operator-provided CA (certificate, key).
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Device certificate validity, in days.
    pub cert_validity_days: u32,
    /// Largest REST request body.
    pub max_body_bytes: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Graceful shutdown budget, in seconds.
    pub shutdown_timeout_secs: u64,
    /// Development plain-MQTT listener (loopback only).
    pub mqtt_plain_addr: Option<SocketAddr>,
    /// Broker limits.
    pub mqtt: crate::mqtt::MqttSettings,
    /// Shadow document limits.
    pub shadow_limits: crate::shadow::request::Limits,
}

impl Settings {
    /// Resolves flags/env over the config file (when one is named) over defaults.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::layer(args, file)
    }

    fn layer(args: ServeArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data"));
        let database_url = args
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| crate::db::sqlite_url(&data_dir.join("antumbra.db")));
        if crate::db::Engine::of(&database_url).is_none() {
            return Err(ConfigError::Invalid(
                "DATABASE_URL must start with sqlite: or postgres://".into(),
            ));
        }
        let ca = match (args.ca_cert.or(file.ca_cert), args.ca_key.or(file.ca_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "ca_cert and ca_key must be given together".into(),
                ))
            }
        };
        let mqtt_dns_names = args
            .mqtt_dns_names
            .or(file.mqtt_dns_names)
            .unwrap_or_else(|| vec!["localhost".into()]);
        let mqtt_dns_names: Vec<String> = mqtt_dns_names
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if mqtt_dns_names.is_empty() {
            return Err(ConfigError::Invalid(
                "mqtt_dns_names must name at least one host".into(),
            ));
        }
        let cert_validity_days = args.cert_validity_days.or(file.cert_validity_days).unwrap_or(365);
        if !(1..=36500).contains(&cert_validity_days) {
            return Err(ConfigError::Invalid(
                "cert_validity_days must be between 1 and 36500".into(),
            ));
        }
        let max_body_bytes = args.max_body_bytes.or(file.max_body_bytes).unwrap_or(64 * 1024);
        if max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_body_bytes must be at least 1024".into(),
            ));
        }
        let mqtt_plain_addr = args.mqtt_plain_addr.or(file.mqtt_plain_addr);
        if mqtt_plain_addr.is_some_and(|a| !a.ip().is_loopback()) {
            return Err(ConfigError::Invalid(
                "mqtt_plain_addr must be a loopback address: plain MQTT is for development only".into(),
            ));
        }
        let mut mqtt = crate::mqtt::MqttSettings::default();
        if let Some(n) = args.mqtt_max_connections.or(file.mqtt_max_connections) {
            mqtt.max_connections = n.max(1);
        }
        if let Some(n) = args.mqtt_max_packet_bytes.or(file.mqtt_max_packet_bytes) {
            if !(128..=256 * 1024 * 1024).contains(&n) {
                return Err(ConfigError::Invalid(
                    "mqtt_max_packet_bytes must be between 128 and 268435456".into(),
                ));
            }
            mqtt.max_packet_bytes = n;
        }
        if let Some(secs) = args.mqtt_session_expiry_secs.or(file.mqtt_session_expiry_secs) {
            mqtt.session_expiry = std::time::Duration::from_secs(u64::from(secs));
        }
        if let Some(secs) = args.mqtt_write_timeout_secs.or(file.mqtt_write_timeout_secs) {
            if secs == 0 {
                return Err(ConfigError::Invalid(
                    "mqtt_write_timeout_secs must be at least 1".into(),
                ));
            }
            mqtt.write_timeout = std::time::Duration::from_secs(u64::from(secs));
        }
        let mut shadow_limits = crate::shadow::request::Limits::default();
        if let Some(n) = args.shadow_max_state_bytes.or(file.shadow_max_state_bytes) {
            if n < 8 * 1024 {
                return Err(ConfigError::Invalid(
                    "shadow_max_state_bytes must be at least 8192 (AWS's limit)".into(),
                ));
            }
            shadow_limits.max_state_bytes = n;
        }
        if let Some(n) = args.shadow_max_depth.or(file.shadow_max_depth) {
            if !(6..=64).contains(&n) {
                return Err(ConfigError::Invalid(
                    "shadow_max_depth must be between 6 and 64".into(),
                ));
            }
            shadow_limits.max_depth = n;
        }
        if let Some(n) = args.shadow_max_client_token.or(file.shadow_max_client_token) {
            if !(64..=1024).contains(&n) {
                return Err(ConfigError::Invalid(
                    "shadow_max_client_token must be between 64 and 1024".into(),
                ));
            }
            shadow_limits.max_client_token = n;
        }
        Ok(Self {
            shadow_limits,
            mqtt_plain_addr,
            mqtt,
            data_dir,
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| ([127, 0, 0, 1], 8080).into()),
            mqtts_addr: args
                .mqtts_addr
                .or(file.mqtts_addr)
                .unwrap_or_else(|| ([127, 0, 0, 1], 8883).into()),
            database_url,
            redis_url: args.redis_url.or(file.redis_url),
            redis_prefix: args
                .redis_prefix
                .or(file.redis_prefix)
                .unwrap_or_else(|| "antumbra:".into()),
            admin_token: args.admin_token.or(file.admin_token),
            mqtt_dns_names,
            ca,
            cert_validity_days,
            max_body_bytes,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            shutdown_timeout_secs: args
                .shutdown_timeout_secs
                .or(file.shutdown_timeout_secs)
                .unwrap_or(30),
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml: &str) -> FileConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn defaults_follow_the_operator_contract() {
        let s = Settings::layer(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.mqtts_addr.to_string(), "127.0.0.1:8883");
        assert_eq!(s.database_url, "sqlite://./data/antumbra.db?mode=rwc");
        assert_eq!(s.redis_url, None);
        assert_eq!(s.mqtt_dns_names, vec!["localhost"]);
    }

    #[test]
    fn file_fills_what_flags_and_env_did_not_give() {
        let f =
            file("data_dir = \"/srv/a\"\nhttp_addr = \"0.0.0.0:9000\"\nmqtt_dns_names = [\"mqtt.example\"]");
        let args = ServeArgs {
            http_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let s = Settings::layer(args, f).unwrap();
        assert_eq!(
            s.http_addr.to_string(),
            "127.0.0.1:0",
            "flag/env wins over the file"
        );
        assert_eq!(s.data_dir, PathBuf::from("/srv/a"), "file wins over the default");
        assert_eq!(s.database_url, "sqlite:///srv/a/antumbra.db?mode=rwc");
        assert_eq!(s.mqtt_dns_names, vec!["mqtt.example"]);
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("htp_addr = \"x\"").is_err());
        let bad_db = ServeArgs {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        };
        assert!(Settings::layer(bad_db, FileConfig::default()).is_err());
        let half_ca = file("ca_cert = \"/a.crt\"");
        assert!(Settings::layer(ServeArgs::default(), half_ca).is_err());
        let public_plain = file("mqtt_plain_addr = \"0.0.0.0:1883\"");
        assert!(
            Settings::layer(ServeArgs::default(), public_plain).is_err(),
            "plain MQTT binds loopback only"
        );
        let no_write_timeout = file("mqtt_write_timeout_secs = 0");
        assert!(Settings::layer(ServeArgs::default(), no_write_timeout).is_err());
        let write_timeout = file("mqtt_write_timeout_secs = 5");
        let settings = Settings::layer(ServeArgs::default(), write_timeout).unwrap();
        assert_eq!(settings.mqtt.write_timeout, std::time::Duration::from_secs(5));
    }

    #[test]
    fn env_and_flags_are_read_by_clap_with_flags_winning() {
        // clap's env support is exercised through the parser, not by mutating this process's environment.
        let cli = Cli::try_parse_from([
            "antumbra",
            "serve",
            "--http",
            "127.0.0.1:0",
            "--mqtt-dns-names",
            "a,b",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command() else {
            panic!("serve expected")
        };
        let s = Settings::layer(*args, FileConfig::default()).unwrap();
        assert_eq!(s.http_addr.port(), 0);
        assert_eq!(s.mqtt_dns_names, vec!["a", "b"]);
    }

    #[test]
    fn without_a_subcommand_the_flags_are_serves() {
        let cli = Cli::try_parse_from(["antumbra", "--http", "127.0.0.1:0", "--data-dir", "/tmp/x"]).unwrap();
        let Command::Serve(args) = cli.command() else {
            panic!("serve expected")
        };
        let s = Settings::layer(*args, FileConfig::default()).unwrap();
        assert_eq!(s.http_addr.port(), 0);
        assert_eq!(s.data_dir, std::path::Path::new("/tmp/x"));
        // A subcommand's own flags still go with it, and `serve`'s flags are not taken before another one.
        assert!(Cli::try_parse_from(["antumbra", "--http", "127.0.0.1:0", "openapi"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["antumbra", "openapi"]).unwrap().command(),
            Command::Openapi { out: None }
        ));
    }

    #[test]
    fn listen_addresses_take_host_names_and_refuse_nonsense() {
        let cli =
            Cli::try_parse_from(["antumbra", "--http", "localhost:8081", "--mqtts", "[::1]:0"]).unwrap();
        let Command::Serve(args) = cli.command() else {
            panic!("serve expected")
        };
        let s = Settings::layer(*args, FileConfig::default()).unwrap();
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(s.mqtts_addr.to_string(), "[::1]:0");
        let f = file("http_addr = \"localhost:9000\"\nmqtt_plain_addr = \"127.0.0.1:1883\"");
        let s = Settings::layer(ServeArgs::default(), f).unwrap();
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(
            s.mqtt_plain_addr.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:1883")
        );
        for bad in ["localhost", "8080", "localhost:http-ish", ":8080"] {
            assert!(listen_addr(bad).is_err(), "{bad}");
            assert!(Cli::try_parse_from(["antumbra", "--http", bad]).is_err(), "{bad}");
        }
    }
}
