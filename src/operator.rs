//! Talks to a running `serve` through its admin API, for the operator commands of the CLI.
//!
//! Reads the admin address and bearer token from the same config `serve` runs with; the
//! token is sent only to that address and never printed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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

/// `method /admin/v1/{path}` with `body`, bearer `admin.token`; returns the JSON answer.
pub async fn call(
    config: &Config,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, OperatorError> {
    let token = config.admin.token.as_ref().ok_or(OperatorError::NoToken)?;
    let url = format!("{}/admin/v1/{path}", admin_base(config));
    let unreachable = |source| OperatorError::Unreachable {
        url: url.clone(),
        source,
    };
    let mut request = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(token.expose());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(unreachable)?;
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
    call(
        config,
        reqwest::Method::POST,
        "replay",
        Some(serde_json::json!({ "partition": partition, "offset": offset })),
    )
    .await
}
