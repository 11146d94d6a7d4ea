//! The `roster` command line: parses arguments, loads the config, and calls the library.
//! The one place errors become `anyhow` and a one-line message on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use roster::config::Config;

#[derive(Parser)]
#[command(
    name = "roster",
    version,
    about = "Matrix appservice for Letta agent rooms and identity lifecycle; never logs in"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file (YAML); every key can be overridden as ROSTER_<SECTION>__<KEY>.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appservice: homeserver listener, admin listener, reconciler.
    Serve(ConfigArg),
    /// Write an appservice registration with fresh tokens for the homeserver to load.
    Registration {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write it; defaults to appservice.registration from the config.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace an existing file (the homeserver must then load the new tokens).
        #[arg(long)]
        force: bool,
    },
    /// Ask a running `serve` to re-consume lifecycle events of a partition from an offset.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// The partition of lifecycle.topic.
        #[arg(long)]
        partition: i32,
        /// The first offset to consume again (0 for the beginning).
        #[arg(long)]
        offset: i64,
    },
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let path = arg
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.yaml"));
    Ok(Config::load(&path, arg.config.is_some(), &env)?)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ROSTER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("ROSTER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancels `token` on SIGINT or SIGTERM; a second signal exits at once.
fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("signal received; finishing in-flight work (again to force)");
                token.cancel();
            } else {
                tracing::warn!("second signal; exiting now");
                std::process::exit(130);
            }
        }
    });
}

async fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(arg) => {
            let config = load_config(&arg)?;
            let shutdown = CancellationToken::new();
            shutdown_on_signal(shutdown.clone());
            roster::run(config, shutdown).await?;
        }
        Command::Registration {
            config,
            output,
            force,
        } => {
            let config = load_config(&config)?;
            let path = output.unwrap_or_else(|| config.appservice.registration.clone());
            let registration = roster::registration::generate(&config)?;
            roster::registration::write(&path, &registration, force)?;
            eprintln!(
                "wrote {} (mode 0600); add it to the homeserver's app_service_config_files",
                path.display()
            );
        }
        Command::Replay {
            config,
            partition,
            offset,
        } => {
            let config = load_config(&config)?;
            let answer = roster::operator::replay(&config, partition, offset).await?;
            eprintln!(
                "replaying {} partition {} from offset {}",
                answer["topic"].as_str().unwrap_or(&config.lifecycle.topic),
                answer["partition"],
                answer["offset"]
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_logging();
    match real_main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line: the chain joined, most specific last.
            let chain: Vec<String> = error.chain().map(|e| e.to_string()).collect();
            eprintln!("roster: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}
