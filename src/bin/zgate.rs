//! The `zgate` command: a thin binary over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use zgate::backend::{Backend, BackendOptions};
use zgate::config::{Config, TEMPLATE};

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
    /// Validate a configuration file (exit 0 when valid).
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
        /// Path prefix, e.g. /etc/zgate/gw-01 (writes gw-01.key and gw-01.pub).
        #[arg(long)]
        out: PathBuf,
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
        Cmd::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
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
        Cmd::Keygen { out } => {
            let (key, public) = zgate::security::keygen(&out).map_err(anyhow::Error::msg)?;
            println!("secret key: {} (mode 0600)", key.display());
            println!("public key: {}", public.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { seconds } => {
            let seconds = seconds.or_else(|| std::env::var("DEMO_SECONDS").ok()?.parse().ok());
            zgate::demo::run(seconds).context("demo failed")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
