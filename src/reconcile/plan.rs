//! Shows what a sync would do, doing none of it: reads the source, the homeserver (aliases
//! and joined members) and roster's store, and runs the same planner `serve` runs.
//!
//! Only reads: it never registers, creates, invites, joins or writes the store.

use std::sync::Arc;

use ruma::{RoomAliasId, UserId};
use serde::Serialize;

use super::agents::required_members;
use crate::appservice::now_ms;
use crate::config::{Config, Secret};
use crate::matrix::{Homeserver, MatrixError};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::model::agents::{Action, PlanInput, RoomRecord, agent_localpart, plan_agent};
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
    let metrics = Arc::new(Metrics::new());
    let source =
        AgentSource::from_config(&config.agents, metrics.clone())?.ok_or(PlanError::NoSource)?;
    let listing = source.list().await?;
    let registration = crate::registration::read(&config.appservice.registration, config)?;
    let hs = Homeserver::new(
        &config.homeserver.url,
        Secret::new(registration.as_token),
        config.homeserver.request_timeout,
        config.homeserver.max_concurrent_requests,
        metrics.clone(),
    );
    let ids = config
        .identities()
        .expect("a loaded config has valid identities");
    let required = required_members(&ids);
    let records: Vec<RoomRecord> = if config.store.path.exists() {
        Store::open(&config.store.path)?.room_records()?
    } else {
        Vec::new()
    };
    let space_alias = RoomAliasId::parse(format!(
        "#{}:{}",
        config.agents.space_alias, ids.server_name
    ))
    .expect("validated space alias");
    let space = hs.resolve_alias(&space_alias).await?;
    let mut model = Model::new();
    let mut plans = Vec::new();
    for agent in &listing.agents {
        let Some(localpart) = agent_localpart(&agent.id) else {
            continue;
        };
        let agent_user = UserId::parse_with_server_name(localpart.as_str(), &ids.server_name)
            .expect("agent localparts are valid");
        let mut record = records
            .iter()
            .find(|r| r.agent_id == agent.id)
            .cloned()
            .unwrap_or_else(|| RoomRecord {
                agent_id: agent.id.clone(),
                localpart: localpart.clone(),
                ..RoomRecord::default()
            });
        let alias = RoomAliasId::parse(format!("#{localpart}:{}", ids.server_name))
            .expect("agent localparts are valid alias localparts");
        // The alias decides, as in `serve`: a stale record does not.
        record.room_id = hs.resolve_alias(&alias).await?;
        if let Some(room) = &record.room_id {
            let joined = match hs.joined_members(&agent_user, room).await {
                Ok(joined) => joined,
                Err(e) if e.is_forbidden() => hs.joined_members(&ids.bot, room).await?,
                Err(e) => return Err(e.into()),
            };
            let joined: Vec<_> = joined
                .into_iter()
                .map(|(user, m)| (user, m.displayname, m.avatar_url))
                .collect();
            let changes = model.observe_joined(room, &joined, now_ms());
            model.commit(changes);
        }
        let plan = plan_agent(&PlanInput {
            agent,
            agent_user: &agent_user,
            bot: &ids.bot,
            record: &record,
            required: &required,
            space: space.as_deref(),
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
        homeserver_reads: metrics.homeserver_request_total(),
    })
}
