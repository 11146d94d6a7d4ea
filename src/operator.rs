//! Talks to a running `serve` through its admin API, for the operator commands of the CLI.
//!
//! Reads the admin address and bearer token from the same config `serve` runs with; the
//! token is sent only to that address and never printed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "admin.token is not set; the admin API (and so this command) needs it (ROSTER_ADMIN__TOKEN)"
    )]
    NoToken,
    #[error(
        "cannot reach roster's admin API at {url}: {source}; is `roster serve` running with this config?"
    )]
    Unreachable { url: String, source: reqwest::Error },
    #[error("roster answered HTTP {status}: {message}")]
    Refused { status: u16, message: String },
}

/// Where to reach the admin listener: its address, with an unspecified IP made local.
fn admin_base(config: &Config) -> String {
    let mut addr: SocketAddr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    format!("http://{addr}")
}

async fn post(config: &Config, path: &str, body: Value) -> Result<Value, OperatorError> {
    let token = config.admin.token.as_ref().ok_or(OperatorError::NoToken)?;
    let url = format!("{}{path}", admin_base(config));
    let unreachable = |source| OperatorError::Unreachable {
        url: url.clone(),
        source,
    };
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a TLS backend is compiled in")
        .post(&url)
        .bearer_auth(token.expose())
        .json(&body)
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let message = body["error"]
            .as_str()
            .unwrap_or("no reason given")
            .to_owned();
        return Err(OperatorError::Refused { status, message });
    }
    Ok(body)
}

/// Asks the running consumer to re-consume `partition` from `offset`; returns its answer
/// (`{topic, partition, offset}`).
pub async fn replay(config: &Config, partition: i32, offset: i64) -> Result<Value, OperatorError> {
    post(
        config,
        "/admin/v1/replay",
        serde_json::json!({ "partition": partition, "offset": offset }),
    )
    .await
}
