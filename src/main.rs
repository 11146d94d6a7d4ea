//! The `roster` command line: parses arguments, loads the config, and calls the library.
//! The one place errors become `anyhow` and a one-line message on stderr.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use roster::admin::Target;
use roster::config::Config;
use roster::operator::AdminClient;

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

/// Where a client command finds the running roster: only the admin URL and token.
#[derive(clap::Args)]
struct AdminArg {
    /// Config file to read `admin.listen` and `admin.token` from (nothing else is read).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The admin API, e.g. http://127.0.0.1:9010 (else ROSTER_ADMIN_URL, else admin.listen).
    /// The token comes from ROSTER_ADMIN__TOKEN or admin.token.
    #[arg(long, value_name = "URL")]
    admin_url: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appservice: homeserver listener, admin listener, reconciler, lifecycle.
    Serve(ConfigArg),
    /// Write the appservice registrations (pushed and acting-only) with fresh tokens.
    Registration {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write the pushed one (the acting one goes beside it, `-acting` before
        /// the extension); defaults to appservice.registration from the config.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace an existing file (the homeserver must then load the new tokens).
        #[arg(long)]
        force: bool,
    },
    /// Ask a running roster for an immediate reconciliation (concurrent requests coalesce).
    Sync {
        #[command(flatten)]
        admin: AdminArg,
        /// Only this agent room (its id or its alias).
        #[arg(long, value_name = "ROOM", conflicts_with = "agent")]
        room: Option<String>,
        /// Only this agent's room.
        #[arg(long, value_name = "AGENT_ID")]
        agent: Option<String>,
        /// Return when the sync finished, printing its summary.
        #[arg(long)]
        wait: bool,
    },
    /// Check the config, the registrations and the files roster uses; start nothing.
    CheckConfig(ConfigArg),
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
        admin: AdminArg,
    },
    /// Ask a running roster to re-consume lifecycle events of a partition from an offset.
    Replay {
        #[command(flatten)]
        admin: AdminArg,
        /// The partition of lifecycle.topic.
        #[arg(long)]
        partition: i32,
        /// The first offset to consume again, within the partition's range.
        #[arg(long)]
        offset: i64,
    },
}

fn environment() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    let path = arg
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.yaml"));
    let env = environment();
    for warning in roster::config::unread_env_vars(&env) {
        tracing::warn!("{warning}");
    }
    Ok(Config::load(&path, arg.config.is_some(), &env)?)
}

fn admin_client(arg: &AdminArg) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::resolve(
        arg.admin_url.clone(),
        arg.config.as_deref(),
        &environment(),
    )?)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ROSTER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into pipes and files.
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (stderr's reader went away: a `| tee` that
        // ended, a restarted collector) is dropped. Reporting it would `eprintln!` to that
        // same stderr, which panics the task that logged, the SIGTERM handler among them.
        .log_internal_errors(false);
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
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                commit = option_env!("ROSTER_COMMIT").unwrap_or("unknown"),
                "roster starting"
            );
            let config = load_config(&arg)?;
            let shutdown = CancellationToken::new();
            shutdown_on_signal(shutdown.clone());
            roster::run(config, shutdown).await?;
            tracing::info!("roster stopped");
        }
        Command::Registration {
            config,
            output,
            force,
        } => {
            if output.as_deref() == Some(std::path::Path::new("-")) {
                anyhow::bail!(
                    "-o takes a file path: registrations hold tokens and are written to files (mode 0600), never to stdout"
                );
            }
            let mut config = load_config(&config)?;
            if let Some(output) = output
                && output != config.appservice.registration
            {
                eprintln!(
                    "warning: -o {} is not appservice.registration ({}), which serve reads: set appservice.registration to it (or ROSTER_APPSERVICE__REGISTRATION)",
                    output.display(),
                    config.appservice.registration.display()
                );
                config.appservice.registration = output;
                config.appservice.acting_registration = None;
            }
            let pushed = config.appservice.registration.clone();
            let acting = config.appservice.acting_registration_path();
            let pair = roster::registration::generate(&config)?;
            roster::registration::write_pair(&pushed, &acting, &pair, force)?;
            eprintln!(
                "wrote {} (pushed) and {} (acting-only, url: null), mode 0600; add both to the homeserver's app_service_config_files",
                pushed.display(),
                acting.display()
            );
        }
        Command::CheckConfig(arg) => {
            let config = load_config(&arg)?;
            let report = roster::commands::check_config::check_all(&config);
            if !report.problems.is_empty() {
                for problem in &report.problems {
                    eprintln!("{problem}");
                }
                anyhow::bail!(
                    "{} problem(s) in the configuration; fix them and run check-config again",
                    report.problems.len()
                );
            }
            println!(
                "ok: the config is valid; roster is registered with {}",
                report.registered_as.unwrap_or("its registration")
            );
        }
        Command::Sync {
            admin,
            room,
            agent,
            wait,
        } => {
            let client = admin_client(&admin)?;
            let target = Target { room, agent, wait };
            match client.sync(&target).await? {
                Some(summary) if admin.json => {
                    println!("{}", serde_json::to_string_pretty(&summary)?)
                }
                Some(summary) => {
                    println!(
                        "sync finished: {}",
                        roster::operator::render_summary(&summary)
                    )
                }
                None => println!("sync requested"),
            }
        }
        Command::Plan { config, json } => {
            let config = load_config(&config)?;
            let plan = roster::commands::plan::dry_run(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", roster::commands::plan::render(&plan));
            }
        }
        Command::Adopt {
            config,
            legacy_mappings,
        } => {
            let config = load_config(&config)?;
            let report = roster::commands::adopt::adopt(&config, &legacy_mappings).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            // Conflicts need the operator: `serve` would give those agents other rooms.
            if !report.conflicts.is_empty() {
                eprintln!(
                    "adopt: {} mapping(s) not taken over, listed under \"conflicts\" above; \
                     those agents get rooms of their own at the first serve unless you resolve \
                     them first (README: Adopting from the old bot) and run adopt again",
                    report.conflicts.len()
                );
            }
        }
        Command::Status { admin } => {
            let status = admin_client(&admin)?.status().await?;
            if admin.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!(
                    "{}",
                    roster::operator::render_status(&status, roster::clock::now_ms())
                );
            }
        }
        Command::Replay {
            admin,
            partition,
            offset,
        } => {
            let answer = admin_client(&admin)?.replay(partition, offset).await?;
            if admin.json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!(
                    "replaying {} partition {} from offset {}",
                    answer.topic, answer.partition, answer.offset
                );
            }
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
            // One line: the chain joined, most specific last; a cause an error already
            // shows in its own text is not repeated.
            let mut line = String::new();
            for cause in error.chain().map(|e| e.to_string()) {
                if line.contains(&cause) {
                    continue;
                }
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&cause);
            }
            eprintln!("roster: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}
