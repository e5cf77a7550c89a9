//! The `zgate` command: a thin binary over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use zgate::backend::{Backend, BackendOptions};
use zgate::config::{Config, TEMPLATE};
use zgate::security;

#[derive(Parser)]
#[command(
    name = "zgate",
    version,
    about = "Field gateway: serial sensors and GPIO to a ZeroMQ backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway in the foreground (logs: RUST_LOG, default info).
    Run {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a configuration file and load every key file it names (exit 0 when valid,
    /// 2 with the file, line and key of the problem otherwise).
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Print a fully commented configuration template.
    ConfigTemplate,
    /// Run the reference backend: prints received messages as JSON lines, acks readings,
    /// sends commands read as JSON lines from stdin.
    Backend {
        /// Endpoint to bind, e.g. tcp://0.0.0.0:5555 or ipc:///tmp/zgate.ipc
        #[arg(long)]
        bind: String,
        /// Do not acknowledge readings (for testing retransmission).
        #[arg(long)]
        no_ack: bool,
        /// CURVE: the backend's secret key file (from `zgate keygen`, mode 0600).
        #[arg(long, requires = "allow")]
        secret_key: Option<PathBuf>,
        /// CURVE: directory of `<gateway-id>.pub` files, the gateways allowed to connect.
        #[arg(long, requires = "secret_key")]
        allow: Option<PathBuf>,
    },
    /// Generate a CURVE key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub (public).
    /// Never overwrites an existing file.
    Keygen {
        /// Path prefix, e.g. /etc/zgate/gateway (writes gateway.key and gateway.pub).
        #[arg(long)]
        out: PathBuf,
        /// The gateway id ([gateway] id): printed as the file name the backend's allow list
        /// needs, `<id>.pub`.
        #[arg(long)]
        id: Option<String>,
        /// Read the gateway id from this configuration file (when --id is not given).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the embedded demo: local backend, simulated sensor and GPIO, and the gateway.
    Demo {
        /// Stop after this many seconds (default: env DEMO_SECONDS, else run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zgate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Run { config } => {
            let cfg = Config::load(&config).map_err(anyhow::Error::new)?;
            zgate::Gateway::run_with_config_file(cfg, config).context("gateway failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { file } => {
            let problem = match Config::load(&file) {
                Ok(cfg) => check_key_files(&cfg)
                    .err()
                    .map(|e| format!("{}: key backend.secret_key_file: {e}", file.display())),
                Err(e) => Some(e.to_string()),
            };
            match problem {
                None => {
                    println!("{}: ok", file.display());
                    Ok(ExitCode::SUCCESS)
                }
                Some(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::ConfigTemplate => {
            print!("{TEMPLATE}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backend {
            bind,
            no_ack,
            secret_key,
            allow,
        } => {
            let ctx = zmq::Context::new();
            let mut backend = Backend::new(
                &ctx,
                BackendOptions {
                    bind: bind.clone(),
                    ack: !no_ack,
                    secret_key,
                    allow_dir: allow,
                },
            )
            .context("cannot start the backend")?;
            log::info!("backend listening bind={bind}");
            backend.run().context("backend failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen { out, id, config } => {
            let id = match (id, config) {
                (Some(id), _) => Some(id),
                (None, Some(config)) => Some(gateway_id_of(&config)?),
                (None, None) => None,
            };
            if let Some(id) = &id {
                anyhow::ensure!(
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic() && b != b'/'),
                    "--id {id:?}: a gateway id is printable ASCII without spaces or '/'"
                );
            }
            let (key, public) = security::keygen(&out).map_err(anyhow::Error::msg)?;
            print!("{}", keygen_report(&key, &public, id.as_deref()));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { seconds } => {
            let seconds = seconds.or_else(|| std::env::var("DEMO_SECONDS").ok()?.parse().ok());
            zgate::demo::run(seconds).context("demo failed")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads every key file the configuration names, as `run` would (so `sudo -u zgate zgate
/// check-config` proves that user can read them).
fn check_key_files(cfg: &Config) -> Result<(), String> {
    if let Some(path) = &cfg.backend.secret_key_file {
        security::require_curve()?;
        security::read_secret_key(path).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `[gateway] id` of a configuration file, without validating the rest of it.
fn gateway_id_of(config: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let value: toml::Value =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", config.display()))?;
    value
        .get("gateway")
        .and_then(|g| g.get("id"))
        .and_then(toml::Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("{} has no [gateway] id", config.display()))
}

/// What `zgate keygen` prints: the two files, the exact name the backend's allow list needs,
/// and, when the packaged service's group exists, how to let the service read the key.
fn keygen_report(key: &std::path::Path, public: &std::path::Path, id: Option<&str>) -> String {
    let mut out = format!(
        "secret key: {} (mode 0600, owner {})\npublic key: {}\n",
        key.display(),
        security::user_name(security::RunAs::current().uid),
        public.display()
    );
    match id {
        Some(id) => {
            out += &format!(
                "backend: give {} to the backend operator, to be saved as {id}.pub in the \
             backend's allow list directory (zgate backend --allow DIR): the file name must \
             be the gateway id\n",
                public.display()
            )
        }
        None => {
            out += &format!(
                "backend: give {} to the backend operator, to be saved as <gateway-id>.pub in \
             the backend's allow list directory (zgate backend --allow DIR), where \
             <gateway-id> is [gateway] id of this gateway (--id ID or --config FILE prints \
             the exact name)\n",
                public.display()
            )
        }
    }
    if security::RunAs::current().uid == 0 && security::group_id("zgate").is_some() {
        let k = key.display();
        out += &format!(
            "service: the zgate service reads the key through its group: \
             chown root:zgate {k} && chmod 0640 {k}\n"
        );
    }
    out
}
