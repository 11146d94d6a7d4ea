//! HTTP plumbing both listeners share: how they are served (bounded), Matrix JSON errors
//! for every refusal, and bearer tokens read the same way.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use axum::body::to_bytes;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ruma::api::error::{ErrorKind, StandardErrorBody};

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client that has not sent a request's headers within this is disconnected (an
    /// idle keep-alive connection too): a slow or silent client cannot hold a connection.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        header_read_timeout: Duration::from_secs(30),
        max_connections: 256,
    };
}

/// How long open connections get to finish their requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` (HTTP/1.1) until `shutdown`, then lets open requests finish
/// for a few seconds. Unlike `axum::serve`, bounded by `limits`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = http1.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away or sends garbage ends only its own connection.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    Ok(())
}

/// Errors of one incoming connection (not of the listener): skip it.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// A Matrix error response: `{"errcode": ..., "error": ...}` with `status`.
pub fn matrix_error(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Response {
    Rejection::new(status, kind, message).into_response()
}

/// A refused request, kept small until it becomes a response.
pub struct Rejection(Box<(StatusCode, StandardErrorBody)>);

impl Rejection {
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Rejection {
        Rejection(Box::new((
            status,
            StandardErrorBody::new(kind, message.into()),
        )))
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, body) = *self.0;
        (status, axum::Json(body)).into_response()
    }
}

/// Turns any error answer that is not JSON (axum's own rejections: a bad path, a wrong
/// method) into a Matrix JSON error, so every listener speaks one error format.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let text = to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let kind = match status {
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => ErrorKind::Unrecognized,
        StatusCode::UNAUTHORIZED => ErrorKind::MissingToken,
        StatusCode::FORBIDDEN => ErrorKind::Forbidden,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorKind::BadJson,
        _ => ErrorKind::Unknown,
    };
    matrix_error(status, kind, message)
}

/// The token of an `Authorization: Bearer` header; the scheme is case-insensitive.
pub fn bearer_token(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[test]
    fn should_read_the_bearer_scheme_case_insensitively() {
        for header in ["Bearer tok", "bearer tok", "BEARER  tok "] {
            let request = Request::builder()
                .header(header::AUTHORIZATION, header)
                .body(Body::empty())
                .unwrap();
            assert_eq!(bearer_token(&request), Some("tok"), "{header:?}");
        }
        for header in ["Basic tok", "Bearer", "tok"] {
            let request = Request::builder()
                .header(header::AUTHORIZATION, header)
                .body(Body::empty())
                .unwrap();
            assert_eq!(bearer_token(&request), None, "{header:?}");
        }
    }

    #[tokio::test]
    async fn should_turn_plain_error_answers_into_matrix_errors() {
        let plain = (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
        let answer = json_errors(plain).await;
        assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body = to_bytes(answer.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errcode"], "M_UNRECOGNIZED");
        assert_eq!(body["error"], "Method Not Allowed");
        let ok = json_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }

    /// A silent client holding the only connection slot is dropped once its headers are
    /// late, and the client waiting behind it is served. Without the timeout the second
    /// client would wait forever.
    #[tokio::test]
    async fn should_drop_a_silent_client_and_serve_the_one_behind_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok\n" }));
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 1,
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router, limits, shutdown.clone()));

        let mut silent = TcpStream::connect(at).await.unwrap();
        silent.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        let mut waiting = TcpStream::connect(at).await.unwrap();
        waiting
            .write_all(b"GET /health HTTP/1.1\r\nHost: roster\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(60), waiting.read_to_string(&mut answer))
            .await
            .expect("the waiting client is served once the silent one is dropped")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), silent.read_to_end(&mut rest))
            .await
            .expect("the silent client is disconnected");
        // Closed (a 408 first, or not) or reset: either way never answered 200.
        if read.is_ok() {
            assert!(
                !String::from_utf8_lossy(&rest).contains(" 200 "),
                "{rest:?}"
            );
        }

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), server)
            .await
            .expect("serve returns at shutdown")
            .unwrap()
            .unwrap();
    }
}
