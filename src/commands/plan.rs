//! Shows what a sync would do, doing none of it: reads the source, the homeserver (aliases
//! and joined members) and roster's store, and runs the same planner `serve` runs.
//!
//! Only reads: it never registers, creates, invites, joins or writes the store.

use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::matrix::MatrixError;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::model::agents::{Action, Agent, AgentBook, PlanInput, RoomRecord, plan_agent};
use crate::reconcile::agents::{avatar_for, read_joined, required_members};
use crate::sources::{AgentSource, SourceError};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no agent source: set agents.letta_url or agents.file")]
    NoSource,
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Registration(#[from] crate::registration::RegistrationError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Homeserver(#[from] MatrixError),
}

#[derive(Debug, Serialize)]
pub struct AgentPlan {
    pub agent_id: String,
    pub name: String,
    pub room: Option<String>,
    pub actions: Vec<Action>,
    /// Members roster would not touch (banned).
    pub blocked: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct DryRun {
    pub space_exists: bool,
    pub agents: Vec<AgentPlan>,
    /// Agents the store knows that the source no longer lists (removed after the grace).
    pub absent: Vec<String>,
    pub homeserver_reads: u64,
}

pub async fn dry_run(config: &Config) -> Result<DryRun, PlanError> {
    let source = AgentSource::from_config(&config.agents, Arc::new(Metrics::new()))?
        .ok_or(PlanError::NoSource)?;
    let listing = source.list().await?;
    let (hs, metrics) = super::homeserver(config)?;
    let ids = config.ids();
    let required = required_members(ids);
    let records: Vec<RoomRecord> = if config.store.path.exists() {
        Store::open_read_only(&config.store.path)?.room_records()?
    } else {
        Vec::new()
    };
    let space = hs.resolve_alias(&ids.space_alias).await?;
    let mut model = Model::new();
    let mut plans = Vec::new();
    // As in `serve`: an agent whose id makes the user and alias another agent holds is
    // left out, never planned into that agent's room.
    let mut book = AgentBook::default();
    for record in &records {
        book.restore(record.clone());
    }
    let (listed, left_out) = book.without_taken_localparts(listing.agents.clone());
    for (agent, holder) in left_out {
        plans.push(AgentPlan {
            blocked: vec![format!(
                "its user and room: agent {holder} holds them (the two ids make the same \
                 Matrix user and alias); give one of them another id"
            )],
            agent_id: agent.id,
            name: agent.name,
            room: None,
            actions: Vec::new(),
        });
    }
    for agent in &listed {
        let localpart = match ids.agent_localpart(&agent.id) {
            Ok(localpart) => localpart,
            Err(error) => {
                tracing::warn!(%error, "skipping agent");
                continue;
            }
        };
        // The name as `serve` keeps it: cut to what a homeserver takes.
        let agent = &Agent {
            name: crate::ids::display_name(&agent.name).into_owned(),
            ..agent.clone()
        };
        let agent_user = ids.agent_user(&localpart);
        let mut record = records
            .iter()
            .find(|r| r.agent_id == agent.id)
            .cloned()
            .unwrap_or_else(|| RoomRecord {
                agent_id: agent.id.clone(),
                localpart: localpart.clone(),
                ..RoomRecord::default()
            });
        // The alias decides, as in `serve`: a stale record does not.
        record.room_id = hs.resolve_alias(&ids.agent_alias(&localpart)).await?;
        if let Some(room) = &record.room_id {
            let joined = match read_joined(&hs, room, &agent_user, &ids.bot).await {
                Ok(joined) => joined,
                // One room roster is locked out of is that agent's news, not the end of
                // the plan: serve reports it and goes on with the others as well.
                Err(error) if error.is_forbidden() || error.is_not_found() => {
                    plans.push(AgentPlan {
                        agent_id: agent.id.clone(),
                        name: agent.name.clone(),
                        room: Some(room.to_string()),
                        actions: Vec::new(),
                        blocked: vec![format!(
                            "room {room} ({}): neither {agent_user} nor {} can read it ({error})",
                            ids.agent_alias(&localpart),
                            ids.bot
                        )],
                    });
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let changes = model.observe_joined(room, &joined, model.last_seq());
            model.commit(changes);
        }
        let avatar = avatar_for(&config.agents.avatar, agent);
        let plan = plan_agent(&PlanInput {
            agent,
            agent_user: &agent_user,
            bot: &ids.bot,
            record: &record,
            required: &required,
            space: space.as_deref(),
            avatar: avatar.as_ref(),
            model: &model,
        });
        plans.push(AgentPlan {
            agent_id: agent.id.clone(),
            name: agent.name.clone(),
            room: record.room_id.as_ref().map(ToString::to_string),
            actions: plan.actions,
            blocked: plan
                .blocked
                .iter()
                .map(|(u, why)| format!("{u} ({why})"))
                .collect(),
        });
    }
    let absent = records
        .iter()
        .filter(|r| !r.retired && !listing.agents.iter().any(|a| a.id == r.agent_id))
        .map(|r| r.agent_id.clone())
        .collect();
    Ok(DryRun {
        space_exists: space.is_some(),
        agents: plans,
        absent,
        homeserver_reads: metrics.homeserver_requests_sent(),
    })
}

/// The plan as an operator reads it: one line per action.
pub fn render(plan: &DryRun) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration;
    use crate::testing::{FakeHomeserver, Room};

    /// A config for the agents file `agents.yaml`, the store and the registrations in
    /// `dir`, against the homeserver at `url`.
    fn config_in(dir: &std::path::Path, url: &str) -> Config {
        Config::from_yaml(&format!(
            "homeserver: {{server_name: ex.org, url: '{url}'}}\nappservice: {{registration: {}}}\nstore: {{path: {}}}\nagents: {{file: {}, avatar: none}}",
            dir.join("registration.yaml").display(),
            dir.join("roster.db").display(),
            dir.join("agents.yaml").display()
        ))
        .unwrap()
    }

    /// Writes the registration pair into `dir`; the config (homeserver not yet known) too.
    fn with_registrations(dir: &std::path::Path) -> (Config, registration::Registrations) {
        let config = config_in(dir, "http://127.0.0.1:8008");
        let pair = registration::generate(&config).unwrap();
        registration::write_pair(
            &config.appservice.registration,
            &config.appservice.acting_registration_path(),
            &pair,
            false,
        )
        .unwrap();
        (config, pair)
    }

    /// A room its alias names but that neither the agent nor the bot can read (both were
    /// kicked, say) is shown for that agent; the plan of every other agent still comes.
    #[tokio::test]
    async fn should_plan_the_other_agents_when_one_room_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents.yaml");
        std::fs::write(
            &agents,
            "- {id: agent-a, name: Alpha}\n- {id: agent-b, name: Beta}\n",
        )
        .unwrap();
        let (_, pair) = with_registrations(dir.path());
        let hs = FakeHomeserver::start(&pair.pushed.as_token, "ex.org", "letta").await;
        {
            let mut world = hs.world();
            world.rooms.insert("!locked:ex.org".into(), Room::default());
            world
                .aliases
                .insert("#agent_a:ex.org".into(), "!locked:ex.org".into());
        }
        let config = config_in(dir.path(), &hs.url);

        let plan = dry_run(&config)
            .await
            .expect("one unreadable room does not hide the plan of the others");
        let alpha = plan
            .agents
            .iter()
            .find(|a| a.agent_id == "agent-a")
            .unwrap();
        assert_eq!(alpha.room.as_deref(), Some("!locked:ex.org"));
        assert!(alpha.actions.is_empty(), "{:?}", alpha.actions);
        assert!(
            alpha
                .blocked
                .iter()
                .any(|b| b.contains("!locked:ex.org") && b.contains("can read it")),
            "{:?}",
            alpha.blocked
        );
        let beta = plan
            .agents
            .iter()
            .find(|a| a.agent_id == "agent-b")
            .unwrap();
        assert!(
            beta.actions
                .iter()
                .any(|a| matches!(a, Action::EnsureRoom { .. })),
            "{:?}",
            beta.actions
        );
        assert!(
            render(&plan).contains("agent-a: will not touch room !locked:ex.org"),
            "{}",
            render(&plan)
        );
        assert_eq!(hs.world().count("/register"), 0, "a dry run writes nothing");
    }

    /// An agent whose id makes the user another agent's record holds (`1` and `agent-1`
    /// both make `@agent_1`) is shown as left out, as `serve` leaves it out: no plan that
    /// would rename the holder's user and room.
    #[tokio::test]
    async fn should_show_an_agent_whose_id_makes_another_agents_user_as_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents.yaml");
        std::fs::write(&agents, "- {id: '1', name: Twin}\n").unwrap();
        let (first, pair) = with_registrations(dir.path());
        Store::open(&first.store.path)
            .unwrap()
            .save_room_records(&[RoomRecord {
                agent_id: "agent-1".into(),
                localpart: "agent_1".into(),
                name: "One".into(),
                room_id: Some(ruma::owned_room_id!("!one:ex.org")),
                ..RoomRecord::default()
            }])
            .unwrap();
        let hs = FakeHomeserver::start(&pair.pushed.as_token, "ex.org", "letta").await;
        let plan = dry_run(&config_in(dir.path(), &hs.url)).await.unwrap();
        let twin = plan.agents.iter().find(|a| a.agent_id == "1").unwrap();
        assert!(twin.actions.is_empty(), "{:?}", twin.actions);
        assert!(
            render(&plan).contains("1: will not touch its user and room: agent agent-1 holds them"),
            "{}",
            render(&plan)
        );
        assert_eq!(plan.absent, ["agent-1"], "the holder is not listed");
    }
}
