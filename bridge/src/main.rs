//! `zgate-bridge`: zgate gateways (ZeroMQ ROUTER, CURVE + ZAP allow list, protocol v1) into a
//! NATS JetStream cluster, and commands back by request-reply. See docs/fleet.md.
//!
//! Two threads: the ROUTER thread (a calloop loop owning every libzmq socket, and every
//! gateway's delivery state) and the NATS side (tokio, async-nats). They talk over bounded
//! channels only.

mod config;
mod flow;
mod gateways;
mod kv;
mod messages;
mod nats;
mod router_loop;
mod subject;

use clap::{Parser, Subcommand};
use config::BridgeConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "zgate-bridge",
    version,
    about = "zgate gateways into a NATS JetStream cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the bridge.
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Checks a config file and exits (0: valid).
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Prints a commented config.
    ConfigTemplate,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().cmd {
        Cmd::ConfigTemplate => {
            print!("{}", config::TEMPLATE);
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig { file } => match BridgeConfig::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run { config } => {
            let cfg = match BridgeConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(cfg: BridgeConfig) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let (secret_key, allow_dir) = cfg.curve().unzip();
    let opts = zgate::backend::RouterOptions {
        bind: cfg.bridge.bind.clone(),
        secret_key,
        allow_dir,
        curve_hint: "set secret_key_file and allow_dir in [bridge]".into(),
    };
    // Bound here, before anything else starts: a bad key or a taken port fails at once.
    let router = zgate::backend::Router::new(&ctx, &opts, "bridge")?;
    log::info!(
        "bridge id={} bind={} curve={}",
        cfg.bridge.id,
        cfg.bridge.bind,
        router.curve()
    );
    let (to_nats, from_router) = tokio::sync::mpsc::channel(nats::TO_NATS_CAPACITY);
    let (to_router, from_nats) = calloop::channel::sync_channel(nats::TO_ROUTER_CAPACITY);
    let gw = gateways::Gateways::new(router, to_nats, cfg.bridge.max_inflight, &cfg.bridge.id);
    // One thread for the NATS side: async-nats drives one connection from one task, and a
    // single-threaded runtime spends nothing on moving tasks between workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nats_cfg = cfg.clone();
    std::thread::Builder::new()
        .name("nats".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                let nats = async move {
                    let client = match nats::connect(&nats_cfg).await {
                        Ok(c) => c,
                        Err(e) => {
                            log::error!("NATS: {e}");
                            std::process::exit(1);
                        }
                    };
                    log::info!("NATS connected servers={:?}", nats_cfg.nats.servers);
                    nats::run(nats_cfg, client, from_router, to_router).await;
                };
                let stop = async {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                };
                tokio::select! {
                    // Returns when the ROUTER thread is gone; main reports why.
                    _ = nats => {}
                    _ = stop => {
                        log::info!("stopping");
                        std::process::exit(0);
                    }
                }
            })
        })?;
    let zmq_thread = std::thread::Builder::new()
        .name("router".into())
        .spawn(move || router_loop::run(gw, from_nats))?;
    zmq_thread
        .join()
        .map_err(|_| anyhow::anyhow!("ROUTER thread panicked"))??;
    drop(ctx);
    Ok(())
}
