//! The bridge's config file (`bridge.toml`): `[bridge]` and `[nats]`, exact keys, every error
//! naming file, line and key (the same error type as the gateway's config).

use serde::Deserialize;
use std::path::{Path, PathBuf};
use zgate::config::{line_of_key, parse_toml, read_config_file, ConfigError};

/// The commented template `zgate-bridge config-template` prints.
pub const TEMPLATE: &str = include_str!("bridge_template.toml");

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// `[bridge]`: this process and its ROUTER.
    pub bridge: BridgeSection,
    /// `[nats]`: the cluster, the stream.
    #[serde(default)]
    pub nats: NatsSection,
}

/// `[bridge]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    /// Unique per bridge process (the `bridge` field of the key-value bucket).
    pub id: String,
    /// The ROUTER endpoint gateways connect to.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// CURVE server secret key; "" for none (then `allow_dir` must be "" too).
    #[serde(default)]
    pub secret_key_file: String,
    /// Directory of `<gateway-id>.pub` files allowed to connect; "" for none.
    #[serde(default)]
    pub allow_dir: String,
    /// Plaintext on a non-loopback bind is refused unless this is true.
    #[serde(default)]
    pub insecure: bool,
    /// Per gateway: readings published but not yet confirmed by JetStream.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
}

/// `[nats]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// Server URLs of the cluster (the client fails over between them).
    #[serde(default = "default_servers")]
    pub servers: Vec<String>,
    /// NATS credentials file; "" for none.
    #[serde(default)]
    pub creds_file: String,
    /// The JetStream stream name.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Replicas the stream (and the key-value bucket) is created with when missing.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// The stream's de-duplication window, seconds.
    #[serde(default = "default_duplicate_window_s")]
    pub duplicate_window_s: u64,
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            servers: default_servers(),
            creds_file: String::new(),
            stream: default_stream(),
            replicas: default_replicas(),
            duplicate_window_s: default_duplicate_window_s(),
        }
    }
}

fn default_bind() -> String {
    "tcp://0.0.0.0:5555".into()
}
fn default_max_inflight() -> usize {
    1024
}
fn default_servers() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".into()]
}
fn default_stream() -> String {
    "ZGATE".into()
}
fn default_replicas() -> usize {
    3
}
fn default_duplicate_window_s() -> u64 {
    3600
}

/// Largest accepted `max_inflight` (per gateway).
pub const MAX_INFLIGHT_LIMIT: usize = 65_536;

impl BridgeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<BridgeConfig, ConfigError> {
        let (file, text) = read_config_file(path)?;
        BridgeConfig::parse(&text, &file)
    }

    /// Parses and validates config text; `file` is the name used in errors.
    pub fn parse(text: &str, file: &str) -> Result<BridgeConfig, ConfigError> {
        let cfg: BridgeConfig = parse_toml(text, file)?;
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let err = |section: &str, key: &str, message: String| ConfigError {
            file: file.to_string(),
            line: line_of_key(text, section, key),
            key: format!("{section}.{key}"),
            message,
        };
        let b = &self.bridge;
        if b.id.is_empty() || !b.id.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(err(
                "bridge",
                "id",
                "must be non-empty printable ASCII without spaces".into(),
            ));
        }
        if b.bind.is_empty() {
            return Err(err(
                "bridge",
                "bind",
                "must be a ZeroMQ endpoint, e.g. tcp://0.0.0.0:5555".into(),
            ));
        }
        match (b.secret_key_file.is_empty(), b.allow_dir.is_empty()) {
            (true, false) => {
                return Err(err(
                    "bridge",
                    "allow_dir",
                    "set secret_key_file too (the CURVE server key, from zgate keygen)".into(),
                ))
            }
            (false, true) => {
                return Err(err(
                    "bridge",
                    "secret_key_file",
                    "set allow_dir too (the directory of <gateway-id>.pub files)".into(),
                ))
            }
            (true, true) if !b.insecure && !zgate::security::endpoint_is_local(&b.bind) => {
                return Err(err(
                    "bridge",
                    "bind",
                    format!(
                        "{} is not loopback and CURVE is off: set secret_key_file and allow_dir, \
                     or insecure = true to accept plaintext (see {})",
                        b.bind,
                        zgate::security::SECURITY_DOC
                    ),
                ));
            }
            _ => {}
        }
        if b.max_inflight == 0 || b.max_inflight > MAX_INFLIGHT_LIMIT {
            return Err(err(
                "bridge",
                "max_inflight",
                format!("must be 1..={MAX_INFLIGHT_LIMIT}"),
            ));
        }
        let n = &self.nats;
        if n.servers.is_empty() || n.servers.iter().any(|s| s.trim().is_empty()) {
            return Err(err(
                "nats",
                "servers",
                "must list at least one server URL".into(),
            ));
        }
        let stream_ok = !n.stream.is_empty()
            && n.stream
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        if !stream_ok {
            return Err(err(
                "nats",
                "stream",
                "must be letters, digits, '_' or '-'".into(),
            ));
        }
        if !(1..=5).contains(&n.replicas) {
            return Err(err(
                "nats",
                "replicas",
                "must be 1..=5 (JetStream's limit)".into(),
            ));
        }
        if n.duplicate_window_s == 0 {
            return Err(err(
                "nats",
                "duplicate_window_s",
                "must be at least 1 second".into(),
            ));
        }
        Ok(())
    }

    /// The CURVE key file and allow list, when CURVE is on.
    pub fn curve(&self) -> Option<(PathBuf, PathBuf)> {
        let b = &self.bridge;
        (!b.secret_key_file.is_empty()).then(|| {
            (
                PathBuf::from(&b.secret_key_file),
                PathBuf::from(&b.allow_dir),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses() {
        let c = BridgeConfig::parse(TEMPLATE, "t.toml").unwrap();
        assert_eq!(c.bridge.id, "bridge-1");
        assert_eq!(c.bridge.max_inflight, 1024);
        assert_eq!(c.nats.stream, "ZGATE");
        assert_eq!(c.nats.replicas, 3);
        assert_eq!(c.nats.duplicate_window_s, 3600);
        assert!(c.curve().is_some());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text =
            "[bridge]\nid = \"b\"\nbind = \"tcp://127.0.0.1:5555\"\n\n[nats]\nstreem = \"X\"\n";
        let e = BridgeConfig::parse(text, "b.toml").unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.key.as_str()),
            ("b.toml", 6, "nats.streem")
        );
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn plaintext_on_a_public_bind_needs_insecure() {
        let text = "[bridge]\nid = \"b\"\nbind = \"tcp://0.0.0.0:5555\"\n";
        let e = BridgeConfig::parse(text, "b.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "bridge.bind"));
        let ok = format!("{text}insecure = true\n");
        assert!(BridgeConfig::parse(&ok, "b.toml").is_ok());
        let local = "[bridge]\nid = \"b\"\nbind = \"tcp://127.0.0.1:5555\"\n";
        assert!(BridgeConfig::parse(local, "b.toml")
            .unwrap()
            .curve()
            .is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = "[bridge]\nid = \"b\"\nbind = \"tcp://127.0.0.1:1\"\n";
        for (extra, key) in [
            ("max_inflight = 0\n", "bridge.max_inflight"),
            ("secret_key_file = \"k\"\n", "bridge.secret_key_file"),
            ("allow_dir = \"d\"\n", "bridge.allow_dir"),
            ("[nats]\nreplicas = 7\n", "nats.replicas"),
            ("[nats]\nstream = \"A.B\"\n", "nats.stream"),
            ("[nats]\nservers = []\n", "nats.servers"),
            (
                "[nats]\nduplicate_window_s = 0\n",
                "nats.duplicate_window_s",
            ),
        ] {
            let e = BridgeConfig::parse(&format!("{base}{extra}"), "b.toml").unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
            assert!(e.line >= 3, "{extra}: {e}");
        }
    }
}
