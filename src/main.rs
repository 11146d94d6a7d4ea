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
    /// Ask a running roster for an immediate reconciliation (concurrent requests coalesce).
    Sync {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this agent room.
        #[arg(long, value_name = "ROOM_ID")]
        room: Option<String>,
        /// Only this agent's room.
        #[arg(long, value_name = "AGENT_ID")]
        agent: Option<String>,
        /// Return when the sync finished, printing its summary.
        #[arg(long)]
        wait: bool,
    },
    /// Dry run: read the source and the homeserver, print the actions a sync would take.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take over the rooms the old agent-sync bot made (run before the first serve).
    Adopt {
        #[command(flatten)]
        config: ConfigArg,
        /// The old bot's agent_user_mappings.json.
        #[arg(long, value_name = "FILE")]
        legacy_mappings: PathBuf,
    },
    /// Show a running roster's state: agents, rooms, drift, pending and failed work.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the full status as JSON.
        #[arg(long)]
        json: bool,
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
        Command::Sync {
            config,
            room,
            agent,
            wait,
        } => {
            let config = load_config(&config)?;
            let target = roster::admin::Target { room, agent, wait };
            let answer = roster::operator::call(
                &config,
                reqwest::Method::POST,
                "sync",
                Some(serde_json::to_value(&target)?),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        Command::Plan { config, json } => {
            let config = load_config(&config)?;
            let plan = roster::reconcile::plan::dry_run(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", human_plan(&plan));
            }
        }
        Command::Adopt {
            config,
            legacy_mappings,
        } => {
            let config = load_config(&config)?;
            let report = roster::reconcile::adopt::adopt(&config, &legacy_mappings).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Status { config, json } => {
            let config = load_config(&config)?;
            let status =
                roster::operator::call(&config, reqwest::Method::GET, "status", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", human_status(&status));
            }
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

fn human_plan(plan: &roster::reconcile::plan::DryRun) -> String {
    let mut out = String::new();
    if !plan.space_exists {
        out += "create the agents space\n";
    }
    let mut actions = 0;
    for agent in &plan.agents {
        for action in &agent.actions {
            actions += 1;
            out += &format!(
                "{} ({}): {}\n",
                agent.agent_id,
                agent.name,
                serde_json::to_string(action).unwrap_or_default()
            );
        }
        for blocked in &agent.blocked {
            out += &format!("{}: will not touch {blocked}\n", agent.agent_id);
        }
    }
    for absent in &plan.absent {
        out += &format!("{absent}: absent from the source (removed after agents.removal_grace)\n");
    }
    out += &format!(
        "{} agents, {actions} actions; {} homeserver reads, no writes\n",
        plan.agents.len(),
        plan.homeserver_reads
    );
    out
}

/// A JSON value as an operator reads it: strings without quotes, `-` for nothing.
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A few lines an operator reads at a glance; `--json` has everything.
fn human_status(s: &serde_json::Value) -> String {
    let sync = &s["last_sync"];
    let source = &s["source"];
    let mut out = format!(
        "ready: {}\nagents: {}  rooms: {}  retired: {}\npending: {}  running: {}  failed: {}  blocked: {}\n",
        s["ready"],
        s["agents"],
        s["rooms"],
        s["retired"],
        s["pending"],
        s["running"],
        s["failed"].as_object().map_or(0, |m| m.len()),
        s["blocked"].as_object().map_or(0, |m| m.len()),
    );
    if sync.is_object() {
        out += &format!(
            "last sync: {} ({} ms, {} rooms read, drift {}, {} actions)\n",
            sync["trigger"],
            sync["duration_ms"],
            sync["rooms_read"],
            sync["drift"],
            sync["actions"]
        );
    }
    if source.is_object() {
        out += &format!(
            "source: {} ({} agents; last error: {})\n",
            text(&source["source"]),
            source["agents_listed"],
            text(&source["last_error"])
        );
    }
    out += &format!(
        "cache hit ratio: {}  lifecycle lag: {}\n",
        s["cache_hit_ratio"], s["lifecycle_lag"]
    );
    for (agent, reason) in s["failed"].as_object().into_iter().flatten() {
        out += &format!("failed {agent}: {reason}\n");
    }
    out
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
